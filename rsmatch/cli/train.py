"""Train an algorithm: `accelerate launch launch/train.py --config configs/rsmatch.yaml key=value ...`.

Errors in the config or the data stop the run before anything is written, with one line naming
the key and value, and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from rsmatch.benchmark.sources import SourceError
from rsmatch.config import ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="rsmatch-train",
        description="Train RSMatch or a baseline. Keys are documented in docs/config.md.",
    )
    ap.add_argument("--config", help="YAML config file (defaults apply to missing keys)")
    ap.add_argument(
        "--resume", action="store_true", help="continue from train.output_dir's latest checkpoint"
    )
    ap.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=0.01"
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from rsmatch.trainer import Trainer  # heavy imports after the cheap checks

        trainer = Trainer(cfg)
        metrics = trainer.fit(resume=args.resume)
    except (ConfigError, SourceError) as e:
        print(f"rsmatch-train: error: {e}", file=sys.stderr)
        return 2
    if trainer.accelerator.is_main_process:
        print(json.dumps(metrics))
    trainer.accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
