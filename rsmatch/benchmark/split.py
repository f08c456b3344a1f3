"""The RS-SSL split (docs/method.md section 1), decided once from a seed and stored as data.

Per class c, with a generator seeded by (seed, c) so the split depends on nothing else (not the
world size, not the other classes): shuffle the real train images, take the first
`labels_per_class` as labeled, the next `unlabeled_per_class` (or all) as the unlabeled pool,
drop the first round(r * pool) of the pool and add as many synthetic images of class c, drawn in
equal shares from the generators (sorted by name; the remainder goes to the first ones).
The pool is then shuffled by a generator seeded by (seed, POOL_ORDER), so a row's position says
nothing about where it came from. Every row carries provenance that training never reads:
`is_synthetic`, `generator`, `source_id`. With r = 0 no generator is needed (real-only SSL).
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import numpy as np

from rsmatch.benchmark.sources import RealSource, SourceError, class_counts

REAL = "real"  # the provenance name of real rows, so no generator may use it
POOL_ORDER = 2**32 - 1  # the seed key of the pool shuffle; class keys are 0..C-1


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
        ds.add_column("is_synthetic", [generator != REAL] * len(rows))
        .add_column("generator", [generator] * len(rows))
        .add_column("source_id", [f"{generator}/{i}" for i in rows])
    )


def pool_sizes(counts: np.ndarray, spec: SplitSpec) -> list[int]:
    """Unlabeled pool size per class (before replacement) from real train images per class."""
    sizes = []
    for n in counts.tolist():
        pool = n - spec.labels_per_class
        sizes.append(
            pool if spec.unlabeled_per_class is None else min(pool, spec.unlabeled_per_class)
        )
    return sizes


def generator_shares(total: int, generators: list[str]) -> dict[str, int]:
    """`total` split equally over the sorted generators, the remainder to the first ones."""
    if not generators:  # real-only: check_counts has made sure nothing is to be replaced
        return {}
    base, extra = divmod(total, len(generators))
    return {g: base + (i < extra) for i, g in enumerate(sorted(generators))}


def required_per_generator(
    counts: np.ndarray, spec: SplitSpec, generators: list[str]
) -> dict[str, int]:
    """The most synthetic images of one class each generator must supply."""
    need = dict.fromkeys(generators, 0)
    for pool in pool_sizes(counts, spec):
        for g, share in generator_shares(
            round(spec.replace_ratio * max(pool, 0)), generators
        ).items():
            need[g] = max(need[g], share)
    return need


# How errors name the split's settings: the trainer's config keys, or the builder's flags
CONFIG_KEYS = {"labels_per_class": "data.labels_per_class",
               "unlabeled_per_class": "data.unlabeled_per_class",
               "replace_ratio": "data.replace_ratio", "synthetic": "data.synthetic"}  # fmt: skip


def check_counts(
    counts: np.ndarray, class_names: list[str], synthetic: dict[str, np.ndarray], spec: SplitSpec,
    keys: dict[str, str] = CONFIG_KEYS,
) -> None:  # fmt: skip
    """Every error `build_split` can raise, from images per class alone (nothing decoded):
    `counts` are the real train images per class, `synthetic` each generator's; errors name
    the settings as `keys` does."""
    k = keys
    if spec.replace_ratio > 0 and not synthetic:
        raise SourceError(
            f"{k['replace_ratio']}={spec.replace_ratio} needs {k['synthetic']} sources"
        )
    if REAL in synthetic:
        raise SourceError(
            f"{k['synthetic']}: the generator name {REAL!r} is reserved for real images"
        )
    for c, name in enumerate(class_names):
        n = int(counts[c])
        if spec.labels_per_class >= n:
            raise SourceError(
                f"{k['labels_per_class']}={spec.labels_per_class}: class {name!r} has only "
                f"{n} images (some must stay unlabeled)"
            )
        pool = n - spec.labels_per_class
        if spec.unlabeled_per_class is not None:
            if spec.unlabeled_per_class > pool:
                raise SourceError(
                    f"{k['unlabeled_per_class']}={spec.unlabeled_per_class}: class {name!r} has "
                    f"only {pool} unlabeled images"
                )
            pool = spec.unlabeled_per_class
        for g, share in generator_shares(round(spec.replace_ratio * pool), list(synthetic)).items():
            if share > synthetic[g][c]:
                raise SourceError(
                    f"{k['replace_ratio']}={spec.replace_ratio}: generator {g!r} has "
                    f"{synthetic[g][c]} images of class {name!r}, {share} needed"
                )


def build_split(
    real: RealSource, synthetic: dict[str, datasets.Dataset], spec: SplitSpec
) -> datasets.DatasetDict:
    """Labeled / unlabeled / test DatasetDict with provenance columns (see module doc)."""
    names = real.class_names
    labels = np.asarray(real.train["label"])
    synth_labels = {g: np.asarray(ds["label"]) for g, ds in synthetic.items()}
    synth_counts = {g: class_counts(y, len(names)) for g, y in synth_labels.items()}
    check_counts(class_counts(labels, len(names)), names, synth_counts, spec)
    lab_rows, unl_rows = [], []
    syn_rows: dict[str, list[int]] = {g: [] for g in synthetic}
    for c in range(len(names)):
        rng = np.random.default_rng([spec.seed, c])
        rows = rng.permutation(np.flatnonzero(labels == c))
        pool = rows[spec.labels_per_class :]
        if spec.unlabeled_per_class is not None:
            pool = pool[: spec.unlabeled_per_class]
        n_replace = round(spec.replace_ratio * len(pool))
        lab_rows += rows[: spec.labels_per_class].tolist()
        unl_rows += pool[n_replace:].tolist()
        for g, share in generator_shares(n_replace, list(synthetic)).items():
            candidates = np.flatnonzero(synth_labels[g] == c)
            syn_rows[g] += rng.permutation(candidates)[:share].tolist()
    parts = [_with_provenance(real.train, REAL, unl_rows)]
    parts += [_with_provenance(synthetic[g], g, syn_rows[g]) for g in sorted(synthetic)]
    unlabeled = datasets.concatenate_datasets(parts)
    order = np.random.default_rng([spec.seed, POOL_ORDER]).permutation(len(unlabeled))
    return datasets.DatasetDict(
        labeled=_with_provenance(real.train, REAL, lab_rows),
        unlabeled=unlabeled.select(order),
        test=_with_provenance(real.test, REAL, list(range(len(real.test)))),
    )
