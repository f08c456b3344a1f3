"""rsmatch's batched augmentation against USB's per-image Pillow pipeline.

The reference here is written from USB's semantics (semilearn 0.3.2:
`semilearn/datasets/augmentation/randaugment.py` and the CIFAR transforms of
`semilearn/datasets/cv_datasets/cifar.py`) with Pillow and torchvision calls:
- weak: reflect-pad 4, random 32x32 crop, horizontal flip with probability 1/2;
- strong: weak, then `random.choices` of 3 ops out of 14 (with replacement), each at a
  magnitude min + (max - min) * random(), then Cutout, always, of side random() * 0.5 * width.
Given the same random draws, rsmatch must produce the same pixels. Every comparison below is
exact (tolerance 0 grey levels, 0 differing pixels): rsmatch follows Pillow's integer, fixed-point
and float64 arithmetic, so no rounding or resampling difference is left to bound. What still
differs (how the draws are made, sub-1e-10 effects never observed) is listed in
docs/usb-augment-differences.md.
"""

from __future__ import annotations

import random
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from scipy import stats
from torchvision.transforms import functional as TVF

from rsmatch.data import augment

from .conftest import needs_cuda

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"

# USB's augment_list(): op -> (min, max) of its uniformly drawn magnitude. No Invert.
USB_RANGES = {
    "autocontrast": (0, 1), "brightness": (0.05, 0.95), "color": (0.05, 0.95),
    "contrast": (0.05, 0.95), "equalize": (0, 1), "identity": (0, 1), "posterize": (4, 8),
    "rotate": (-30, 30), "sharpness": (0.05, 0.95), "shear_x": (-0.3, 0.3),
    "shear_y": (-0.3, 0.3), "solarize": (0, 256), "translate_x": (-0.3, 0.3),
    "translate_y": (-0.3, 0.3),
}  # fmt: skip
USB_N_OPS = 3
FILL = (125, 123, 114)
# Magnitudes in [0, 1): the ends of the range, its middle (often a no-op) and points between.
MAGS = (0.0, 0.07, 0.13, 0.37, 0.5, 0.62, 0.77, 0.91, 0.999)


def usb_op(name: str, img: Image.Image, v: float) -> Image.Image:
    """One op on a PIL image at USB's magnitude v, with Pillow's defaults as USB calls them."""
    w, h = img.size
    affine = {
        "shear_x": (1, v, 0, 0, 1, 0),
        "shear_y": (1, 0, 0, v, 1, 0),
        "translate_x": (1, 0, v * w, 0, 1, 0),
        "translate_y": (1, 0, 0, 0, 1, v * h),
    }
    if name in affine:  # output (x, y) reads input (ax + by + c, dx + ey + f), nearest, black
        return img.transform(img.size, Image.Transform.AFFINE, affine[name])
    enhance = {
        "brightness": ImageEnhance.Brightness,
        "color": ImageEnhance.Color,
        "contrast": ImageEnhance.Contrast,
        "sharpness": ImageEnhance.Sharpness,
    }
    if name in enhance:
        return enhance[name](img).enhance(v)
    return {
        "identity": lambda: img,
        "autocontrast": lambda: ImageOps.autocontrast(img),
        "equalize": lambda: ImageOps.equalize(img),
        "posterize": lambda: ImageOps.posterize(img, max(1, int(v))),
        "solarize": lambda: ImageOps.solarize(img, v),
        "rotate": lambda: img.rotate(v),  # counter-clockwise about the centre, nearest, black
    }[name]()


def usb_cutout(img: Image.Image, frac: float, cx: float, cy: float) -> Image.Image:
    """USB's Cutout of side frac * width centred at (cx, cy) px: box corner truncated, Pillow's
    rectangle drawn up to and including its far corner."""
    w, h = img.size
    v = frac * w
    if v <= 0:
        return img
    x0, y0 = int(max(0, cx - v / 2)), int(max(0, cy - v / 2))
    img = img.copy()
    ImageDraw.Draw(img).rectangle((x0, y0, min(w, x0 + v), min(h, y0 + v)), FILL)
    return img


def usb_centre(u: float, size: int) -> float:
    """USB draws the centre with np.random.uniform(size): low=size, high=1 (tested below)."""
    return size + (1 - size) * u


def usb_weak(img: Image.Image, top: int, left: int, flip: bool) -> Image.Image:
    out = TVF.crop(TVF.pad(img, 4, padding_mode="reflect"), top, left, 32, 32)
    return TVF.hflip(out) if flip else out


def to_tensor(imgs: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1) for i in imgs])


def edge_images() -> list[Image.Image]:
    """Flat, two-level and full-range images: autocontrast/equalize special cases, clipping."""
    flat = np.full((32, 32, 3), 117, np.uint8)
    two = np.zeros((32, 32, 3), np.uint8)
    two[8:20, 4:30] = (250, 3, 128)
    ramp = np.broadcast_to(np.arange(0, 256, 8, dtype=np.uint8)[None, :, None], (32, 32, 3))
    rainbow = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return [Image.fromarray(np.ascontiguousarray(a)) for a in (flat, two, ramp, rainbow)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: on a loaded machine a second intra-op thread only adds waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Real CIFAR-10 and generated images from the committed demo set, plus edge cases."""
    real = datasets.load_from_disk(str(DEMO / "real"))["train"].select(range(0, 2250, 75))
    ddpm = datasets.load_from_disk(str(DEMO / "synthetic" / "ddpm")).select(range(0, 1000, 125))
    cgan = datasets.load_from_disk(str(DEMO / "synthetic" / "cgan")).select(range(0, 1000, 125))
    decoded = [row["image"].convert("RGB") for ds in (real, ddpm, cgan) for row in ds]
    return decoded + edge_images()


def test_op_list_and_ranges_are_usbs():
    assert len(augment.OPS) == 14 and set(augment.OPS) == set(USB_RANGES)
    assert augment.RANGES == USB_RANGES
    assert augment.N_OPS == USB_N_OPS and augment.CUTOUT_FILL == FILL


@pytest.mark.parametrize("name", augment.OPS)
def test_op_matches_pillow(images: list[Image.Image], name: str):
    """Each op, at fixed magnitudes and at one random magnitude per image, pixel for pixel."""
    x = to_tensor(images).float()
    n = len(images)
    lo, hi = USB_RANGES[name]
    per_image = torch.rand(n, generator=torch.Generator().manual_seed(1))
    changed = False
    for m in [torch.full((n,), mag) for mag in MAGS] + [per_image]:
        out = augment.apply_op(x.clone(), name, m)
        ref = [usb_op(name, img, lo + (hi - lo) * float(mi)) for img, mi in zip(images, m)]
        ref = to_tensor(ref).float()
        diff = (out - ref).abs()
        assert diff.max() == 0, (name, m[0].item(), diff.max().item(), (diff > 0).sum().item())
        changed |= bool((ref != x).any())
    assert changed or name == "identity"  # the comparison is not between two no-ops


def test_weak_view_matches_torchvision(images: list[Image.Image]):
    x = to_tensor(images)
    p = augment.sample_weak(len(images), torch.Generator().manual_seed(2), (32, 32))
    assert p.flip.any() and not p.flip.all() and p.shift.min() == 0 and p.shift.max() == 8
    ref = [
        usb_weak(img, int(t), int(left), bool(f))
        for img, (t, left), f in zip(images, p.shift, p.flip)
    ]
    assert torch.equal(augment.apply_weak(x, p), to_tensor(ref))


def usb_strong(images: list[Image.Image], p: augment.StrongParams) -> torch.Tensor:
    """USB's strong view of each image from rsmatch's draws: crop, flip, 3 ops in order, Cutout."""
    out = []
    for i, img in enumerate(images):
        (top, left), flip = p.weak.shift[i].tolist(), bool(p.weak.flip[i])
        img = usb_weak(img, top, left, flip)
        for slot in range(USB_N_OPS):
            name = augment.OPS[int(p.ops[i, slot])]
            lo, hi = USB_RANGES[name]
            img = usb_op(name, img, lo + (hi - lo) * float(p.mags[i, slot]))
        u_x, u_y, frac = p.cutout[i].tolist()
        out.append(usb_cutout(img, frac, usb_centre(u_x, 32), usb_centre(u_y, 32)))
    return to_tensor(out)


def strong_view(x: torch.Tensor, p: augment.StrongParams, layout: str) -> torch.Tensor:
    """rsmatch's strong view of x on x's device, grouped by op or with fixed shapes (graphs)."""
    if layout == "grouped":
        return augment.apply_strong(x, p.to(x.device))
    return augment.apply_strong_fixed(x, augment.fixed(p, *x.shape[2:]).to(x.device))


@pytest.mark.parametrize("layout", ["grouped", "fixed"])
def test_strong_view_matches_usb_pipeline(images: list[Image.Image], layout: str):
    many = images * 16  # 16 independent draws per image
    p = augment.sample_strong(len(many), torch.Generator().manual_seed(3), (32, 32))
    assert torch.equal(strong_view(to_tensor(many), p, layout), usb_strong(many, p))


@needs_cuda
@pytest.mark.parametrize("layout", ["grouped", "fixed"])
def test_strong_view_on_cuda_matches_usb_pipeline(images: list[Image.Image], layout: str):
    """The trainer augments on the training device: TF32, fused kernels and CUDA's libm must
    not change a pixel."""
    many = images * 16
    p = augment.sample_strong(len(many), torch.Generator().manual_seed(8), (32, 32))
    assert torch.equal(strong_view(to_tensor(many).cuda(), p, layout).cpu(), usb_strong(many, p))


def test_numpy_uniform_with_one_argument():
    """np.random.uniform(size) maps a uniform u on [0, 1) to size + (1 - size) * u."""
    got = np.random.RandomState(5).uniform(32, size=1000)
    u = np.random.RandomState(5).random_sample(1000)
    assert np.array_equal(got, [usb_centre(ui, 32) for ui in u])
    assert got.min() > 1 and got.max() <= 32


def test_draws_follow_usb_distributions():
    """3 ops per image drawn uniformly with replacement, magnitudes and Cutout uniform."""
    n = 40_000
    p = augment.sample_strong(n, torch.Generator().manual_seed(4), (32, 32))
    assert p.ops.shape == (n, USB_N_OPS) and p.mags.shape == (n, USB_N_OPS)
    for slot in range(USB_N_OPS):
        counts = torch.bincount(p.ops[:, slot], minlength=14).numpy()
        assert len(counts) == 14 and stats.chisquare(counts).pvalue > 1e-3, slot
        assert stats.kstest(p.mags[:, slot].numpy(), "uniform").pvalue > 1e-3, slot
    # With replacement: 3 distinct ops with probability 13*12/14^2, 2 with 3*13/14^2, 1 with 1/14^2.
    distinct = torch.tensor([len(set(row)) for row in p.ops.tolist()])
    observed = torch.bincount(distinct, minlength=4)[1:].numpy()
    expected = n * np.array([1, 39, 156]) / 196
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    side = p.cutout[:, 2].numpy()
    assert stats.kstest(side, "uniform", args=(0, 0.5)).pvalue > 1e-3
    for axis in (0, 1):
        assert stats.kstest(p.cutout[:, axis].numpy(), "uniform").pvalue > 1e-3


def test_cutout_always_applied_with_usbs_size_distribution():
    """On black images (which every op leaves black, solarize aside at v = 0) the strong view
    shows Cutout alone. Its area and position must be distributed as USB's Cutout, simulated
    with USB's own random calls, and no image may escape it."""
    n = 2000
    black = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    out = augment.apply_strong(
        black, augment.sample_strong(n, torch.Generator().manual_seed(6), (32, 32))
    )
    filled = (out == torch.tensor(FILL, dtype=torch.uint8).view(1, 3, 1, 1)).all(dim=1)
    assert ((out == 0).all(dim=1) | filled).all()
    area = filled.sum(dim=(1, 2)).numpy()
    assert (area > 0).all()
    py_rng, np_rng = random.Random(7), np.random.RandomState(7)  # what random.*, np.random.* use
    usb = []
    for _ in range(n):  # USB's random calls, in its order
        frac = py_rng.random() * 0.5
        cx, cy = np_rng.uniform(32), np_rng.uniform(32)
        usb.append(np.array(usb_cutout(Image.new("RGB", (32, 32)), frac, cx, cy)).any(axis=2))
    usb = torch.from_numpy(np.stack(usb))
    assert stats.ks_2samp(area, usb.sum(dim=(1, 2)).numpy()).pvalue > 1e-3
    for axis in (1, 2):  # where the box lies: mean covered row and column
        ours = (filled.sum(axis) * torch.arange(32)).sum(1) / filled.sum(axis).sum(1)
        theirs = (usb.sum(axis) * torch.arange(32)).sum(1) / usb.sum(axis).sum(1)
        assert stats.ks_2samp(ours.numpy(), theirs.numpy()).pvalue > 1e-3, axis
