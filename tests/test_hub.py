"""Exported models load back; runs stage and push to the Hub at the API boundary (offline)."""

import json

import pytest
import torch

from rsmatch import hub
from rsmatch.export import load_classifier
from rsmatch.trainer import Trainer

from .conftest import tiny_config


@pytest.fixture(scope="module")
def finished_run(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    trainer = Trainer(tiny_config(sources, out, algorithm="rsmatch"))
    trainer.fit()
    return out, trainer


def test_exported_classifier_reproduces_the_ema_predictions(finished_run, capsys):
    out, trainer = finished_run
    model = load_classifier(out / "model")
    assert capsys.readouterr().out == ""  # not huggingface_hub's "Loading weights..."
    assert model.fake_head is None and model.class_names == trainer.data.class_names
    x = trainer.data.test[:8]
    ema = trainer.ema.module.classifier.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x)["logits"], ema(x)["logits"])


def test_stage_and_push_at_the_api_boundary(finished_run, monkeypatch):
    out, _ = finished_run
    calls = []
    import huggingface_hub

    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "create_repo",
        lambda self, repo, **kw: calls.append(("create", repo, kw)),
    )
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "upload_folder",
        lambda self, **kw: calls.append(("upload", kw)) or "url",
    )
    assert hub.main([str(out), "me/model", "--private"]) == 0
    assert calls[0] == ("create", "me/model", {"private": True, "exist_ok": True})
    staged = calls[1][1]["folder_path"]
    names = sorted(p.name for p in (out / "hub").iterdir())
    assert staged == str(out / "hub")
    assert names == sorted(["model.safetensors", "config.json", "README.md", *hub.RECORD_FILES])
    card = (out / "hub" / "README.md").read_text(encoding="utf-8")
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert f"| test_acc | {metrics['test_acc']:.4f} |" in card and "rsmatch" in card


def test_push_errors(finished_run, tmp_path, capsys):
    out, _ = finished_run
    assert hub.main([str(tmp_path), "me/model"]) == 2  # not a run
    assert "not a finished run" in capsys.readouterr().err
    assert hub.main([str(out), "me/model"]) == 1  # HF_HUB_OFFLINE=1 in tests
    assert "push failed" in capsys.readouterr().err
