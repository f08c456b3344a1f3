"""A built benchmark: a saved DatasetDict plus `rsmatch_benchmark.json` (on disk or on the Hub), and
its counts."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np

from rsmatch.benchmark.sources import (
    SourceError,
    is_hub_id,
    is_hub_layout,
    load_hub_layout,
    load_saved,
)

SPLITS = ("labeled", "unlabeled", "test")
META_FILE = "rsmatch_benchmark.json"


def save_benchmark(dd: datasets.DatasetDict, out: Path, meta: dict) -> None:
    dd.save_to_disk(str(out))
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def load_benchmark(spec: str | Path) -> tuple[datasets.DatasetDict, dict]:
    """The splits, held in memory so that nothing is ever written where they lie, and the meta.

    `spec`: the folder `rsmatch-build-benchmark` wrote, the same benchmark pushed to the Hub (its
    dataset repo id), or a download of that repo (parquet shards under `data/`).
    """
    spec = str(spec)
    name = f"data.benchmark={spec!r}"
    if is_hub_id(spec):
        meta, revision = _hub_meta(spec, name)
        dd = load_hub_layout(spec, name, revision=revision)  # the commit the meta came from
        if revision:  # a Hub repo moves on: record which commit this run trained on
            meta["hub_revision"] = revision
    else:
        path = Path(spec)
        if not path.is_dir():
            raise SourceError(f"{name}: no such folder")
        if not (path / META_FILE).is_file():
            raise SourceError(f"{name}: not a saved RS-SSL benchmark ({META_FILE} missing)")
        try:
            meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        except ValueError as e:
            raise SourceError(f"{name}: {META_FILE} is not valid JSON ({e})") from None
        saved = (path / "dataset_dict.json").is_file()  # else as pushed: parquet shards
        if not saved and not is_hub_layout(path):
            raise SourceError(
                f"{name}: no data (neither a saved DatasetDict, dataset_dict.json, nor the "
                "parquet shards of a Hub download, data/)"
            )
        dd = load_saved(path, name) if saved else load_hub_layout(spec, name)
    missing = set(SPLITS) - set(dd)
    if missing:
        raise SourceError(f"{name}: missing splits {sorted(missing)}")
    return dd, meta


def _hub_meta(repo: str, name: str) -> tuple[dict, str | None]:
    """The benchmark's `rsmatch_benchmark.json`, from its Hub dataset repo, and the commit it
    was read at (the snapshot folder hf_hub_download resolved), if known."""
    from huggingface_hub import hf_hub_download

    try:
        file = Path(hf_hub_download(repo, META_FILE, repo_type="dataset"))
        text = file.read_text(encoding="utf-8")
    except Exception as e:  # not found, offline, no access: one line naming the repo
        raise SourceError(
            f"{name}: no local folder of that name, and as a Hub dataset id: cannot read "
            f"{META_FILE} ({type(e).__name__}: {e})"
        ) from None
    revision = file.parent.name if file.parent.parent.name == "snapshots" else None
    try:
        return json.loads(text), revision
    except ValueError as e:
        raise SourceError(f"{name}: {META_FILE} is not valid JSON ({e})") from None


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
