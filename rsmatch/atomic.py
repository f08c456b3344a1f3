"""Writing a file or a folder so that a reader, or a crash, never meets half of it. Kept apart
from the checkpoint code (torch, Accelerate, safetensors) so that the light commands need none
of it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that a reader sees the old file or the new one, never a part,
    also after a power loss (flushed to disk before the rename). A failed write leaves no
    temporary file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_folder(out: Path, fill: Callable[[Path], object]) -> None:
    """Let `fill` write into an empty folder next to `out`, then swap it in whole: a reader meets
    the old `out` or the new one, never a mix. A failure (Ctrl-C included) leaves `out` as it
    was and no temporary folder; a crash between the two renames leaves `out` as `.NAME.old`,
    which the next call for `out` puts back first. One writer per `out` (the caller holds its
    lock, or `out` is its own new path)."""
    tmp, old = (out.with_name(f".{out.name}.{suffix}") for suffix in ("tmp", "old"))
    if old.exists() and not out.exists():  # a writer killed between the two renames below
        os.replace(old, out)
    for leftover in (tmp, old):
        _remove(leftover)
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        if old.exists() and not out.exists():
            os.replace(old, out)
        _remove(tmp)
        raise
    _remove(old)


def replace_path(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, removing what `dst` held first (a folder set aside before, a
    checkpoint written again)."""
    _remove(dst)
    os.replace(src, dst)


def _remove(path: Path) -> None:
    """A folder with its contents, or a file or link (an `out` that was one)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
