"""Train an algorithm: `accelerate launch launch/train.py --config configs/rsmatch.yaml key=value ...`.

Every input is checked before data is decoded or anything is written: the config, the output
folder (writable, not holding another run) and, with `--resume`, the checkpoint (verified by its
manifest) and its config. An error is one line naming the key or file, with exit code 2,
printed once under torchrun (see `_report`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

from rsmatch.benchmark.errors import SourceError
from rsmatch.checkpoint import CheckpointError
from rsmatch.cli import HelpWithDefaults, Once, run_process, stdout_to_stderr
from rsmatch.config import Config, ConfigError, ignored_overrides, load_config

OTHER_RANKS_WAIT_S = 5.0  # see _report
RESUME_CHOICES = ("latest", "auto-fallback")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="rsmatch-train",
        formatter_class=HelpWithDefaults,
        description="Train RSMatch or a baseline. Keys are documented in docs/config.md.",
    )
    ap.add_argument(
        "--config", action=Once, help="YAML config file (defaults apply to missing keys)"
    )
    ap.add_argument(
        "--resume", nargs="?", const="latest", choices=RESUME_CHOICES,
        help="continue from train.output_dir's latest checkpoint, refused if it is broken; "
        "--resume=auto-fallback takes the newest intact one instead (and says so)",
    )  # fmt: skip
    ap.add_argument(
        "--resume-from", type=int, metavar="STEP", help="continue from the checkpoint of STEP"
    )
    ap.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=0.01"
    )
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_intermixed_args(_attach_resume_value(argv))
    if args.resume and args.resume_from is not None:
        ap.error("--resume and --resume-from exclude each other")
    return args


def _attach_resume_value(argv: list[str]) -> list[str]:
    """`--resume VALUE` as `--resume=VALUE` (argparse checks VALUE), and a bare `--resume` as
    `--resume=latest`. The intermixed parsing would otherwise take the word after a bare
    `--resume` as an override (`--resume latest` failed), and a bare one must not swallow the
    key=value or option after it. Overrides hold "=", values never do."""
    out: list[str] = []
    for word in argv:
        if out and out[-1] == "--resume" and not word.startswith("-") and "=" not in word:
            out[-1] = f"--resume={word}"
        else:
            out.append(word)
    return ["--resume=latest" if word == "--resume" else word for word in out]


def _the_runs_own_config(cfg: Config, overrides: list[str]) -> Config:
    """A resume without `--config` continues with the keys the run was started with (its
    config.yaml), the command line's overrides on top; the defaults would differ from them in
    every key the run's file set, each refused as a change."""
    saved = Path(cfg.train.output_dir) / "config.yaml"
    if not saved.is_file():
        return cfg  # no run there: the resume reports what is missing
    return load_config(str(saved), overrides)


def _report(error: Exception) -> None:
    """Print the error on stderr, once when every process finds it.

    Rank 0 prints at once. The other ranks usually meet the same error at the same moment; they
    wait first, so that the launcher, seeing rank 0 exit, stops them before they repeat it
    (printing at once instead, one could exit first and have torchrun stop rank 0 before it
    printed). A rank still running after the wait met an error of its own, say a file missing
    on one node: it prints it, naming its rank."""
    rank = int(os.environ.get("RANK", "0"))
    if rank:
        time.sleep(OTHER_RANKS_WAIT_S)
    print(f"rsmatch-train: error: {f'[rank {rank}] ' if rank else ''}{error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    resume = args.resume_from if args.resume_from is not None else args.resume
    try:
        cfg = load_config(args.config, args.overrides)
        if resume is not None and args.config is None:
            cfg = _the_runs_own_config(cfg, args.overrides)
        from rsmatch import runfolder  # heavy imports after the cheap checks

        out = Path(cfg.train.output_dir)
        runfolder.check_writable(out)
        runfolder.check_free(out)
        runfolder.check_run_folder(cfg, resume)  # read-only; repeated under the run lock
        from rsmatch.trainer import Trainer

        ignored = ignored_overrides(cfg, args.overrides)  # after the one-line config errors
        if not int(os.environ.get("RANK", "0")):
            for key, reason in ignored.items():
                print(f"rsmatch-train: warning: {key}: ignored, {reason}", file=sys.stderr)

        # stdout is for the final metrics' JSON line; notes, warnings and what libraries print
        # (DeepSpeed logs to stdout) go to stderr
        with stdout_to_stderr():
            trainer = Trainer(cfg)
            metrics = trainer.fit(resume=resume)
    except (ConfigError, SourceError, CheckpointError) as e:
        _report(e)
        return 2
    except KeyboardInterrupt:  # in the training loop Ctrl-C saves a checkpoint instead
        print("rsmatch-train: interrupted outside the training loop; nothing saved",
              file=sys.stderr)  # fmt: skip
        return 130
    if trainer.accelerator.is_main_process:
        print(json.dumps(metrics))
    trainer.accelerator.end_training()
    return 0


def run() -> NoReturn:
    """The `rsmatch-train` command."""
    run_process(main)


if __name__ == "__main__":
    run()
