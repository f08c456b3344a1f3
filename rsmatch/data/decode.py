"""Image bytes from a `datasets.Dataset` to one uint8 tensor, decoded once for the whole run."""

from __future__ import annotations

import datasets
import torch

from rsmatch.benchmark.integrity import decode_bytes
from rsmatch.benchmark.sources import SourceError, image_bytes


def decode(ds: datasets.Dataset, column: str = "image") -> torch.Tensor:
    """Decode every image once into a uint8 [N, 3, H, W] tensor (all images must share a size)."""
    raw = ds.cast_column(column, datasets.Image(decode=False))[column]
    out = None
    for i, item in enumerate(raw):
        data = image_bytes(item)
        try:
            img = decode_bytes(data)
        except RuntimeError as e:
            raise SourceError(f"cannot decode image {i} ({item.get('path')}): {e}") from None
        if out is None:
            out = torch.empty((len(raw), *img.shape), dtype=torch.uint8)
        if img.shape != out.shape[1:]:
            raise SourceError(
                f"image {i} ({item.get('path')}) is {tuple(img.shape[1:])}, "
                f"expected {tuple(out.shape[2:])} like the first image"
            )
        out[i] = img
    if out is None:
        raise SourceError("no images to decode")
    return out
