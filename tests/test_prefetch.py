"""`train.prefetch`: the next batch made in a worker thread changes no batch and no weight."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from rsmatch.data.loaders import BatchMaker
from rsmatch.data.prefetch import Prefetcher

from .conftest import tiny_config
from .test_data import _data
from .test_trainer import _run, _weights, assert_resume_is_exact

FIELDS = ("x_lb", "y_lb", "idx_lb", "u_w", "u_s", "idx_ulb")


def test_prefetched_batches_are_the_steps_own_and_made_in_the_worker():
    make = BatchMaker(_data(), 6, 2, seed=3, rank=0, world=1, device=torch.device("cpu"))
    made_by: dict[int, str] = {}

    def recorded(step: int):
        made_by[step] = threading.current_thread().name
        return make(step)

    prefetcher = Prefetcher(recorded, torch.device("cpu"), ahead=True)
    try:
        for step in (0, 1, 2, 7, 8):  # in order, then a jump
            got, want = prefetcher(step), make(step)
            for name in FIELDS:
                assert torch.equal(getattr(got, name), getattr(want, name)), (step, name)
    finally:
        prefetcher.close()
    # each step's batch and the next one were made by the worker (3 ahead of a jump to 7)
    assert set(made_by) == {0, 1, 2, 3, 7, 8, 9}
    assert all(name.startswith("rsmatch-batches") for name in made_by.values()), made_by


def test_an_error_in_the_worker_reaches_the_step_it_concerns():
    def make(step: int):
        if step == 3:
            raise ValueError("broken batch 3")
        return step

    prefetcher = Prefetcher(make, torch.device("cpu"), ahead=True)
    try:
        assert [prefetcher(k) for k in range(3)] == [0, 1, 2]  # batch 3 failed meanwhile
        with pytest.raises(ValueError, match="broken batch 3"):
            prefetcher(3)
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
    for ahead in (True, False):  # run.json says what was used
        assert json.loads((tmp_path / str(ahead) / "run.json").read_text())["prefetch"] is ahead


def test_resume_with_prefetch_is_exact(sources, tmp_path):
    assert_resume_is_exact(sources, tmp_path, algorithm="rsmatch", **{"train.prefetch": True})
