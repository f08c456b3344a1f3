"""The run configuration and the hardware choices by hand: YAML and override parsing, the key
named in each error, the ends of every range, `auto` precision and host memory, what run.json
records (a mutation audit of rsmatch/config.py and rsmatch/hardware.py)."""

import pytest

from rsmatch import hardware
from rsmatch.config import (
    ConfigError,
    DataConfig,
    fixed_by_benchmark,
    ignored_overrides,
    load_config,
    parse_yaml,
)
from rsmatch.hardware import (
    complete_deepspeed_config,
    cpu_flags,
    idle_cores_note,
    keep_host_memory,
    onednn_isa_limit,
    resolve,
)


def _error(overrides, path=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return str(e.value)


# ---------------------------------------------------------------- defaults and YAML


def test_list_and_dict_defaults_are_not_shared_between_configs():
    """Each config gets its own data.mean list and data.synthetic dict."""
    first = DataConfig()
    first.mean.append(9.0)
    first.synthetic["a"] = "x"
    second = load_config(None, [])
    assert second.data.mean == [0.485, 0.456, 0.406]
    assert second.data.synthetic == {}


def test_capitalised_true_is_a_boolean(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  progress: False\ndata:\n  real_only: True\n", encoding="utf-8")
    cfg = load_config(f, ["train.compile=True"])
    assert cfg.train.progress is False and cfg.data.real_only is True
    assert cfg.train.compile is True


def test_signed_scientific_numbers_are_floats():
    """+1e-3 and -1e-3 are numbers, so -1e-3 meets the range check, not a type error."""
    assert load_config(None, ["train.weight_decay=+1e-3"]).train.weight_decay == 0.001
    assert _error(["train.weight_decay=-1e-3"]) == "train.weight_decay=-0.001: must be >= 0"


@pytest.mark.parametrize(
    "value, expected",
    [("010", 10), ("+7", 7), ("1_048_576", 1048576), ("0x1F", 31), ("0o17", 15)],
)
def test_integers_are_read_as_yaml_1_2(value, expected, tmp_path):
    """A leading zero is decimal (YAML 1.1 read `010` as octal 8: a seed silently changed),
    in overrides and in files alike; 0x and 0o say their base."""
    assert load_config(None, [f"train.seed={value}"]).train.seed == expected
    (tmp_path / "c.yaml").write_text(f"train:\n  seed: {value}\n", encoding="utf-8")
    assert load_config(str(tmp_path / "c.yaml"), []).train.seed == expected


def test_negative_decimals_with_leading_zeros_or_groups():
    assert [parse_yaml(v, "x") for v in ("-010", "-1_000", "0", "-0")] == [-10, -1000, 0, 0]


@pytest.mark.parametrize("value", ["1:30", "0b101", "0x", "1__"])
def test_yaml_1_1_sexagesimal_and_binary_are_not_integers(value):
    """`1:30` was 90 and `0b101` 5 under YAML 1.1; they are text now, refused for an integer key
    by name."""
    message = _error([f"train.steps={value}"])
    assert message == f"train.steps: expected an integer, got '{value}'"


@pytest.mark.parametrize(
    "value, expected",
    [("1e-3", 0.001), ("3E-2", 0.03), (".5", 0.5), ("2.", 2.0), ("+.5e+1", 5.0), ("1_0.5", 10.5)],
)
def test_floats_are_read_as_yaml_1_2(value, expected, tmp_path):
    """A point or an exponent makes a float (`1e-3` was text under YAML 1.1)."""
    assert load_config(None, [f"train.lr={value}"]).train.lr == expected
    (tmp_path / "c.yaml").write_text(f"train:\n  lr: {value}\n", encoding="utf-8")
    assert load_config(str(tmp_path / "c.yaml"), []).train.lr == expected


@pytest.mark.parametrize("value", ["1:30.5", "1e", "1.5.2"])
def test_yaml_1_1_sexagesimal_floats_are_not_numbers(value):
    """`1:30.5` was 90.5 under YAML 1.1 (base 60: 1 * 60 + 30.5); text now, refused for a
    float key by name."""
    assert _error([f"train.lr={value}"]) == f"train.lr: expected float, got '{value}'"


@pytest.mark.parametrize("value, shown", [(".inf", "inf"), ("-.Inf", "-inf"), (".nan", "nan")])
def test_a_float_key_must_be_finite(value, shown):
    """`.inf` met `train.lr > 0` and would have trained on NaN weights; infinities and NaN are
    refused for every float key, before any range check."""
    assert _error([f"train.lr={value}"]) == f"train.lr: expected a finite number, got {shown}"
    assert (
        _error([f"ssl.lambda_u={value}"]) == f"ssl.lambda_u: expected a finite number, got {shown}"
    )


def test_a_runs_config_yaml_reads_back_as_the_same_config(tmp_path):
    """Texts that YAML 1.2 reads as numbers (`1e5`, `0o17`) are quoted in config.yaml, so the
    file works as a --config (it refused `data.benchmark: 0o17` as the integer 15) and reads
    the same with yaml.safe_load (the report's and the resume check's reader)."""
    import yaml

    from rsmatch.config import to_dict
    from rsmatch.runinfo import write_run_record

    texts = {"data.real": "1e5", "data.benchmark": "0o17", "train.output_dir": "no"}
    cfg = load_config(None, [f'{key}="{text}"' for key, text in texts.items()])
    write_run_record(tmp_path, cfg, {}, None)
    saved = (tmp_path / "config.yaml").read_text(encoding="utf-8")
    assert "real: '1e5'" in saved and "benchmark: '0o17'" in saved and "output_dir: 'no'" in saved
    again = load_config(str(tmp_path / "config.yaml"), [])
    assert [again.data.real, again.data.benchmark, again.train.output_dir] == ["1e5", "0o17", "no"]
    assert to_dict(again) == to_dict(cfg) == yaml.safe_load(saved)


def test_null_is_accepted_where_the_key_may_be_none():
    cfg = load_config(None, ["data.unlabeled_per_class=null", "data.exclude_scores=null"])
    assert cfg.data.unlabeled_per_class is None and cfg.data.exclude_scores is None


def test_an_empty_or_comment_only_file_gives_the_defaults(tmp_path):
    for text in ("", "# nothing set\n"):
        f = tmp_path / "c.yaml"
        f.write_text(text, encoding="utf-8")
        cfg = load_config(f, ["train.steps=3"])
        assert cfg.train.steps == 3 and cfg.train.lr == 0.03 and cfg.algorithm == "rsmatch"


def test_a_file_that_is_not_a_mapping_or_missing_is_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("- a\n- b\n", encoding="utf-8")
    assert _error([], f) == f"--config: {f} must hold a mapping at top level"
    missing = tmp_path / "nope.yaml"
    assert _error([], missing) == f"--config: no such file '{missing}'"


# ---------------------------------------------------------------- value types


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.mean=[1, x, 2]", "data.mean[1]: expected float, got 'x'"),
        ("data.mean=0.5", "data.mean: expected a list, got 0.5"),
        ("data.synthetic=[a]", "data.synthetic: expected a mapping name: value, got ['a']"),
        ("train.lr=true", "train.lr: expected float, got True"),
        ("train=3", "train: expected a section, got 3"),
        ("ssl.x=1", "ssl.x: unknown key (valid: lambda_u, threshold)"),
    ],
)
def test_type_errors_name_the_key_and_the_value(override, message):
    assert _error([override]) == message


def test_generator_names_are_strings():
    """A YAML number as generator name becomes the string key."""
    assert load_config(None, ["data.synthetic={1: x}"]).data.synthetic == {"1": "x"}


# ---------------------------------------------------------------- overrides


def test_an_override_splits_at_its_first_equals_sign():
    assert load_config(None, ["data.real=/a/b=c"]).data.real == "/a/b=c"


def test_an_empty_value_is_the_empty_string():
    assert load_config(None, ["data.real="]).data.real == ""


def test_spaces_around_the_key_are_dropped():
    assert load_config(None, ["train.lr = 0.5"]).train.lr == 0.5


def test_an_override_without_a_key_is_refused():
    assert _error(["=1"]) == "=1: overrides are key=value, e.g. train.lr=0.01"


def test_a_yml_file_given_without_the_flag_gets_the_hint():
    assert _error(["c.yml"]) == (
        "c.yml: overrides are key=value, e.g. train.lr=0.01; a config file is --config c.yml"
    )


def test_an_override_below_a_value_is_refused():
    assert _error(["train.lr=1", "train.lr.x=2"]) == "train.lr.x: lr is not a section"


def test_ignored_override_keys_are_named_without_their_spaces():
    overrides = ["algorithm=fixmatch", " rsmatch.queue_length =4"]
    found = ignored_overrides(load_config(None, overrides), overrides)
    assert found == {"rsmatch.queue_length": "algorithm=fixmatch does not read that section"}


def test_a_benchmark_fixes_the_keys_below_a_split_key():
    assert fixed_by_benchmark("data.synthetic.ddpm") is True
    assert fixed_by_benchmark("data.split_seed") is True
    assert fixed_by_benchmark("data.real_only") is False


# ---------------------------------------------------------------- ranges


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.mean=[0.5, 0.5]", "data.mean=[0.5, 0.5]: needs 3 values (R, G, B)"),
        ("data.std=[0.2, 0.2, 0.2, 0.2]", "data.std=[0.2, 0.2, 0.2, 0.2]: needs 3 values (R, G, B)"),
        ("train.uratio=0", "train.uratio=0: must be >= 1"),
        ("train.steps=0", "train.steps=0: must be >= 1"),
        ("train.batch_size=0", "train.batch_size=0: must be >= 1"),
        ("train.eval_every=0", "train.eval_every=0: must be >= 1"),
        ("train.log_every=0", "train.log_every=0: must be >= 1"),
        ("train.lr=0", "train.lr=0.0: must be positive"),
        ("train.momentum=-0.1", "train.momentum=-0.1: not in [0, 1)"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints=0: must be >= 1"),
        ("train.mixed_precision=fp32", "train.mixed_precision='fp32': one of auto, no, fp16, bf16"),
        ("train.keep_host_memory=maybe", "train.keep_host_memory='maybe': true, false or auto"),
        ("train.graph_batches=maybe", "train.graph_batches='maybe': true, false or auto"),
        ("train.sync_bn=maybe", "train.sync_bn='maybe': true, false or auto"),
        ("train.channels_last=maybe", "train.channels_last='maybe': true, false or auto"),
        ("ssl.lambda_u=-1", "ssl.lambda_u=-1.0: must be >= 0"),
        ("train.cosine_cycles=-1", "train.cosine_cycles=-1.0: must be >= 0"),
        ("train.weight_decay=-1", "train.weight_decay=-1.0: must be >= 0"),
        ("train.clip_grad_norm=-1", "train.clip_grad_norm=-1.0: must be >= 0 (0 = off)"),
    ],
)  # fmt: skip
def test_values_out_of_range_are_refused_naming_the_key(override, message):
    assert _error([override]) == message


def test_exclude_scores_must_be_a_file(tmp_path):
    missing = tmp_path / "scores.parquet"
    assert _error([f"data.exclude_scores={missing}"]) == (
        f"data.exclude_scores='{missing}': no such file"
    )
    assert _error([f"data.exclude_scores={tmp_path}"]) == (
        f"data.exclude_scores='{tmp_path}': no such file"
    )
    missing.write_bytes(b"")
    assert load_config(None, [f"data.exclude_scores={missing}"]).data.exclude_scores == str(missing)


def test_the_zero_and_one_ends_that_mean_off_or_all_load():
    """Supervised-only (lambda_u=0), no decay, constant lr, fp16, a full replacement."""
    cfg = load_config(None, ["ssl.lambda_u=0", "train.weight_decay=0", "train.cosine_cycles=0",
                             "data.exclude_above=0", "model.bn_momentum=0", "train.ema_decay=0",
                             "data.replace_ratio=1", "train.mixed_precision=fp16",
                             "train.keep_checkpoints=1", "train.uratio=1"])  # fmt: skip
    assert (cfg.ssl.lambda_u, cfg.train.weight_decay, cfg.train.cosine_cycles) == (0.0, 0.0, 0.0)
    assert (cfg.data.exclude_above, cfg.model.bn_momentum, cfg.train.ema_decay) == (0.0, 0.0, 0.0)
    assert cfg.data.replace_ratio == 1.0 and cfg.train.mixed_precision == "fp16"


# ---------------------------------------------------------------- hardware: bf16 and oneDNN


@pytest.mark.parametrize(
    "value", ["SSE41", "AVX", "AVX2_VNNI_2", "AVX512_MIC", "AVX512_MIC_4OPS", " avx2 "]
)
def test_every_onednn_isa_below_bf16_is_a_limit(value):
    """Named as set, spaces included; each keeps a bf16 CPU at fp32 under auto."""
    env = {"ONEDNN_MAX_CPU_ISA": value}
    assert onednn_isa_limit(env) == f"ONEDNN_MAX_CPU_ISA={value}"
    assert hardware.cpu_bf16_support({"amx_bf16"}, env)[0] is False


def test_unreadable_cpu_flags_are_empty(tmp_path):
    """A folder (IsADirectoryError, like a permission error) reads as no flags, not a crash."""
    assert cpu_flags(tmp_path) == set()


def test_explicit_reason_and_warning_name_the_given_key():
    p = resolve("bf16", False, cuda=False, cpu_bf16=False, key="--precision")
    assert p.reason == "explicit --precision"
    assert p.warning == (
        "--precision=bf16 on a CPU without native bf16: emulated and slow; "
        "--precision=auto picks fp32 here"
    )


def test_run_json_records_all_four_fields():
    """Precision.record() is what run.json holds under "precision", warning included."""
    auto = resolve("auto", "auto", cuda=False, cpu_bf16=False)
    assert auto.record() == {
        "mixed_precision": "no",
        "channels_last": True,
        "reason": "auto: CPU without native bf16: fp32 (bf16 would be emulated, several times "
        "slower)",
        "warning": None,
    }
    emulated = resolve("bf16", False, cuda=True, cuda_bf16=False)
    assert emulated.record() == {
        "mixed_precision": "bf16",
        "channels_last": False,
        "reason": "explicit train.mixed_precision",
        "warning": "train.mixed_precision=bf16 on a CUDA GPU without native bf16: emulated and "
        "slow; train.mixed_precision=auto picks fp16 here",
    }


def test_deepspeed_note_follows_the_chosen_precision_not_auto():
    """Explicit bf16 on a GPU that emulates it: the trainer still autocasts in bf16."""
    p = resolve("bf16", True, cuda=True, cuda_bf16=False, deepspeed=True)
    assert p.reason == (
        "explicit train.mixed_precision; DeepSpeed: torch autocast (the engine's torch_autocast "
        "too), fp32 weights kept contiguous (activations channels_last)"
    )


def test_a_null_precision_section_in_the_deepspeed_config_is_off():
    config = {"bf16": None, "fp16": None}
    complete_deepspeed_config(config, "no", 0.0)
    assert config["torch_autocast"]["enabled"] is False


# ---------------------------------------------------------------- hardware: host memory, cores


class _Libc:
    """mallopt that accepts only the first `accepted` calls, recording each."""

    def __init__(self, accepted: int) -> None:
        self.calls, self.accepted = [], accepted

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1 if len(self.calls) <= self.accepted else 0


def test_keep_host_memory_needs_both_mallopt_calls(monkeypatch):
    libc = _Libc(accepted=1)
    monkeypatch.setattr(hardware, "_glibc", lambda: libc)
    assert keep_host_memory(True, "cpu") == "off (glibc refused mallopt)"
    assert libc.calls == [(-4, 0), (-1, -1)]


@pytest.mark.parametrize("device", ["mps", "xpu"])
def test_auto_host_memory_is_off_on_any_accelerator(monkeypatch, device):
    libc = _Libc(accepted=2)
    monkeypatch.setattr(hardware, "_glibc", lambda: libc)
    assert keep_host_memory("auto", device) == f"off ({device})"
    assert libc.calls == []


def test_no_glibc_is_detected_from_the_platform(monkeypatch):
    monkeypatch.setattr(hardware.platform, "libc_ver", lambda: ("", ""))
    assert hardware._glibc() is None


def test_usable_cores_follow_the_affinity(monkeypatch):
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 64)
    assert hardware.usable_cores() == 3
    monkeypatch.delattr(hardware.os, "sched_getaffinity")
    assert hardware.usable_cores() == 64
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: None)
    assert hardware.usable_cores() == 1


def test_idle_cores_note_with_no_process_count_takes_all_cores():
    note = idle_cores_note(1, 4, 0, {"OMP_NUM_THREADS": "1"})
    assert note.endswith("OMP_NUM_THREADS=4 uses them")


def test_a_config_file_that_is_not_text_is_one_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_bytes(b"\xff\xfe\x00train")
    assert _error([], f) == (
        f"--config: cannot read '{f}' ('utf-8' codec can't decode byte 0xff in position 0: "
        "invalid start byte)"
    )
