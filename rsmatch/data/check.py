"""The training data checked before anything is decoded or written: `check_sources(cfg.data)`.

Paths, classes and images per class are found by listing files (or reading a label column),
so a split the sources cannot supply fails in about a second; then one pass lists every image
training could not decode, real and synthetic alike, with its full path.
"""

from __future__ import annotations

from pathlib import Path

from rsmatch.benchmark.integrity import check_readable
from rsmatch.benchmark.sources import (
    SourceError,
    SourceIndex,
    check_folder_or_hub_id,
    index_dataset,
    index_real,
    index_synthetic,
    missing_folder,
)
from rsmatch.benchmark.split import SplitSpec, check_counts
from rsmatch.benchmark.store import SPLITS, load_benchmark
from rsmatch.config import DataConfig


def check_local_paths(cfg: DataConfig) -> None:
    """The paths a config names, by their existence alone (microseconds, no download): what a
    grid checks for every run before any starts."""
    if cfg.benchmark:
        check_folder_or_hub_id(cfg.benchmark, key="data.benchmark")
        return
    check_folder_or_hub_id(cfg.real, key="data.real")
    for g, path in sorted(cfg.synthetic.items()):  # always local
        if not Path(path).is_dir():
            raise SourceError(f"data.synthetic.{g}: {path}: {missing_folder(Path(path))}")


def data_indexes(cfg: DataConfig) -> dict[str, SourceIndex]:
    """Every image source of the config, indexed (named `real/train`, `synthetic/NAME`, ...)."""
    if cfg.benchmark:
        dd, _ = load_benchmark(cfg.benchmark)
        return {f"benchmark/{s}": index_dataset(dd[s], f"{cfg.benchmark} ({s})") for s in SPLITS}
    check_local_paths(cfg)  # before the real set's download
    real = index_real(cfg.real, key="data.real")
    indexes = {"real/train": real.train, "real/test": real.test}
    for g, path in sorted(cfg.synthetic.items()):
        try:
            indexes[f"synthetic/{g}"] = index_synthetic(path, real.class_names)
        except SourceError as e:
            raise SourceError(f"data.synthetic.{g}: {e}") from None
    spec = SplitSpec(
        cfg.labels_per_class, cfg.replace_ratio, cfg.unlabeled_per_class, cfg.split_seed
    )
    synthetic = {g: indexes[f"synthetic/{g}"].counts() for g in cfg.synthetic}
    check_counts(real.train.counts(), real.class_names, synthetic, spec)
    return indexes


def check_sources(cfg: DataConfig) -> dict[str, dict[str, int]]:
    """Images per class of each source; raises one SourceError naming the first bad path or
    key, or listing every undecodable image."""
    indexes = data_indexes(cfg)
    check_readable(indexes)
    return {
        name: dict(zip(index.class_names, index.counts().tolist()))
        for name, index in indexes.items()
    }
