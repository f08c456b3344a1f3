"""A built benchmark on disk: a saved DatasetDict plus `rsmatch_benchmark.json`, and its counts."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np

from rsmatch.benchmark.sources import SourceError, load_saved

SPLITS = ("labeled", "unlabeled", "test")
META_FILE = "rsmatch_benchmark.json"


def save_benchmark(dd: datasets.DatasetDict, out: Path, meta: dict) -> None:
    dd.save_to_disk(str(out))
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_benchmark(path: str | Path) -> tuple[datasets.DatasetDict, dict]:
    """The splits, held in memory so that nothing is ever written into `path`, and the meta."""
    path = Path(path)
    if not path.is_dir():
        raise SourceError(f"data.benchmark={str(path)!r}: no such folder")
    if not (path / META_FILE).is_file():
        raise SourceError(
            f"data.benchmark={str(path)!r}: not a saved RS-SSL benchmark ({META_FILE} missing)"
        )
    dd = load_saved(path, f"data.benchmark={str(path)!r}")
    missing = set(SPLITS) - set(dd)
    if missing:
        raise SourceError(f"data.benchmark={str(path)!r}: missing splits {sorted(missing)}")
    return dd, json.loads((path / META_FILE).read_text())


def summary(dd: datasets.DatasetDict) -> dict:
    """Counts per split, class and generator (for cards, logs and run records)."""
    names = dd["test"].features["label"].names
    out = {}
    for split in SPLITS:
        labels = np.asarray(dd[split]["label"])
        gens = np.asarray(dd[split]["generator"])
        out[split] = {
            "total": int(len(labels)),
            "per_class": {names[c]: int((labels == c).sum()) for c in range(len(names))},
            "per_generator": {g: int((gens == g).sum()) for g in sorted(set(gens.tolist()))},
        }
    return out
