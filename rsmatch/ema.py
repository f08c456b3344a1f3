"""The EMA teacher: timm's ModelEmaV3 with its buffers copied in two multi-tensor operations.

timm averages the parameters with one `_foreach_lerp_` but copies the buffers (BatchNorm's
running statistics and counters; USB copies them too) with one `copy_` each: 75 small kernels
per step for WRN-28-2 and ~40 more for RSMatch's detector. A GPU step is bound by launching
kernels (docs/speed.md), so here the buffers are copied with one `_foreach_copy_` per dtype
(CUDA's multi-tensor copy takes one launch only when all its sources share a dtype: the float
statistics in one, the int64 counters in another). Same values.
"""

from __future__ import annotations

import torch
from timm.utils import ModelEmaV3
from torch import nn


class ModelEma(ModelEmaV3):
    """`ModelEmaV3(model, ..., exclude_buffers=True)`: parameters averaged, buffers copied."""

    @torch.no_grad()
    def apply_update_no_buffers_(self, model: nn.Module, decay: float) -> None:
        if not self.foreach or self.device is not None:  # timm's per-tensor path, as it is
            return super().apply_update_no_buffers_(model, decay)
        ema_params, model_params = list(self.module.parameters()), list(model.parameters())
        # timm's own multi-tensor average where it has one (newer timm: bf16 averages are
        # rounded stochastically), else the plain one older timm used
        lerp = getattr(self, "_foreach_lerp_", torch._foreach_lerp_)
        lerp(ema_params, model_params, weight=1.0 - decay)
        by_dtype: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for ema_b, model_b in zip(self.module.buffers(), model.buffers()):
            ema_list, model_list = by_dtype.setdefault(ema_b.dtype, ([], []))
            ema_list.append(ema_b)
            model_list.append(model_b)
        for ema_list, model_list in by_dtype.values():
            torch._foreach_copy_(ema_list, model_list)
