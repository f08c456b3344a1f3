"""What a run writes next to its checkpoints so its numbers can be traced."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from rsmatch.atomic import write_text_atomic
from rsmatch.config import Config, ConfigError, as_saved, dump_yaml, flat_config, to_dict

PACKAGES = ("rsmatch", "torch", "torchvision", "accelerate", "timm", "datasets", "safetensors",
            "numpy", "deepspeed", "diffusers", "transformers")  # fmt: skip


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_commit() -> dict[str, str | bool]:
    """The source's commit and whether it had uncommitted changes; where the package is not in a
    git checkout of its own (an installed wheel, the Docker image, a venv inside another
    project's checkout), the commit the build recorded in RSMATCH_GIT_COMMIT (`docker build
    --build-arg RSMATCH_GIT_COMMIT=$(git rev-parse HEAD)`)."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() == here.parent:
            return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"commit": os.environ.get("RSMATCH_GIT_COMMIT") or "unknown", "dirty": False}


# Keys that may change when a run is resumed. All but train.steps leave the weights' trajectory
# as it was (several processes without SyncBatchNorm average BatchNorm's running statistics at
# each evaluation and checkpoint, so new intervals move those in their last bits); a new
# train.steps stretches the cosine learning rate from the resumed step on.
RESUMABLE = ("train.steps", "train.eval_every", "train.log_every", "train.save_every",
             "train.keep_checkpoints", "train.progress", "train.eval_batch_size",
             "train.output_dir")  # fmt: skip


def check_resume_config(saved: dict, cfg: Config, source: Path) -> None:
    """Refuse a resume whose config differs from the checkpoint's outside RESUMABLE."""
    # data.synthetic compared whole: flattened, a mapping emptied on one side showed as
    # `data.synthetic ('<absent>' -> {})` beside a line per generator
    old = flat_config(saved)
    new = flat_config(as_saved(cfg))
    # A whole section on one side only is an algorithm registered on one side only (a plugin,
    # a newer version); it matters only when it is this run's own algorithm.
    sections = {k.split(".")[0] for k in old} ^ {k.split(".")[0] for k in new}
    ignored = sections - {cfg.algorithm}
    differ = [
        f"{k} ({old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r})"
        for k in sorted(old.keys() | new.keys())
        if k not in RESUMABLE
        and k.split(".")[0] not in ignored
        and old.get(k, _ABSENT) != new.get(k, _ABSENT)
    ]
    if differ:
        raise ConfigError(
            f"--resume: the config differs from {source} in {', '.join(differ)}; only "
            f"{', '.join(RESUMABLE)} may change on resume"
        )


_ABSENT = object()


def write_run_record(out: Path, cfg: Config, extra: dict, resumed_from: str | None) -> None:
    """Write config.yaml and run.json; a resume appends to run.json's history."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.yaml", dump_yaml(to_dict(cfg)))
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    event = {
        "event": "resume" if resumed_from else "start", "command": sys.argv, "time": now,
        "host": platform.node(), "pid": os.getpid(), "resumed_from": resumed_from,
        "versions": versions(), "git": git_commit(), **extra,
    }  # fmt: skip
    path = out / "run.json"
    record = None
    if resumed_from and path.is_file():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            record = None  # unreadable: start a new record rather than lose the run
    if not isinstance(record, dict):
        # the split's seed as trained on: a saved benchmark's own, not the ignored data.split_seed
        split_seed = (extra.get("split") or {}).get("seed", cfg.data.split_seed)
        record = {"seed": cfg.train.seed, "split_seed": split_seed, "command": sys.argv,
                  "started": now, "host": platform.node(), "versions": event["versions"],
                  "git": event["git"], **extra, "history": []}  # fmt: skip
    record.setdefault("history", []).append(event)
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")


def trim_evals(out: Path, step: int) -> int:
    """Drop evaluations after `step` from evals.jsonl (a resume from an older checkpoint
    repeats them), and a last line that a crash cut off; replaced atomically. Returns how many
    lines were dropped."""
    path = out / "evals.jsonl"
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if (e := _entry(line)) is not None and e.get("step", 0) <= step]
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(f"{line}\n" for line in kept))
    return len(lines) - len(kept)


def eval_entries(out: Path) -> list[dict[str, Any]]:
    """The evaluations in `out/evals.jsonl`, in file order (none without the file)."""
    path = out / "evals.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return [e for e in map(_entry, lines) if e is not None]


def _entry(line: str) -> dict[str, Any] | None:
    """One evals.jsonl line; None for a blank line or one a crash cut off while it was written
    (the last), which a resume drops and a report skips."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None
