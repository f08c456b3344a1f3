"""Checkpoints that prove themselves: written into a temporary folder, sealed by a manifest, renamed.

A checkpoint folder holds Accelerate's state (model, optimizer, scheduler, scaler, RNG; sharded
under DeepSpeed), our safetensors files for the EMA weights and the algorithm state, the
run's `config.yaml` and `trainer.json` (step, best accuracy). `manifest.json`, written last,
lists the size and sha256 of every other file: a checkpoint without one, or whose files differ
from it, is refused by name before anything is loaded. A crash at any moment leaves either the
previous `latest` or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from rsmatch.atomic import replace_path, write_text_atomic
from rsmatch.config import dump_yaml

# torch, Accelerate and safetensors are imported where a checkpoint is saved or loaded: the
# command line imports CheckpointError before it reads its config, and a mistyped --config
# path should be reported before torch loads.
if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch import nn

LATEST = "latest"
MANIFEST = "manifest.json"
REQUIRED = ("ema.safetensors", "algorithm.safetensors", "trainer.json", "config.yaml")


class CheckpointError(Exception):
    """A checkpoint that is missing, incomplete or corrupt; the message names the file."""


def readable_as_umask(folder: Path) -> None:
    """safetensors (0.8) writes its files 0600. Give them the mode of every other file the run
    writes (0666 less the umask), so that a cluster group can read the models and checkpoints."""
    mask = os.umask(0)
    os.umask(mask)
    for path in folder.rglob("*.safetensors"):
        path.chmod(0o666 & ~mask)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in files
    }
    with open(folder / MANIFEST, "w", encoding="utf-8") as f:
        json.dump({"files": entries}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def verify(folder: Path) -> None:
    """Raise CheckpointError naming the first file that is missing or differs from the manifest."""
    manifest = folder / MANIFEST
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{manifest}: missing (the checkpoint is incomplete)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest}: unreadable ({type(e).__name__})") from None
    if not isinstance(entries, dict) or not all(
        isinstance(e, dict) and {"size", "sha256"} <= e.keys() for e in entries.values()
    ):
        raise CheckpointError(f"{manifest}: malformed")
    for name in REQUIRED:
        if name not in entries:
            raise CheckpointError(
                f"{folder / name}: not in the manifest (an incomplete checkpoint)"
            )
    # a file the manifest does not list would still be loaded (a DeepSpeed shard, another
    # rank's RNG state): it was not written with this checkpoint
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and name != MANIFEST and name not in entries:
            raise CheckpointError(f"{path}: not in the manifest (added after the checkpoint)")
    for name, entry in entries.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"{path}: {size} bytes, the manifest says {entry['size']}")
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{path}: contents differ from the manifest (sha256)")


def save(
    accelerator: Accelerator,
    root: Path,
    step: int,
    ema: nn.Module,
    algorithm_state: dict,
    trainer_state: dict,
    config: dict,
    keep: int,
) -> Path:
    from accelerate.utils import broadcast_object_list
    from safetensors.torch import save_file

    final = root / f"step_{step:08d}"
    # Unique per run and per save: two writers can never share a temporary folder.
    name = [f".tmp_step_{step:08d}_{os.getpid()}_{uuid.uuid4().hex[:8]}"]
    if accelerator.num_processes > 1:
        broadcast_object_list(name)  # every rank writes its shards into the same folder
    tmp = root / name[0]
    if accelerator.is_main_process:
        for stale in root.glob(".tmp_step_*"):  # left by a killed run; the run lock is ours
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank: DeepSpeed writes shards
    # every rank's files (its RNG state, its shards) are in `tmp` before it is sealed and moved
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file(
            {k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors")
        )
        state = {k: v.detach().cpu().contiguous() for k, v in algorithm_state.items()}
        save_file(state, str(tmp / "algorithm.safetensors"))
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2), encoding="utf-8")
        (tmp / "config.yaml").write_text(dump_yaml(config), encoding="utf-8")
        readable_as_umask(tmp)
        write_manifest(tmp)  # last: it vouches for everything above
        replace_path(tmp, final)
        write_text_atomic(root / LATEST, final.name + "\n")
        for old in steps(root)[keep:]:  # folders only: a stray `step_*` file is not counted
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def latest(root: Path) -> Path | None:
    """The folder `latest` points at; without a pointer, the newest checkpoint folder (a crash
    between a checkpoint's rename and its pointer leaves it so); None when there is neither."""
    pointer = root / LATEST
    if not pointer.is_file():
        return next(iter(steps(root)), None)
    return root / pointer.read_text(encoding="utf-8").strip()


def step_of(folder: Path) -> int:
    """The step a checkpoint folder `step_00000042` holds: 42."""
    return int(folder.name.removeprefix("step_"))


def steps(root: Path) -> list[Path]:
    """Checkpoint folders, newest first."""
    return sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)


def select(root: Path, mode: str | int) -> tuple[Path, list[str]]:
    """The checkpoint to resume from, verified, and notes on the broken ones passed over.

    `mode` is "latest" (refuse if it is broken), "auto-fallback" (the newest intact one) or a
    step number.
    """
    if isinstance(mode, int):
        path = root / f"step_{mode:08d}"
        if not path.is_dir():
            have = ", ".join(str(step_of(p)) for p in steps(root)) or "none"
            raise CheckpointError(f"--resume-from {mode}: no checkpoint {path} (steps: {have})")
        verify(path)
        return path, []
    if mode == "auto-fallback":
        skipped = []
        for path in steps(root):
            try:
                verify(path)
                return path, skipped
            except CheckpointError as e:
                skipped.append(str(e))
        raise CheckpointError(
            f"--resume=auto-fallback: no intact checkpoint under {root}"
            + (f" ({'; '.join(skipped)})" if skipped else "")
        )
    path = latest(root)
    if path is None:
        raise CheckpointError(f"--resume: no checkpoint under {root}")
    if not path.is_dir():
        raise CheckpointError(f"{root / LATEST}: points to {path.name}, which is missing")
    try:
        verify(path)
    except CheckpointError as e:
        older = [p for p in steps(root) if p.name < path.name]
        hint = "--resume=auto-fallback or --resume-from STEP" if older else "no older checkpoint"
        raise CheckpointError(f"{e}; the latest checkpoint is broken ({hint})") from None
    return path, []


def saved_config(path: Path) -> dict:
    return yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))


def load(accelerator: Accelerator, path: Path, ema: nn.Module) -> tuple[dict, dict]:
    """Restore Accelerate's state and the EMA; return (algorithm state, trainer state).

    Call :func:`verify` first; a file that still fails to load is named.
    """
    from safetensors.torch import load_file

    try:
        accelerator.load_state(str(path))
    except Exception as e:  # torch/accelerate raise many types for a bad file
        raise CheckpointError(f"{path}: cannot be loaded ({_first_line(e)})") from None
    files = {name: path / name for name in ("ema.safetensors", "algorithm.safetensors")}
    try:
        ema.load_state_dict(load_file(str(files["ema.safetensors"]), device="cpu"))
        algo = load_file(str(files["algorithm.safetensors"]), device="cpu")
        trainer = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be loaded ({_first_line(e)})") from None
    return algo, trainer


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def set_aside(root: Path, resumed: Path) -> list[Path]:
    """After resuming from an older checkpoint, move the newer ones out of the rotation (kept,
    renamed `set_aside_step_N`) and point `latest` at the one resumed from."""
    moved = []
    for path in steps(root):
        if path.name > resumed.name:
            target = root / f"set_aside_{path.name}"
            replace_path(path, target)
            moved.append(target)
    write_text_atomic(root / LATEST, resumed.name + "\n")
    return moved
