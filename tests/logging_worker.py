"""Run by tests under torchrun: train with logging every step and record what each rank logged."""

import json
import sys
from pathlib import Path

import torch
from accelerate.utils import gather_object

from rsmatch.cli import exit_process
from rsmatch.config import load_config
from rsmatch.trainer import Trainer

if __name__ == "__main__":
    trainer = Trainer(load_config(None, sys.argv[1:]))
    keys, logs = [], []
    collect, reduce = trainer._collect, trainer._reduce
    trainer._collect = lambda window, logged: (keys.append(list(logged)), collect(window, logged))
    trainer._reduce = lambda window: logs.append(reduce(window)) or logs[-1]
    trainer.fit()
    # The same keys met in a rank-dependent order must still be reduced key by key.
    r = float(trainer.rank)
    window = {"a": [torch.tensor(r)], "b": [torch.tensor(10 + r)]}
    if trainer.rank % 2:
        window = dict(reversed(window.items()))
    ranks = gather_object([{"keys": keys, "logs": logs, "swapped": reduce(window)}])
    if trainer.accelerator.is_main_process:
        Path(trainer.cfg.train.output_dir, "logged.json").write_text(
            json.dumps(ranks), encoding="utf-8"
        )
    trainer.accelerator.end_training()
    exit_process(0)  # see there: a gloo worker may abort a finalising Python
