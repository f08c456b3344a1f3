"""A DeepSpeed run as it goes on a GPU, on the CPU, recording where the engine's parameters lie.
`record_engine` patches this process (tests/test_deepspeed.py, in its own process through
pytest's monkeypatch); run as a script, it trains launch/train.py patched so (the launched runs).

- DeepSpeed's engine asks `torch.is_autocast_enabled()`, which reads CUDA's autocast only; on a
  GPU it is on (the trainer autocasts) and the engine's forward then switches it off unless its
  config has `torch_autocast`. Here the no-argument form answers with the CPU's autocast, so the
  CPU run takes that GPU path. (On a GPU nothing is changed.)
- The probe file (RSMATCH_PROBE_OUT for the script): JSON written before training, each
  parameter's address modulo 16 bytes inside the engine (ZeRO's flat buffer), and the norm the
  engine clips gradients at.
"""

import json
import os
import runpy
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from rsmatch.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def record_engine(out: Path, patch: Callable[[object, str, object], None] = setattr) -> None:
    """Patch torch's autocast question (CPU only) and Trainer.fit with `patch` (setattr, or
    monkeypatch.setattr to undo it after a test)."""
    if not torch.cuda.is_available():  # on a GPU the real answer is the one wanted
        cuda_answer = torch.is_autocast_enabled

        def is_autocast_enabled(device_type: str | None = None) -> bool:
            return cuda_answer(device_type or "cpu")

        patch(torch, "is_autocast_enabled", is_autocast_enabled)
    fit = Trainer.fit

    def fit_and_record(self: Trainer, *args, **kwargs):
        offsets = {n: p.data_ptr() % 16 for n, p in self.model.module.named_parameters()}
        probe = {"offsets": offsets, "gradient_clipping": self.model.gradient_clipping()}
        out.write_text(json.dumps(probe), encoding="utf-8")
        return fit(self, *args, **kwargs)

    patch(Trainer, "fit", fit_and_record)


if __name__ == "__main__":
    record_engine(Path(os.environ["RSMATCH_PROBE_OUT"]))
    sys.argv = [str(ROOT / "launch" / "train.py"), *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
