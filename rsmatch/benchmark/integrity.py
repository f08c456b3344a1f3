"""Which images cannot be decoded, found in one pass and reported in one listing.

An image is readable when training's own decoder (torchvision) decodes it: it is stricter than
PIL, which accepts JPEGs cut before their end marker and BMPs that training cannot read.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torchvision.io import ImageReadMode, decode_image

from rsmatch.benchmark.sources import SourceError, SourceIndex

SHOWN = 20  # paths printed in the one-line listing; the rest are counted


def decode_bytes(data: bytes) -> torch.Tensor:
    """One image as uint8 [3, H, W]; RuntimeError when it cannot be decoded (also zero bytes)."""
    if not data:
        raise RuntimeError("empty file")
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB)


@dataclass(frozen=True)
class Unreadable:
    positions: frozenset[int]  # in the index, for SourceIndex.load(skip=...)
    names: list[str]  # full paths, or `source[row]` for images inside a dataset


def unreadable(index: SourceIndex) -> Unreadable:
    positions, names = [], []
    with warnings.catch_warnings():  # libjpeg's "corrupt data" warnings: the listing says it
        warnings.simplefilter("ignore")
        for i, (name, data) in enumerate(index.raw()):
            try:
                decode_bytes(data)
            except RuntimeError:
                positions.append(i)
                names.append(name)
    return Unreadable(frozenset(positions), names)


def check_readable(
    indexes: dict[str, SourceIndex], drop: bool = False, hint: str = ""
) -> dict[str, Unreadable]:
    """The unreadable images of every index, found in one pass. Unless `drop`, any found raise
    one SourceError listing them all with their paths (`hint` follows the count)."""
    found = {name: unreadable(index) for name, index in indexes.items()}
    names = [n for bad in found.values() for n in bad.names]
    if names and not drop:
        more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
        raise SourceError(
            f"{len(names)} unreadable image(s){hint}: " + ", ".join(names[:SHOWN]) + more
        )
    return found
