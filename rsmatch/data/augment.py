"""Weak and strong views of whole uint8 batches, on whatever device the batch lives on.

USB's recipe, batched: weak = reflect-pad-4 random crop + horizontal flip; strong = weak +
RandAugment drawing 3 of 14 ops *with replacement*, each with a uniformly random magnitude
(the FixMatch "RA" variant), then Cutout of side U(0, 0.5) * size filled with (125, 123, 114).

Why not torchvision's RandAugment: it applies one op and one magnitude to a whole batch; USB
draws both per image. Here the random draws (`sample_*`) are separate from the pixel work
(`apply_*`): the trainer draws them for the *global* batch from a generator seeded by the step
and each rank applies its slice, so views do not depend on the number of processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

OPS = (
    "identity", "autocontrast", "equalize", "brightness", "color", "contrast", "sharpness",
    "posterize", "solarize", "rotate", "shear_x", "shear_y", "translate_x", "translate_y",
)  # fmt: skip
N_OPS = 3
CUTOUT_FILL = (125.0, 123.0, 114.0)


@dataclass
class Params:
    """Per-image random draws; slicing selects a rank's share."""

    def __getitem__(self, sel: slice | torch.Tensor) -> Params:
        return type(self)(**{f.name: getattr(self, f.name)[sel] for f in fields(self)})

    def to(self, device: torch.device | str) -> Params:
        return type(self)(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


@dataclass
class WeakParams(Params):
    shift: torch.Tensor  # [N, 2] crop offsets in [0, 2*pad]
    flip: torch.Tensor  # [N] bool


@dataclass
class StrongParams(Params):
    weak: WeakParams
    ops: torch.Tensor  # [N, N_OPS] op indices
    mags: torch.Tensor  # [N, N_OPS] magnitudes in [0, 1]
    cutout: torch.Tensor  # [N, 3] centre x, centre y (fractions), side (fraction)

    def __getitem__(self, sel: slice | torch.Tensor) -> StrongParams:
        return StrongParams(self.weak[sel], self.ops[sel], self.mags[sel], self.cutout[sel])

    def to(self, device: torch.device | str) -> StrongParams:
        return StrongParams(self.weak.to(device), self.ops.to(device), self.mags.to(device),
                            self.cutout.to(device))  # fmt: skip


def sample_weak(n: int, gen: torch.Generator, pad: int = 4) -> WeakParams:
    return WeakParams(
        shift=torch.randint(0, 2 * pad + 1, (n, 2), generator=gen),
        flip=torch.rand(n, generator=gen) < 0.5,
    )


def sample_strong(n: int, gen: torch.Generator, pad: int = 4) -> StrongParams:
    weak = sample_weak(n, gen, pad)
    ops = torch.randint(0, len(OPS), (n, N_OPS), generator=gen)
    mags = torch.rand(n, N_OPS, generator=gen)
    centre = torch.rand(n, 2, generator=gen)
    side = torch.rand(n, 1, generator=gen) * 0.5
    return StrongParams(weak, ops, mags, torch.cat([centre, side], dim=1))


def apply_weak(x: torch.Tensor, p: WeakParams, pad: int = 4) -> torch.Tensor:
    """Random crop of the reflect-padded image, then flip. uint8 [N,C,H,W] in and out."""
    n, _, h, w = x.shape
    padded = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect")
    rows = p.shift[:, 0, None] + torch.arange(h, device=x.device)  # [N, H]
    cols = p.shift[:, 1, None] + torch.arange(w, device=x.device)  # [N, W]
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    out = torch.where(p.flip[:, None, None, None], out.flip(-1), out)
    return out.round().to(torch.uint8)


# --- RandAugment ops: float images in [0, 255], m in [0, 1] per image ------------------------


def _per_image(m: torch.Tensor) -> torch.Tensor:
    return m.view(-1, 1, 1, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (degenerate + _per_image(factor) * (x - degenerate)).clamp(0, 255)


def _enhance_factor(m: torch.Tensor) -> torch.Tensor:
    return 0.05 + 0.9 * m  # USB's [0.05, 0.95] for brightness, colour, contrast, sharpness


def _autocontrast(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(hi > lo, 255.0 / (hi - lo).clamp(min=1e-6), torch.ones_like(hi))
    return torch.where(hi > lo, (x - lo) * scale, x)


def _equalize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return TF.equalize(x.round().to(torch.uint8)).float()


def _sharpness(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    kernel = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]], device=x.device) / 13
    kernel = kernel.expand(x.shape[1], 1, 3, 3)
    smooth = F.conv2d(x, kernel, groups=x.shape[1]).round()
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth  # PIL keeps the border pixels
    return _blend(degenerate, x, _enhance_factor(m))


def _posterize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    bits = (4 + (m * 4).round()).long()  # [4, 8]
    mask = (0xFF << (8 - bits)) & 0xFF
    return (x.round().to(torch.int64) & _per_image(mask)).float()


def _solarize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= _per_image(256 * m), 255 - x, x)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Apply per-image 2x3 affine maps (output -> input, normalised coords), black fill."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _eye(n: int, device: torch.device) -> torch.Tensor:
    return torch.eye(2, 3, device=device).repeat(n, 1, 1)


def _rotate(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    angle = (-30 + 60 * m) * math.pi / 180
    theta = _eye(len(x), x.device)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle), -torch.sin(angle)
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle), torch.cos(angle)
    return _affine(x, theta)


def _shear(axis: int):
    def op(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        theta = _eye(len(x), x.device)
        theta[:, axis, 1 - axis] = -0.3 + 0.6 * m
        return _affine(x, theta)

    return op


def _translate(axis: int):
    def op(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        theta = _eye(len(x), x.device)
        theta[:, axis, 2] = 2 * (-0.3 + 0.6 * m)  # fraction of the size, in [-1, 1] coords
        return _affine(x, theta)

    return op


_OP_FNS = {
    "identity": lambda x, m: x,
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "brightness": lambda x, m: _blend(torch.zeros_like(x), x, _enhance_factor(m)),
    "color": lambda x, m: _blend(_gray(x), x, _enhance_factor(m)),
    "contrast": lambda x, m: _blend(_gray(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), x,
                                    _enhance_factor(m)),
    "sharpness": _sharpness,
    "posterize": _posterize,
    "solarize": _solarize,
    "rotate": _rotate,
    "shear_x": _shear(0),
    "shear_y": _shear(1),
    "translate_x": _translate(0),
    "translate_y": _translate(1),
}  # fmt: skip


def _cutout(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    n, _, h, w = x.shape
    side = c[:, 2] * h
    cy, cx = c[:, 1] * h, c[:, 0] * w
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (
        (ys >= (cy - side / 2).view(n, 1, 1)) & (ys < (cy + side / 2).view(n, 1, 1))
        & (xs >= (cx - side / 2).view(n, 1, 1)) & (xs < (cx + side / 2).view(n, 1, 1))
    )  # fmt: skip
    fill = torch.tensor(CUTOUT_FILL, device=x.device).view(1, 3, 1, 1)
    return torch.where(inside[:, None], fill, x)


def apply_strong(x: torch.Tensor, p: StrongParams) -> torch.Tensor:
    """Weak view, then 3 RandAugment ops, then Cutout. uint8 [N,C,H,W] in and out."""
    out = apply_weak(x, p.weak).float()
    for slot in range(p.ops.shape[1]):
        for k, name in enumerate(OPS):
            sel = p.ops[:, slot] == k
            if name != "identity" and bool(sel.any()):
                out[sel] = _OP_FNS[name](out[sel], p.mags[sel, slot]).clamp(0, 255)
    return _cutout(out, p.cutout).round().to(torch.uint8)
