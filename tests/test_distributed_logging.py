"""Logging with several processes: every rank reduces the same keys in the same order."""

import json
import math
from pathlib import Path

import pytest

from .conftest import tiny_overrides
from .torchrun import torchrun

WORKER = Path(__file__).with_name("logging_worker.py")


@pytest.mark.slow
def test_freematch_logs_every_step_with_two_processes(sources, tmp_path):
    out = tmp_path / "run"
    args = tiny_overrides(sources, out, **{
        "algorithm": "freematch", "train.steps": 4, "train.log_every": 1, "train.eval_every": 4,
        "train.save_every": 4, "freematch.ent_loss_ratio": 0.5, "freematch.ema_p": 0.0,
        # one unlabeled image per rank and ema_p 0: the less confident one falls below the global
        # mean, so one rank has a fairness term and the other none (a collective failed before)
        "train.batch_size": 2, "train.uratio": 1})  # fmt: skip
    res = torchrun(WORKER, args, 2, restore=out, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ranks = json.loads((out / "logged.json").read_text(encoding="utf-8"))
    assert len(ranks) == 2 and len(ranks[0]["logs"]) == 4
    assert ranks[0]["keys"] == ranks[1]["keys"], "ranks logged different keys"
    assert all("loss_fair" in step for step in ranks[0]["keys"])
    for log0, log1 in zip(ranks[0]["logs"], ranks[1]["logs"]):
        assert log0.keys() == log1.keys() and all(math.isfinite(v) for v in log0.values())
        assert log0 == pytest.approx(log1)  # the all-reduced means, the same on every rank
    for rank in ranks:  # rank 0 met (a, b), rank 1 (b, a): means are still taken key by key
        assert rank["swapped"]["a"] == 0.5 and rank["swapped"]["b"] == 10.5
