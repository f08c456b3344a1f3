"""The EMA teacher: timm's ModelEmaV3 with its buffers copied in two multi-tensor operations.

timm averages the parameters with one `_foreach_lerp_` but copies the buffers (BatchNorm's
running statistics and counters; USB copies them too) with one `copy_` each: 75 small kernels
per step for WRN-28-2 and ~40 more for RSMatch's detector. A GPU step is bound by launching
kernels (docs/speed.md), so here the buffers are copied with one `_foreach_copy_` per dtype
(CUDA's multi-tensor copy takes one launch only when all its sources share a dtype: the float
statistics in one, the int64 counters in another). Same values.

Walking two module trees for their parameters and buffers at every step cost ~0.5 ms of host
time per step (one core of a 2-core EPYC; docs/speed.md): where each tensor lives (its module's
dict and its name) is found once per model, and each step reads the tensors from there, so a
tensor that a later `.to()` replaces is still the one averaged or copied. A submodule swapped
for another after the first update would not be seen: the trainer converts (SyncBatchNorm,
channels_last, Accelerate's and DeepSpeed's wrapping) before it builds the EMA.
"""

from __future__ import annotations

import weakref

import torch
from timm.utils import ModelEmaV3
from torch import nn

Slots = list[tuple[dict[str, torch.Tensor], str]]


def _slots(model: nn.Module, kind: str) -> Slots:
    """Where `model.parameters()` (kind "parameters") or `.buffers()` ("buffers") come from, in
    that order: (the owning module's `_parameters` or `_buffers`, the name there)."""
    named = model.named_parameters() if kind == "parameters" else model.named_buffers()
    owner = {name: module for name, module in model.named_modules()}
    slots = []
    for name, _ in named:
        prefix, _, leaf = name.rpartition(".")
        slots.append((getattr(owner[prefix], f"_{kind}"), leaf))
    return slots


class ModelEma(ModelEmaV3):
    """`ModelEmaV3(model, ..., exclude_buffers=True)`: parameters averaged, buffers copied."""

    def __init__(self, model: nn.Module, **kwargs: object) -> None:
        super().__init__(model, **kwargs)
        # where each model's parameters and buffers live; a dropped model's entry goes with it
        self._where: weakref.WeakKeyDictionary[nn.Module, tuple[Slots, Slots]] = (
            weakref.WeakKeyDictionary()
        )

    def _tensors(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if model not in self._where:
            self._where[model] = _slots(model, "parameters"), _slots(model, "buffers")
        params, buffers = self._where[model]
        return [d[n] for d, n in params], [d[n] for d, n in buffers]

    @torch.no_grad()
    def apply_update_no_buffers_(self, model: nn.Module, decay: float) -> None:
        if not self.foreach or self.device is not None:  # timm's per-tensor path, as it is
            return super().apply_update_no_buffers_(model, decay)
        ema_params, ema_buffers = self._tensors(self.module)
        model_params, model_buffers = self._tensors(model)
        # timm's own multi-tensor average where it has one (newer timm: bf16 averages are
        # rounded stochastically), else the plain one older timm used
        lerp = getattr(self, "_foreach_lerp_", torch._foreach_lerp_)
        lerp(ema_params, model_params, weight=1.0 - decay)
        by_dtype: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for ema_b, model_b in zip(ema_buffers, model_buffers, strict=True):
            ema_list, model_list = by_dtype.setdefault(ema_b.dtype, ([], []))
            ema_list.append(ema_b)
            model_list.append(model_b)
        for ema_list, model_list in by_dtype.values():
            torch._foreach_copy_(ema_list, model_list)
