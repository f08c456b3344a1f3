"""`apply_strong` groups the images of a batch by op on the host (the geometric ops' source maps
are made there too) and works on each group on the device. These tests pin that grouping with properties that need no reference pixels (the pixels
themselves are pinned against Pillow in tests/test_augment_parity.py): a batch in which every
image draws the same op is that op applied to the whole batch, and each image of a mixed batch
comes out as it does alone.
"""

from __future__ import annotations

import time

import pytest
import torch

from rsmatch.data import augment
from rsmatch.data.transfer import copy_to, to_device

from .conftest import needs_cuda

N = 24


def _images(seed: int, n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("name", augment.OPS)
def test_a_batch_of_one_op_is_that_op_on_the_whole_batch(name):
    x = _images(1)
    p = augment.sample_strong(N, torch.Generator().manual_seed(2), (32, 32))
    p.ops.fill_(augment.OPS.index(name))
    p.cutout[:, 2] = 0.0  # Cutout of side 0 draws nothing
    want = augment.apply_weak(x, p.weak).float()
    for slot in range(augment.N_OPS):
        want = augment.apply_op(want, name, p.mags[:, slot])
    assert torch.equal(augment.apply_strong(x, p), want.to(torch.uint8))


@pytest.mark.parametrize("layout", ["grouped", "fixed"])
def test_source_maps_of_large_images_keep_their_indices(layout):
    """192 x 192 has more pixels than int16 counts: the maps must not wrap around."""
    x = torch.randint(0, 256, (4, 3, 192, 192), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(6))  # fmt: skip
    p = augment.sample_strong(4, torch.Generator().manual_seed(7), (192, 192))
    p.ops.copy_(torch.tensor([[9, 10, 11], [12, 13, 9], [11, 12, 13], [10, 9, 12]]))  # geometric
    p.cutout[:, 2] = 0.0
    want = augment.apply_weak(x, p.weak).float()
    for i, row in enumerate(p.ops.tolist()):
        for slot, k in enumerate(row):
            want[i : i + 1] = augment.apply_op(
                want[i : i + 1], augment.OPS[k], p.mags[i : i + 1, slot]
            )
    if layout == "grouped":
        got = augment.apply_strong(x, p)
    else:
        got = augment.apply_strong_fixed(x, augment.fixed(p, 192, 192))
    assert torch.equal(got, want.to(torch.uint8))


def test_geometric_ops_come_last_so_sorting_by_op_puts_them_together():
    assert augment.OPS[-len(augment.GEOMETRIC) :] == augment.GEOMETRIC
    assert set(augment.GEOMETRIC) == {"rotate", "shear_x", "shear_y", "translate_x", "translate_y"}


def test_each_image_of_a_mixed_batch_comes_out_as_alone():
    x = _images(3, 96)
    p = augment.sample_strong(96, torch.Generator().manual_seed(4), (32, 32))
    assert all(len(p.ops[:, slot].unique()) == len(augment.OPS) for slot in range(3))
    out = augment.apply_strong(x, p)
    for i in range(len(x)):
        assert torch.equal(out[i : i + 1], augment.apply_strong(x[i : i + 1], p[i : i + 1])), i


def test_params_leave_the_op_indices_and_magnitudes_on_the_host():
    p = augment.sample_strong(4, torch.Generator().manual_seed(5), (32, 32)).to("meta")
    assert p.ops.device.type == p.mags.device.type == "cpu"
    assert {t.device.type for t in (p.cutout, p.weak.shift, p.weak.flip)} == {"meta"}


def test_to_device_copies_only_across_devices():
    t = torch.arange(3)
    assert to_device(t, "cpu") is t
    assert to_device(t, torch.device("meta")).device.type == "meta"


@needs_cuda
@pytest.mark.parametrize("copy", ["to_device", "copy_to"])
def test_copies_to_cuda_never_hold_the_host(copy):
    """With ~50 ms of GPU work queued, a copy from pageable memory would hold the host until the
    stream gets to it (sync debug mode does not flag a non_blocking one); a pinned one returns."""
    t = torch.arange(100_000)
    dst = torch.empty_like(t, device="cuda")
    to_device(t, "cuda")  # the first pinned allocation and the CUDA context
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)  # GPU cycles: ~50 ms at 2 GHz
    start = time.perf_counter()
    got = to_device(t, "cuda") if copy == "to_device" else (copy_to(dst, t), dst)[1]
    held = time.perf_counter() - start
    torch.cuda.synchronize()
    assert torch.equal(got.cpu(), t)
    assert held < 0.02, f"the host waited {held:.3f} s for the copy"
