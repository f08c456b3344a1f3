"""Run by tests under torchrun: train (or resume with --resume), then record per-rank digests
of the algorithm state, the live model and the EMA model (buffers included)."""

import hashlib
import json
import sys
from pathlib import Path

from accelerate.utils import gather_object

from rsmatch.cli import exit_process
from rsmatch.config import load_config
from rsmatch.trainer import Trainer


def digests(state: dict, prefix: str) -> dict[str, str]:
    return {
        f"{prefix}{k}": hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        for k, v in state.items()
    }


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--resume"]
    trainer = Trainer(load_config(None, args))
    trainer.fit(resume="--resume" in sys.argv)
    live = trainer.accelerator.unwrap_model(trainer.model)
    digest = {
        **digests(trainer.algorithm.state_dict(), ""),
        **digests(live.state_dict(), "model."),
        **digests(trainer.ema.module.state_dict(), "ema."),
    }
    ranks = gather_object([digest])
    if trainer.accelerator.is_main_process:
        Path(trainer.cfg.train.output_dir, "ranks.json").write_text(json.dumps(ranks))
    trainer.accelerator.end_training()
    exit_process(0)  # see there: a gloo worker may abort a finalising Python
