"""Load real and synthetic image sources as `datasets.Dataset`s with columns `image`, `label`.

A real source is a Hub id (`uoft-cs/cifar10`), a folder with `train/` and `test/` holding one
subfolder per class, or a DatasetDict saved with `save_to_disk`. A synthetic source is a folder
with one subfolder per class or a saved Dataset. Image files are stored as their original bytes
(no re-encoding), so real and synthetic images keep exactly the compression they came with.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
LABEL_COLUMNS = ("label", "fine_label", "labels")  # uoft-cs/cifar100 uses fine_label


class SourceError(ValueError):
    """A source that cannot be used; the message names the path or id."""


@dataclass
class RealSource:
    train: datasets.Dataset
    test: datasets.Dataset
    class_names: list[str]


def _features(class_names: list[str]) -> datasets.Features:
    return datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names)}
    )


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def find_corrupt(root: Path) -> list[Path]:
    """Image files under root that do not decode."""
    bad = []
    for path in image_files(root):
        try:
            with Image.open(path) as im:
                im.load()
        except (OSError, SyntaxError, ValueError):
            bad.append(path)
    return bad


def _prompts(root: Path) -> dict[str, str]:
    index = root / "prompts.jsonl"
    if not index.is_file():
        return {}
    return {row["file"]: row["prompt"] for row in map(json.loads, index.read_text().splitlines())}


def read_class_folder(
    root: Path, class_names: list[str] | None = None, exclude: frozenset[Path] = frozenset()
) -> datasets.Dataset:
    """One subfolder per class; the class index is the position of its name in `class_names`
    (sorted folder names when not given). Unknown class folders are an error. A
    `prompts.jsonl` written by the generator adds a `prompt` column."""
    if not root.is_dir():
        raise SourceError(f"{root}: not a folder")
    folders = _class_folders(root)
    if not folders:
        raise SourceError(f"{root}: no class subfolders")
    names = class_names or [f.name for f in folders]
    unknown = [f.name for f in folders if f.name not in names]
    if unknown:
        raise SourceError(f"{root}: class folders {unknown} are not among the classes {names}")
    prompts = _prompts(root)
    images, labels, texts = [], [], []
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if (
                path.suffix.lower() in IMAGE_SUFFIXES
                and path not in exclude
                and not path.name.startswith(".")
            ):
                key = f"{folder.name}/{path.name}"
                images.append({"bytes": path.read_bytes(), "path": key})
                labels.append(names.index(folder.name))
                texts.append(prompts.get(key, ""))
    if not images:
        raise SourceError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    columns = {"image": images, "label": labels}
    features = _features(names)
    if prompts:
        columns["prompt"] = texts
        features["prompt"] = datasets.Value("string")
    return datasets.Dataset.from_dict(columns, features=features)


CIFAKE_NAME = re.compile(r"^\d+(?: \((\d+)\))?\.(?:jpe?g|png)$", re.IGNORECASE)


def cifake_class(filename: str) -> int:
    """CIFAKE's flat folders: `NNNN.jpg` is class 1 and `NNNN (k).jpg` class k (1-based, in
    CIFAR-10 order), as the dataset's own description puts it; returns the 0-based index."""
    match = CIFAKE_NAME.match(filename)
    if match is None:
        raise SourceError(f"{filename}: not a CIFAKE file name (NNNN.jpg or NNNN (k).jpg)")
    return int(match.group(1) or 1) - 1


def read_cifake_folder(
    root: Path, class_names: list[str], exclude: frozenset[Path] = frozenset()
) -> datasets.Dataset:
    if not root.is_dir():
        raise SourceError(f"{root}: not a folder")
    images, labels = [], []
    for path in image_files(root):
        if path in exclude:
            continue
        k = cifake_class(path.name)
        if k >= len(class_names):
            raise SourceError(
                f"{path}: class {k + 1} but the real set has {len(class_names)} classes"
            )
        images.append({"bytes": path.read_bytes(), "path": path.name})
        labels.append(k)
    if not images:
        raise SourceError(f"{root}: no CIFAKE images found")
    return datasets.Dataset.from_dict(
        {"image": images, "label": labels}, features=_features(class_names)
    )


def _standardise(ds: datasets.Dataset, where: str) -> datasets.Dataset:
    """Rename a dataset's image and label columns to `image` and `label`."""
    image_col = next((k for k, v in ds.features.items() if isinstance(v, datasets.Image)), None)
    label_col = next((k for k in LABEL_COLUMNS if k in ds.features), None)
    if image_col is None or label_col is None:
        raise SourceError(f"{where}: needs an Image column and one of {LABEL_COLUMNS}")
    ds = ds.select_columns([image_col, label_col])
    if image_col != "image":
        ds = ds.rename_column(image_col, "image")
    if label_col != "label":
        ds = ds.rename_column(label_col, "label")
    if not isinstance(ds.features["label"], datasets.ClassLabel):
        names = [str(i) for i in range(int(max(ds["label"])) + 1)]
        ds = ds.cast_column("label", datasets.ClassLabel(names=names))
    return ds


def load_real(spec: str) -> RealSource:
    """Real images with a train and a test split (see the module doc for `spec`)."""
    path = Path(spec)
    if (path / "dataset_dict.json").is_file():
        dd = datasets.load_from_disk(str(path))
    elif (path / "train").is_dir() and (path / "test").is_dir():
        train = read_class_folder(path / "train")
        names = train.features["label"].names
        return RealSource(train, read_class_folder(path / "test", names), names)
    else:
        try:  # a Hub id, or a local folder laid out like a Hub dataset repository
            dd = datasets.load_dataset(spec)
        except Exception as e:  # datasets raises many types; name the source in one line
            kind = "folder" if path.exists() else "Hub id"
            raise SourceError(
                f"{spec}: cannot load this {kind} ({type(e).__name__}: {e})"
            ) from None
    missing = {"train", "test"} - set(dd)
    if missing:
        raise SourceError(f"{spec}: missing split(s) {sorted(missing)}")
    train, test = _standardise(dd["train"], spec), _standardise(dd["test"], spec)
    return RealSource(train, test, train.features["label"].names)


def load_synthetic(spec: str, class_names: list[str]) -> datasets.Dataset:
    """Synthetic images whose labels are re-indexed to the real set's classes."""
    path = Path(spec)
    if (path / "dataset_info.json").is_file():
        ds = _standardise(datasets.load_from_disk(str(path)), spec)
        names = ds.features["label"].names
        unknown = sorted(set(names) - set(class_names))
        if unknown:
            raise SourceError(f"{spec}: classes {unknown} are not among {class_names}")
        remap = np.array([class_names.index(n) for n in names])
        labels = remap[np.asarray(ds["label"])].tolist()
        ds = ds.remove_columns("label").add_column("label", labels)
        return ds.cast_column("label", datasets.ClassLabel(names=class_names))
    return read_class_folder(path, class_names)
