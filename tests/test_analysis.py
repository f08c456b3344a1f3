"""rsmatch-analyze on a tiny finished run: t-SNE and GradCAM++ figures."""

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rsmatch import analysis
from rsmatch.cli.analyze import main
from rsmatch.experiment import train_in_process
from tests.conftest import CLASSES, tiny_overrides

pytest.importorskip("pytorch_grad_cam")
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def run(sources, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("analysis") / "run"
    assert train_in_process(tiny_overrides(sources, out, algorithm="rsmatch")) == 0
    return out


def _coloured_png(path: Path) -> None:
    with Image.open(path) as im:
        im.verify()
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert pixels.std() > 0
    assert ((pixels.max(-1) - pixels.min(-1)) > 60).sum() > 200, path  # points, heat maps


@pytest.mark.slow
def test_analyze_draws_tsne_and_gradcam_of_classifier_and_exported_detector(run, tmp_path):
    assert (run / "detector").is_dir()  # every RSMatch run exports its detector
    assert main([str(run), "--samples", "60", "--out", str(tmp_path)]) == 0
    for name in ("tsne.png", "gradcam_classifier.png", "gradcam_detector.png"):
        _coloured_png(tmp_path / name)


@pytest.mark.slow
def test_analyze_skips_a_missing_detector(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("detector", "checkpoints"))
    out = copy / "analysis"
    assert main([str(copy), "--samples", "60"]) == 0
    assert (out / "tsne.png").is_file() and (out / "gradcam_classifier.png").is_file()
    assert not (out / "gradcam_detector.png").exists()
    assert "no detector exported" in capsys.readouterr().err


@pytest.mark.slow
def test_the_sample_is_fixed_by_its_seed(run):
    a, b, c = (analysis.Pool(run, 20, s) for s in (0, 0, 1))
    assert torch.equal(a.images, b.images) and (a.labels == b.labels).all()
    assert not torch.equal(a.images, c.images)
    assert a.synthetic.any() and (~a.synthetic).any()


def test_more_classes_than_the_run_has_are_refused(run, tmp_path, capsys):
    """The grid silently showed the run's classes only."""
    n = len(CLASSES)
    assert main([str(run), "--classes", str(n + 1), "--out", str(tmp_path / "out")]) == 2
    assert f"--classes {n + 1}: the run has {n} classes" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_analyze_without_a_finished_run_exits_2(tmp_path, capsys, monkeypatch):
    """Before rsmatch.analysis (torch, the figures' libraries) is imported: at once."""
    monkeypatch.setitem(sys.modules, "rsmatch.analysis", None)  # importing it would raise
    assert main([str(tmp_path)]) == 2
    assert "no exported classifier" in capsys.readouterr().err
    assert main([str(tmp_path / "absent")]) == 2
    assert f"{tmp_path / 'absent'}: no such run folder" in capsys.readouterr().err
    # an export cut short (a crash while writing it): named, not a traceback after t-SNE
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}", encoding="utf-8")
    assert main([str(tmp_path)]) == 2
    want = "model: an incomplete export (model.safetensors missing)"
    assert want in capsys.readouterr().err
    (tmp_path / "model" / "model.safetensors").write_bytes(b"")
    (tmp_path / "detector").mkdir()
    assert main([str(tmp_path)]) == 2
    want = "detector: an incomplete export (config.json, model.safetensors missing)"
    assert want in capsys.readouterr().err


def test_analyze_called_directly_refuses_a_missing_run_folder(tmp_path):
    """Named as a run folder, not sent to the Hub: `absent_run/model` has the shape of a Hub
    model id, which the classifier's loader would query (~25 s of retries when offline)."""
    with pytest.raises(FileNotFoundError, match=r"^absent_run: no such run folder$"):
        analysis.analyze(Path("absent_run"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_missing_viz_extra_is_named_before_any_figure(run, tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pytorch_grad_cam" else find_spec(name, *a))  # fmt: skip
    assert main([str(run), "--out", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "rsmatch-analyze: error: pytorch_grad_cam missing: the viz extra, "
        "pip install -e '.[viz]' in the repository"
    ]
    assert not (tmp_path / "a").exists()
