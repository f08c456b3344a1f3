"""The inference models, saved and loaded with huggingface_hub's `PyTorchModelHubMixin`
(safetensors weights + config.json of the constructor's arguments), so an export loads from a
folder or a Hub id alike.

The classifier is the encoder and real head: RSMatch's detector, queue and fake head cost
nothing at inference. RSMatch's detector is exported separately (`RUN/detector`) as a product
of its own: a synthetic-image detector trained without a synthetic label (see docs/filter.md).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from huggingface_hub import ModelCard

from rsmatch.benchmark.sources import is_hub_id
from rsmatch.checkpoint import readable_as_umask
from rsmatch.models import Classifier, Detector
from rsmatch.runfolder import EXPORT_FILES

RESIZE = "PIL Lanczos (antialiased), the resize the benchmark builder applies to generated images"


def export_classifier(classifier: Classifier, out: Path, class_names: list[str], mean: list[float],
                      std: list[float], small_stem: bool, algorithm: str) -> Path:  # fmt: skip
    """A fresh encoder + real head with the trained weights, and a model card, under `out`."""
    inference = Classifier(classifier.backbone_name, len(class_names), mean, std, small_stem,
                           class_names=class_names)  # fmt: skip
    inference.load_state_dict(classifier.inference_state_dict(), strict=True)
    inference.save_pretrained(out)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    # huggingface_hub's own card (written when none is there) says the model was pushed
    classifier_card(config, algorithm).save(out / "README.md")
    readable_as_umask(out)
    return out


def classifier_card(
    config: dict, algorithm: str, title: str = "rsmatch classifier",
    source: str = "FOLDER_OR_HUB_ID", results: tuple[str, ...] = (
        "Its scores are in its run folder: `metrics.json`, `evals.jsonl`, `run.json`.",
    ),
) -> ModelCard:  # fmt: skip
    """The card of a classifier export, from its config.json: what it is, its classes and
    input, `results` (`rsmatch-push` puts the run's data and metrics there), how to load it."""
    classes = config.get("class_names") or []
    return ModelCard(
        "\n".join([
            "---", "library_name: rsmatch", "tags:", "- rsmatch", "- image-classification",
            "- semi-supervised-learning", f"- {algorithm}", "---", "",
            f"# {title}", "",
            f"A `{config.get('backbone')}` classifier trained with **{algorithm}** by the rsmatch "
            "trainer, on images whose unlabeled part may hold AI-generated ones (RS-SSL): the "
            "encoder and the real head only (RSMatch's fake head and detector are not needed at "
            "inference).", "",
            *results, "",
            *([f"Classes ({len(classes)}): {', '.join(classes)}.", ""] if classes else []),
            "Input: uint8 RGB images, NCHW, at the size it was trained on, normalised inside the "
            f"model (mean {config.get('mean')}, std {config.get('std')}). Output: `logits`, `feat`.",
            "", "```python", "from rsmatch.export import load_classifier",
            f"model = load_classifier('{source}')",
            "predictions = model(uint8_images)['logits'].argmax(-1)", "```", "",
        ])
    )  # fmt: skip


def _quiet_hub() -> contextlib.AbstractContextManager:
    """huggingface_hub's mixin prints "Loading weights from local directory" on stdout, which
    is the tools' output (and broke their one-line errors on stderr): dropped."""
    return contextlib.redirect_stdout(io.StringIO())


def export_kind(folder: Path) -> str | None:
    """`classifier`, `detector`, or None (not an rsmatch export), from its config.json."""
    if not all((folder / name).is_file() for name in EXPORT_FILES):
        return None
    keys = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return "classifier" if "num_classes" in keys else "detector" if "threshold" in keys else None


def _checked_source(source: str | Path, kind: str) -> str:
    """A folder holding a `kind` export, or what can only be a Hub id; else one clear error
    (the Hub would answer a mistyped path with a long LocalEntryNotFoundError)."""
    spec = str(source)
    if Path(spec).exists():
        found = export_kind(Path(spec))
        if found != kind:
            what = (
                f"a {found} export" if found else "not an export (config.json + model.safetensors)"
            )
            raise ValueError(f"{spec}: {what}; load_{kind} loads a {kind} export")
    elif not is_hub_id(spec):
        raise FileNotFoundError(f"{spec}: no such folder, and not a Hub model id")
    return spec


def load_classifier(source: str | Path) -> Classifier:
    """Rebuild an exported classifier from a folder or a Hub id; nothing else is downloaded."""
    spec = _checked_source(source, "classifier")
    with _quiet_hub():
        return Classifier.from_pretrained(spec, strict=True).eval()


def export_detector(detector: Detector, out: Path, mean: list[float], std: list[float],
                    image_size: list[int], class_names: list[str], real_set: str,
                    training: dict, metrics: dict[str, float] | None) -> Path:  # fmt: skip
    """A self-describing copy of a trained detector, with a model card, saved under `out`."""
    inference = Detector(detector.backbone_name, mean, std, image_size=list(image_size),
                         class_names=class_names, real_set=real_set)  # fmt: skip
    inference.load_state_dict(detector.state_dict(), strict=True)
    out.mkdir(parents=True, exist_ok=True)
    detector_card(inference, training, metrics).save(out / "README.md")
    inference.save_pretrained(out)  # keeps the README.md written above
    readable_as_umask(out)
    return out


def load_detector(source: str | Path) -> Detector:
    """Rebuild an exported detector from a folder or a Hub id."""
    spec = _checked_source(source, "detector")
    with _quiet_hub():
        return Detector.from_pretrained(spec, strict=True).eval()


def detector_card(det: Detector, training: dict, metrics: dict[str, float] | None) -> ModelCard:
    """How the detector was trained (no synthetic labels), its input, and its metrics."""
    h, w = det.image_size
    rows = "\n".join(f"| {k} | {v} |" for k, v in training.items())
    if metrics:
        scores = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items()))
        measured = (
            "Measured at the last evaluation before export, on the unlabeled training pool "
            "against its provenance columns (which training never reads):\n\n"
            f"| metric | value |\n|---|---|\n{scores}"
        )
    else:
        measured = "No detector metrics at export (the run exported before its first evaluation)."
    return ModelCard(
        "\n".join([
            "---", "library_name: rsmatch", "tags:", "- rsmatch", "- synthetic-image-detection",
            "- semi-supervised-learning", "---", "",
            "# RSMatch synthetic-image detector", "",
            f"A `{det.backbone_name}` binary classifier (score = probability that an image is "
            "AI-generated) trained by RSMatch **without a single synthetic label**. Its only "
            f"labels: the labeled real images of `{det.real_set}` (called real) and the "
            "unlabeled images its own class-wise queue picked as the most synthetic-looking "
            "(called synthetic), plus consistency on its own confident pseudo-labels. Which "
            "pool images were generated, and by what, was never read.", "",
            "## Training", "", "| | |", "|---|---|", rows, "",
            f"Classes of the real set: {', '.join(det.class_names or [])}.", "",
            "## Input and threshold", "",
            f"uint8 RGB images, NCHW, {h}x{w}; normalised inside the model (mean {det.mean}, std {det.std}"
            f"). `rsmatch-filter` resizes other sizes to "
            f"{h}x{w} with {RESIZE}. An image is called synthetic when its score exceeds "
            f"{det.threshold} (the argmax RSMatch routes samples by).", "",
            "## Metrics at export", "", measured, "",
            "It knows only the generators of its training pool; `rsmatch-filter --labels` or a "
            "benchmark with provenance columns measures how far it carries to others.", "",
            "## Use", "", "```python", "from rsmatch.export import load_detector",
            "det = load_detector('FOLDER_OR_HUB_ID')", "scores = det.score(uint8_images)",
            "```", "", "or `rsmatch-filter --detector FOLDER_OR_HUB_ID --images FOLDER --out OUT`.", "",
        ])
    )  # fmt: skip
