"""`train.prefetch`: the next batch made in a worker thread changes no batch and no weight."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from rsmatch.data.batch import Batch
from rsmatch.data.loaders import BatchMaker
from rsmatch.data.prefetch import Prefetcher

from .conftest import needs_cuda, tiny_config
from .test_data import _data
from .test_trainer import _run, _weights, assert_resume_is_exact

FIELDS = ("x_lb", "y_lb", "idx_lb", "u_w", "u_s", "idx_ulb")


def test_prefetched_batches_are_the_steps_own_and_made_in_the_worker():
    # two makers: one for the worker, one for this thread (a maker caches its epoch's order)
    make, ahead = (BatchMaker(_data(), 6, 2, 3, 0, 1, torch.device("cpu")) for _ in range(2))
    made_by: dict[int, str] = {}

    def recorded(step: int):
        made_by[step] = threading.current_thread().name
        return ahead(step)

    prefetcher = Prefetcher(recorded, torch.device("cpu"), ahead=True)
    try:
        for step in (0, 1, 2, 7, 8):  # in order, then a jump
            got, want = prefetcher(step), make(step)
            for name in FIELDS:
                assert torch.equal(getattr(got, name), getattr(want, name)), (step, name)
    finally:
        prefetcher.close()
    # each step's batch and the next one were made by the worker; 3, made ahead of the jump to
    # 7, at most (its making may have started before the jump cancelled it)
    assert {0, 1, 2, 7, 8, 9} <= set(made_by) <= {0, 1, 2, 3, 7, 8, 9}
    assert all(name.startswith("rsmatch-batches") for name in made_by.values()), made_by


def test_no_batch_is_made_after_the_last_step():
    """`stop` = train.steps: the last step's call starts no batch that nothing will ask for."""
    made = []
    prefetcher = Prefetcher(lambda k: made.append(k) or k, torch.device("cpu"), ahead=True, stop=3)
    try:
        assert [prefetcher(k) for k in range(3)] == [0, 1, 2]
        assert prefetcher.pending is None  # nothing queued (close would cancel it unseen)
    finally:
        prefetcher.close()
    assert made == [0, 1, 2]


def test_an_error_in_the_worker_reaches_the_step_it_concerns():
    failures = [3]

    def make(step: int):
        if step in failures:
            failures.remove(step)
            raise ValueError(f"broken batch {step}")
        return step

    prefetcher = Prefetcher(make, torch.device("cpu"), ahead=True)
    try:
        assert [prefetcher(k) for k in range(3)] == [0, 1, 2]  # batch 3 failed meanwhile
        with pytest.raises(ValueError, match="broken batch 3"):
            prefetcher(3)
        assert prefetcher(3) == 3  # asked again, it is made again (a transient failure)
    finally:
        prefetcher.close()
    assert prefetcher(5) == 5  # a closed prefetcher starts a new worker when asked again
    prefetcher.close()


def test_training_with_and_without_prefetch_is_identical(sources, tmp_path):
    runs = {
        ahead: _run(
            tiny_config(
                sources, tmp_path / str(ahead), algorithm="rsmatch", **{"train.prefetch": ahead}
            )
        )  # fmt: skip
        for ahead in (True, False)
    }
    on, off = _weights(runs[True]), _weights(runs[False])
    assert all(torch.equal(on[k], off[k]) for k in on)
    for ahead in (True, False):  # run.json says what was used; `auto` batch graphs: not on CPUs
        record = json.loads((tmp_path / str(ahead) / "run.json").read_text(encoding="utf-8"))
        assert record["prefetch"] is ahead and record["graph_batches"] is False


def test_resume_with_prefetch_is_exact(sources, tmp_path):
    assert_resume_is_exact(sources, tmp_path, algorithm="rsmatch", **{"train.prefetch": True})


@needs_cuda
def test_a_batch_from_the_side_stream_is_complete_on_the_main_stream():
    """The worker's stream is held back by a long kernel before it fills the batch: the main
    stream must wait for the batch's event (it reads garbage otherwise), and the batch's memory
    must not go back to the worker's stream before the main stream is done with it."""
    cuda = torch.device("cuda")

    def slow(step: int) -> Batch:
        torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time, queued on the worker's stream
        x = torch.full((64, 3, 32, 32), step, dtype=torch.uint8, device=cuda)
        return Batch(x, torch.full((64,), step, device=cuda), torch.arange(64, device=cuda))

    prefetcher = Prefetcher(slow, cuda, ahead=True)
    try:
        for step in range(1, 6):
            batch = prefetcher(step)
            assert int(batch.x_lb.sum()) == step * batch.x_lb.numel(), step
            assert int(batch.y_lb.sum()) == step * 64, step
    finally:
        prefetcher.close()


@needs_cuda
def test_prefetched_cuda_batches_equal_batches_made_in_place():
    cuda = torch.device("cuda")
    make, ahead = (BatchMaker(_data(), 6, 2, 3, 0, 1, cuda) for _ in range(2))
    prefetcher = Prefetcher(ahead, cuda, ahead=True)
    try:
        for step in (0, 1, 2, 7):
            got, want = prefetcher(step), make(step)
            for name in FIELDS:
                assert torch.equal(getattr(got, name), getattr(want, name)), (step, name)
    finally:
        prefetcher.close()


def test_throughput_measures_and_stops_the_prefetching_thread(sources, tmp_path, capsys):
    from rsmatch.cli import throughput

    from .conftest import tiny_overrides

    overrides = tiny_overrides(sources, tmp_path / "run", **{"train.prefetch": True})
    assert throughput.main(["--steps", "2", "--warmup", "1", *overrides]) == 0
    result = json.loads(capsys.readouterr().out)  # the one line: libraries' prints to stderr
    # tiny_config: RSMatch, B = 6, mu = 2, so 18 images per step; its classifier forwards
    # B + 2 mu B = 30 images, its detector 2 B + 2 mu B = 36
    # both rounded to 0.1: on a loaded machine (a few steps per second) that is up to
    # 0.05 + 0.05 * 66 / 18 apart, more than a relative 1e-3 (it failed once so)
    per_s = pytest.approx(result["samples_per_s"] * 66 / 18, rel=1e-3, abs=0.05 + 0.05 * 66 / 18)
    assert result["forward_images_per_s"] == per_s
    assert result["s_per_step"] > 0 and result["batch_size"] == 6 and result["uratio"] == 2
    assert not [t for t in threading.enumerate() if t.name.startswith("rsmatch-batches")]
