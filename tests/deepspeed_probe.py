"""Run launch/train.py as a DeepSpeed run on a GPU would see it, on the CPU, and record where
the engine's parameters lie. Launched by tests/test_deepspeed.py through `accelerate launch`.

- DeepSpeed's engine asks `torch.is_autocast_enabled()`, which reads CUDA's autocast only; on a
  GPU it is on (the trainer autocasts) and the engine's forward then switches it off unless its
  config has `torch_autocast`. Here the no-argument form answers with the CPU's autocast, so the
  CPU run takes that GPU path. (On a GPU nothing is changed.)
- RSMATCH_PROBE_OUT: a JSON file, written before training: each parameter's address modulo
  16 bytes inside the engine (ZeRO's flat buffer), and the norm the engine clips gradients at.
"""

import json
import os
import runpy
import sys
from pathlib import Path

import torch

from rsmatch.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
cuda_answer = torch.is_autocast_enabled


def is_autocast_enabled(device_type: str | None = None) -> bool:
    return cuda_answer(device_type or "cpu")


if not torch.cuda.is_available():  # on a GPU the real answer is the one wanted
    torch.is_autocast_enabled = is_autocast_enabled
fit = Trainer.fit


def fit_and_record(self: Trainer, *args, **kwargs):
    offsets = {n: p.data_ptr() % 16 for n, p in self.model.module.named_parameters()}
    probe = {"offsets": offsets, "gradient_clipping": self.model.gradient_clipping()}
    Path(os.environ["RSMATCH_PROBE_OUT"]).write_text(json.dumps(probe), encoding="utf-8")
    return fit(self, *args, **kwargs)


Trainer.fit = fit_and_record
sys.argv = [str(ROOT / "launch" / "train.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
