"""Experiment grids: a base config crossed with axes of values, each point an ordinary run.

A grid file names a base config, an output folder and the axes::

    base: configs/demo.yaml
    output: runs/grid
    overrides: [train.steps=100]          # optional, applied to every run
    axes:
      algorithm: [fixmatch, rsmatch]      # a dotted config key and its values
      data.replace_ratio: [0.3, 0.7]
      method:                             # a named axis: each value sets several keys
        real_only: {algorithm: fixmatch, data.real_only: true}
      train.seed: [0, 1, 2]

Every point is validated with :func:`rsmatch.config.load_config` before any run starts, so a
bad grid costs nothing. A run's folder is named from its axis values, which keeps names stable
across invocations: a rerun skips finished runs (``metrics.json``) and resumes interrupted ones
(``checkpoints/latest``).
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from rsmatch import checkpoint
from rsmatch.atomic import write_text_atomic
from rsmatch.benchmark.errors import SourceError
from rsmatch.config import (
    Config,
    ConfigError,
    as_saved,
    fixed_by_benchmark,
    flat_config,
    load_config,
    parse_yaml,
    to_dict,
)

GRID_KEYS = ("base", "output", "axes", "overrides")
MANIFEST = "experiment.json"  # what the report reads to know the runs a grid expects
RESULT_NEUTRAL = ("train.output_dir", "train.progress")  # keys that cannot change a result
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=,-]+")


class GridError(ValueError):
    """A bad grid; the message names the grid key, axis value or run at fault."""


@dataclass(frozen=True)
class Run:
    name: str
    labels: dict[str, str]  # axis -> its value's label (`_label`; the name holds `_in_name` of it)
    overrides: tuple[str, ...]  # applied on top of the base config, output_dir last
    config: Config
    path: Path


@dataclass(frozen=True)
class Grid:
    file: Path
    base: Path
    output: Path
    runs: tuple[Run, ...]
    raw: dict[str, Any]


# --- expansion -------------------------------------------------------------------------------


def _label(value: Any) -> str:
    """The text of an axis value in a run name: YAML-like scalars, compact JSON otherwise."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def _override(key: str, value: Any) -> str:
    # JSON is valid YAML, so load_config parses back exactly this value.
    return f"{key}={json.dumps(value)}"


def _axis_values(name: str, spec: Any) -> list[tuple[str, list[str]]]:
    """(label, overrides) per value: a list for a config key, a mapping for a named axis."""
    where = f"axes.{name}"
    if isinstance(spec, list):
        if not spec:
            raise GridError(f"{where}: empty axis (give at least one value)")
        if name == "train.output_dir":
            raise GridError(f"{where}: run folders are named by the grid; set `output` instead")
        return [(_label(v), [_override(name, v)]) for v in spec]
    if isinstance(spec, dict):
        if not spec:
            raise GridError(f"{where}: empty axis (give at least one value)")
        out = []
        for label, keys in spec.items():
            keys = keys or {}
            if not isinstance(keys, dict):
                raise GridError(f"{where}.{label}: expected a mapping key: value, got {keys!r}")
            if "train.output_dir" in keys:
                raise GridError(f"{where}.{label}: run folders are named by the grid")
            out.append((_label(label), [_override(k, v) for k, v in keys.items()]))
        return out
    raise GridError(f"{where}: expected a list of values or a mapping name: {{key: value}}")


def _check(base: Path, overrides: Sequence[str], culprit: str) -> Config:
    try:
        return load_config(base, list(overrides))
    except ConfigError as e:
        raise GridError(f"{culprit}: {e}") from None


def _in_name(label: str) -> str:
    """A value's label as a run name (a folder name) writes it."""
    return _UNSAFE.sub("_", label).strip("_")


def _run_name(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={_in_name(v)}" for k, v in labels.items())


def load_grid(path: str | Path) -> Grid:
    """Parse and validate a grid; raises :class:`GridError` naming the culprit."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"{path}: no such grid file")
    try:  # the same YAML dialect as configs; errors as FILE:LINE:COL: problem
        raw = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    except ConfigError as e:
        raise GridError(str(e)) from None
    if not isinstance(raw, dict):
        raise GridError(f"{path}: a grid is a mapping with {', '.join(GRID_KEYS)}")
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise GridError(f"{unknown[0]}: unknown grid key (valid: {', '.join(GRID_KEYS)})")
    for key in ("base", "output", "axes"):
        if not raw.get(key):
            raise GridError(f"{key}: missing from {path}")
    base, output = Path(str(raw["base"])), Path(str(raw["output"]))
    if not base.is_file():
        raise GridError(f"base: no such config file {str(base)!r}")
    common = raw.get("overrides") or []
    if not isinstance(common, list) or not all(isinstance(o, str) for o in common):
        raise GridError("overrides: expected a list of key=value strings")
    if not isinstance(raw["axes"], dict):
        raise GridError("axes: expected a mapping axis: [values]")
    common_keys = {o.partition("=")[0].strip() for o in common}
    if "train.output_dir" in common_keys:
        raise GridError("overrides: train.output_dir is set by the grid; set `output` instead")
    _check(base, common, "overrides" if common else "base")

    axes = {name: _axis_values(str(name), spec) for name, spec in raw["axes"].items()}
    owner: dict[str, str] = {}  # config key -> the axis that sets it
    for name, values in axes.items():
        for key in {o.partition("=")[0] for _, ovr in values for o in ovr}:
            if owner.setdefault(key, name) != name:
                raise GridError(f"axes.{name}: sets {key}, which axes.{owner[key]} sets too")
    for name, values in axes.items():
        for label, ovr in values:
            clash = common_keys & {o.partition("=")[0] for o in ovr}
            if clash:
                raise GridError(f"axes.{name}: {sorted(clash)[0]} is also in `overrides`")
            _check(base, [*common, *ovr], f"axes.{name}={label}")

    runs, seen = [], {}
    for combo in itertools.product(*axes.values()):
        labels = {name: label for name, (label, _) in zip(axes, combo)}
        name = _run_name(labels)
        if name in seen:
            raise GridError(f"axes: runs {seen[name]} and {labels} get the same folder {name!r}")
        seen[name] = labels
        if len(name) > 200:
            raise GridError(f"axes: run name {name[:60]}... is too long for a folder; shorten it")
        run_dir = output / name
        varied = [o for _, group in combo for o in group]
        ovr = (*common, *varied, _override("train.output_dir", str(run_dir)))
        cfg = _check(base, ovr, f"run {name}")
        fixed = [k for k in (o.partition("=")[0] for o in varied) if fixed_by_benchmark(k)]
        if cfg.data.benchmark and fixed:
            raise GridError(
                f"axes: {fixed[0]} is ignored when data.benchmark is set (the saved benchmark "
                "fixes it); vary data.benchmark instead"
            )
        runs.append(Run(name, labels, ovr, cfg, run_dir))
    return Grid(path, base, output, tuple(runs), raw)


# --- state and selection -----------------------------------------------------------------------


def run_state(run_dir: Path) -> str:
    """done (metrics.json), partial (a checkpoint to resume) or todo."""
    if (run_dir / "metrics.json").is_file():
        return "done"
    if checkpoint.latest(run_dir / "checkpoints") is not None:
        return "partial"
    return "todo"


def config_drift(run: Run) -> tuple[str, str] | None:
    """The first key where an existing run's config.yaml differs from the grid's, if any, and
    how it differs.

    Keys only one side has are skipped so that a key added to the code later does not make
    every old run stale, and so are the keys that cannot change a result (`output` written
    relative once and absolute later names the same runs).
    """
    saved_file = run.path / "config.yaml"
    if not saved_file.is_file() or run_state(run.path) == "todo":
        return None
    saved = flat_config(yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {})
    wanted = flat_config(as_saved(run.config))
    for key in sorted(saved.keys() & wanted.keys() - set(RESULT_NEUTRAL)):
        if saved[key] != wanted[key]:
            return key, f"{key} is {saved[key]!r} there, {wanted[key]!r} in the grid"
    return None


def select(runs: Sequence[Run], only: Sequence[str]) -> list[Run]:
    """Runs matching every filter: ``AXIS=VALUE`` exactly (the value as the grid gives it or as
    the run name writes it), else a substring of the name."""
    axes = set(runs[0].labels) if runs else set()
    out = list(runs)
    for f in only:
        key, sep, value = f.partition("=")
        if sep and key in axes:
            out = [r for r in out if value in (r.labels[key], _in_name(r.labels[key]))]
        else:
            out = [r for r in out if f in r.name]
    if not out:
        raise GridError(f"--only {' '.join(only)}: matches no run (axes: {', '.join(axes)})")
    return out


def write_manifest(grid: Grid) -> None:
    """The grid's expected runs and configs, so a report can list runs that never ran."""
    grid.output.mkdir(parents=True, exist_ok=True)
    manifest = {
        "grid_file": str(grid.file),
        "grid": grid.raw,
        "runs": [
            {"name": r.name, "axes": r.labels, "overrides": list(r.overrides),
             "config": to_dict(r.config)}
            for r in grid.runs
        ],
    }  # fmt: skip
    write_text_atomic(grid.output / MANIFEST, json.dumps(manifest, indent=2) + "\n")


# --- running ---------------------------------------------------------------------------------


def train_in_process(argv: list[str]) -> int:
    """One run in this process through the training CLI."""
    from accelerate.state import AcceleratorState, GradientState

    # Accelerate keeps one global state per process and refuses a second Accelerator with
    # other settings (e.g. mixed precision); each run here is a fresh single-process start.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    from rsmatch.cli import train

    return train.main(argv)


def train_with_accelerate(argv: list[str], launcher_args: Sequence[str]) -> int:
    """One run under ``accelerate launch``; SIGTERM/SIGINT are passed on so it checkpoints."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher_args,
           "--module", "rsmatch.cli.train", *argv]  # fmt: skip
    print("+ " + shlex.join(cmd), flush=True)
    child = subprocess.Popen(cmd)
    forward = lambda signum, _frame: child.send_signal(signum)  # noqa: E731
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


TrainCommand = Callable[[list[str]], int]


def check_data_paths(runs: Sequence[Run]) -> None:
    """The data folders of the runs still to train exist (or are Hub ids), before any run
    starts: a typo in one axis value would otherwise surface at its run's turn, hours in."""
    from rsmatch.data.check import check_local_paths  # heavy imports, for real runs only

    for run in runs:
        try:
            check_local_paths(run.config.data)
        except SourceError as e:
            raise GridError(f"run {run.name}: {e}") from None


def run_grid(grid: Grid, runs: Sequence[Run], train: TrainCommand) -> int:
    """Run ``runs`` one after another; 0 if all finished, 1 if some failed, 130 if stopped."""
    write_manifest(grid)
    states = {r.name: run_state(r.path) for r in runs}
    todo = [r for r in runs if states[r.name] != "done"]
    if len(todo) < len(runs):
        print(f"[grid] {len(runs) - len(todo)} of {len(runs)} runs finished already: skipped")
    failed: list[str] = []
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc="grid", unit="run",
               position=0, dynamic_ncols=True)  # fmt: skip
    try:
        for run in todo:
            resume = states[run.name] == "partial"
            bar.set_postfix_str(f"{'resume' if resume else 'start'} {run.name}")
            tqdm.write(f"[grid] {'resuming' if resume else 'starting'} {run.name}")
            argv = ["--config", str(grid.base), *run.overrides, *(["--resume"] if resume else [])]
            bar.clear()  # the run's own lines start on a line of their own
            try:
                code = train(argv)
            except KeyboardInterrupt:
                code = 130
            except Exception:  # one broken run should not cost the rest of the grid
                traceback.print_exc()
                code = 1
            if run_state(run.path) == "done":
                bar.update(1)
            elif code in (0, 130, -signal.SIGINT, -signal.SIGTERM):  # stopped by a signal
                tqdm.write(f"[grid] stopped during {run.name}; rerun the same command to resume")
                return 130
            else:
                tqdm.write(f"[grid] FAILED {run.name} (exit code {code}); continuing",
                           file=sys.stderr)  # fmt: skip
                failed.append(run.name)
    finally:
        bar.close()
    if failed:
        print(f"[grid] {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def describe(runs: Sequence[Run]) -> str:
    """The --dry-run listing: state and name of each run, then counts."""
    states = [run_state(r.path) for r in runs]
    lines = [f"{s:8s} {r.path}" for r, s in zip(runs, states)]
    counts = {s: states.count(s) for s in ("done", "partial", "todo")}
    lines.append(f"{len(runs)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)
