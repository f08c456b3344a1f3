"""The inference model: the classifier's encoder and real head, saved and loaded with
huggingface_hub's `PyTorchModelHubMixin` (safetensors weights + config.json of the
constructor's arguments), so a run's export loads from a folder or a Hub id alike.

RSMatch's detector, queue and fake head exist only for training, so the exported model costs
exactly what a FixMatch model costs.
"""

from __future__ import annotations

from pathlib import Path

from rsmatch.models import Classifier


def export_classifier(classifier: Classifier, out: Path, class_names: list[str], mean: list[float],
                      std: list[float], small_stem: bool) -> Path:  # fmt: skip
    """A fresh encoder + real head with the trained weights, saved under `out`."""
    inference = Classifier(classifier.backbone_name, len(class_names), mean, std, small_stem,
                           class_names=class_names)  # fmt: skip
    inference.load_state_dict(classifier.inference_state_dict(), strict=True)
    inference.save_pretrained(out)
    return out


def load_classifier(source: str | Path) -> Classifier:
    """Rebuild an exported classifier from a folder or a Hub id; nothing else is downloaded."""
    return Classifier.from_pretrained(str(source), strict=True).eval()
