"""A built benchmark: a saved DatasetDict plus `rsmatch_benchmark.json` (on disk or on the Hub), and
its counts."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np

from rsmatch.benchmark.sources import SourceError, is_hub_id, load_hub_layout, load_saved

SPLITS = ("labeled", "unlabeled", "test")
META_FILE = "rsmatch_benchmark.json"


def save_benchmark(dd: datasets.DatasetDict, out: Path, meta: dict) -> None:
    dd.save_to_disk(str(out))
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_benchmark(spec: str | Path) -> tuple[datasets.DatasetDict, dict]:
    """The splits, held in memory so that nothing is ever written where they lie, and the meta.

    `spec`: the folder `rsmatch-build-benchmark` wrote, the same benchmark pushed to the Hub (its
    dataset repo id), or a download of that repo (parquet shards under `data/`).
    """
    spec = str(spec)
    name = f"data.benchmark={spec!r}"
    if is_hub_id(spec):
        meta = _hub_meta(spec, name)
        dd = load_hub_layout(spec, name)
    else:
        path = Path(spec)
        if not path.is_dir():
            raise SourceError(f"{name}: no such folder")
        if not (path / META_FILE).is_file():
            raise SourceError(f"{name}: not a saved RS-SSL benchmark ({META_FILE} missing)")
        meta = (path / META_FILE).read_text()
        saved = (path / "dataset_dict.json").is_file()  # else as pushed: parquet shards
        dd = load_saved(path, name) if saved else load_hub_layout(spec, name)
    missing = set(SPLITS) - set(dd)
    if missing:
        raise SourceError(f"{name}: missing splits {sorted(missing)}")
    return dd, json.loads(meta)


def _hub_meta(repo: str, name: str) -> str:
    """The benchmark's `rsmatch_benchmark.json`, from its Hub dataset repo."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, META_FILE, repo_type="dataset")).read_text()
    except Exception as e:  # not found, offline, no access: one line naming the repo
        raise SourceError(
            f"{name}: cannot read {META_FILE} of this Hub dataset id ({type(e).__name__}: {e})"
        ) from None


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
