"""The filter-first baseline: drop unlabeled pool rows a detector scored above a threshold
(`data.exclude_scores`, `data.exclude_above`), before any algorithm sees the pool.

It reads only the pool's `source_id` column and the scores file's `source_id` (and `split`)
and `synthetic_score` columns: detector scores, never the ground truth (`is_synthetic`,
`generator`), which this function is not even handed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rsmatch.benchmark.sources import SourceError

POOL_SPLIT = "unlabeled"  # a benchmark's pool, when the scores file covers several splits


def read_scores(path: str) -> dict[str, float]:
    """source_id -> synthetic score from an `rsmatch-filter` scores.parquet."""
    import pyarrow.parquet as pq

    key = f"data.exclude_scores={path!r}"
    try:
        names = pq.read_schema(path).names
    except (OSError, ValueError) as e:
        raise SourceError(f"{key}: not a readable parquet file ({e})") from None
    missing = {"source_id", "synthetic_score"} - set(names)
    if missing:
        raise SourceError(
            f"{key}: no {sorted(missing)} column(s); score a saved benchmark, whose rows carry "
            "source_id, with rsmatch-filter"
        )
    table = pq.read_table(
        path, columns=[c for c in ("split", "source_id", "synthetic_score") if c in names]
    )
    ids = table["source_id"].to_pylist()
    scores = table["synthetic_score"].to_pylist()
    if "split" in names:
        split = np.asarray(table["split"].to_pylist())
        if (split == POOL_SPLIT).any():  # labeled/test rows reuse source ids of other images
            rows = np.flatnonzero(split == POOL_SPLIT)
            ids, scores = [ids[i] for i in rows], [scores[i] for i in rows]
    if len(set(ids)) != len(ids):
        raise SourceError(f"{key}: source_id values repeat; score one pool only")
    return dict(zip(ids, scores))


def kept_rows(source_ids: Sequence[str], path: str, above: float) -> list[int]:
    """Pool rows whose score is at most `above` (a score above it calls synthetic)."""
    scores = read_scores(path)
    missing = [s for s in source_ids if s not in scores]
    if missing:
        raise SourceError(
            f"data.exclude_scores={path!r}: {len(missing)} of {len(source_ids)} pool rows have "
            f"no score (e.g. {missing[0]!r}); score this benchmark's unlabeled split"
        )
    keep = [i for i, s in enumerate(source_ids) if scores[s] <= above]
    if not keep:
        raise SourceError(f"data.exclude_above={above}: drops every unlabeled row")
    return keep
