"""Score any image set with an exported RSMatch detector, call each image real or synthetic,
and write the scores, the scored (or filtered) dataset and a report (`rsmatch-filter`).

Inputs are read into a `datasets.DatasetDict` whatever their form (a folder, nested or flat; a
saved Dataset or DatasetDict; a Hub id), so scoring, filtering and saving are one path. Images
are decoded as training decoded them (torchvision, RGB) and, when their size differs from the
detector's input, resized with PIL Lanczos, the resize the benchmark builder applies to
generated images. An image is called synthetic when its score exceeds the threshold, as RSMatch
routes samples by argmax (score > 0.5).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor
from tqdm.auto import tqdm

from rsmatch.atomic import write_folder
from rsmatch.benchmark.integrity import decode_bytes
from rsmatch.benchmark.sources import (
    LABEL_COLUMNS,
    image_bytes,
    image_files,
    is_hub_id,
    is_hub_layout,
    load_hub_layout,
    load_saved,
    missing_folder,
)
from rsmatch.evaluate import gather_shards, shard
from rsmatch.export import export_kind, load_detector
from rsmatch.hub import data_folder_kind
from rsmatch.models import Detector

if TYPE_CHECKING:
    from accelerate import Accelerator

PROVENANCE = ("is_synthetic", "generator")


class FilterError(ValueError):
    """Bad input to the filter; the message names the option and the path or id."""


# -- the detector -----------------------------------------------------------------------------


def check_hub_id(spec: str, named: str) -> None:
    """What is not a local folder must be an `owner/name` Hub id, not a mistyped path. `named`:
    the source as the user gave it, to start the error (`--detector runs/x`)."""
    if "/" not in spec or not is_hub_id(spec):
        raise FilterError(f"{named}: {missing_folder(Path(spec))}")


def resolve_detector(spec: str) -> Detector:
    """A run directory (its `detector/`), an export folder, or a Hub id."""
    path = Path(spec)
    if path.is_dir():
        for folder in (path / "detector", path):
            if export_kind(folder) == "detector":
                return load_detector(folder)
        if export_kind(path) == "classifier":
            raise FilterError(f"--detector {spec}: a classifier export, not a detector export "
                              "(an RSMatch run writes both: RUN/model and RUN/detector)")  # fmt: skip
        raise FilterError(
            f"--detector {spec}: no detector export here (RSMatch runs write RUN/detector; "
            "other algorithms and rsmatch.shared_encoder=true runs have none)"
        )
    check_hub_id(spec, f"--detector {spec}")
    try:
        return load_detector(spec)
    except Exception as e:  # hub errors come in many types; name the id in one line
        raise FilterError(
            f"--detector {spec}: cannot load from the Hub ({type(e).__name__})"
        ) from None


# -- the images -------------------------------------------------------------------------------


def image_column(ds: datasets.Dataset) -> str:
    col = next((k for k, v in ds.features.items() if isinstance(v, datasets.Image)), None)
    if col is None:
        raise FilterError(f"dataset with columns {ds.column_names}: no Image column")
    return col


def label_column(ds: datasets.Dataset) -> str | None:
    return next(
        (k for k in LABEL_COLUMNS if isinstance(ds.features.get(k), datasets.ClassLabel)), None
    )


def read_folder(root: Path, named: str | None = None) -> datasets.Dataset:
    """Every image under root, any depth, except inside an earlier filter output (`--out`
    placed in the folder it scored: its report's figures are not the user's images). When all
    lie in subfolders, the first subfolder level names the class (a `label` column); a flat or
    mixed folder has no labels. `named` starts its error (default `--images ROOT`)."""
    files = image_files(root)
    folders = {root / up for f in files for up in f.relative_to(root).parents}
    outputs = {folder for folder in folders if data_folder_kind(folder) == "filter"}
    kept = [f for f in files if outputs.isdisjoint(f.parents)]
    if not kept:
        skipped = (
            f" outside earlier rsmatch-filter outputs ({len(files)} inside, skipped)"
            if files
            else ""
        )
        raise FilterError(f"{named or f'--images {root}'}: no images found{skipped}")
    files = kept
    rel = [f.relative_to(root) for f in files]
    columns: dict = {
        "image": [{"bytes": f.read_bytes(), "path": str(r)} for f, r in zip(files, rel)],
        "path": [str(r) for r in rel],
    }
    features = {"image": datasets.Image(), "path": datasets.Value("string")}
    if all(len(r.parts) > 1 for r in rel):
        names = sorted({r.parts[0] for r in rel})
        columns["label"] = [names.index(r.parts[0]) for r in rel]
        features["label"] = datasets.ClassLabel(names=names)
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def load_images(spec: str, named: str | None = None) -> datasets.DatasetDict:
    """A folder, a saved Dataset/DatasetDict, or a Hub dataset id, as a DatasetDict. `named`:
    the source as the user gave it, to start its errors (default `--images SPEC`)."""
    path = Path(spec)
    named = named or f"--images {spec}"
    if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
        data = load_saved(path, named, in_memory=False)
    elif path.is_dir() and not is_hub_layout(path):
        data = read_folder(path, named)
    else:  # a Hub dataset id, or a download of one (e.g. a pushed benchmark)
        if not path.is_dir():
            check_hub_id(spec, named)
        data = load_hub_layout(spec, named, in_memory=False)
    dd = data if isinstance(data, datasets.DatasetDict) else datasets.DatasetDict(train=data)
    if sum(len(ds) for ds in dd.values()) == 0:
        raise FilterError(f"{named}: no images")
    for ds in dd.values():
        image_column(ds)
    return dd


def select_splits(dd: datasets.DatasetDict, names: list[str]) -> datasets.DatasetDict:
    unknown = [n for n in names if n not in dd]
    if unknown:
        raise FilterError(f"--split {unknown[0]}: not among the splits {sorted(dd)}")
    return datasets.DatasetDict({n: dd[n] for n in names})


def load_labelled(sources: dict[str, str]) -> datasets.DatasetDict:
    """`--labels NAME=SOURCE ...`: provenance from where images come from. NAME `real` is
    real; any other name is a generator whose images are synthetic."""
    if "real" not in sources or len(sources) < 2:
        raise FilterError(
            f"--labels {' '.join(f'{k}={v}' for k, v in sources.items())}: "
            "needs real=SOURCE and at least one GENERATOR=SOURCE"
        )
    parts: dict[str, list[datasets.Dataset]] = {}
    for name, spec in sources.items():
        for split, ds in load_images(spec, f"--labels {name}={spec}").items():
            col = image_column(ds)
            ds = ds.cast_column(col, datasets.Image(decode=False))
            if col != "image":
                ds = ds.rename_column(col, "image")
            ds = ds.select_columns(
                [c for c in ("image", "path", label_column(ds)) if c in ds.column_names]
            )
            n = len(ds)
            # ids unique across sources and naming theirs: NAME/file, or NAME/split/row for a
            # source without files (a saved Dataset, a Hub id)
            ids = [f"{name}/{i}" for i in row_ids(ds, split, range(n))]
            if "path" in ds.column_names:
                ds = ds.remove_columns("path")
            ds = ds.add_column("path", ids)
            ds = ds.add_column("is_synthetic", [name != "real"] * n)
            ds = ds.add_column("generator", [name] * n)
            parts.setdefault(split, []).append(ds)
    out = {}
    for split, group in parts.items():
        labels = {json.dumps(ds.features.to_dict().get("label")) for ds in group}
        if len(labels) > 1:  # different class sets: keep provenance, drop class labels
            group = [ds.remove_columns("label") if "label" in ds.features else ds for ds in group]
        out[split] = datasets.concatenate_datasets(group)
    return datasets.DatasetDict(out)


def to_tensor(data: bytes, size: tuple[int, int]) -> torch.Tensor | None:
    """uint8 [3, H, W] at the detector's size, or None for a file that does not decode."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # PIL notices truncation that libjpeg only warns about
            pil = im.convert("RGB")
    except (OSError, SyntaxError, ValueError):
        return None
    if pil.size != (size[1], size[0]):
        return pil_to_tensor(pil.resize((size[1], size[0]), Image.Resampling.LANCZOS))
    try:  # training decoded with torchvision: the same pixels
        return decode_bytes(data)
    except RuntimeError:  # formats torchvision does not read (BMP, ...)
        return pil_to_tensor(pil)


class _Decoded(torch.utils.data.Dataset):
    def __init__(self, ds: datasets.Dataset, rows: range, size: tuple[int, int]) -> None:
        col = image_column(ds)
        self.items = ds.cast_column(col, datasets.Image(decode=False))[col]
        self.rows, self.size = rows, size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, bool]:
        row = self.rows[i]
        x = to_tensor(image_bytes(self.items[row]), self.size)
        return (
            row,
            (x if x is not None else torch.zeros(3, *self.size, dtype=torch.uint8)),
            x is not None,
        )


# -- scoring ----------------------------------------------------------------------------------


@torch.no_grad()
def score_dataset(det: Detector, ds: datasets.Dataset, batch_size: int, accelerator: Accelerator,
                  workers: int = 0, desc: str = "scoring") -> np.ndarray:  # fmt: skip
    """Synthetic score of every row (NaN where the image does not decode), each process
    scoring a contiguous shard; the full array on every process."""
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    n = len(ds)
    rows, size = shard(n, rank, world)
    loader = torch.utils.data.DataLoader(
        _Decoded(ds, rows, tuple(det.image_size)), batch_size=batch_size, num_workers=workers
    )
    local = torch.full((size,), float("nan"), device=device)
    det = det.to(device)
    bar = tqdm(loader, desc=desc, unit="batch", disable=not accelerator.is_local_main_process)
    for idx, x, ok in bar:
        with accelerator.autocast():
            s = det.score(x.to(device))
        local[idx.to(device) - rows.start] = torch.where(ok.to(device), s, float("nan"))
    scores = gather_shards(local, n, world, accelerator.gather)
    return scores.cpu().numpy().astype(np.float64)


def threshold_for_fraction(scores: np.ndarray, keep_fraction: float) -> float:
    """The threshold calling the `keep_fraction` lowest-scored images real (ties kept): the
    nearest whole number of images, halves up (Python's round() would keep 2 of 5 at 0.5)."""
    k = max(1, math.floor(keep_fraction * len(scores) + 0.5))
    return float(np.sort(scores)[k - 1])


# -- the run ----------------------------------------------------------------------------------


@dataclass
class FilterResult:
    threshold: float
    table: dict[str, list]  # the scores file's columns
    scored: datasets.DatasetDict  # every decoded row, with `synthetic_score`
    dataset: datasets.DatasetDict  # what is saved: `scored`, or its rows called real
    corrupt: list[str] = field(default_factory=list)


def row_ids(ds: datasets.Dataset, split: str, rows: Sequence[int]) -> list[str]:
    """How the outputs name `ds`'s rows, which are the rows `rows` of `split`: their relative
    path, else `split/row`."""
    return list(ds["path"]) if "path" in ds.column_names else [f"{split}/{r}" for r in rows]


def run_filter(det: Detector, dd: datasets.DatasetDict, accelerator: Accelerator, batch_size: int = 256,
               threshold: float | None = None, keep_fraction: float | None = None,
               keep_real: bool = False, skip_corrupt: bool = False,
               workers: int = 0) -> FilterResult:  # fmt: skip
    scores = {
        split: score_dataset(det, ds, batch_size, accelerator, workers, f"scoring {split}")
        for split, ds in dd.items()
    }
    undecoded = {s: np.flatnonzero(np.isnan(sc)) for s, sc in scores.items()}
    corrupt = [
        name for s, rows in undecoded.items() for name in row_ids(dd[s].select(rows), s, rows)
    ]
    if corrupt and not skip_corrupt:
        shown = ", ".join(corrupt[:5]) + (
            f" and {len(corrupt) - 5} more" if len(corrupt) > 5 else ""
        )
        raise FilterError(f"--images: {len(corrupt)} image(s) do not decode: {shown} (pass --skip-corrupt to skip them)")  # fmt: skip
    valid = {s: np.flatnonzero(~np.isnan(sc)) for s, sc in scores.items()}
    all_scores = np.concatenate([scores[s][valid[s]] for s in dd])
    if len(all_scores) == 0:
        raise FilterError("--images: no image decodes")
    if keep_fraction is not None:
        threshold = threshold_for_fraction(all_scores, keep_fraction)
    threshold = det.threshold if threshold is None else threshold
    table: dict[str, list] = {"split": [], "row": [], "id": [], "synthetic_score": [], "call": []}
    has_source = all("source_id" in ds.column_names for ds in dd.values())
    if has_source:
        table["source_id"] = []
    scored, saved = {}, {}
    for split, ds in dd.items():
        rows, sc = valid[split], scores[split][valid[split]]
        kept = ds.select(rows).add_column("synthetic_score", sc.tolist())
        ids = row_ids(kept, split, rows)
        table["split"] += [split] * len(rows)
        table["row"] += rows.tolist()
        table["id"] += list(ids)
        table["synthetic_score"] += sc.tolist()
        table["call"] += ["synthetic" if s > threshold else "real" for s in sc]
        if has_source:
            table["source_id"] += list(kept["source_id"])
        scored[split] = kept
        saved[split] = kept.select(np.flatnonzero(sc <= threshold)) if keep_real else kept
    # a split with no row left is not saved: datasets writes it without data, then cannot load it
    saved = {split: ds for split, ds in saved.items() if len(ds)}
    return FilterResult(
        threshold, table, datasets.DatasetDict(scored), datasets.DatasetDict(saved), corrupt
    )


def write_outputs(result: FilterResult, out: Path, report: Callable[[Path], None]) -> None:
    """scores.parquet, dataset/, corrupt.txt and the report, written whole or not at all
    (`atomic.write_folder`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def fill(tmp: Path) -> None:
        pq.write_table(pa.table(result.table), tmp / "scores.parquet")
        result.dataset.save_to_disk(str(tmp / "dataset"))
        if result.corrupt:
            (tmp / "corrupt.txt").write_text("\n".join(result.corrupt) + "\n", encoding="utf-8")
        report(tmp)

    write_folder(out, fill)


def push(out: Path, dataset: datasets.DatasetDict, repo: str, private: bool) -> None:
    """The scored dataset through `datasets`, then the report as its card with its figures."""
    from huggingface_hub import HfApi

    dataset.push_to_hub(repo, private=private)
    HfApi().upload_folder(folder_path=str(out), repo_id=repo, repo_type="dataset",
                          allow_patterns=["README.md", "*.png", "report.json"])  # fmt: skip


def provenance(dd: datasets.DatasetDict) -> bool:
    return all(all(c in ds.column_names for c in PROVENANCE) for ds in dd.values())


def concat_column(dd: datasets.DatasetDict, name: str) -> Sequence:
    return [v for ds in dd.values() for v in ds[name]]
