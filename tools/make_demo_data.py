"""Make the bundled demo sources in data/demo/ from the shared CIFAR-10 and synthetic JPEGs.

    python tools/make_demo_data.py --shared ../shared/data --out data/demo

Takes the first N files (sorted names) of each class, stores their original JPEG bytes (no
re-encoding) as saved `datasets`: real/ (train, test) and synthetic/{ddpm,cgan}/.
"""

from __future__ import annotations

import argparse
import shutil
import tarfile
import tempfile
from pathlib import Path

import datasets

from rsmatch.benchmark.sources import read_class_folder

REAL_TRAIN, REAL_TEST, SYNTH = 225, 100, 100  # per class


def _subset(ds: datasets.Dataset, per_class: int) -> datasets.Dataset:
    seen: dict[int, int] = {}
    keep = []
    for i, y in enumerate(ds["label"]):
        if seen.get(y, 0) < per_class:
            seen[y] = seen.get(y, 0) + 1
            keep.append(i)
    return ds.select(keep).flatten_indices()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=Path("data/demo"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("cifar10-jpeg", "synth-ddpm-jpeg", "synth-cgan-jpeg"):
            with tarfile.open(args.shared / f"{name}.tar.gz") as tar:
                tar.extractall(tmp, filter="data")
        root = Path(tmp)
        train = read_class_folder(root / "cifar10/train")
        names = train.features["label"].names
        real = datasets.DatasetDict(
            train=_subset(train, REAL_TRAIN),
            test=_subset(read_class_folder(root / "cifar10/test", names), REAL_TEST),
        )
        # written beside the old demo data, which is replaced only once all of it is written
        staged = args.out.with_name(f".{args.out.name}.tmp")
        shutil.rmtree(staged, ignore_errors=True)
        real.save_to_disk(str(staged / "real"))
        for gen in ("ddpm", "cgan"):
            synth = _subset(read_class_folder(root / "synth" / gen, names), SYNTH)
            synth.save_to_disk(str(staged / "synthetic" / gen))
    shutil.rmtree(args.out, ignore_errors=True)
    staged.rename(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
