"""CSQueue: ranks (simulated in threads), host syncs, sampling, storage."""

import threading

import pytest
import torch
from torch.overrides import TorchFunctionMode

from rsmatch.csqueue import CSQueue

from .conftest import ON_CUDA

SHAPE = (3, 2, 2)


def _images(ids: torch.Tensor) -> torch.Tensor:
    return ids.to(torch.uint8).view(-1, 1, 1, 1).expand(-1, *SHAPE).clone()


def _gathers(world: int):
    """One all-gather per rank (rank order), for ranks running in threads."""
    barrier, slots = threading.Barrier(world), {}

    def make(rank: int):
        def gather(t: torch.Tensor) -> torch.Tensor:
            slots[rank] = t
            barrier.wait()
            out = torch.cat([slots[r] for r in range(world)])
            barrier.wait()  # nobody overwrites a slot before everyone has read it
            return out

        return gather

    return [make(r) for r in range(world)]


def _steps(seed: int, n: int, steps: int, classes: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        # scores on a coarse grid: many ties, within and across ranks
        scores = torch.randint(0, 4, (n,), generator=g).float()
        labels = torch.randint(0, classes, (n,), generator=g)
        ids = torch.randint(0, 250, (n,), generator=g)
        yield scores, labels, ids


@pytest.mark.parametrize("class_wise", [True, False])
@pytest.mark.parametrize(("topk", "n"), [(2, 6), (3, 2)])  # k above a rank's batch, not the global
def test_two_ranks_hold_the_queue_of_one_process(class_wise, topk, n):
    make = lambda: CSQueue(4, 3, picks=2, topk=topk, image_shape=SHAPE, class_wise=class_wise)  # noqa: E731
    one, ranks, world = make(), [make(), make()], 2
    data = list(_steps(0, n * world, 8, 4))
    for step, (scores, labels, ids) in enumerate(data):
        one.update(scores, labels, _images(ids), ids, torch.Generator().manual_seed(step))
    gathers = _gathers(world)

    def run(rank: int) -> None:
        for step, (scores, labels, ids) in enumerate(data):
            part = slice(rank * n, (rank + 1) * n)
            ranks[rank].update(scores[part], labels[part], _images(ids[part]), ids[part],
                               torch.Generator().manual_seed(step), gathers[rank])  # fmt: skip

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for q in ranks:
        assert torch.equal(q.pushed, one.pushed) and torch.equal(q.sources, one.sources)
        assert torch.equal(q.images, one.images)
    assert int(one.pushed.sum()) > 0


@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
def test_ties_go_to_the_earlier_batch_position(device):
    """On any device: CUDA sorts short rows unstably unless asked, and ranks would differ."""
    q = CSQueue(1, 4, picks=1, topk=2, image_shape=SHAPE).to(device)
    ids = torch.tensor([5, 6, 7, 8], device=device)
    q.update(torch.tensor([1.0, 2.0, 2.0, 2.0], device=device),
             torch.zeros(4, dtype=torch.long, device=device), _images(ids), ids,
             torch.Generator())  # fmt: skip
    assert q.sources[0, :2].tolist() == [6, 7]


class _NoHostSync(TorchFunctionMode):
    BANNED = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
              torch.Tensor.__index__, torch.Tensor.__float__, torch.Tensor.nonzero, torch.nonzero}  # fmt: skip

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.BANNED:
            raise AssertionError(f"host sync: {func.__name__}")
        return func(*args, **(kwargs or {}))


def test_push_and_sample_have_no_host_sync_once_the_queue_holds_items():
    q = CSQueue(5, 4, picks=3, topk=2, image_shape=SHAPE)
    steps = list(_steps(1, 16, 4, 5))
    q.update(*steps[0][:2], _images(steps[0][2]), steps[0][2], torch.Generator())
    q.sample(4, torch.Generator())  # the one host check: is the queue still empty?
    with _NoHostSync():
        for scores, labels, ids in steps[1:]:
            q.update(scores, labels, _images(ids), ids, torch.Generator())
            drawn = q.sample(4, torch.Generator())
    assert len(drawn) == 4


def test_sample_is_uniform_over_held_items():
    q = CSQueue(3, 4, picks=3, topk=1, image_shape=SHAPE)
    for i in range(5):  # class 0: 4 held (ring wrapped); class 2: 1 held; class 1 empty
        ids = torch.tensor([10 + i, 50])
        q.update(torch.ones(2), torch.tensor([0, 2 if i == 0 else 0]), _images(ids), ids,
                 torch.Generator())  # fmt: skip
    held = sorted(q.held_sources().tolist())
    drawn = q.sample(5000, torch.Generator().manual_seed(0))[:, 0, 0, 0].long()
    counts = torch.bincount(drawn, minlength=256)
    assert sorted(torch.nonzero(counts).flatten().tolist()) == held
    assert counts[held].min() > 5000 / len(held) * 0.85
    torch.manual_seed(0)
    again = q.sample(5000, torch.Generator().manual_seed(0))[:, 0, 0, 0].long()
    assert torch.equal(drawn, again)  # the generator alone decides


def test_sample_maps_each_62_bit_draw_to_the_held_item_of_its_rank():
    """The k-th held item in row-major order, k = draw mod held count, with the draws of
    randint(0, 2**62) from the step's generator: a seed's draws are part of the contract
    (resume and the 1-vs-N-process equality rest on them)."""
    q = CSQueue(3, 4, picks=3, topk=1, image_shape=SHAPE)
    for i in range(3):  # held, row-major: class 0 -> 10, 11, 12; class 2 -> 50
        ids = torch.tensor([10 + i, 50])
        q.update(torch.ones(2), torch.tensor([0, 2 if i == 0 else 0]), _images(ids), ids,
                 torch.Generator())  # fmt: skip
    held = [10, 11, 12, 50]
    draws = torch.randint(0, 2**62, (64,), generator=torch.Generator().manual_seed(7)).tolist()
    expected = [held[d % 4] for d in draws]
    drawn = q.sample(64, torch.Generator().manual_seed(7))[:, 0, 0, 0].tolist()
    assert drawn == expected


def test_sample_is_uniform_over_a_hundred_items():
    q = CSQueue(1, 100, picks=1, topk=100, image_shape=SHAPE)
    ids = torch.arange(100)
    q.update(torch.zeros(100), torch.zeros(100, dtype=torch.long), _images(ids), ids,
             torch.Generator())  # fmt: skip
    counts = torch.bincount(q.sample(20000, torch.Generator().manual_seed(0))[:, 0, 0, 0].long())
    assert counts.min() > 140 and counts.max() < 260  # 200 expected each


def test_storage_is_uint8_images_and_long_pool_indices_from_zero():
    q = CSQueue(2, 3, picks=2, topk=1, image_shape=SHAPE)
    assert q.images.dtype == torch.uint8 and q.sources.dtype == torch.long
    q.update(torch.ones(1), torch.tensor([1]), _images(torch.tensor([0])), torch.tensor([0]),
             torch.Generator())  # fmt: skip
    assert q.held_sources().tolist() == [0]  # pool index 0 is a real index


def test_loading_an_empty_state_empties_the_queue():
    q, empty = CSQueue(2, 3, 2, 1, SHAPE), CSQueue(2, 3, 2, 1, SHAPE)
    q.update(torch.ones(1), torch.tensor([1]), _images(torch.tensor([7])), torch.tensor([7]),
             torch.Generator())  # fmt: skip
    assert len(q.sample(2, torch.Generator())) == 2
    q.load_state_dict(empty.state_dict())
    assert len(q.sample(2, torch.Generator())) == 0


def _push(q: CSQueue, scores: list[float], labels: list[int], ids: list[int]) -> None:
    ids_t = torch.tensor(ids)
    q.update(torch.tensor(scores), torch.tensor(labels), _images(ids_t), ids_t,
             torch.Generator().manual_seed(0))  # fmt: skip


def test_a_picked_class_with_no_candidate_keeps_what_it_holds():
    """Both classes are picked (C <= M); the step's one candidate is class 1's. Class 0's full
    ring must keep its images and sources: nothing is written where nothing was chosen."""
    q = CSQueue(2, 2, picks=2, topk=1, image_shape=SHAPE)
    _push(q, [1.0], [0], [7])
    _push(q, [1.0], [0], [9])
    _push(q, [1.0], [1], [42])
    assert q.images[0, :, 0, 0, 0].tolist() == [7, 9] and q.sources[0].tolist() == [7, 9]
    assert q.pushed.tolist() == [2, 1] and q.images[1, 0, 0, 0, 0] == 42


def test_topk_above_the_queue_length_pushes_a_ring_once():
    """k = 3 into a ring of 2: the two best of the batch (scores 4 and 3), each slot once."""
    q = CSQueue(1, 2, picks=1, topk=3, image_shape=SHAPE)
    _push(q, [1.0, 4.0, 3.0, 2.0], [0, 0, 0, 0], [10, 11, 12, 13])
    assert q.pushed.tolist() == [2] and q.sources[0].tolist() == [11, 12]
    assert q.images[0, :, 0, 0, 0].tolist() == [11, 12]
