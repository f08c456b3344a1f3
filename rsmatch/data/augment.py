"""Weak and strong views of whole uint8 batches, on whatever device the batch lives on.

USB's recipe, batched: weak = random crop of the image reflect-padded by an eighth of its size
(4 px at 32) + horizontal flip; strong = weak +
RandAugment drawing 3 of 14 ops *with replacement*, each with a uniformly random magnitude
(the FixMatch "RA" variant), then Cutout of side U(0, 0.5) * size filled with (125, 123, 114).
Each op reproduces Pillow's output on uint8 images pixel for pixel, given the same draws
(tests/test_augment_parity.py; docs/usb-augment-differences.md lists what remains different).

Why not torchvision's RandAugment: it applies one op and one magnitude to a whole batch; USB
draws both per image. Here the random draws (`sample_*`) are separate from the pixel work
(`apply_*`): the trainer draws them for the *global* batch from a generator seeded by the step
and each rank applies its slice, so views do not depend on the number of processes.

Host and device: the draws are made on the host. `Params.to(device)` moves them with copies that
never block the host (`rsmatch.data.transfer`), except the op indices and magnitudes, which stay
on the host (`StrongParams.ops`, `.mags`): `apply_strong` groups the images by op there, and
works out there where each pixel of a geometric op (rotate, shear, translate) comes from, since
that depends on the draws alone; the grouping, the magnitudes and these source maps go to the
device in one copy each. So augmenting a batch on a GPU never waits for the GPU (no read of a
device value, no blocking copy, no device tensor built from Python data), and it launches few
kernels: all geometric images of a slot are warped by one gather, whatever their ops.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from rsmatch.data.transfer import Movable, to_device

OPS = (
    "identity", "autocontrast", "equalize", "brightness", "color", "contrast", "sharpness",
    "posterize", "solarize", "rotate", "shear_x", "shear_y", "translate_x", "translate_y",
)  # fmt: skip
N_OPS = 3
CROP_RATIO = 0.875  # USB's crop_ratio: the weak view reflect-pads (1 - ratio) * size per side


def crop_pad(h: int, w: int) -> int:
    """Pixels of reflect padding on each side before the weak view's random crop: USB's
    int(img_size * (1 - crop_ratio)), 4 at 32 x 32 (the shorter side for a non-square image)."""
    return int(min(h, w) * (1 - CROP_RATIO))


CUTOUT_FILL = (125.0, 123.0, 114.0)


@dataclass
class Params(Movable):
    """Per-image random draws; slicing selects a rank's share."""

    def __getitem__(self, sel: slice | torch.Tensor) -> Params:
        return type(self)(**{f.name: getattr(self, f.name)[sel] for f in fields(self)})


@dataclass
class WeakParams(Params):
    shift: torch.Tensor  # [N, 2] crop offsets in [0, 2 * crop_pad]
    flip: torch.Tensor  # [N] bool


@dataclass
class StrongParams(Params):
    weak: WeakParams
    ops: torch.Tensor  # [N, N_OPS] op indices, on the host (`to` leaves them there)
    mags: torch.Tensor  # [N, N_OPS] magnitudes in [0, 1], on the host too
    cutout: torch.Tensor  # [N, 3] U(0,1) draws for the centre x, y; side fraction U(0, 0.5)

    def __getitem__(self, sel: slice | torch.Tensor) -> StrongParams:
        return StrongParams(self.weak[sel], self.ops[sel], self.mags[sel], self.cutout[sel])

    def to(self, device: torch.device | str) -> StrongParams:
        return StrongParams(
            self.weak.to(device), self.ops, self.mags, to_device(self.cutout, device)
        )


def sample_weak(n: int, gen: torch.Generator, size: tuple[int, int]) -> WeakParams:
    """Crop offsets and flips for n images of `size` (height, width)."""
    return WeakParams(
        shift=torch.randint(0, 2 * crop_pad(*size) + 1, (n, 2), generator=gen),
        flip=torch.rand(n, generator=gen) < 0.5,
    )


def sample_strong(n: int, gen: torch.Generator, size: tuple[int, int]) -> StrongParams:
    weak = sample_weak(n, gen, size)
    ops = torch.randint(0, len(OPS), (n, N_OPS), generator=gen)
    mags = torch.rand(n, N_OPS, generator=gen)
    centre = torch.rand(n, 2, generator=gen)
    side = torch.rand(n, 1, generator=gen) * 0.5
    return StrongParams(weak, ops, mags, torch.cat([centre, side], dim=1))


def apply_weak(x: torch.Tensor, p: WeakParams) -> torch.Tensor:
    """Random crop of the reflect-padded image, then flip. uint8 [N,C,H,W] in and out."""
    n, _, h, w = x.shape
    pad = crop_pad(h, w)
    padded = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect")
    rows = p.shift[:, 0, None] + torch.arange(h, device=x.device)  # [N, H]
    cols = p.shift[:, 1, None] + torch.arange(w, device=x.device)  # [N, W]
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    out = torch.where(p.flip[:, None, None, None], out.flip(-1), out)
    return out.round().to(torch.uint8)


# --- RandAugment ops ---------------------------------------------------------------------------
# USB applies each op to a uint8 PIL image, so each op here returns what Pillow returns: the
# images stay integer-valued floats in [0, 255], with Pillow's roundings and truncations and its
# nearest-pixel lookup. v is USB's magnitude, one per image, drawn uniformly from RANGES.

RANGES = {
    "identity": (0.0, 1.0), "autocontrast": (0.0, 1.0), "equalize": (0.0, 1.0),
    "brightness": (0.05, 0.95), "color": (0.05, 0.95), "contrast": (0.05, 0.95),
    "sharpness": (0.05, 0.95), "posterize": (4.0, 8.0), "solarize": (0.0, 256.0),
    "rotate": (-30.0, 30.0), "shear_x": (-0.3, 0.3), "shear_y": (-0.3, 0.3),
    "translate_x": (-0.3, 0.3), "translate_y": (-0.3, 0.3),
}  # fmt: skip


def _per_image(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L: ITU-R 601-2 weights in 16-bit fixed point, rounded."""
    c = x.to(torch.int32)
    lum = (c[:, 0:1] * 19595 + c[:, 1:2] * 38470 + c[:, 2:3] * 7471 + 0x8000) >> 16
    return lum.to(x.dtype).expand_as(x)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ImageEnhance: Image.blend in float32, truncated to uint8 (v <= 1 needs no clipping)."""
    return (degenerate + _per_image(v.float()) * (x - degenerate)).floor()


def _autocontrast(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True).double()
    hi = x.amax(dim=(2, 3), keepdim=True).double()
    scale = torch.full_like(lo, 255.0) / (hi - lo).clamp(min=1)  # not 255.0 / t: a reciprocal
    offset = -lo * scale
    out = (x.double() * scale + offset).trunc().clamp(0, 255)  # Pillow's LUT: int(ix*scale+offset)
    return torch.where(hi > lo, out.to(x.dtype), x)


def _equalize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return TF.equalize(x.to(torch.uint8)).to(x.dtype)


def _contrast(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    mean = (_gray(x)[:, :1].double().mean(dim=(1, 2, 3), keepdim=True) + 0.5).floor()
    return _blend(mean.to(x.dtype).expand_as(x), x, v)


def _sharpness(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # [[1, 1, 1], [1, 5, 1], [1, 1, 1]], made on the device: torch.tensor(..., device=) would block
    kernel = F.pad(torch.full((1, 1), 5.0, device=x.device), (1, 1, 1, 1), value=1.0)
    kernel = kernel.expand(x.shape[1], 1, 3, 3)
    # ImageFilter.SMOOTH. Integer weights keep the sum exact even under TF32; k/13 is never a tie.
    smooth = (F.conv2d(x, kernel, groups=x.shape[1]) / 13).round()
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth  # Pillow keeps the border pixels
    return _blend(degenerate, x, v)


def _posterize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    bits = v.floor().long()  # USB's int(v): 4, 5, 6 or 7 bits, each with probability 1/4
    mask = (0xFF << (8 - bits)) & 0xFF
    return (x.to(torch.int64) & _per_image(mask)).to(x.dtype)


def _solarize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= _per_image(v), 255 - x, x)


def _source_index(row: torch.Tensor, col: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[n, h*w]: for each output pixel, the flat index of the input pixel it reads, -1 outside.
    row, col: integer source coordinates that broadcast to [n, h, w]."""
    row, col = torch.broadcast_tensors(row, col)
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    return torch.where(inside, row * w + col, -1).flatten(1)


def _warp(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """out[n, :, p] = x[n, :, source[n, p]]; black where source is -1. x [N,C,H,W]."""
    n, ch = x.shape[:2]
    index = source.clamp(min=0).long()[:, None].expand(n, ch, -1)
    out = x.flatten(2).gather(2, index).view_as(x)
    return torch.where(
        (source >= 0).view(n, 1, *x.shape[2:]), out, torch.zeros((), dtype=x.dtype, device=x.device)
    )


def _grid(h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ys = torch.arange(h, device=device, dtype=torch.float64).view(1, h, 1)
    return ys, torch.arange(w, device=device, dtype=torch.float64).view(1, 1, w)


def _translate(dx: torch.Tensor, dy: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Image.transform(AFFINE, (1, 0, dx, 0, 1, dy)), which Pillow runs as a nearest "scale" in
    float64: the output pixel centred at (X, Y) reads the input pixel (floor(X + dx),
    floor(Y + dy)); black outside."""
    ys, xs = _grid(h, w, dx.device)
    col = (dx.view(-1, 1, 1) + 0.5 + xs).floor().long()
    row = (dy.view(-1, 1, 1) + 0.5 + ys).floor().long()
    return _source_index(row, col, h, w)


def _fix(t: torch.Tensor | float) -> torch.Tensor | int:
    """A coefficient in Pillow's 16.16 fixed point (a Python float stays a Python int)."""
    if isinstance(t, torch.Tensor):
        return (t * 65536.0 + 0.5).floor().long()
    return math.floor(t * 65536.0 + 0.5)


def _affine_fixed(*coeffs: torch.Tensor | float) -> list[torch.Tensor | int]:
    """Image.transform(AFFINE, coeffs) when the map shears or rotates, as Pillow runs it: coeffs
    (a, b, c, d, e, f), Python floats or float64 tensors of one per image, make the output pixel
    centred at (X, Y) read the input pixel at (aX + bY + c, dX + eY + f), each coefficient in
    16.16 fixed point. Returns (A, B, C, D, E, F) in fixed point, the centre's half pixel in C
    and F. Floats stay Python numbers (float64 too): no copy to the device."""
    a, b, c, d, e, f = coeffs
    return [_fix(a), _fix(b), _fix(c + a * 0.5 + b * 0.5),
            _fix(d), _fix(e), _fix(f + d * 0.5 + e * 0.5)]  # fmt: skip


def _affine_source(
    fixed: list[torch.Tensor | int], h: int, w: int, device: torch.device
) -> torch.Tensor:
    """Source indices of `_affine_fixed`'s map: nearest neighbour, integer arithmetic only
    (exact on any device), black outside. Tensors hold one coefficient per image."""
    A, B, C, D, E, F = (t.view(-1, 1, 1) if isinstance(t, torch.Tensor) else t for t in fixed)
    ys, xs = _grid(h, w, device)
    ys, xs = ys.long(), xs.long()
    return _source_index((F + xs * D + ys * E) >> 16, (C + xs * A + ys * B) >> 16, h, w)


def _rotation(v: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, ...]:
    """Image.rotate(v)'s affine coefficients: counter-clockwise by v degrees about the centre."""
    cx, cy = w / 2, h / 2
    a = torch.deg2rad(-v)
    cos, sin = torch.cos(a), torch.sin(a)
    return cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy


# The geometric ops, given the magnitudes v [n] and the size: the affine coefficients of the
# rotation and shears, the (dx, dy) of the translations.
_AFFINE = {
    "rotate": _rotation,
    # USB's shears act about the top-left corner (Pillow's origin), not the centre
    "shear_x": lambda v, h, w: (1.0, v, 0.0, 0.0, 1.0, 0.0),
    "shear_y": lambda v, h, w: (1.0, 0.0, 0.0, v, 1.0, 0.0),
}
_SHIFTS = {
    "translate_x": lambda v, h, w: (v * w, torch.zeros_like(v)),
    "translate_y": lambda v, h, w: (torch.zeros_like(v), v * h),
}
# Where each output pixel of a geometric op comes from: [n, h*w] source indices. These ops are
# the last five of OPS, so sorting a slot by op puts them together.
_SOURCES = {
    **{name: lambda v, h, w, coeffs=coeffs: _affine_source(
        _affine_fixed(*coeffs(v, h, w)), h, w, v.device) for name, coeffs in _AFFINE.items()},
    **{name: lambda v, h, w, shift=shift: _translate(*shift(v, h, w), h, w)
       for name, shift in _SHIFTS.items()},
}  # fmt: skip
GEOMETRIC = tuple(_SOURCES)
_FIRST_GEOMETRIC = OPS.index(GEOMETRIC[0])  # where the geometric runs start in a sorted slot
_PIXEL_OPS = [(k, name) for k, name in enumerate(OPS[:_FIRST_GEOMETRIC]) if name != "identity"]


def _index_dtype(h: int, w: int) -> torch.dtype:
    """The smallest integer type that holds a flat pixel index (a source map's copy is halved)."""
    return torch.int16 if h * w <= torch.iinfo(torch.int16).max else torch.int32


_LOW = torch.tensor([RANGES[name][0] for name in OPS], dtype=torch.float64)
_SPAN = torch.tensor([RANGES[name][1] - RANGES[name][0] for name in OPS], dtype=torch.float64)


def _magnitudes(op: torch.Tensor | int, m: torch.Tensor) -> torch.Tensor:
    """m in [0, 1] mapped linearly onto USB's range of the op (an index into OPS, or one per m),
    in float64 as Python computes it."""
    return _LOW[op] + _SPAN[op] * m.to(torch.float64)


_OP_FNS = {
    "identity": lambda x, v: x,
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "brightness": lambda x, v: _blend(torch.zeros_like(x), x, v),
    "color": lambda x, v: _blend(_gray(x), x, v),
    "contrast": _contrast,
    "sharpness": _sharpness,
    "posterize": _posterize,
    "solarize": _solarize,
    **{name: lambda x, v, source=source: _warp(x, source(v, *x.shape[2:]))
       for name, source in _SOURCES.items()},
}  # fmt: skip


def apply_op(x: torch.Tensor, name: str, m: torch.Tensor) -> torch.Tensor:
    """One RandAugment op on integer-valued float images [N,C,H,W]; m in [0, 1] per image. Not
    used in training: the reference the tests hold the grouped and fixed-shape views to."""
    return _OP_FNS[name](x, _magnitudes(OPS.index(name), m.to(x.device)))


def _cutout(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """USB's Cutout, in float64 as Python computes it.

    Side v = c[:, 2] * width px. The centre is uniform on (1, size]: USB calls
    np.random.uniform(size), i.e. low=size, high=1. The top-left corner is truncated and
    Pillow's rectangle includes its far edge, so a side covers floor(x0 + v) - x0 + 1 pixels
    before clipping. Nothing is drawn when v = 0.
    """
    n, _, h, w = x.shape
    c = c.to(x.device, torch.float64)
    v = (c[:, 2] * w).view(n, 1, 1)
    x0 = (w + (1 - w) * c[:, 0].view(n, 1, 1) - v / 2).clamp(min=0).floor()
    y0 = (h + (1 - h) * c[:, 1].view(n, 1, 1) - v / 2).clamp(min=0).floor()
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (
        (xs >= x0) & (xs <= (x0 + v).floor()) & (ys >= y0) & (ys <= (y0 + v).floor()) & (v > 0)
    )  # fmt: skip
    fill = torch.cat(  # filled on the device: torch.tensor(CUTOUT_FILL, device=) would block
        [torch.full((1, 1, 1, 1), v, device=x.device, dtype=x.dtype) for v in CUTOUT_FILL], dim=1
    )
    return torch.where(inside[:, None], fill, x)


@dataclass
class _Plan:
    """What `apply_strong` does in each slot, worked out on the host: per op, the rows that drew
    it (a run of `rows`) with their magnitudes in the op's range; for the geometric rows, all
    together at the end of each slot's run, where their pixels come from."""

    rows: torch.Tensor  # [N_OPS, N] per slot, the rows sorted by op (stable: by row within an op)
    mags: torch.Tensor  # [N_OPS, N] their magnitudes, mapped onto their ops' ranges (float64)
    starts: list[list[int]]  # per slot, where each op's run starts in `rows`, then N
    sources: torch.Tensor  # [geometric rows of all slots, H*W] source indices, slot by slot

    def to(self, device: torch.device) -> _Plan:
        """On `device` in one copy per tensor (the run boundaries stay Python ints)."""
        return _Plan(to_device(self.rows, device), to_device(self.mags, device), self.starts,
                     to_device(self.sources, device))  # fmt: skip

    def runs(self, slot: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(op, rows, magnitudes) of each pixel op drawn in the slot, identity left out."""
        s = self.starts[slot]
        sizes = [end - start for start, end in itertools.pairwise(s)]
        rows, mags = self.rows[slot].split(sizes), self.mags[slot].split(sizes)  # one op each
        return [(name, rows[k], mags[k]) for k, name in _PIXEL_OPS if sizes[k]]

    def geometric(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The slot's rows that drew a geometric op, and where their pixels come from."""
        n = self.rows.shape[1]
        first = sum(n - s[_FIRST_GEOMETRIC] for s in self.starts[:slot])  # earlier slots' rows
        rows = self.rows[slot, self.starts[slot][_FIRST_GEOMETRIC] :]
        return rows, self.sources[first : first + len(rows)]


def _plan(ops: torch.Tensor, mags: torch.Tensor, h: int, w: int) -> _Plan:
    """From the host draws ops, mags [N, N_OPS], on the host. Each geometric op's source maps
    are computed once for all the slots, then laid out slot by slot, in the order of `rows`."""
    order = ops.argsort(dim=0, stable=True).T.contiguous()  # [N_OPS, N]
    sorted_ops = ops.T.gather(1, order)
    sorted_mags = _magnitudes(sorted_ops, mags.T.gather(1, order))
    starts = [[0, *itertools.accumulate(torch.bincount(o, minlength=len(OPS)).tolist())]
              for o in sorted_ops]  # fmt: skip
    pieces: list[list[torch.Tensor]] = [[] for _ in starts]
    for name in GEOMETRIC:
        k = OPS.index(name)
        runs = [sorted_mags[slot, s[k] : s[k + 1]] for slot, s in enumerate(starts)]
        sources = _SOURCES[name](torch.cat(runs), h, w).to(_index_dtype(h, w))
        for slot, part in enumerate(sources.split([len(r) for r in runs])):
            pieces[slot].append(part)
    return _Plan(order, sorted_mags, starts, torch.cat([part for slot in pieces for part in slot]))


def apply_strong(x: torch.Tensor, p: StrongParams) -> torch.Tensor:
    """Weak view, then 3 RandAugment ops, then Cutout. uint8 [N,C,H,W] in and out.

    `p.ops` and `p.mags` on the host (where `StrongParams.to` leaves them), the rest on x's device.
    """
    out = apply_weak(x, p.weak).float()
    plan = _plan(p.ops, p.mags, *x.shape[2:]).to(x.device)
    for slot in range(N_OPS):
        for name, rows, mags in plan.runs(slot):
            out.index_copy_(0, rows, _OP_FNS[name](out.index_select(0, rows), mags))
        rows, sources = plan.geometric(slot)
        out.index_copy_(0, rows, _warp(out.index_select(0, rows), sources))
    return _cutout(out, p.cutout).to(torch.uint8)


# --- The same view with fixed shapes, for CUDA graphs ------------------------------------------
# `apply_strong` launches a different sequence of kernels for each draw (one group per op drawn,
# of the size drawn), so it cannot be captured once and replayed. `apply_strong_fixed` makes the
# same pixels with a sequence that depends on N, H and W alone: every pixel op runs on every
# image and each image keeps its own op's result; one gather warps every image, those without a
# geometric op reading their own pixels. About 8x the pixel work (5.5x the time on a 2-core CPU,
# docs/speed.md): expected to be cheap on a GPU (not measured), not on a CPU.


@dataclass
class FixedStrongParams(Params):
    """`StrongParams` laid out for `apply_strong_fixed`: everything may live on the device."""

    weak: WeakParams
    ops: torch.Tensor  # [N, N_OPS] op indices
    mags: torch.Tensor  # [N, N_OPS] magnitudes in [0, 1]
    affine: torch.Tensor  # [N, N_OPS, 6] int64 `_affine_fixed` per slot; the identity if none
    shift: torch.Tensor  # [N, N_OPS, 2] float64 (dx, dy) of a translation per slot, else 0
    cutout: torch.Tensor


_IDENTITY = _affine_fixed(1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # reads its own pixel
_TRANSLATIONS = [OPS.index(name) for name in _SHIFTS]


def fixed(p: StrongParams, h: int, w: int) -> FixedStrongParams:
    """The host draws `p` for images of h x w, with each geometric op's coefficients worked out
    on the host (the float64 arithmetic Pillow does per image); the device maps them to pixels
    in integer arithmetic, or float64 additions (translations), exact on any device."""
    affine = torch.tensor(_IDENTITY).repeat(*p.ops.shape, 1)
    shift = torch.zeros(*p.ops.shape, 2, dtype=torch.float64)
    for name in GEOMETRIC:
        k = OPS.index(name)
        drew = p.ops == k
        v = _magnitudes(k, p.mags[drew])
        if name in _AFFINE:
            coeffs = _affine_fixed(*_AFFINE[name](v, h, w))
            affine[drew] = torch.stack([torch.as_tensor(c).expand(len(v)) for c in coeffs], -1)
        else:
            shift[drew] = torch.stack(_SHIFTS[name](v, h, w), -1)
    return FixedStrongParams(p.weak, p.ops, p.mags, affine, shift, p.cutout)


def apply_strong_fixed(x: torch.Tensor, p: FixedStrongParams) -> torch.Tensor:
    """`apply_strong`'s pixels, with every tensor of x and p on one device and kernels that do
    not depend on the draws. uint8 [N,C,H,W] in and out."""
    h, w = x.shape[2:]
    out = apply_weak(x, p.weak).float()
    for slot in range(N_OPS):
        op, m = p.ops[:, slot, None], p.mags[:, slot]
        for k, name in _PIXEL_OPS:
            out = torch.where(op.view(-1, 1, 1, 1) == k, _OP_FNS[name](out, _magnitudes(k, m)), out)
        dx, dy = p.shift[:, slot].unbind(-1)
        affine = _affine_source(p.affine[:, slot].unbind(-1), h, w, x.device)
        translated = (op == _TRANSLATIONS[0]) | (op == _TRANSLATIONS[1])
        out = _warp(out, torch.where(translated, _translate(dx, dy, h, w), affine))
    return _cutout(out, p.cutout).to(torch.uint8)
