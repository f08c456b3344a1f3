"""The RS-SSL split (RSMATCH.md section 1), decided once from a seed and stored as data.

Per class c, with a generator seeded by (seed, c) so the split depends on nothing else (not the
world size, not the other classes): shuffle the real train images, take the first
`labels_per_class` as labeled, the next `unlabeled_per_class` (or all) as the unlabeled pool,
drop the first round(r * pool) of the pool and add as many synthetic images of class c, drawn in
equal shares from the generators (sorted by name; the remainder goes to the first ones).
Every row carries provenance that training never reads: `is_synthetic`, `generator`,
`source_id`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from rsmatch.benchmark.sources import RealSource, SourceError

SPLITS = ("labeled", "unlabeled", "test")
META_FILE = "rsmatch_benchmark.json"


@dataclass
class SplitSpec:
    labels_per_class: int
    replace_ratio: float
    unlabeled_per_class: int | None
    seed: int


def _with_provenance(ds: datasets.Dataset, generator: str, rows: list[int]) -> datasets.Dataset:
    ds = ds.select(rows)
    if "prompt" not in ds.column_names:
        ds = ds.add_column("prompt", [""] * len(rows))
    return (
        ds.add_column("is_synthetic", [generator != "real"] * len(rows))
        .add_column("generator", [generator] * len(rows))
        .add_column("source_id", [f"{generator}/{i}" for i in rows])
    )


def pool_sizes(labels: np.ndarray, num_classes: int, spec: SplitSpec) -> list[int]:
    """Unlabeled pool size per class (before replacement), as build_split computes it."""
    sizes = []
    for c in range(num_classes):
        pool = int((labels == c).sum()) - spec.labels_per_class
        sizes.append(
            pool if spec.unlabeled_per_class is None else min(pool, spec.unlabeled_per_class)
        )
    return sizes


def required_per_generator(
    labels: np.ndarray, num_classes: int, spec: SplitSpec, generators: list[str]
) -> dict[str, int]:
    """The most synthetic images of one class each generator must supply."""
    need = {g: 0 for g in generators}
    if not generators:
        return need
    for pool in pool_sizes(labels, num_classes, spec):
        for g, share in generator_shares(
            round(spec.replace_ratio * max(pool, 0)), generators
        ).items():
            need[g] = max(need[g], share)
    return need


def generator_shares(total: int, generators: list[str]) -> dict[str, int]:
    base, extra = divmod(total, len(generators))
    return {g: base + (i < extra) for i, g in enumerate(sorted(generators))}


def build_split(
    real: RealSource, synthetic: dict[str, datasets.Dataset], spec: SplitSpec
) -> datasets.DatasetDict:
    """Labeled / unlabeled / test DatasetDict with provenance columns (see module doc)."""
    labels = np.asarray(real.train["label"])
    synth_labels = {g: np.asarray(ds["label"]) for g, ds in synthetic.items()}
    if spec.replace_ratio > 0 and not synthetic:
        raise SourceError(f"data.replace_ratio={spec.replace_ratio} needs data.synthetic sources")
    lab_rows, unl_rows = [], []
    syn_rows: dict[str, list[int]] = {g: [] for g in synthetic}
    for c, name in enumerate(real.class_names):
        rng = np.random.default_rng([spec.seed, c])
        rows = rng.permutation(np.flatnonzero(labels == c))
        if spec.labels_per_class >= len(rows):
            raise SourceError(
                f"data.labels_per_class={spec.labels_per_class}: class {name!r} has only "
                f"{len(rows)} images (some must stay unlabeled)"
            )
        pool = rows[spec.labels_per_class :]
        if spec.unlabeled_per_class is not None:
            if spec.unlabeled_per_class > len(pool):
                raise SourceError(
                    f"data.unlabeled_per_class={spec.unlabeled_per_class}: class {name!r} has "
                    f"only {len(pool)} unlabeled images"
                )
            pool = pool[: spec.unlabeled_per_class]
        n_replace = round(spec.replace_ratio * len(pool))
        lab_rows += rows[: spec.labels_per_class].tolist()
        unl_rows += pool[n_replace:].tolist()
        for g, share in generator_shares(n_replace, list(synthetic)).items():
            candidates = np.flatnonzero(synth_labels[g] == c)
            if share > len(candidates):
                raise SourceError(
                    f"data.replace_ratio={spec.replace_ratio}: generator {g!r} has "
                    f"{len(candidates)} images of class {name!r}, {share} needed"
                )
            syn_rows[g] += rng.permutation(candidates)[:share].tolist()
    unlabeled = [_with_provenance(real.train, "real", unl_rows)]
    unlabeled += [_with_provenance(synthetic[g], g, syn_rows[g]) for g in sorted(synthetic)]
    return datasets.DatasetDict(
        labeled=_with_provenance(real.train, "real", lab_rows),
        unlabeled=datasets.concatenate_datasets(unlabeled),
        test=_with_provenance(real.test, "real", list(range(len(real.test)))),
    )


def save_benchmark(dd: datasets.DatasetDict, out: Path, meta: dict) -> None:
    dd.save_to_disk(str(out))
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_benchmark(path: str | Path) -> tuple[datasets.DatasetDict, dict]:
    path = Path(path)
    if not (path / META_FILE).is_file():
        raise SourceError(
            f"data.benchmark={str(path)!r}: not a saved RS-SSL benchmark ({META_FILE} missing)"
        )
    dd = datasets.load_from_disk(str(path))
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
