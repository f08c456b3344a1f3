"""Run an experiment grid: `rsmatch-experiment GRID.yaml [--dry-run] [--only AXIS=VALUE]`.

Every run is an ordinary training run, in this process one after another or each under
`accelerate launch` (`--launcher accelerate -- --multi_gpu --num_processes 4`). Finished runs are
skipped and interrupted ones resumed, so rerunning the same command continues a grid. A bad grid
stops before any run with one line naming the culprit and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

from rsmatch.cli import HelpWithDefaults
from rsmatch.experiment import (
    GridError,
    check_data_paths,
    config_drift,
    describe,
    load_grid,
    run_grid,
    run_state,
    select,
    train_in_process,
    train_with_accelerate,
)
from rsmatch.launcher import deepspeed_launch


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Arguments after `--` go to `accelerate launch` unchanged."""
    launcher_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(
        prog="rsmatch-experiment",
        description=__doc__.splitlines()[0],
        formatter_class=HelpWithDefaults,
    )
    ap.add_argument("grid", help="grid YAML (see docs/experiments.md)")
    ap.add_argument("--dry-run", action="store_true", help="list the runs and their state")
    ap.add_argument(
        "--only", action="append", default=[], metavar="AXIS=VALUE|TEXT",
        help="keep runs whose axis has this value, or whose name contains TEXT (repeatable: all must match)",
    )  # fmt: skip
    ap.add_argument(
        "--launcher", choices=("inline", "accelerate"), default="inline",
        help="inline: each run in this process; accelerate: each under `accelerate launch` "
        "with the arguments after `--`",
    )  # fmt: skip
    return ap.parse_args(argv), launcher_args


def main(argv: list[str] | None = None) -> int:
    args, launcher_args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        # runs train in this process: not as one of several ranks, nor under DeepSpeed, which
        # keeps the first run's process group for the next run
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 or deepspeed_launch():
            raise GridError(
                "rsmatch-experiment runs under accelerate launch: start it plainly and pass "
                "--launcher accelerate instead (each run then gets its own launch)"
            )
        if launcher_args and args.launcher != "accelerate":
            raise GridError(f"{launcher_args[0]}: arguments after -- need --launcher accelerate")
        grid = load_grid(args.grid)
        runs = select(grid.runs, args.only)
        for run in runs:
            drift = config_drift(run)
            if drift:
                key, how = drift
                extend = (
                    " (a grid does not extend finished runs: its schedule was for their length; "
                    "`rsmatch-train --resume train.steps=N` extends one run alone)"
                    if key == "train.steps"
                    else ""
                )
                raise GridError(
                    f"run {run.path}: its config.yaml differs from the grid ({how}); "
                    f"move the run away or change `output`{extend}"
                )
        if not args.dry_run:  # a dry run lists the grid, generated folders or not
            check_data_paths([r for r in runs if run_state(r.path) != "done"])
    except GridError as e:
        print(f"rsmatch-experiment: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(describe(runs))
        return 0
    if args.launcher == "accelerate":
        train = partial(train_with_accelerate, launcher_args=launcher_args)
    else:
        train = train_in_process
    return run_grid(grid, runs, train)


if __name__ == "__main__":
    sys.exit(main())
