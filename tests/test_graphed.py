"""`train.graph_batches`: batch making replayed from one CUDA graph.

A graph replays the kernels it recorded, with the arguments it recorded, on the memory it
recorded. So on the CPU these tests pin what that needs: the fixed-shape strong view makes the
grouped view's pixels (both are pinned against Pillow in tests/test_augment_parity.py) and
launches the same operators with the same shapes and host values whatever the draws; and
`Graphed`, run with a stand-in capture that behaves as a graph does (replay recomputes from the
captured inputs into the captured outputs), makes every step's batch as eager batch making does.
The real capture runs in the CUDA tests.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from rsmatch.data import augment
from rsmatch.data.graphed import Graphed, tensors
from rsmatch.data.loaders import BatchMaker, views
from rsmatch.data.prefetch import Prefetcher

from .conftest import needs_cuda
from .test_data import _data

FIELDS = ("x_lb", "y_lb", "idx_lb", "x_lb_s", "u_w", "u_s", "idx_ulb")


def test_fixed_strong_view_is_the_grouped_one():
    for shape, seed in (((96, 3, 32, 32), 1), ((40, 3, 20, 28), 2), ((1, 3, 32, 32), 3)):
        n, _, h, w = shape
        x = torch.randint(
            0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
        )
        p = augment.sample_strong(n, torch.Generator().manual_seed(seed + 10), (h, w))
        got = augment.apply_strong_fixed(x, augment.fixed(p, h, w))
        assert torch.equal(got, augment.apply_strong(x, p)), shape


class _Launches(TorchDispatchMode):
    """The operators a call dispatches, each with what a graph would bake into its launch: the
    shapes and dtypes of device tensors, and the values of host tensors and Python numbers."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        def baked(a: object) -> object:
            if isinstance(a, torch.Tensor):
                host = a.device.type == "cpu"
                return (a.device.type, tuple(a.shape), a.dtype, a.tolist() if host else None)
            return a

        self.launches.append((str(func), tree_map(baked, (args, kwargs))))
        return func(*args, **(kwargs or {}))


def _launches(strong, layout) -> list[tuple]:
    """What strong-view augmentation launches on a device (`meta`), for draws of seed 0 and 1."""
    out = []
    for seed in (0, 1):
        p = layout(augment.sample_strong(32, torch.Generator().manual_seed(seed), (32, 32))).to(
            "meta"
        )
        x = torch.empty(32, 3, 32, 32, dtype=torch.uint8, device="meta")
        with _Launches() as recorded:
            strong(x, p)
        out.append(recorded.launches)
    return out


def test_fixed_strong_view_launches_the_same_kernels_whatever_the_draws():
    first, second = _launches(augment.apply_strong_fixed, lambda p: augment.fixed(p, 32, 32))
    assert first == second
    # the recorder sees what differs: the grouped view launches by the draws
    first, second = _launches(augment.apply_strong, lambda p: p)
    assert first != second


def _rerun(fn, inputs):
    """A CUDA graph's contract, eagerly: replay() recomputes fn on what `inputs` hold then,
    writing into the tensors the capture returned."""
    outputs = fn(inputs)

    def replay() -> None:
        for dst, src in zip(tensors(outputs), tensors(fn(inputs)), strict=True):
            dst.copy_(src)

    return replay, outputs


def _assert_same_batches(got, want, step: int) -> None:
    for name in FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), (step, name)


@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_graphed_batches_are_the_eager_ones(rank, world):
    cpu = torch.device("cpu")
    kw = dict(rank=rank, world=world, device=cpu, strong_labeled=True)
    eager = BatchMaker(_data(), 6, 2, 3, **kw)
    graphed = BatchMaker(_data(), 6, 2, 3, graphed=True, capture=_rerun, **kw)
    for step in (0, 1, 2, 9):  # step 9 wraps the unlabeled epoch
        _assert_same_batches(graphed(step), eager(step), step)
    assert graphed.graph.replay is not None
    draws = graphed.draws(3)  # a graph needs the strong views' fixed-shape layout
    assert isinstance(draws.strong_lb, augment.FixedStrongParams)
    assert isinstance(draws.strong_u, augment.FixedStrongParams)


def test_a_graph_reads_and_writes_only_the_device():
    """On `meta` as the device, every captured input and output lives there: nothing the
    capture reads stays on the host, where a graph would bake it in."""
    meta = torch.device("meta")
    graphed = BatchMaker(_data(), 6, 2, 3, 0, 1, meta, strong_labeled=True, graphed=True,
                         capture=_rerun)  # fmt: skip
    batch = graphed(0)
    placed = tensors(graphed.graph.inputs) + tensors(graphed.graph.outputs) + tensors(batch)
    assert {t.device.type for t in placed} == {"meta"}


def test_graphed_batches_are_copies_the_next_replay_leaves_alone():
    graphed = BatchMaker(_data(), 6, 2, 3, 0, 1, torch.device("cpu"), graphed=True, capture=_rerun)
    first = graphed(0)
    kept = first.u_s.clone()
    graphed(1)
    assert torch.equal(first.u_s, kept)


def test_a_graph_refuses_inputs_of_other_shapes():
    graph = Graphed(views, torch.device("cpu"), _rerun)
    graph(BatchMaker(_data(), 6, 2, 3, 0, 1, torch.device("cpu")).draws(0))
    with pytest.raises(ValueError, match="captured shapes"):
        graph(BatchMaker(_data(), 4, 2, 3, 0, 1, torch.device("cpu")).draws(0))


@needs_cuda
def test_cuda_graphed_batches_are_the_eager_ones_and_never_wait():
    """Captured for real, in the prefetching thread on its own stream; steady-state steps
    replay without a host sync; a new worker thread (after `close`, as evaluation does) replays
    the same graph; with no prefetching, capture and replay run on the main thread."""
    cuda = torch.device("cuda")
    eager = BatchMaker(_data(), 6, 2, 3, 0, 1, cuda, strong_labeled=True)
    graphed = BatchMaker(_data(), 6, 2, 3, 0, 1, cuda, strong_labeled=True, graphed=True)
    prefetcher = Prefetcher(graphed, cuda, ahead=True)
    try:
        _assert_same_batches(prefetcher(0), eager(0), 0)  # captured here
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            batches = {step: prefetcher(step) for step in range(1, 5)}
        finally:
            torch.cuda.set_sync_debug_mode("default")
        prefetcher.close()
        batches[9] = prefetcher(9)  # another worker thread, the same graph
    finally:
        prefetcher.close()
    on_main = BatchMaker(_data(), 6, 2, 3, 0, 1, cuda, strong_labeled=True, graphed=True)
    batches |= {100 + step: on_main(step) for step in range(3)}
    for step, batch in batches.items():
        _assert_same_batches(batch, eager(step % 100), step)
