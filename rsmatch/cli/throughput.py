"""Training throughput of one algorithm's step for a config (warm-up excluded), as one JSON line.

    rsmatch-throughput --config configs/fixmatch.yaml --steps 20 --warmup 5 train.batch_size=64

`samples_per_s` counts the labeled and unlabeled images consumed per second (B + mu*B per
step); `forward_images_per_s` counts every image pushed through a network, as the algorithm
reports it (FixMatch forwards B + 2*mu*B; RSMatch adds its detector's forward).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import TYPE_CHECKING, NoReturn

from rsmatch.benchmark.errors import SourceError
from rsmatch.cli import HelpWithDefaults, Once, at_least, run_process, stdout_to_stderr
from rsmatch.config import ConfigError, load_config

if TYPE_CHECKING:  # imported late: it loads torch's and Accelerate's training stack
    from rsmatch.trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="rsmatch-throughput",
        description=__doc__.splitlines()[0],
        formatter_class=HelpWithDefaults,
    )
    ap.add_argument("--config", action=Once,
                    help="a training YAML (configs/*.yaml), as rsmatch-train takes it")  # fmt: skip
    ap.add_argument("--steps", type=at_least(1), default=20, help="measured steps")
    ap.add_argument("--warmup", type=at_least(0), default=5, help="unmeasured steps first")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides, as rsmatch-train takes them (docs/config.md)")  # fmt: skip
    args = ap.parse_intermixed_args(argv)
    import torch  # after parsing: --help and usage errors need neither torch nor datasets

    # stdout is for the JSON line; what libraries print (DeepSpeed logs to stdout) goes to stderr
    with stdout_to_stderr():
        try:
            cfg = load_config(args.config, [*args.overrides, "train.progress=false"])
            from rsmatch.trainer import Trainer

            trainer = Trainer(cfg)
        except (ConfigError, SourceError) as e:
            print(f"rsmatch-throughput: error: {e}", file=sys.stderr)
            return 2
        seconds = _time_steps(trainer, args.warmup, args.steps)
    t = cfg.train
    b, mu = t.batch_size, t.uratio
    per_step = b + mu * b if trainer.algorithm.views.unlabeled else b
    forwards = trainer.algorithm.forward_images(b, mu * b)
    result = {
        "algorithm": cfg.algorithm,
        "backbone": cfg.model.backbone,
        "batch_size": b,
        "uratio": mu,
        "mixed_precision": trainer.precision.mixed_precision,  # the autocast, under DeepSpeed too
        "channels_last": trainer.precision.channels_last,
        "processes": trainer.world,
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "s_per_step": round(seconds / args.steps, 4),
        "samples_per_s": round(per_step * args.steps / seconds, 1),
        "forward_images_per_s": round(forwards * args.steps / seconds, 1),
    }
    if trainer.accelerator.is_main_process:
        print(json.dumps(result))
    trainer.accelerator.end_training()
    return 0


def _time_steps(trainer: Trainer, warmup: int, steps: int) -> float:
    """Seconds for `steps` training steps after `warmup` unmeasured ones."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    try:
        for step in range(warmup):
            trainer.train_step(step)
        sync()
        start = time.perf_counter()
        for step in range(warmup, warmup + steps):
            trainer.train_step(step)
        sync()
        return time.perf_counter() - start
    finally:
        trainer.batches.close()  # the prefetching thread, if any, ends with the measurement


def run() -> NoReturn:
    """The `rsmatch-throughput` command (ends as rsmatch-train does: `run_process`)."""
    run_process(main)


if __name__ == "__main__":
    run()
