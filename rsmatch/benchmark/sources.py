"""Real and synthetic image sources, indexed before any image is read, then loaded as
`datasets.Dataset`s with columns `image`, `label` (and `prompt` when the generator wrote one).

A real source is a Hub id (`uoft-cs/cifar10`), a folder with `train/` and `test/` holding one
subfolder per class, or a DatasetDict saved with `save_to_disk`. A synthetic source is a folder
with one subfolder per class, a CIFAKE folder, or a saved Dataset. Image files are stored as
their original bytes (no re-encoding), so real and synthetic images keep exactly the compression
they came with.

An index (`SourceIndex`) holds a label per image and where the image is, so counts per class
are known, and checked, before anything is decoded. Loading never writes next to the data:
saved and Hub datasets are held in memory (`keep_in_memory=True`; training decodes every image
into RAM anyway), so no `datasets` cache file is ever created in a data folder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from huggingface_hub.utils import HFValidationError, validate_repo_id

from rsmatch.benchmark.errors import SourceError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
LABEL_COLUMNS = ("label", "fine_label", "labels")  # uoft-cs/cifar100 uses fine_label


def image_bytes(item: dict) -> bytes:
    """The encoded bytes of an undecoded `datasets.Image` value: stored, or read from its path."""
    return item["bytes"] if item.get("bytes") is not None else Path(item["path"]).read_bytes()


@dataclass
class RealSource:
    train: datasets.Dataset
    test: datasets.Dataset
    class_names: list[str]


@dataclass
class SourceIndex:
    """One split of a source before any image is read: a label per image and where it is,
    either one file each (`files`, with the `keys` stored as the image path) or a row of an
    in-memory `dataset`."""

    where: str  # how messages name this split: a folder, or "SPEC (split)"
    class_names: list[str]
    labels: np.ndarray
    files: list[Path] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    prompts: dict[str, str] = field(default_factory=dict)
    dataset: datasets.Dataset | None = None

    def counts(self, skip: frozenset[int] = frozenset()) -> np.ndarray:
        """Images per class, without the positions in `skip`."""
        keep = np.ones(len(self.labels), dtype=bool)
        keep[list(skip)] = False
        return class_counts(self.labels[keep], len(self.class_names))

    def raw(self) -> Iterator[tuple[str, bytes]]:
        """(name, bytes) of each image in order; the name is a full path or `where[row]`."""
        if self.dataset is None:
            for path in self.files:
                yield str(path.resolve()), path.read_bytes()
            return
        for i, item in enumerate(self.dataset.cast_column("image", datasets.Image(decode=False))):
            image = item["image"]
            data = image_bytes(image)
            suffix = f" ({image['path']})" if image.get("path") else ""
            yield f"{self.where}[{i}]{suffix}", data

    def load(self, skip: frozenset[int] = frozenset()) -> datasets.Dataset:
        """The images as a Dataset (file bytes read now), without the positions in `skip`."""
        keep = [i for i in range(len(self.labels)) if i not in skip]
        if self.dataset is not None:
            return self.dataset.select(keep) if skip else self.dataset
        columns = {
            "image": [{"bytes": self.files[i].read_bytes(), "path": self.keys[i]} for i in keep],
            "label": self.labels[keep].tolist(),
        }
        features = _features(self.class_names)
        if self.prompts:
            columns["prompt"] = [self.prompts.get(self.keys[i], "") for i in keep]
            features["prompt"] = datasets.Value("string")
        return datasets.Dataset.from_dict(columns, features=features)


@dataclass
class RealIndex:
    train: SourceIndex
    test: SourceIndex

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)


def _features(class_names: list[str]) -> datasets.Features:
    return datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names)}
    )


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if _is_image(p))


def _prompts(root: Path) -> dict[str, str]:
    index = root / "prompts.jsonl"
    if not index.is_file():
        return {}
    return {
        row["file"]: row["prompt"]
        for row in map(json.loads, index.read_text(encoding="utf-8").splitlines())
    }


def missing_folder(path: Path) -> str:
    """Why `path` is no folder: `no such folder`, or `not a folder` (a file)."""
    return "not a folder" if path.exists() else "no such folder"


def index_class_folder(
    root: Path, class_names: list[str] | None = None, only: set[Path] | None = None
) -> SourceIndex:
    """One subfolder per class; the class index is the position of its name in `class_names`
    (sorted folder names when not given). Unknown class folders are an error. A
    `prompts.jsonl` written by the generator adds a `prompt` column. `only`: these files
    alone (a generated folder holds an earlier, larger build's images too)."""
    if not root.is_dir():
        raise SourceError(f"{root}: {missing_folder(root)}")
    folders = _class_folders(root)
    if not folders:
        raise SourceError(f"{root}: no class subfolders")
    names = class_names or [f.name for f in folders]
    unknown = [f.name for f in folders if f.name not in names]
    if unknown:
        raise SourceError(f"{root}: class folders {unknown} are not among the classes {names}")
    files, keys, labels = [], [], []
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if _is_image(path) and (only is None or path in only):
                files.append(path)
                keys.append(f"{folder.name}/{path.name}")
                labels.append(names.index(folder.name))
    if not files:
        raise SourceError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    return SourceIndex(str(root), names, np.array(labels), files, keys, _prompts(root))


def read_class_folder(
    root: Path, class_names: list[str] | None = None, only: set[Path] | None = None
) -> datasets.Dataset:
    return index_class_folder(root, class_names, only).load()


CIFAKE_NAME = re.compile(r"^\d+(?: \((\d+)\))?\.(?:jpe?g|png)$", re.IGNORECASE)


def cifake_class(filename: str) -> int:
    """CIFAKE's flat folders: `NNNN.jpg` is class 1 and `NNNN (k).jpg` class k (1-based, in
    CIFAR-10 order), as the dataset's own description puts it; returns the 0-based index."""
    match = CIFAKE_NAME.match(filename)
    if match is None:
        raise SourceError(f"{filename}: not a CIFAKE file name (NNNN.jpg or NNNN (k).jpg)")
    return int(match.group(1) or 1) - 1


def index_cifake_folder(root: Path, class_names: list[str]) -> SourceIndex:
    if not root.is_dir():
        raise SourceError(f"{root}: {missing_folder(root)}")
    # flat, as CIFAKE's REAL and FAKE folders are: a parent folder would take both
    files = sorted(p for p in root.iterdir() if p.is_file() and _is_image(p))
    labels = []
    for path in files:
        k = cifake_class(path.name)
        if k >= len(class_names):
            raise SourceError(
                f"{path}: class {k + 1} but the real set has {len(class_names)} classes"
            )
        labels.append(k)
    if not files:
        hint = " (CIFAKE folders are flat: name e.g. CIFAKE/train/FAKE, not its parent)"
        raise SourceError(
            f"{root}: no CIFAKE images found"
            + (hint if any(p.is_dir() for p in root.iterdir()) else "")
        )
    return SourceIndex(str(root), class_names, np.array(labels), files, [p.name for p in files])


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


def index_dataset(ds: datasets.Dataset, where: str) -> SourceIndex:
    ds = _standardise(ds, where)
    return SourceIndex(where, ds.features["label"].names, np.asarray(ds["label"]), dataset=ds)


def is_repo_id(spec: str) -> bool:
    """`spec` is shaped as a Hub repository id (`name` or `owner/name`)."""
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def is_hub_id(spec: str) -> bool:
    """A data source `spec` can only mean a Hub repository: nothing of that name here, a repo
    id, and not inside a local folder (`benchmarks/cifar10-r07` with `benchmarks/` here is a
    mistyped path, which the Hub would answer only after its retries)."""
    if Path(spec).exists() or not is_repo_id(spec):
        return False
    owner, _, _ = spec.rpartition("/")
    return not (owner and Path(owner).is_dir())


def check_folder_or_hub_id(spec: str, key: str) -> None:
    """`spec` names a local folder or a Hub dataset id (a real set, a benchmark)."""
    if not Path(spec).exists() and not is_hub_id(spec):
        raise SourceError(f"{key}={spec}: no such folder")


def is_hub_layout(path: Path) -> bool:
    """A local folder laid out as the Hub dataset repo `push_to_hub` writes (a download of one):
    parquet shards under `data/`."""
    return any((path / "data").glob("*.parquet"))


def load_hub_layout(
    spec: str, name: str, revision: str | None = None, in_memory: bool = True
) -> datasets.DatasetDict:
    """A Hub dataset id (at `revision`, else its latest), or a local folder laid out like a Hub
    dataset repository (`is_hub_layout`); `name` starts the one-line error."""
    kind = "folder" if Path(spec).exists() else "Hub dataset id (no local folder of that name)"
    try:
        return datasets.load_dataset(spec, revision=revision, keep_in_memory=in_memory)
    except Exception as e:  # datasets raises many types; name the source in one line
        raise SourceError(f"{name}: cannot load this {kind} ({type(e).__name__}: {e})") from None


def load_saved(
    path: Path, name: str, in_memory: bool = True
) -> datasets.Dataset | datasets.DatasetDict:
    """What `save_to_disk` wrote in `path`, a Dataset or a DatasetDict; `name` starts its
    one-line errors. datasets saves a split with no rows without data files and then fails to
    load it (IndexError), so such splits are named before loading."""
    if _saved_without_rows(path):
        raise SourceError(f"{name}: a saved dataset with no rows")
    empty = sorted(split.name for split in path.iterdir() if _saved_without_rows(split))
    if empty:
        raise SourceError(f"{name}: empty splits {empty}")
    try:
        return datasets.load_from_disk(str(path), keep_in_memory=in_memory)
    except Exception as e:  # datasets raises many types (a truncated arrow file, a bad json)
        raise SourceError(
            f"{name}: cannot load this saved dataset ({type(e).__name__}: {e})"
        ) from None


def _saved_without_rows(split: Path) -> bool:
    """A folder that `Dataset.save_to_disk` wrote with no rows: no data files listed."""
    state = split / "state.json"
    try:
        return state.is_file() and not json.loads(state.read_text(encoding="utf-8")).get(
            "_data_files"
        )
    except (OSError, ValueError, AttributeError):  # unreadable: load_from_disk names it below
        return False


def index_real(spec: str, key: str = "data.real") -> RealIndex:
    """Real images with a train and a test split (see the module doc for `spec`); `key` names
    the setting in messages (`data.real`, `--real`)."""
    path = Path(spec)
    if (path / "dataset_dict.json").is_file():
        dd = load_saved(path, f"{key}={spec}")
    elif (path / "train").is_dir() and (path / "test").is_dir():
        train = index_class_folder(path / "train")
        return RealIndex(train, index_class_folder(path / "test", train.class_names))
    elif (path / "dataset_info.json").is_file():  # `Dataset.save_to_disk`: one split
        raise SourceError(
            f"{key}={spec}: a saved single split; a real set needs a train and a test split (a "
            "saved DatasetDict, train/ and test/ class folders, or a Hub dataset id)"
        )
    else:
        check_folder_or_hub_id(spec, key)
        dd = load_hub_layout(spec, f"{key}={spec}")
    missing = {"train", "test"} - set(dd)
    if missing:
        raise SourceError(f"{key}={spec}: missing split(s) {sorted(missing)}")
    return RealIndex(
        *(index_dataset(dd[split], f"{spec} ({split})") for split in ("train", "test"))
    )


def load_real(spec: str, key: str = "data.real") -> RealSource:
    real = index_real(spec, key)
    return RealSource(real.train.load(), real.test.load(), real.class_names)


def index_synthetic(spec: str, class_names: list[str]) -> SourceIndex:
    """Synthetic images whose labels are re-indexed to the real set's classes."""
    path = Path(spec)
    if not (path / "dataset_info.json").is_file():
        return index_class_folder(path, class_names)
    ds = _standardise(load_saved(path, spec), spec)
    names = ds.features["label"].names
    unknown = sorted(set(names) - set(class_names))
    if unknown:
        raise SourceError(f"{spec}: classes {unknown} are not among {class_names}")
    remap = np.array([class_names.index(n) for n in names])
    labels = remap[np.asarray(ds["label"])]
    ds = ds.remove_columns("label").add_column("label", labels.tolist())
    ds = ds.cast_column("label", datasets.ClassLabel(names=class_names))
    return SourceIndex(spec, class_names, labels, dataset=ds)


def load_synthetic(spec: str, class_names: list[str]) -> datasets.Dataset:
    return index_synthetic(spec, class_names).load()
