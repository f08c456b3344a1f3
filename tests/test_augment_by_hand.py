"""Augmentation, prefetching, the EMA teacher and the algorithm registry by hand: what the parity
tests leave free (the order of the draws, dtypes, non-square Cutout), the prefetch worker's
threading and closing, the EMA's cache and device path, registry errors and re-registration
(a mutation audit of rsmatch/data/augment.py, data/prefetch.py, ema.py and registry.py)."""

import gc
import subprocess
import sys
import threading
import time
import weakref

import pytest
import torch
from torch import nn

from rsmatch import registry
from rsmatch.algorithms.base import FixMatch
from rsmatch.data import augment
from rsmatch.data.prefetch import Prefetcher
from rsmatch.ema import ModelEma

CPU = torch.device("cpu")

# ---------------------------------------------------------------- augment


def test_strong_draws_come_from_one_generator_in_a_fixed_order():
    """crop shift, flip, ops, magnitudes, Cutout centre, Cutout side: a step's seed gives the same
    views only if this order (and the weak draws first) never changes."""
    p = augment.sample_strong(5, torch.Generator().manual_seed(11), (32, 32))
    g = torch.Generator().manual_seed(11)
    assert torch.equal(p.weak.shift, torch.randint(0, 9, (5, 2), generator=g))
    assert torch.equal(p.weak.flip, torch.rand(5, generator=g) < 0.5)
    assert torch.equal(p.ops, torch.randint(0, 14, (5, 3), generator=g))
    assert torch.equal(p.mags, torch.rand(5, 3, generator=g))
    assert torch.equal(p.cutout[:, :2], torch.rand(5, 2, generator=g))
    assert torch.equal(p.cutout[:, 2], torch.rand(5, 1, generator=g)[:, 0] * 0.5)


def test_crop_offsets_are_every_shift_of_the_4_pixel_padding():
    """Reflect-pad 4 (USB): crop offsets 0..8 on each axis, all of them drawn, none beyond."""
    p = augment.sample_strong(400, torch.Generator().manual_seed(12), (32, 32))
    for axis in (0, 1):
        assert sorted(p.weak.shift[:, axis].unique().tolist()) == list(range(9))


def test_flip_probability_is_one_half():
    """40 000 draws: the share flipped is 0.5 within 4 standard deviations (0.01)."""
    flip = augment.sample_weak(40_000, torch.Generator().manual_seed(13), (32, 32)).flip
    assert flip.dtype == torch.bool
    assert 0.49 < flip.float().mean().item() < 0.51


def test_views_are_uint8_of_the_input_shape():
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(14))  # fmt: skip
    p = augment.sample_strong(3, torch.Generator().manual_seed(15), (32, 32))
    assert p.weak.shift.dtype == torch.int64 and p.weak.shift.shape == (3, 2)
    assert p.ops.shape == p.mags.shape == (3, 3) and p.cutout.shape == (3, 3)
    for out in (
        augment.apply_weak(x, p.weak),
        augment.apply_strong(x, p),
        augment.apply_strong_fixed(x, augment.fixed(p, 32, 32)),
    ):
        assert out.dtype == torch.uint8 and out.shape == (3, 3, 32, 32)


@pytest.mark.parametrize("layout", ["grouped", "fixed"])
def test_cutout_side_is_a_fraction_of_the_width(layout):
    """8 high, 32 wide, black, identity ops, centre crop, no flip: side 0.25 * 32 = 8 px about the
    centre (32, 8) (u = 0: USB's uniform(size) gives size), corner (28, 4): rows 4-7 and columns
    28-31 filled, 16 pixels (a side of 0.25 * height = 2 px would fill 1)."""
    x = torch.zeros(1, 3, 8, 32, dtype=torch.uint8)
    weak = augment.WeakParams(torch.tensor([[1, 1]]), torch.tensor([False]))  # pads 8 // 8 = 1
    p = augment.StrongParams(weak, torch.zeros(1, 3, dtype=torch.int64), torch.zeros(1, 3),
                             torch.tensor([[0.0, 0.0, 0.25]]))  # fmt: skip
    if layout == "grouped":
        out = augment.apply_strong(x, p)
    else:
        out = augment.apply_strong_fixed(x, augment.fixed(p, 8, 32))
    want = torch.zeros(1, 3, 8, 32, dtype=torch.uint8)
    want[0, :, 4:8, 28:32] = torch.tensor([125, 123, 114], dtype=torch.uint8).view(3, 1, 1)
    assert torch.equal(out, want)


# ---------------------------------------------------------------- prefetch


def test_without_ahead_the_caller_makes_only_the_step_asked():
    made = []
    prefetcher = Prefetcher(lambda k: made.append((k, threading.get_ident())) or k, CPU, False)
    assert [prefetcher(k) for k in (0, 1, 5)] == [0, 1, 5]
    assert made == [(k, threading.get_ident()) for k in (0, 1, 5)]
    assert prefetcher.worker is None


def test_one_worker_makes_one_batch_at_a_time_in_the_order_asked():
    """A jump while step 1 is being made: step 5 waits for it, in the same thread (two workers
    would make both at once; a new worker per call would use another thread)."""
    active, most, made, lock = [0], [0], [], threading.Lock()
    started = threading.Event()

    def make(step):
        if step == 1:
            started.set()
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
            made.append((step, threading.get_ident()))
        time.sleep(0.1 if step == 1 else 0.0)
        with lock:
            active[0] -= 1
        return step

    prefetcher = Prefetcher(make, CPU, ahead=True)
    try:
        assert prefetcher(0) == 0
        assert started.wait(5)  # step 1 is being made when 5 is asked for
        assert prefetcher(5) == 5
        assert prefetcher(6) == 6
    finally:
        prefetcher.close()
    assert [k for k, _ in made][:4] == [0, 1, 5, 6]  # 7, made ahead, may be cancelled
    assert most[0] == 1 and len({t for _, t in made}) == 1


def test_close_waits_for_the_worker_and_drops_the_batch_made_ahead():
    """Closed while step 1 is being made ahead: close waits for it (no worker thread left), and
    step 1 asked for afterwards is made again."""
    made, started = [], threading.Event()

    def make(step):
        if step == 1:
            started.set()
            time.sleep(0.1)
        made.append(step)
        return step

    prefetcher = Prefetcher(make, CPU, ahead=True)
    assert prefetcher(0) == 0
    assert started.wait(5)
    prefetcher.close()
    alive = [t.name for t in threading.enumerate() if t.name.startswith("rsmatch-batches")]
    assert alive == [] and made == [0, 1]
    try:
        assert prefetcher(1) == 1
    finally:
        prefetcher.close()
    assert made[:3] == [0, 1, 1]


# ---------------------------------------------------------------- ema


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))


def test_a_dropped_model_is_not_kept_alive_by_the_slots_cache():
    model = _net()
    ema = ModelEma(model, decay=0.9, exclude_buffers=True)
    other = _net()
    ema.update(other)
    ref = weakref.ref(other)
    del other
    gc.collect()
    assert ref() is None


# ---------------------------------------------------------------- registry


def test_a_taken_name_names_its_owner():
    with pytest.raises(
        ValueError, match=r"^algorithm 'fixmatch' is registered already by FixMatch$"
    ):

        @registry.register_algorithm("fixmatch")
        class Other(FixMatch):
            pass


def test_registering_sets_the_class_name_and_reregistering_replaces_the_entry():
    """The same class defined again (a reloaded module: same qualified name) takes the name over."""

    def define():
        @registry.register_algorithm("handmatch")
        class HandMatch(FixMatch):
            pass

        return HandMatch

    try:
        first, second = define(), define()
        assert first is not second and first.name == second.name == "handmatch"
        entry = registry.algorithms()["handmatch"]
        assert entry.cls is second and entry.config is None
    finally:
        registry._REGISTRY.pop("handmatch", None)
    assert registry.algorithms()["fixmatch"].cls.name == "fixmatch"


def test_algorithms_returns_a_copy():
    got = registry.algorithms()
    got.pop("fixmatch")
    assert "fixmatch" in registry.algorithms()


def test_algorithms_imports_the_built_in_ones():
    """In a fresh interpreter, with nothing imported but the registry."""
    code = "from rsmatch import registry; print(sorted(registry.algorithms()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(
        ["fixmatch", "flexmatch", "freematch", "rsmatch", "simmatch", "supervised"]
    )
