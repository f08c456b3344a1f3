"""Two gloo processes against one process on the same global batch.

The backbones here are timm's BatchNorm-free `test_convnext`: with BatchNorm each rank
normalises its own slice (as in USB), so only a BN-free network can match exactly.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import tiny_overrides

WORKER = Path(__file__).with_name("distributed_worker.py")


def _launch(args: list[str], processes: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
           "--master_port", str(29500 + processes), str(WORKER), *args]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_match_one_with_identical_queues(sources, tmp_path):
    extra = {
        "algorithm": "rsmatch",
        "model.backbone": "test_convnext",
        "rsmatch.detector_backbone": "test_convnext",
        "train.steps": 3,
        "train.save_every": 3,
        "train.eval_every": 3,
        "train.batch_size": 6,
        "ssl.threshold": 0.01,  # (nearly) every sample passes: the routing losses are exercised
        "rsmatch.detector_threshold": 0.01,
    }
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        _launch(tiny_overrides(sources, out, **extra), n)
        ckpt = out / "checkpoints" / "step_00000003"
        runs[n] = (load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "algorithm.safetensors")),
                   json.loads((out / "ranks.json").read_text()))  # fmt: skip
    (w1, q1, _), (w2, q2, ranks2) = runs[1], runs[2]
    assert len(ranks2) == 2 and ranks2[0] == ranks2[1], "ranks hold different queues"
    assert int(q2["queue.pushed"].sum()) > 0
    assert torch.equal(q1["queue.sources"], q2["queue.sources"])
    assert torch.equal(q1["queue.images"], q2["queue.images"])
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)
