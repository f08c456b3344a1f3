"""Run by tests under torchrun: train, then record per-rank digests of the algorithm state."""

import hashlib
import json
import sys
from pathlib import Path

from accelerate.utils import gather_object

from rsmatch.config import load_config
from rsmatch.trainer import Trainer

if __name__ == "__main__":
    trainer = Trainer(load_config(None, sys.argv[1:]))
    trainer.fit()
    state = trainer.algorithm.state_dict()
    digest = {k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in state.items()}
    ranks = gather_object([digest])
    if trainer.accelerator.is_main_process:
        Path(trainer.cfg.train.output_dir, "ranks.json").write_text(json.dumps(ranks))
    trainer.accelerator.end_training()
