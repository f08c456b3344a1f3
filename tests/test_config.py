import subprocess
import sys
from pathlib import Path

import pytest

from rsmatch.config import ConfigError, config_docs, load_config, validate

from .conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_overrides_win_over_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.1\n  mixed_precision: no\nalgorithm: fixmatch\n")
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


def _run_cli(args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300)  # fmt: skip


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
def test_cli_errors_exit_2_and_write_nothing(sources, tmp_path, extra, message):
    out = tmp_path / "run"
    res = _run_cli(tiny_overrides(sources, out, **extra), tmp_path)
    assert res.returncode == 2, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("rsmatch-train: error: ") and message in last, last
    assert not out.exists()


def test_missing_config_file(tmp_path):
    res = _run_cli(["--config", "nope.yaml"], tmp_path)
    assert res.returncode == 2 and "nope.yaml" in res.stderr


def test_config_docs_are_generated_and_current():
    docs = config_docs()
    assert "`rsmatch.queue_length`" in docs and "`train.mixed_precision`" in docs
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == docs, "docs/config.md is stale: python -m rsmatch.config > docs/config.md"


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)
