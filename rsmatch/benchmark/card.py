"""The dataset card (`README.md`) of a built benchmark, as a huggingface_hub `DatasetCard`."""

from __future__ import annotations

import datasets
from huggingface_hub import DatasetCard, DatasetCardData

from rsmatch.benchmark.store import SPLITS, summary

# The Hub's size_categories as `datasets` lists them, bucket i holding n < 10**(3 + i) rows
SIZE_CATEGORIES = ("n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "10M<n<100M",
                   "100M<n<1B", "1B<n<10B", "10B<n<100B", "100B<n<1T")  # fmt: skip


def _size_category(n: int) -> str:
    """The Hub's size_categories bucket of n rows."""
    for i, label in enumerate(SIZE_CATEGORIES):
        if n < 10 ** (3 + i):
            return label
    return "n>1T"


def dataset_card(dd: datasets.DatasetDict, meta: dict) -> DatasetCard:
    counts = summary(dd)
    names = dd["test"].features["label"].names
    data = DatasetCardData(
        task_categories=["image-classification"],
        tags=["rs-ssl", "synthetic-data"],
        size_categories=_size_category(sum(c["total"] for c in counts.values())),
    )
    cap = meta["unlabeled_per_class"]
    lines = [
        "# RS-SSL benchmark", "",
        f"Real source `{meta['real']}`; {meta['labels_per_class']} labels per class; replace ratio "
        f"r = {meta['replace_ratio']} of each class's unlabeled pool"
        + (f" (capped at {cap} per class)" if cap else "")
        + f"; split seed {meta['seed']}. Built by `rsmatch-build-benchmark` with:", "",
        "```", " ".join(meta["command"]), "```", "",
        "Splits: `labeled` (real), `unlabeled` (real and synthetic, unmarked for training), `test` (real).",
        "Columns: `image`, `label`, `prompt`, and provenance that training must never read: "
        "`is_synthetic`, `generator`, `source_id`.", "",
        "| split | total | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names),
    ]  # fmt: skip
    for split in SPLITS:
        row = counts[split]
        cells = " | ".join(str(row["per_class"][n]) for n in names)
        lines.append(f"| {split} | {row['total']} | {cells} |")
    per_generator = counts["unlabeled"]["per_generator"].items()
    lines += [
        "",
        "Unlabeled images per generator: " + ", ".join(f"{g}: {n}" for g, n in per_generator),
        "",
    ]
    synthetic = ", ".join(f"`{g}` ({s})" for g, s in meta["synthetic"].items())
    lines += [f"Synthetic sources: {synthetic}" if synthetic else "No synthetic sources.", ""]
    skipped = sum(len(v) for v in meta["skipped_corrupt"].values())
    lines += [f"Unreadable images skipped: {skipped}.", "", "![preview](preview.png)", ""]
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
