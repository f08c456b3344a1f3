"""The EMA teacher: timm's ModelEmaV3 with its buffers copied in one multi-tensor operation.

timm averages the parameters with one `_foreach_lerp_` but copies the buffers (BatchNorm's
running statistics and counters; USB copies them too) with one `copy_` each: 75 small kernels
per step for WRN-28-2 and ~40 more for RSMatch's detector. A GPU step is bound by launching
kernels (docs/speed.md), so here the buffers take one `_foreach_copy_`. Same values.
"""

from __future__ import annotations

import torch
from timm.utils import ModelEmaV3
from torch import nn


class ModelEma(ModelEmaV3):
    @torch.no_grad()
    def apply_update_no_buffers_(self, model: nn.Module, decay: float) -> None:
        ema_params, model_params = list(self.module.parameters()), list(model.parameters())
        # timm's own multi-tensor average where it has one (newer timm: bf16 averages are
        # rounded stochastically), else the plain one older timm used
        lerp = getattr(self, "_foreach_lerp_", torch._foreach_lerp_)
        lerp(ema_params, model_params, weight=1.0 - decay)
        ema_buffers = list(self.module.buffers())
        if ema_buffers:
            torch._foreach_copy_(ema_buffers, list(model.buffers()))
