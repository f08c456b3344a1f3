"""Atomic checkpoints: write into a hidden temporary folder, then rename, then move `latest`.

A checkpoint folder holds Accelerate's state (model, optimizer, scheduler, scaler; sharded
under DeepSpeed) plus our own safetensors files for the EMA weights and the algorithm state
(queues, thresholds, banks) and `trainer.json` (step, best accuracy). A crash at any moment
leaves either the previous `latest` or the new one, never a half-written folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

LATEST = "latest"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(
    accelerator: Accelerator,
    root: Path,
    step: int,
    ema: nn.Module,
    algorithm_state: dict,
    trainer_state: dict,
    keep: int,
) -> Path:
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank: DeepSpeed writes shards
    if accelerator.is_main_process:
        save_file(
            {k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors")
        )
        state = {k: v.detach().cpu().contiguous() for k, v in algorithm_state.items()}
        save_file(state, str(tmp / "algorithm.safetensors"))
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, final.name + "\n")
        for old in sorted(root.glob("step_*"))[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def latest(root: Path) -> Path | None:
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if path.is_dir() else None


def load(accelerator: Accelerator, path: Path, ema: nn.Module) -> tuple[dict, dict]:
    """Restore Accelerate's state and the EMA; return (algorithm state, trainer state)."""
    accelerator.load_state(str(path))
    ema.load_state_dict(load_file(str(path / "ema.safetensors"), device="cpu"))
    algo = load_file(str(path / "algorithm.safetensors"), device="cpu")
    return algo, json.loads((path / "trainer.json").read_text())
