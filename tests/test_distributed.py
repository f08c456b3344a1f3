"""Two gloo processes against one process on the same global batch.

The backbones of the 1-vs-2 comparisons are timm's BatchNorm-free `test_convnext`: on CPU
(no SyncBatchNorm) each rank normalises its own slice, so only a BN-free network can match one
process exactly. A BatchNorm network is checked for what holds there: identical buffers on every
rank at evaluation and in checkpoints, and exact resume.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rsmatch.config import load_config
from rsmatch.trainer import Trainer

from .conftest import tiny_overrides
from .torchrun import torchrun

WORKER = Path(__file__).with_name("distributed_worker.py")


def _launch(args: list[str], processes: int, restore: Path | None = None) -> None:
    """The worker in `processes` processes; `restore` defaults to the run's output folder."""
    out = Path(next(a.split("=", 1)[1] for a in args if a.startswith("train.output_dir=")))
    res = torchrun(WORKER, args, processes, restore=restore or out)
    # every rank's own traceback lines first: the launcher's tail names only the first failure
    ranks = "\n".join(x for x in res.stderr.splitlines() if x.startswith("[rank"))
    assert res.returncode == 0, ranks[-6000:] + res.stdout[-2000:] + res.stderr[-2000:]
    assert "broadcast_buffers" not in res.stderr  # torch's deprecation, silenced at the DDP wrap


def _saved(out: Path) -> tuple[dict, dict]:
    """A run's weights and algorithm state at step 3."""
    ckpt = out / "checkpoints" / "step_00000003"
    return (load_file(str(ckpt / "model.safetensors")),
            load_file(str(ckpt / "algorithm.safetensors")))  # fmt: skip


def _ranks(out: Path) -> list[dict]:
    """The per-rank digests the worker wrote."""
    return json.loads((out / "ranks.json").read_text(encoding="utf-8"))


BASE = {
    "model.backbone": "test_convnext",
    "train.steps": 3,
    "train.save_every": 3,
    "train.eval_every": 3,
    "train.batch_size": 6,
    "ssl.threshold": 0.4,
}
BASELINES = ("flexmatch", "freematch", "simmatch")


def _baseline(algorithm: str) -> dict:
    extra = {**BASE, "algorithm": algorithm, "simmatch.warmup_steps": 1}
    if algorithm == "freematch":
        # The fairness loss is computed on each rank's masked samples (as in USB), which is not
        # the loss of the global batch; the thresholds it depends on are compared below.
        extra["freematch.ent_loss_ratio"] = 0.0
    return extra


# RSMatch with (nearly) every sample passing, so that the routing losses are exercised
QUEUE_RUN = {
    **BASE,
    "algorithm": "rsmatch",
    "rsmatch.detector_backbone": "test_convnext",
    "ssl.threshold": 0.01,
    "rsmatch.detector_threshold": 0.01,
    # 6 pushes a step, so that each rank's slice of the queue sample holds other images
    "rsmatch.queue_picks": 3,
    "rsmatch.queue_topk": 2,
}


# wrn10_1 (BatchNorm), with a step-2 checkpoint that comes with no evaluation: its save must
# sync the buffers itself
BATCHNORM_RUN = {"algorithm": "fixmatch", "train.batch_size": 6, "train.save_every": 2,
                 "train.eval_every": 4, "ssl.threshold": 0.4, "train.keep_checkpoints": 5}  # fmt: skip
# FreeMatch logging every step; one unlabeled image per rank and ema_p 0: the less confident one
# falls below the global mean, so one rank has a fairness term and the other none (a collective
# failed before)
LOGGING_RUN = {"algorithm": "freematch", "train.steps": 4, "train.log_every": 1,
               "train.eval_every": 4, "train.save_every": 4, "freematch.ent_loss_ratio": 0.5,
               "freematch.ema_p": 0.0, "train.batch_size": 2, "train.uratio": 1}  # fmt: skip


@pytest.fixture(scope="module")
def two_ranks(sources, tmp_path_factory) -> Path:
    """The baselines, QUEUE_RUN, BATCHNORM_RUN and LOGGING_RUN, each trained by 2 processes, one
    after another in one launch: a folder each, named by its algorithm (the last two:
    `batchnorm`, `logging`)."""
    root = tmp_path_factory.mktemp("two_ranks")
    runs = {**{a: _baseline(a) for a in BASELINES}, "rsmatch": QUEUE_RUN,
            "batchnorm": BATCHNORM_RUN, "logging": LOGGING_RUN}  # fmt: skip
    args = [tiny_overrides(sources, root / name, **extra) for name, extra in runs.items()]
    _launch([arg for run in args for arg in ("--then", *run)][1:], 2, restore=root)
    return root


def _one_process(sources, out: Path, extra: dict) -> tuple[dict, dict]:
    Trainer(load_config(None, tiny_overrides(sources, out, **extra))).fit()
    return _saved(out)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", BASELINES)
def test_baseline_state_is_identical_across_ranks_and_to_one_process(
    sources, tmp_path, two_ranks, algorithm
):
    w1, s1 = _one_process(sources, tmp_path / "p1", _baseline(algorithm))
    (w2, s2), ranks2 = _saved(two_ranks / algorithm), _ranks(two_ranks / algorithm)
    assert len(ranks2) == 2 and ranks2[0] == ranks2[1], "ranks hold different state"
    assert s1.keys() == s2.keys()
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=1e-4, atol=1e-5, msg=k)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_two_processes_match_one_with_identical_queues(sources, tmp_path, two_ranks):
    w1, q1 = _one_process(sources, tmp_path / "p1", QUEUE_RUN)
    (w2, q2), ranks2 = _saved(two_ranks / "rsmatch"), _ranks(two_ranks / "rsmatch")
    assert len(ranks2) == 2 and ranks2[0] == ranks2[1], "ranks hold different queues"
    assert int(q2["queue.pushed"].sum()) > 0
    assert torch.equal(q1["queue.sources"], q2["queue.sources"])
    assert torch.equal(q1["queue.images"], q2["queue.images"])
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)
    # the evaluations too: each rank scores its own shard of the test set and the pool
    evals = [[json.loads(x) for x in (run / "evals.jsonl").read_text(encoding="utf-8").splitlines()]
             for run in (tmp_path / "p1", two_ranks / "rsmatch")]  # fmt: skip
    assert len(evals[0]) == len(evals[1]) == 1
    for key, value in evals[0][0].items():
        if isinstance(value, float):
            assert evals[1][0][key] == pytest.approx(value, abs=1e-4), key


@pytest.mark.slow
def test_batchnorm_ranks_share_buffers_and_resume_exactly(sources, tmp_path, two_ranks):
    """wrn10_1 has BatchNorm: per-rank statistics are averaged before evaluations and saves,
    so both ranks hold the same buffers and a 2-process run resumes exactly."""
    straight = two_ranks / "batchnorm"
    ranks = _ranks(straight)
    assert ranks[0] == ranks[1], "ranks evaluate/save different weights or BN buffers"
    assert any("running_mean" in k for k in ranks[0])
    watched = json.loads((straight / "watched.json").read_text(encoding="utf-8"))
    for rank in watched:  # each sync averaged (not copied from one rank), before evaluating
        checked, wrong = rank["bn_sync"]
        assert checked > 0 and wrong == 0, rank["bn_sync"]
    assert watched[0]["evaluated"] == watched[1]["evaluated"] and watched[0]["evaluated"]
    for ckpt in (straight / "checkpoints").glob("step_*"):  # sealed only once every rank wrote
        listed = json.loads((ckpt / "manifest.json").read_text(encoding="utf-8"))["files"]
        assert {"random_states_0.pkl", "random_states_1.pkl"} <= listed.keys(), ckpt
        assert sorted(listed) == sorted(p.name for p in ckpt.iterdir() if p.name != "manifest.json")

    # a second run gets only the step-2 checkpoint of the first and resumes to step 4
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    step2 = "step_00000002"
    shutil.copytree(straight / "checkpoints" / step2, resumed / "checkpoints" / step2)
    (resumed / "checkpoints" / "latest").write_text(step2 + "\n", encoding="utf-8")
    _launch([*tiny_overrides(sources, resumed, **BATCHNORM_RUN), "--resume"], 2)
    assert _ranks(resumed) == ranks


@pytest.mark.slow
def test_freematch_logs_every_step_with_two_processes(two_ranks):
    """Every rank reduces the same keys in the same order."""
    ranks = json.loads((two_ranks / "logging" / "watched.json").read_text(encoding="utf-8"))
    assert len(ranks) == 2 and len(ranks[0]["logs"]) == 4
    assert ranks[0]["keys"] == ranks[1]["keys"], "ranks logged different keys"
    assert all("loss_fair" in step for step in ranks[0]["keys"])
    for log0, log1 in zip(ranks[0]["logs"], ranks[1]["logs"]):
        assert log0.keys() == log1.keys() and all(math.isfinite(v) for v in log0.values())
        assert log0 == pytest.approx(log1)  # the all-reduced means, the same on every rank
    for rank in ranks:  # rank 0 met (a, b), rank 1 (b, a): means are still taken key by key
        assert rank["swapped"]["a"] == 0.5 and rank["swapped"]["b"] == 10.5
