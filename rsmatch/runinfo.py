"""What a run writes next to its checkpoints so its numbers can be traced."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import yaml

from rsmatch.config import Config, to_dict

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
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True
            ).stdout.strip()
        )
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": False}


def write_run_record(out: Path, cfg: Config, extra: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    record = {
        "seed": cfg.train.seed,
        "split_seed": cfg.data.split_seed,
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "versions": versions(),
        "git": git_commit(),
        **extra,
    }
    (out / "run.json").write_text(json.dumps(record, indent=2) + "\n")
