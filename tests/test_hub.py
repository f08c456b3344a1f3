"""Exported models load back, their model cards; runs stage and push to the Hub at the API
boundary (offline)."""

import json
import shutil

import pytest
import torch

from rsmatch import hub
from rsmatch.export import classifier_card, load_classifier
from rsmatch.trainer import Trainer

from .conftest import tiny_config
from .test_synth_store_by_hand import _run


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


def test_an_unreadable_record_is_named_and_leaves_the_staged_folder(finished_run, tmp_path, capsys):
    """A metrics.json cut off by a crash: exit 2 naming it, and RUN/hub/ as staged before (it
    was emptied first, and kept without its card). A run.json without a commit still stages."""
    run = tmp_path / "r"
    shutil.copytree(finished_run[0], run)
    assert hub.main([str(run), "me/model", "--stage-only"]) == 0
    before = {p.name: p.read_bytes() for p in (run / "hub").iterdir()}
    (run / "metrics.json").write_text('{"test_acc": 0.', encoding="utf-8")
    assert hub.main([str(run), "me/model", "--stage-only"]) == 2
    assert (
        f"rsmatch-push: error: {run / 'metrics.json'}: not valid JSON (" in capsys.readouterr().err
    )
    assert {p.name: p.read_bytes() for p in (run / "hub").iterdir()} == before
    shutil.copy2(finished_run[0] / "metrics.json", run / "metrics.json")
    record = json.loads((run / "run.json").read_text(encoding="utf-8"))
    del record["git"]
    (run / "run.json").write_text(json.dumps(record), encoding="utf-8")
    assert hub.main([str(run), "me/model", "--stage-only"]) == 0
    assert "git unknown." in (run / "hub" / "README.md").read_text(encoding="utf-8")


# -- the classifier card ----------------------------------------------------------------------

CONFIG = {"backbone": "wrn28_2", "class_names": ["cat", "dog"], "mean": [0.5], "std": [0.25]}


def test_the_exported_classifier_card_by_hand():
    """An export's card: front matter, default title, where the scores are, classes, input,
    output and the loading snippet with a placeholder source."""
    card = classifier_card(CONFIG, "fixmatch")
    assert card.data.to_dict() == {
        "library_name": "rsmatch",
        "tags": ["rsmatch", "image-classification", "semi-supervised-learning", "fixmatch"],
    }
    assert str(card) == (
        "---\nlibrary_name: rsmatch\ntags:\n- rsmatch\n- image-classification\n"
        "- semi-supervised-learning\n- fixmatch\n---\n\n"
        "# rsmatch classifier\n\n"
        "A `wrn28_2` classifier trained with **fixmatch** by the rsmatch trainer, on images whose "
        "unlabeled part may hold AI-generated ones (RS-SSL): the encoder and the real head only "
        "(RSMatch's fake head and detector are not needed at inference).\n\n"
        "Its scores are in its run folder: `metrics.json`, `evals.jsonl`, `run.json`.\n\n"
        "Classes (2): cat, dog.\n\n"
        "Input: uint8 RGB images, NCHW, at the size it was trained on, normalised inside the "
        "model (mean [0.5], std [0.25]). Output: `logits`, `feat`.\n\n"
        "```python\nfrom rsmatch.export import load_classifier\n"
        "model = load_classifier('FOLDER_OR_HUB_ID')\n"
        "predictions = model(uint8_images)['logits'].argmax(-1)\n```\n"
    )


@pytest.mark.parametrize("names", [None, []])
def test_a_card_without_class_names_has_no_classes_line(names):
    config = {**CONFIG, "class_names": names}
    text = str(classifier_card(config, "fixmatch"))
    assert "Classes" not in text
    assert "run.json`.\n\nInput: uint8 RGB images" in text


def test_the_pushed_card_is_the_export_card_with_the_runs_record(tmp_path):
    """rsmatch-push: the run's data and metrics replace the export's pointer to its run folder,
    ending with what test_acc and best_acc mean; the rest is the export's card."""
    text = hub.model_card(_run(tmp_path / "r"), "me/my-model")
    assert text.startswith("---\nlibrary_name: rsmatch\ntags:\n- rsmatch\n")
    assert "Its scores are in its run folder" not in text and "Classes" not in text
    assert (
        "| test_acc | 0.1235 |\n| step | 7 |\n\n"
        "`test_acc` is the final EMA model's top-1 accuracy on the real test split; `best_acc` is "
        "the best over evaluations (optimistic, as in USB). The full config, package versions and "
        "per-evaluation metrics are in `config.yaml`, `run.json` and `evals.jsonl`.\n\n"
        "Input: uint8 RGB images, NCHW"
    ) in text
    assert text.endswith(
        "model = load_classifier('me/my-model')\n"
        "predictions = model(uint8_images)['logits'].argmax(-1)\n```\n"
    )
