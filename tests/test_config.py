import runpy
import sys
import warnings

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rsmatch.config import ConfigError, config_docs, ignored_overrides, load_config, validate

from .conftest import ROOT, tiny_overrides


def test_overrides_win_over_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        "train:\n  lr: 0.1\n  mixed_precision: no\nalgorithm: fixmatch\n", encoding="utf-8"
    )
    cfg = load_config(f, ["train.lr=0.01", "train.weight_decay=1e-3"])
    assert cfg.train.lr == 0.01
    assert cfg.train.weight_decay == 0.001
    assert cfg.train.mixed_precision == "no"  # YAML 1.1 would have read a boolean
    assert cfg.algorithm == "fixmatch"


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.lrr=0.1", "train.lrr"),
        ("train.lr=fast", "train.lr"),
        ("train.steps=1.5", "train.steps"),
        ("data.replace_ratio=1.5", "data.replace_ratio"),
        ("algorithm=mixmatch", "algorithm"),
        ("rsmatch.base=rsmatch", "rsmatch.base"),
        ("train.progress=maybe", "train.progress"),
        ("data.synthetic=3", "data.synthetic"),
        ("train", "train"),
        ("rsmatch.detector_threshold=0", "rsmatch.detector_threshold"),
        ("simmatch.temperature=0", "simmatch.temperature"),
        ("data.unlabeled_per_class=0", "data.unlabeled_per_class"),
        ("rsmatch.queue_length=0", "rsmatch.queue_length"),
        ("train.prefetch=sometimes", "train.prefetch"),
        ("train.compile_mode=fast", "train.compile_mode"),
        ("train.compile_mode=reduce-overhead", "train.compile_mode"),  # without train.compile
    ],
)
def test_bad_values_name_the_key(override, named):
    with pytest.raises(ConfigError, match=rf"^{named}\b"):
        load_config(None, [override])


def test_batch_must_divide_world_size():
    cfg = load_config(None, ["train.batch_size=63"])
    validate(cfg, world_size=1)
    with pytest.raises(ConfigError, match=r"^train.batch_size=63: .*2 processes"):
        validate(cfg, world_size=2)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"train.batch_sise": 8}, "train.batch_sise: unknown key"),
        ({"data.labels_per_class": 30}, "data.labels_per_class=30: class 'cat' has only 30"),
        (
            {"data.replace_ratio": 1.0},
            "data.replace_ratio=1.0: generator 'a' has 12 images of class 'cat', 13 needed",
        ),
        ({"data.real": "/nonexistent/real"}, "/nonexistent/real"),
    ],
)
def test_cli_errors_exit_2_and_write_nothing(sources, tmp_path, extra, message, train_in_process):
    out = tmp_path / "run"
    res = train_in_process(tiny_overrides(sources, out, **extra), tmp_path)
    assert res.returncode == 2, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("rsmatch-train: error: ") and message in last, last
    assert not out.exists()


def test_missing_config_file(tmp_path, train_in_process):
    res = train_in_process(["--config", "nope.yaml"], tmp_path)
    assert res.returncode == 2 and "nope.yaml" in res.stderr


def test_a_config_file_given_without_the_flag_gets_a_hint():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["configs/demo.yaml"])
    assert str(e.value) == (
        "configs/demo.yaml: overrides are key=value, e.g. train.lr=0.01; a config file is "
        "--config configs/demo.yaml"
    )
    with pytest.raises(
        ConfigError, match=r"^trainsteps: overrides are key=value, e.g. train.lr=0.01$"
    ):
        load_config(None, ["trainsteps"])


def test_a_config_folder_is_named_a_folder(tmp_path):
    with pytest.raises(ConfigError, match=f"--config: a folder, not a YAML file '{tmp_path}'"):
        load_config(tmp_path)


def test_config_docs_are_generated_and_current(capsys, monkeypatch):
    docs = config_docs()
    assert "`rsmatch.queue_length`" in docs and "`train.mixed_precision`" in docs
    committed = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert committed == docs, "docs/config.md is stale: python -m rsmatch.config > docs/config.md"
    assert _run_config_module([], capsys, monkeypatch) == (0, committed)
    code, helped = _run_config_module(["--help"], capsys, monkeypatch)
    assert code == 0 and helped.startswith("usage: python -m rsmatch.config")


def _run_config_module(args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """`python -m rsmatch.config ARGS`, run as __main__ in this process (a fresh one spends
    ~10 s importing the algorithms): its exit code and stdout."""
    monkeypatch.setattr(sys, "argv", ["rsmatch.config", *args])
    capsys.readouterr()
    with warnings.catch_warnings():  # runpy notes that the module is imported already
        warnings.simplefilter("ignore", RuntimeWarning)
        try:  # alter_sys: its dataclasses' annotations resolve in the module run as __main__
            runpy.run_module("rsmatch.config", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code
    return code, capsys.readouterr().out


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)


def test_near_miss_keys_suggest_the_key():
    with pytest.raises(ConfigError, match=r"^train.lrr: unknown key; did you mean train.lr\? \("):
        load_config(None, ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"^trian: unknown key; did you mean train\? \("):
        load_config(None, ["trian.lr=0.1"])
    with pytest.raises(ConfigError, match=r"^train.zzz: unknown key \(valid: "):
        load_config(None, ["train.zzz=1"])


def test_yaml_errors_are_one_line_with_file_line_column(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.1\n  steps: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value) == f"{f}:4:1: expected ',' or ']', but got '<stream end>'"
    with pytest.raises(ConfigError, match=r"^train.lr: cannot parse '\[1': expected"):
        load_config(None, ["train.lr=[1"])
    with pytest.raises(ConfigError, match=r"^train.seed: cannot parse '2024-13-45': month"):
        load_config(None, ["train.seed=2024-13-45"])  # a YAML date that is not one


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.seed=-1", "train.seed=-1: must be in [0, 2**32)"),
        ("data.split_seed=4294967296", "data.split_seed=4294967296: must be in [0, 2**32)"),
        ("train.eval_batch_size=0", "train.eval_batch_size=0: must be >= 1"),
        ("model.backbone=wrn28_3", "model.backbone='wrn28_3': not a timm model; did you mean wrn28_8?"),
        ("rsmatch.detector_backbone=resnet19", "rsmatch.detector_backbone='resnet19': not a timm model; did you mean resnet18?"),
        ("model.backbone=qqqqqq", "model.backbone='qqqqqq': not a timm model"),
        ("train.lr=" + "9" * 400, "train.lr: 999"),
        ("data.labels_per_class=0", "data.labels_per_class=0: must be >= 1"),
        ("data.std=[0.2, 0, 0.2]", "data.std=[0.2, 0.0, 0.2]: must be positive"),
        ("data.exclude_above=1.5", "data.exclude_above=1.5: not in [0, 1]"),
        ("model.bn_momentum=1.5", "model.bn_momentum=1.5: not in [0, 1]"),
        ("model.bn_momentum=-0.1", "model.bn_momentum=-0.1: not in [0, 1]"),
        ("train.save_every=0", "train.save_every=0: must be >= 1"),
        ("train.momentum=1", "train.momentum=1.0: not in [0, 1)"),
        ("train.ema_decay=1", "train.ema_decay=1.0: not in [0, 1)"),
        ("ssl.threshold=0", "ssl.threshold=0.0: not in (0, 1]"),
        ("train.progress=1", "train.progress: expected true/false, got 1"),
        ("train.channels_last=1", "train.channels_last: expected str, got 1"),  # not True
        ("train.output_dir=1e3",  # YAML's number; text when quoted (no hint for bool | str keys)
         "train.output_dir: expected text, got the float 1000.0 (quote it to keep it as text)"),
        ("algorithm=true", "algorithm: expected text, got the bool True (quote it to keep it"),
        ("train.steps=true", "train.steps: expected an integer, got True"),
    ],
)  # fmt: skip
def test_early_value_checks(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_quoted_number_is_text():
    assert load_config(None, ["train.output_dir='1e3'"]).train.output_dir == "1e3"


def test_the_ends_of_each_range_load_and_an_integer_is_read_as_a_float():
    cfg = load_config(None, ["ssl.threshold=1", "data.replace_ratio=0", "data.exclude_above=1",
                             "train.momentum=0", "train.ema_decay=0", "train.lr=1"])  # fmt: skip
    assert type(cfg.train.lr) is float and cfg.train.lr == 1.0  # config.yaml says 1.0


def test_the_evaluation_batch_must_split_evenly_across_processes():
    cfg = load_config(None, ["train.eval_batch_size=255"])
    validate(cfg, world_size=1)
    with pytest.raises(ConfigError, match=r"^train.eval_batch_size=255: .*2 processes"):
        validate(cfg, world_size=2)


def test_timm_and_our_backbones_pass():
    cfg = load_config(None, ["model.backbone=resnet18", "rsmatch.detector_backbone=wrn10_1"])
    assert cfg.model.backbone == "resnet18"


# -- property: any override or YAML document loads or fails as one ConfigError line ----------

KEYS = ["algorithm", "train.lr", "train.lrr", "train.steps", "train.seed", "data.split_seed",
        "data.synthetic", "data.synthetic.a", "data.mean", "data.real", "model.backbone",
        "rsmatch.detector_backbone", "rsmatch.queue_length", "train.mixed_precision",
        "train.channels_last", "train.eval_batch_size", "ssl.threshold", "simmatch.temperature",
        "train", "train.lr.x", "", ".", "a..b"]  # fmt: skip

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
    st.sampled_from(["wrn28_2", "resnet18", "fixmatch", "rsmatch", "no", "auto", "1e-3"]),
)  # fmt: skip
documents = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.one_of(st.sampled_from(KEYS + ["lr", "steps", "seed"]), st.text(max_size=6)),
                      inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


def _loads_or_one_line(path, overrides) -> None:
    try:
        load_config(path, overrides)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e), repr(str(e))


@pytest.mark.parametrize("overrides", [["0\n0=None"], ["a\nb"], ["train.\tlr=1"]])
def test_keys_with_control_characters_fail_as_one_line(overrides):
    """Found by the random-override test below: a key holding a newline gave a two-line error."""
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value) and "\t" not in str(e.value)


def test_yaml_key_with_a_newline_is_named_on_one_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text('"0\\n0": 1\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^'0\\n0': unknown key"):
        load_config(f, [])


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.tuples(st.sampled_from(KEYS) | st.text(max_size=10), st.text(max_size=16)
                          | scalars.map(str)), max_size=4))  # fmt: skip
def test_random_overrides_load_or_fail_as_one_line(pairs):
    _loads_or_one_line(None, [f"{k}={v}" for k, v in pairs])


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.one_of(documents.map(lambda d: yaml.safe_dump(d)), st.text(max_size=60)))
def test_random_yaml_documents_load_or_fail_as_one_line(tmp_path, text):
    f = tmp_path / "c.yaml"
    f.write_text(text, encoding="utf-8", errors="surrogatepass")
    _loads_or_one_line(f, [])


@pytest.mark.parametrize(
    "overrides, ignored",
    [
        (["algorithm=fixmatch", "rsmatch.queue_length=4", "ssl.threshold=0.9"], ["rsmatch.queue_length"]),
        (["algorithm=rsmatch", "rsmatch.base=flexmatch", "flexmatch.thresh_warmup=false",
          "freematch.ema_p=0.9"], ["freematch.ema_p"]),
        (["algorithm=rsmatch", "flexmatch.thresh_warmup=false"], ["flexmatch.thresh_warmup"]),
        (["algorithm=flexmatch", "flexmatch.thresh_warmup=false", "train.lr=0.1"], []),
        # a saved benchmark fixes the split; data.real_only is still read
        (["data.benchmark=b", "data.replace_ratio=0.3", "data.synthetic.x=y", "data.real_only=true",
          "data.labels_per_class=4"], ["data.replace_ratio", "data.synthetic.x", "data.labels_per_class"]),
        (["data.replace_ratio=0.3"], []),
    ],
)  # fmt: skip
def test_overrides_the_run_does_not_read(overrides, ignored):
    """rsmatch-train warns about these (they used to be ignored silently)."""
    found = ignored_overrides(load_config(None, overrides), overrides)
    assert list(found) == ignored
    for key in ignored:
        section = key.startswith(("rsmatch.", "flexmatch.", "freematch."))
        assert ("does not read that section" in found[key]) is section


def test_flatten_keeps_whole_keys_and_empty_mappings():
    from rsmatch.config import flatten

    tree = {"a": {"b": 1, "c": {}}, "d": {"e": {"f": 2}, "g": {"h": 3}}}
    assert flatten(tree) == {"a.b": 1, "a.c": {}, "d.e.f": 2, "d.g.h": 3}
    assert flatten(tree, whole=("d.e",)) == {"a.b": 1, "a.c": {}, "d.e": {"f": 2}, "d.g.h": 3}
