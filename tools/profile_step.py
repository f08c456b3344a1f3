"""Where a training step's time goes: batch making, the algorithm step, and the bare step.

    python tools/profile_step.py --algorithm fixmatch [rsmatch ...] [--batch-size 64 --uratio 7]
        [--trace] [--override train.graph_batches=true] [--variant train.prefetch=true]

Builds the same contenders as tools/bench_vs_usb.py (WRN-28-2 or `--backbone`, random CIFAR-sized images,
`auto` precision; on the GPU when there is one), warms them up, then times, alternating over
`--rounds`: `trainer.batches(step)` alone, `trainer.train_step` on a pre-made batch, and the
bare forward + backward + SGD step, with `train.prefetch` off (each part on the main thread,
one after the other). On a GPU each timing waits for the device. It also counts
the aten operators each of the three dispatches (what a launch-bound GPU step pays for). With `--trace`
it also prints the top operators of one profiled training step and of one bare step
(torch.profiler), by self time on the host and, on a GPU, on the device.

Each algorithm is profiled in turn in this one process (one start-up for all), and with
`--variant KEY=VALUE` once more with that override; each prints its figures as one JSON line
(`"profiled"`: its name) as soon as it is done.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_vs_usb as bench  # noqa: E402


class _CountOps(TorchDispatchMode):
    """Counts the aten operators a call dispatches (views included). On a GPU whose step is
    bound by launching kernels, this count, not FLOPs, is what a step costs."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _counted(fn, *args) -> tuple[int, Any]:
    """fn(*args) with the aten operators it dispatches counted: (count, its result)."""
    with _CountOps() as counter:
        result = fn(*args)
    return counter.count, result


def _timed(sync, fn, *args) -> tuple[float, Any]:
    """fn(*args) timed, the device waited for: (seconds, its result)."""
    sync()
    start = time.perf_counter()
    result = fn(*args)
    sync()
    return time.perf_counter() - start, result


@contextmanager
def _on_made_batch(trainer, batch):
    """The trainer's steps take `batch` instead of making their own."""
    make = trainer.batches
    trainer.batches = lambda _step: batch
    try:
        yield
    finally:
        trainer.batches = make


def profile(
    args: argparse.Namespace, name: str, algorithm: str, sync: Callable[[], Any], out: str
) -> dict:
    """One algorithm's parts timed and their operators counted (with --trace, printed too),
    under `args.override`; `out`: the trainer's run folder."""
    step = bench._rsmatch_step(args, algorithm, out)
    trainer = step.__self__
    bare = bench._bare_step(args)
    for k in range(args.warmup):
        step(k)
        bare(k)
    times: dict[str, list[float]] = {"batch_making": [], "step_on_a_made_batch": [], "bare": []}
    for r in range(args.rounds):
        k = args.warmup + r
        seconds, batch = _timed(sync, trainer.batches, k)
        times["batch_making"].append(seconds)
        with _on_made_batch(trainer, batch):
            times["step_on_a_made_batch"].append(_timed(sync, trainer.train_step, k)[0])
        times["bare"].append(_timed(sync, bare, k)[0])
    med = {name: round(statistics.median(v), 4) for name, v in times.items()}
    k = args.warmup + args.rounds
    ops = {}
    ops["batch_making"], batch = _counted(trainer.batches, k)
    with _on_made_batch(trainer, batch):
        ops["step_on_a_made_batch"] = _counted(trainer.train_step, k)[0]
    ops["bare"] = _counted(bare, k)[0]
    if args.trace:  # one step of each, operator by operator
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        for part, fn in (("train_step", trainer.train_step), ("bare", bare)):
            with torch.profiler.profile(activities=activities) as prof:
                fn(k)
                sync()
            averages = prof.key_averages()
            print(f"--- {name}: {part}")
            print(averages.table(sort_by="self_cpu_time_total", row_limit=15))
            if torch.cuda.is_available():
                print(averages.table(sort_by="self_cuda_time_total", row_limit=12))
    return {"backbone": args.backbone, "precision": trainer.precision.record(), "median_s": med,
            "aten_ops": ops}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algorithm", nargs="+", default=["fixmatch"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--uratio", type=int, default=7)
    ap.add_argument("--pool", type=int, default=5000)
    ap.add_argument("--backbone", default=bench.USB_BACKBONE,
                    help="the classifier of the trainer's step and the bare step (any timm name)")  # fmt: skip
    ap.add_argument("--precision", default="auto", choices=("auto", "no", "bf16"))
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                    help="train.compile in this train.compile_mode, and the bare model too")  # fmt: skip
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for the trainer (repeatable), e.g. train.graph_batches=true")  # fmt: skip
    ap.add_argument("--variant", metavar="KEY=VALUE",
                    help="each algorithm once more with this override too, named 'ALGORITHM KEY=VALUE'")  # fmt: skip
    args = ap.parse_args(argv)
    shared = ["train.prefetch=false", *args.override]  # parts timed apart, on the main thread
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    contenders = [(a, a, shared) for a in args.algorithm]
    if args.variant:
        contenders += [(f"{a} {args.variant}", a, [*shared, args.variant]) for a in args.algorithm]
    machine = bench._machine()
    with tempfile.TemporaryDirectory(prefix="profile-", ignore_cleanup_errors=True) as scratch:
        for i, (name, algorithm, overrides) in enumerate(contenders):
            figures = profile(argparse.Namespace(**{**vars(args), "override": overrides}),
                              name, algorithm, sync, f"{scratch}/{i}")  # fmt: skip
            print(json.dumps({"profiled": name, "machine": machine, **figures}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
