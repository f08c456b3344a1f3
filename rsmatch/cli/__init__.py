"""Command-line entry points (thin: parse, then call the library), the argparse type of
their counted options, and how a launched command's process ends."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any, NoReturn


class HelpWithDefaults(argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default, unless its text already says it or there is none
    (descriptions and epilogs keep their line breaks)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        # `is`, not `in`: a default of 0 is shown (0 == False)
        nothing = default is None or default is False or default is argparse.SUPPRESS
        if not action.option_strings or "default" in text or nothing or default == []:
            return text
        return f"{text} (default: %(default)s)"


class Once(argparse.Action):
    """An option given at most once: a second `--config` would silently replace the first
    (files are not merged). `overrides` says what overrides the file's keys in this tool."""

    def __init__(self, *args: Any, overrides: str = "key=value", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.overrides = overrides

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 value: object, option: str | None = None) -> None:  # fmt: skip
        if getattr(namespace, self.dest) is not None:
            parser.error(f"{option} given twice ({getattr(namespace, self.dest)}, {value}): "
                         f"one file per command; override its keys with {self.overrides}")  # fmt: skip
        setattr(namespace, self.dest, value)


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


def name_value_pairs(
    items: list[str], flag: str, error: type[Exception], value: str = "VALUE"
) -> dict[str, str]:
    """`FLAG NAME=VALUE ...` as {NAME: VALUE}, raising `error` on an item without a name or a
    value, and on a name given twice (refused, not overwritten by its last value)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, given = item.partition("=")
        if not (sep and name and given):
            raise error(f"{flag} {item!r}: expected NAME={value}")
        if name in out:
            raise error(f"{flag}: {name!r} given twice")
        out[name] = given
    return out


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout meanwhile to stderr: Python's prints, streams that kept
    the original `sys.stdout` (a logger's handler made at import), and file descriptor 1 itself,
    which C++ code (NCCL's debug output) and child processes (DeepSpeed's op builds) write to."""
    for stream in (sys.stdout, sys.__stdout__):
        if stream is not None:
            stream.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no descriptor 1 (closed by the caller): nothing below can write there
        saved = None
    if saved is not None:
        os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for stream in (sys.stdout, sys.__stdout__):  # their buffers belong to the stderr side
            if stream is not None:
                stream.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


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
