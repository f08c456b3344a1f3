"""The inference model: the classifier's encoder and real head as safetensors, and back.

RSMatch's detector, queue and fake head exist only for training, so the exported model costs
exactly what a FixMatch model costs.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from rsmatch.models import Classifier

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def export_classifier(classifier: Classifier, out: Path, class_names: list[str], mean: list[float],
                      std: list[float], small_stem: bool) -> Path:  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in classifier.inference_state_dict().items()}
    save_file(state, str(out / WEIGHTS))
    config = {"backbone": classifier.backbone_name, "class_names": class_names, "mean": mean, "std": std,
              "small_stem": small_stem}  # fmt: skip
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def load_classifier(folder: str | Path) -> Classifier:
    """Rebuild an exported classifier (random init is replaced; nothing is downloaded)."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG).read_text())
    model = Classifier(config["backbone"], len(config["class_names"]), config["mean"], config["std"],
                       config["small_stem"])  # fmt: skip
    missing, unexpected = model.load_state_dict(load_file(str(folder / WEIGHTS)), strict=False)
    if unexpected or any(k.split(".")[0] in ("encoder", "head") for k in missing):
        raise ValueError(
            f"{folder}: weights do not fit {config['backbone']} ({missing[:3]}, {unexpected[:3]})"
        )
    model.class_names = config["class_names"]
    return model.eval()
