"""DeepSpeed installs, imports and drives the one-engine model on CPU (one process).

What this does NOT check: that ZeRO-2 training matches DDP numerically (see README, Limits).
"""

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_deepspeed_imports():
    import deepspeed  # noqa: F401
    from accelerate.utils import DeepSpeedPlugin

    assert (
        DeepSpeedPlugin(hf_ds_config=str(ROOT / "configs" / "deepspeed" / "zero2.json")).zero_stage
        == 2
    )


@pytest.mark.slow
def test_rsmatch_runs_under_deepspeed_zero2(sources, tmp_path):
    cfg = tmp_path / "ds.json"
    cfg.write_text('{"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 6}')
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--deepspeed_config_file",
           str(cfg), "--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no",
           str(ROOT / "launch" / "train.py"), *tiny_overrides(sources, out, algorithm="rsmatch")]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = out / "checkpoints" / "step_00000004"
    assert (ckpt / "pytorch_model").is_dir() and (ckpt / "algorithm.safetensors").is_file()
    assert (out / "metrics.json").is_file()
