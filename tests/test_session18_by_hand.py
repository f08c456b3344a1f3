"""What session 18 changed and its tests left unpinned (found by a mutation audit): rsmatch-filter's
loading errors, the report's metric format, the classifier card (export and rsmatch-push), and
the clipping that deepspeed_plugin hands on. Expected values are written out by hand."""

import json

import datasets
import pytest

from rsmatch import filter as flt
from rsmatch import hub
from rsmatch.benchmark.errors import SourceError
from rsmatch.config import ConfigError, load_config
from rsmatch.export import classifier_card
from rsmatch.filter_report import format_metric
from rsmatch.trainer import deepspeed_plugin

from .test_synth_store_by_hand import _run

# -- rsmatch-filter: loading ------------------------------------------------------------------


def test_an_empty_folder_is_no_images_found_without_the_skipped_note(tmp_path):
    """The note on earlier filter outputs appears only when there were images inside them."""
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no image here", encoding="utf-8")
    with pytest.raises(flt.FilterError) as error:
        flt.read_folder(tmp_path / "empty")
    assert str(error.value) == f"--images {tmp_path / 'empty'}: no images found"


def test_a_hub_id_that_does_not_load_is_named_with_its_option(tmp_path, monkeypatch):
    """A Hub id goes through the benchmark sources' loader: one line naming `--images ID`."""

    def offline(spec, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.chdir(tmp_path)  # no local folder me/data
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SourceError) as error:
        flt.load_images("me/data")
    assert str(error.value) == (
        "--images me/data: cannot load this Hub dataset id (no local folder of that name) "
        "(ConnectionError: offline)"
    )


def test_a_labels_source_error_names_it_as_typed(tmp_path, sources):
    """`--labels real=PATH` with no such folder: the error names `--labels real=PATH` (it read
    `--labels real= PATH`, a space the user never typed)."""
    missing = tmp_path / "nope"
    with pytest.raises(flt.FilterError) as error:
        flt.load_labelled({"real": str(missing), "a": str(sources["gen_a"])})
    assert str(error.value).startswith(f"--labels real={missing}: ")


def test_an_empty_labels_folder_is_named_as_a_labels_source(tmp_path, sources):
    """It was blamed on `--images`."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(flt.FilterError) as error:
        flt.load_labelled({"real": str(sources["real"]), "a": str(tmp_path / "empty")})
    assert str(error.value).startswith("--labels a=") and "--images" not in str(error.value)


# -- rsmatch-filter: the report ---------------------------------------------------------------


def test_format_metric_shows_zero_as_a_number_and_only_none_as_n_a():
    """0.0 is a measured value (no real image called synthetic), not an undefined one."""
    assert format_metric(0.0) == "0.0000"
    assert format_metric(None) == "n/a"
    assert format_metric(0.12345) == "0.1235"
    assert format_metric(1.0) == "1.0000"


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


# -- DeepSpeed: what the trainer hands on -----------------------------------------------------


def _plugin(cfg, ds_config: dict, mixed_precision: str, tmp_path, monkeypatch) -> dict:
    """deepspeed_plugin under a DeepSpeed launch of the JSON `ds_config`: the config it completed
    (what Accelerate adds itself removed)."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **ds_config}), encoding="utf-8")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    completed = deepspeed_plugin(cfg, mixed_precision).deepspeed_config
    for accelerates in ("zero_optimization", "gradient_accumulation_steps", "steps_per_print"):
        completed.pop(accelerates)
    return completed


def test_deepspeed_plugin_clips_and_autocasts_as_the_config_says(tmp_path, monkeypatch):
    """train.clip_grad_norm and the resolved precision go into the engine's JSON."""
    cfg = load_config(None, ["train.clip_grad_norm=0.5"])
    assert _plugin(cfg, {}, "bf16", tmp_path, monkeypatch) == {
        "torch_autocast": {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []},
        "gradient_clipping": 0.5,
    }  # fmt: skip
    with pytest.raises(ConfigError) as error:
        _plugin(cfg, {"gradient_clipping": 1.0}, "no", tmp_path, monkeypatch)
    assert str(error.value) == (
        "train.clip_grad_norm=0.5: the DeepSpeed config clips at 1.0; "
        'set "gradient_clipping": 0.5 there, or leave it out'
    )


def test_deepspeed_plugin_refuses_compile(tmp_path, monkeypatch):
    cfg = load_config(None, ["train.compile=true"])
    with pytest.raises(ConfigError, match=r"^train.compile=true: not under DeepSpeed"):
        _plugin(cfg, {}, "no", tmp_path, monkeypatch)
