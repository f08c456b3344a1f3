"""Command-line entry points (thin: parse, then call the library), the argparse type of
their counted options, and how a launched command's process ends."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `low`, else argparse's one-line error and exit 2."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def exit_process(code: int) -> NoReturn:
    """End this process with `code`; a launched one (WORLD_SIZE > 1) without finalising Python.

    A DDP model keeps torch's gloo process group, and its worker threads, alive after
    `end_training()` destroys it (torch 2.14; without DDP the threads are joined). A worker
    still releasing the tensors of the last collective needs the GIL, and once Python is
    finalising it is made to exit inside that C++ destructor, which is noexcept:
    std::terminate, "terminate called without an active exception", SIGABRT (a core dump
    showed it; 9 in 40 launches of a bare DDP script, 0 in 30 with this). `os._exit` ends
    the process without finalising: the trackers are closed and the run lock released before
    it, and nothing in rsmatch registers atexit work.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def run_process(entry: Callable[[], int]) -> NoReturn:
    """A command's `entry`, then `exit_process`, after a crash too (its process group may
    still be up, and the abort would hide the exit code)."""
    try:
        code = entry()
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001 -- reported here, the process ends below
        traceback.print_exc()
        code = 1
    exit_process(code)
