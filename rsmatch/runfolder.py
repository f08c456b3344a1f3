"""The run folder: writable before any work starts, and used by one run at a time.

The lock is an OS advisory lock (`fcntl.flock`) on `train.output_dir/.lock`, held for the whole
run and released by the kernel even on `kill -9`. The file names its holder (pid, host, start
time) for the run that is refused. It is removed on release, so a refused or failed run leaves
the folder as it found it.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import time
from pathlib import Path

from rsmatch import checkpoint
from rsmatch.config import Config, ConfigError
from rsmatch.runinfo import check_resume_config

LOCK = ".lock"


EXPORT_FILES = ("config.json", "model.safetensors")  # what every export holds (rsmatch.export)


def unwritable(out: Path, inside: tuple[str, ...] = ()) -> str | None:
    """Why the folder `out` (and the named folders in it) could not be created and written to,
    or None; read-only, so a refusal leaves everything as it was."""
    existing = out
    while not existing.exists():  # the first folder that would be created in
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    for folder in (existing, *(out / name for name in inside)):
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            return f"{folder} is not writable"
    return None


def read_json_object(path: Path) -> dict:
    """A run's JSON record file as a dict; ValueError naming the file when it is not one (a
    file cut off by a crash, say)."""
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: not a JSON object")
    return loaded


def exported_model_problem(run: Path) -> str | None:
    """Why `run` is not a finished run folder with its exported classifier (and, where there
    is one, detector) complete, if it is not."""
    if not run.is_dir():
        return f"{run}: no such run folder"
    if not (run / "model").is_dir():
        return f"{run / 'model'}: no exported classifier (has the run finished?)"
    for export in (run / "model", run / "detector"):
        missing = [n for n in EXPORT_FILES if export.is_dir() and not (export / n).is_file()]
        if missing:
            return f"{export}: an incomplete export ({', '.join(missing)} missing)"
    return None


def check_writable(out: Path) -> None:
    """One-line ConfigError unless the run can create and write `out` and what it holds."""
    problem = unwritable(out, ("checkpoints", "tb"))
    if problem:
        raise ConfigError(f"train.output_dir={str(out)!r}: {problem}")


def check_free(out: Path) -> None:
    """Refuse early, writing nothing, if another run holds `out`'s lock now."""
    try:
        fd = os.open(out / LOCK, os.O_RDONLY)
    except OSError:  # no lock file (or no folder): nobody holds it
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(_busy(out)) from None
    finally:
        os.close(fd)


def _busy(out: Path) -> str:
    try:
        h = json.loads((out / LOCK).read_text(encoding="utf-8"))
        holder = f"pid {h['pid']} on {h['host']} since {h['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        holder = "holder not yet recorded"
    return f"train.output_dir={str(out)!r}: in use by another run ({holder}); one run per folder"


class RunLock:
    """`with RunLock(out):` holds train.output_dir for this process or raises ConfigError."""

    def __init__(self, out: Path) -> None:
        self.out, self.path = out, out / LOCK
        self.fd: int | None = None
        self.created: list[Path] = []

    def acquire(self) -> None:
        missing = []
        folder = self.out
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        self.created = missing  # removed again if we end up holding nothing
        try:  # os.access passes folders that refuse a mkdir (/proc, /sys, some mounts)
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self._remove_created()
            raise ConfigError(
                f"train.output_dir={str(self.out)!r}: cannot create it ({e.strerror})"
            ) from None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._remove_created()
                raise ConfigError(_busy(self.out)) from None
            try:  # the file we locked may have been unlinked by a releasing holder: retry
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = {"pid": os.getpid(), "host": platform.node(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
        self.fd = fd

    def release(self, keep_folder: bool = True) -> None:
        """Unlock; with keep_folder=False also remove the folders acquire() created if empty."""
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # before unlocking: see the inode check in acquire
        os.close(self.fd)
        self.fd = None
        if not keep_folder:
            self._remove_created()

    def _remove_created(self) -> None:
        for folder in self.created:  # deepest first
            # never made (a failed mkdir made only folders above it); os.path.isdir, unlike
            # Path.is_dir on Python 3.11, is False for a name too long instead of raising
            if not os.path.isdir(folder):
                continue
            try:
                folder.rmdir()
            except OSError:  # not empty (something else wrote there): nor are its parents
                break
        self.created = []

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


Resume = bool | str | int | None  # False/None: a new run; True/"latest"; "auto-fallback"; a step


def check_run_folder(cfg: Config, resume: Resume) -> tuple[Path | None, list[str]]:
    """Read-only checks of train.output_dir for a new run or a resume, before any write.

    Returns the verified checkpoint to resume from (None for a new run) and notes on broken
    checkpoints passed over by `auto-fallback`.
    """
    out = Path(cfg.train.output_dir)
    root = out / "checkpoints"
    if resume is None or resume is False:
        # latest() is the pointer's folder, else the newest step_N: any checkpoint at all
        if checkpoint.latest(root) is not None or (out / "metrics.json").exists():
            raise ConfigError(
                f"train.output_dir={str(out)!r}: holds a run already; pass --resume or "
                "choose another train.output_dir"
            )
        return None, []
    found, skipped = checkpoint.select(root, "latest" if resume is True else resume)
    check_resume_config(checkpoint.saved_config(found), cfg, found / "config.yaml")
    step = checkpoint.step_of(found)
    if step > cfg.train.steps:
        raise ConfigError(
            f"train.steps={cfg.train.steps}: below the step of the checkpoint to resume from "
            f"({found}, step {step}); train.steps={step} ends the run there, --resume-from an "
            "earlier step ends it sooner"
        )
    return found, skipped
