"""Host-to-device copies that never make the host wait.

A copy from pageable host memory is synchronous on CUDA: the host waits for the stream's
queued work and the copy, so it could not queue the next kernels meanwhile
(`torch.cuda.set_sync_debug_mode` flags a blocking copy, not a `non_blocking` one from pageable
memory, which stalls all the same; tests/test_augment_batching.py times it instead). Pinned memory lets the copy run asynchronously on the current stream; torch's pinned
allocator keeps the staging buffer alive until the copy is done, so the tensor handed in may be
dropped or reused at once. Pinning needs CUDA, hence only for CUDA targets; elsewhere (CPU, meta)
`non_blocking` costs nothing.
"""

from __future__ import annotations

from dataclasses import fields

import torch


def _staged(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` in pinned memory when it goes from the host to a CUDA device, else `t`."""
    return t.pin_memory() if device.type == "cuda" and t.device.type == "cpu" else t


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` (on the host) on `device` without blocking the host; `t` itself when already there."""
    device = torch.device(device)
    return _staged(t, device).to(device, non_blocking=True)


def copy_to(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) for a host `src`, without blocking the host (pinned when `dst` is CUDA)."""
    dst.copy_(_staged(src, dst.device), non_blocking=True)


class Movable:
    """A dataclass of host tensors (or nested `Movable`s, or None for a view not made) that
    moves to a device field by field, each copy as `to_device` makes it."""

    def to(self, device: torch.device | str) -> Movable:
        return type(self)(**{f.name: _moved(getattr(self, f.name), device) for f in fields(self)})


def _moved(
    value: Movable | torch.Tensor | None, device: torch.device | str
) -> Movable | torch.Tensor | None:
    if value is None:
        return None
    if isinstance(value, Movable):
        return value.to(device)
    return to_device(value, device)
