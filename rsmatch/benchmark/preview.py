"""`preview.png` of a built benchmark: per class, real unlabeled images beside synthetic ones."""

from __future__ import annotations

from itertools import zip_longest
from pathlib import Path

import datasets
import numpy as np


def _interleaved(rows: np.ndarray, generators: np.ndarray, n: int) -> list[int]:
    """Up to n rows taking one per generator in turn, so every generator is shown."""
    groups = [rows[generators[rows] == g] for g in sorted(set(generators[rows].tolist()))]
    # zip_longest: a generator with fewer rows leaves its turns to the others
    return [int(r) for turn in zip_longest(*groups) for r in turn if r is not None][:n]


def preview(dd: datasets.DatasetDict, path: Path, per_kind: int = 4) -> None:
    """A grid: one row per class, real unlabeled images then synthetic ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unl = dd["unlabeled"]
    names = unl.features["label"].names
    labels = np.asarray(unl["label"])
    synthetic = np.asarray(unl["is_synthetic"])
    generators = np.asarray(unl["generator"])
    fig, axes = plt.subplots(
        len(names), 2 * per_kind, figsize=(2 * per_kind * 0.9, len(names) * 0.95), squeeze=False
    )
    for c, name in enumerate(names):
        for k, is_syn in enumerate((False, True)):
            rows = np.flatnonzero((labels == c) & (synthetic == is_syn))
            shown = _interleaved(rows, generators, per_kind)
            for j in range(per_kind):
                ax = axes[c, k * per_kind + j]
                ax.axis("off")
                if j < len(shown):
                    ax.imshow(unl[shown[j]]["image"])
                    if c == 0:
                        ax.set_title(unl[shown[j]]["generator"], fontsize=6)
        axes[c, 0].text(
            -0.1, 0.5, name, transform=axes[c, 0].transAxes, ha="right", va="center", fontsize=7
        )
    fig.suptitle("real (left) vs synthetic (right)", fontsize=8)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
