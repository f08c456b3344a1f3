"""The filter's report: counts, a score histogram, the most synthetic and most real images per
class, and, when the input carries provenance, how well the detector separates real from
synthetic (ROC AUC, accuracy, precision and recall at the threshold, recall per generator).
The report doubles as the dataset card when the filtered set is pushed to the Hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import torch

from rsmatch.benchmark.sources import image_bytes
from rsmatch.filter import FilterResult, image_column, label_column, to_tensor

GRID_IMAGES = 8  # per class and grid
GRID_CLASSES = 20  # classes shown in a grid (the first ones by index), plus the (no label) row
UNLABELED = "(no label)"  # rows whose label is datasets' -1


def provenance_metrics(scores: np.ndarray, is_synthetic: np.ndarray, generator: list[str],
                       threshold: float) -> dict[str, float | None]:  # fmt: skip
    """Synthetic is the positive class; a score above the threshold calls synthetic. A metric
    the images leave undefined (no synthetic image, none real, none called synthetic) is None:
    JSON's null, where NaN would make report.json unreadable to strict parsers."""
    from sklearn.metrics import roc_auc_score

    truth = np.asarray(is_synthetic, dtype=bool)
    called = np.asarray(scores) > threshold
    tp = float((called & truth).sum())
    out = {
        "roc_auc": float(roc_auc_score(truth, scores)) if 0 < truth.sum() < len(truth) else None,
        "accuracy": float((called == truth).mean()),
        "precision": _share(tp, called.sum()),
        "recall": _share(tp, truth.sum()),
        "real_called_synthetic": _share(called[~truth].sum(), (~truth).sum()),
    }
    gens = np.asarray(generator)
    for g in sorted(set(gens[truth].tolist())):
        out[f"recall/{g}"] = float(called[gens == g].mean())
    return out


def _share(part: float, whole: float) -> float | None:
    return float(part) / float(whole) if whole else None


def format_metric(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def histogram(path: Path, scores: np.ndarray, threshold: float,
              is_synthetic: np.ndarray | None) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(0, 1, 41)
    if is_synthetic is None:
        ax.hist(scores, bins=bins, color="tab:gray")
    else:
        truth = np.asarray(is_synthetic, dtype=bool)
        ax.hist([scores[~truth], scores[truth]], bins=bins, stacked=True,
                color=["tab:blue", "tab:red"], label=["real (provenance)", "synthetic (provenance)"])  # fmt: skip
        ax.legend(fontsize=8)
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel(f"synthetic score (threshold {threshold:.3g})")
    ax.set_ylabel("images")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def grid(path: Path, rows: list[tuple[str, list[torch.Tensor], list[float]]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(imgs) for _, imgs, _ in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.1 * cols + 1, 1.25 * len(rows)),
                             squeeze=False)  # fmt: skip
    for r, (name, imgs, scores) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(imgs):
                ax.imshow(imgs[c].permute(1, 2, 0).numpy())
                ax.set_title(f"{scores[c]:.3g}", fontsize=7)
        axes[r][0].text(-0.1, 0.5, name, transform=axes[r][0].transAxes, ha="right",
                        va="center", fontsize=8)  # fmt: skip
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def extremes(
    scored: datasets.DatasetDict, size: tuple[int, int], most_synthetic: bool
) -> list[tuple[str, list[torch.Tensor | None], list[float]]]:
    """Per class (or over all images without labels): the GRID_IMAGES highest (or lowest)
    scored images, as grid rows."""
    by_class = {}  # (class index, class name) -> [(score, split, row)]
    for split, ds in scored.items():
        col = label_column(ds)
        names = ds.features[col].names if col else None
        labels = ds[col] if col else [None] * len(ds)
        for row, (s, y) in enumerate(zip(ds["synthetic_score"], labels)):
            if names is None:
                key = (0, "all")
            else:  # datasets' -1, no label: a row of its own, after the classes
                key = (y, names[y]) if y >= 0 else (len(names), UNLABELED)
            by_class.setdefault(key, []).append((s, split, row))
    keys = sorted(by_class)  # the first classes by index, not by row; unlabeled images after
    shown = keys[:GRID_CLASSES] + [k for k in keys[GRID_CLASSES:] if k[1] == UNLABELED]
    rows = []
    for key in shown:
        ranked = sorted(by_class[key], key=lambda e: e[0], reverse=most_synthetic)
        picked = ranked[:GRID_IMAGES]
        imgs = []
        for _, split, row in picked:
            ds = scored[split]
            item = ds.cast_column(image_column(ds), datasets.Image(decode=False))[row]
            imgs.append(to_tensor(image_bytes(item[image_column(ds)]), size))
        rows.append((key[1], imgs, [score for score, _, _ in picked]))
    return rows


def counts(result: FilterResult) -> dict:
    calls = np.asarray(result.table["call"])
    out = {
        "scored": len(calls),
        "corrupt_skipped": len(result.corrupt),
        "called_real": int((calls == "real").sum()),
        "called_synthetic": int((calls == "synthetic").sum()),
        "saved": sum(len(ds) for ds in result.dataset.values()),
    }
    per_class: dict[str, list[int]] = {}  # in class order, as the labels number them
    for ds in result.scored.values():
        col = label_column(ds)
        if col is None:
            continue
        labels = np.asarray(ds[col])
        called = np.asarray(ds["synthetic_score"]) > result.threshold
        for y, name in [*enumerate(ds.features[col].names), (-1, UNLABELED)]:
            is_y = labels == y  # -1: datasets' "no label"
            if y >= 0 or is_y.any():
                c = per_class.setdefault(name, [0, 0])
                c[0] += int(is_y.sum())
                c[1] += int(called[is_y].sum())
    if per_class:
        out["per_class"] = {
            k: {"images": v[0], "called_synthetic": v[1]} for k, v in per_class.items()
        }
    return out


def write_report(folder: Path, result: FilterResult, detector: str, images: str,
                 image_size: list[int], metrics: dict[str, float | None] | None,
                 keep_real: bool) -> None:  # fmt: skip
    """README.md (report and dataset card), report.json, histogram and grids into folder."""
    from rsmatch.export import RESIZE

    c = counts(result)
    scores = np.asarray(result.table["synthetic_score"])
    truth = None
    if metrics is not None:
        truth = np.asarray([v for ds in result.scored.values() for v in ds["is_synthetic"]])
    histogram(folder / "histogram.png", scores, result.threshold, truth)
    size = tuple(image_size)
    grid(folder / "most_synthetic.png", extremes(result.scored, size, True), "most synthetic")
    grid(folder / "most_real.png", extremes(result.scored, size, False), "most real")
    record = {"detector": detector, "images": images, "threshold": result.threshold,
              "keep": "real" if keep_real else "all", "counts": c, "provenance_metrics": metrics}  # fmt: skip
    (folder / "report.json").write_text(
        json.dumps(record, indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    lines = [
        "---", "tags:", "- rsmatch", "- synthetic-image-detection", "---", "",
        "# rsmatch-filter report", "",
        f"Images `{images}` scored by the RSMatch detector `{detector}` (input {size[0]}x{size[1]}; "
        f"other sizes resized with {RESIZE}). An image is called synthetic when its score "
        f"exceeds the threshold **{result.threshold:.4g}**. The saved dataset holds "
        f"{'only the images called real' if keep_real else 'every scored image'}, with a "
        "`synthetic_score` column.", "",
        "| count | images |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in c.items() if k != "per_class"), "",
    ]  # fmt: skip
    if "per_class" in c:
        lines += ["| class | images | called synthetic |", "|---|---|---|"]
        lines += [
            f"| {k} | {v['images']} | {v['called_synthetic']} |" for k, v in c["per_class"].items()
        ]
        lines.append("")
    if metrics is not None:
        lines += [
            "## Against provenance", "",
            "Synthetic is the positive class; `recall/G` is the share of generator G's images "
            "called synthetic, `real_called_synthetic` the false-positive rate.", "",
            "| metric | value |", "|---|---|",
            *(f"| {k} | {format_metric(v)} |" for k, v in metrics.items()), "",
        ]  # fmt: skip
    lines += [
        "![score histogram](histogram.png)", "", "Most synthetic per class:", "",
        "![most synthetic](most_synthetic.png)", "", "Most real per class:", "",
        "![most real](most_real.png)", "",
    ]  # fmt: skip
    if result.corrupt:
        lines += [
            f"{len(result.corrupt)} file(s) did not decode and were skipped (corrupt.txt).",
            "",
        ]
    (folder / "README.md").write_text("\n".join(lines), encoding="utf-8")
