"""Side by side, in one run: the bare step, USB's own FixMatch step, rsmatch's FixMatch and RSMatch.

    python tools/bench_vs_usb.py --setup-usb                      # once: semilearn in its own venv
    python tools/bench_vs_usb.py --batch-size 64 --uratio 7 --threads 2 --steps 5 --rounds 2

Every contender is a worker process built once (its warm-up steps excluded), then timed in
rounds, interleaved (bare, usb, fixmatch, rsmatch, bare, usb, ...), so that a drift of the
machine's load hits all of them alike. Each round starts with one untimed step; between its
rounds a worker hands its freed memory back to the OS, so idle workers do not hold their peak.
All use the same B, mu, number of torch threads, WRN-28-2 and random uint8 CIFAR-sized images
(10 classes, 4 labels per class, a pool of `--pool`). `--backbone` gives rsmatch's contenders
and the bare step another classifier (the GPU check's CPU dry run: wrn10_1); USB's stays
WRN-28-2, so it is refused beside `usb`.

- bare: one forward + backward + SGD step of rsmatch's classifier over B + 2*mu*B images;
  no data pipeline, no EMA, no pseudo-labels. rsmatch's `auto` precision, memory format and
  host memory (`train.keep_host_memory`).
  On a CUDA machine bare, fixmatch and rsmatch run on the GPU (the clock waits for the GPU);
  USB's contender is CPU-only here (its batches are kept on the CPU by patch 3).
- usb: semilearn 0.3.2 (PyPI) in its own venv, driven through its own classes: `get_config`,
  `get_net_builder`, `get_algorithm` (its CIFAR datasets, PIL RandAugment, DataLoader with
  `--usb-workers` workers, FixMatch `train_step`, then its `ParamUpdateHook` and `EMAHook`).
  fp32 (USB's amp is CUDA-only). Patches, all for running without CUDA or network:
    1. empty `torchaudio`, `wandb`, `aim` modules (imported by semilearn, unused for CIFAR);
    2. `torchvision.datasets.CIFAR10` serves the random images instead of downloading;
    3. `Tensor.cuda` returns the tensor (USB's `process_batch` moves every batch to a GPU);
    4. only the step's hooks run (no evaluation, checkpoint, CUDA-event timer or logging).
  glibc's default allocator, as USB ships; `--usb-keep-host-memory` gives it rsmatch's setting.
- rsmatch fixmatch / rsmatch: `Trainer.train_step`, config defaults (`auto` precision and
  memory format), batches built by rsmatch's own in-process pipeline.

Prints one JSON line per round and contender, then a summary with ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLASSES = 10
LABELS_PER_CLASS = 4
USB_VENV = Path(tempfile.gettempdir()) / "rsmatch-usb-venv"
USB = "semilearn==0.3.2"  # without its pins (torch, torchaudio, wandb, aim): these three it imports
USB_IMPORTS = ["progress", "ruamel.yaml", "scikit-image"]
STUBS = ("torchaudio", "wandb", "aim")
CONTENDERS = ("bare", "usb", "fixmatch", "rsmatch")
USB_BACKBONE = "wrn28_2"  # semilearn's wrn_28_2, what its FixMatch step trains here
RSMATCH_CONTENDERS = ("fixmatch", "rsmatch")


# -- workers: build once, warm up, then time `run N` requests from stdin ------------------------
def _images(n: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _serve(step, args: argparse.Namespace) -> None:
    import torch

    # idle workers hand their heap back: four holding their 6-8 GB fp32 peaks outgrew 24 GiB
    from rsmatch.hardware import hand_back_host_memory

    # on a GPU the clock is read only after the queued kernels have finished
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    if not sys.stdin.readline():  # "warmup": one worker at a time, so their peaks never add up
        return  # stdin closed first: another worker failed to start
    for k in range(args.warmup):
        step(k)
    sync()
    hand_back_host_memory()
    print("ready", flush=True)
    k = args.warmup
    for line in sys.stdin:
        n = int(line.split()[1])
        step(k)  # untimed: faults back in what the last round handed back
        k += 1
        sync()
        start = time.perf_counter()
        for _ in range(n):
            step(k)
            k += 1
        sync()
        print(f"seconds {(time.perf_counter() - start) / n}", flush=True)
        hand_back_host_memory()


def _rsmatch_step(args: argparse.Namespace, algorithm: str, out: str):
    """`out`: the trainer's run folder."""
    import torch

    from rsmatch.config import load_config
    from rsmatch.data.batch import Provenance, TrainData
    from rsmatch.trainer import Trainer

    n_lb = CLASSES * LABELS_PER_CLASS
    images = torch.from_numpy(_images(args.pool, 0)).permute(0, 3, 1, 2).contiguous()
    data = TrainData(
        labeled=images[:n_lb].clone(), labeled_y=torch.arange(n_lb) % CLASSES, unlabeled=images,
        test=images[:8].clone(), test_y=torch.zeros(8, dtype=torch.long),
        class_names=[str(c) for c in range(CLASSES)],
        provenance=Provenance(torch.zeros(args.pool, dtype=torch.bool), ["real"] * args.pool),
        split_meta={},
    )  # fmt: skip
    cfg = load_config(None, [
        f"algorithm={algorithm}", f"model.backbone={args.backbone}", f"train.batch_size={args.batch_size}",
        f"train.uratio={args.uratio}", f"train.output_dir={out}", "train.progress=false",
        f"train.mixed_precision={args.precision}",
        *(["train.compile=true", f"train.compile_mode={args.compile}"] if args.compile else []),
        *args.override,
    ])  # fmt: skip
    trainer = Trainer(cfg, data=data)
    print(json.dumps({"precision": trainer.precision.record()}), file=sys.stderr)
    return trainer.train_step


def _bare_step(args: argparse.Namespace):
    import torch

    from rsmatch import hardware
    from rsmatch.algorithms import make_algorithm
    from rsmatch.config import load_config

    cfg = load_config(None, ["algorithm=fixmatch", f"model.backbone={args.backbone}"])
    precision = hardware.resolve(args.precision, "auto")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = make_algorithm(cfg, CLASSES, 40, args.pool, (3, 32, 32)).build_model().train()
    model = model.to(device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
        model.normalize.channels_last = True
    if args.compile:
        model.compile(mode=args.compile)  # as the trainer does with train.compile
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, nesterov=True)
    n = args.batch_size * (1 + 2 * args.uratio)
    x = torch.from_numpy(_images(n, 1)).permute(0, 3, 1, 2).contiguous().to(device)
    y = (torch.arange(n) % CLASSES).to(device)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision.mixed_precision)
    scaler = torch.amp.GradScaler(device.type, enabled=half is torch.float16)

    def step(_k: int) -> None:
        with torch.autocast(device.type, dtype=half or torch.float32, enabled=half is not None):
            loss = torch.nn.functional.cross_entropy(model(x)["logits"], y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    return step


def _usb_step(args: argparse.Namespace, out: str):
    """`out`: USB's save and data folder."""
    import torch
    import torchvision

    class RandomCIFAR:  # patch 2: no download
        def __init__(self, root, train=True, download=False, **_):
            self.data = _images(args.pool if train else 64, 0 if train else 2)
            self.targets = [i % CLASSES for i in range(len(self.data))]

    torchvision.datasets.CIFAR10 = RandomCIFAR
    torch.Tensor.cuda = lambda self, *a, **k: self  # patch 3: batches stay on the CPU
    from semilearn import get_algorithm, get_config, get_net_builder

    # USB's samplers materialise num_train_iter * batch indices as one Python list up front
    # (semilearn's DistributedSampler.__iter__: torch.cat(...).tolist()); sized for a real run
    # (2**20 steps) that list alone outgrew 22 GB and the worker was OOM-killed. Ask for the
    # steps this benchmark takes.
    steps = args.warmup + args.rounds * (1 + args.steps)  # each round's untimed step too
    config = get_config({
        "algorithm": "fixmatch", "net": "wrn_28_2", "dataset": "cifar10", "num_classes": CLASSES,
        "num_labels": CLASSES * LABELS_PER_CLASS, "batch_size": args.batch_size,
        "uratio": args.uratio, "num_train_iter": steps, "epoch": 1, "amp": False,
        "num_workers": args.usb_workers, "gpu": None, "world_size": 1, "distributed": False,
        "multiprocessing_distributed": False, "save_dir": out, "data_dir": out, "seed": 0,
        "img_size": 32, "crop_ratio": 0.875, "p_cutoff": 0.95, "hard_label": True, "T": 0.5,
        "ulb_loss_ratio": 1.0, "ema_m": 0.999, "use_cat": True, "net_from_name": False,
    })  # fmt: skip
    algo = get_algorithm(config, get_net_builder(config.net, from_name=False), None, None)
    algo.model.train()
    algo.call_hook("before_run", "EMAHook")
    batches = zip(algo.loader_dict["train_lb"], algo.loader_dict["train_ulb"])

    def step(_k: int) -> None:  # the body of AlgorithmBase.train's loop (patch 4: step hooks)
        data_lb, data_ulb = next(batches)
        algo.out_dict, algo.log_dict = algo.train_step(**algo.process_batch(**data_lb, **data_ulb))
        algo.call_hook("after_train_step", "ParamUpdateHook")
        algo.call_hook("after_train_step", "EMAHook")
        algo.it += 1

    return step


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kind = args.worker
    if kind == "bare" or (kind == "usb" and args.usb_keep_host_memory):
        # rsmatch's workers apply train.keep_host_memory themselves; the bare step is the limit
        from rsmatch.hardware import keep_host_memory

        keep_host_memory("auto", "cuda" if torch.cuda.is_available() else "cpu")
    # the run folder of rsmatch's trainer or USB's, removed when the driver closes stdin
    with tempfile.TemporaryDirectory(prefix="bench-", ignore_cleanup_errors=True) as out:
        if kind == "bare":
            step = _bare_step(args)
        elif kind == "usb":
            step = _usb_step(args, out)
        else:
            step = _rsmatch_step(args, kind, out)
        _serve(step, args)


# -- the driver --------------------------------------------------------------------------------
def setup_usb() -> None:
    """A venv that sees this environment's torch (no second download) and adds semilearn."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(USB_VENV)],
                   check=True)  # fmt: skip
    pip = [str(USB_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--no-deps", USB], check=True)
    subprocess.run([*pip, *USB_IMPORTS], check=True)
    stubs = USB_VENV / "stubs"  # patch 1
    stubs.mkdir(exist_ok=True)
    for name in STUBS:
        (stubs / f"{name}.py").write_text(
            "# semilearn imports it; a CIFAR FixMatch step never uses it\n", encoding="utf-8"
        )
    print(f"USB venv ready: {USB_VENV}")


def _start(kind: str, args: argparse.Namespace, override: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    python = sys.executable
    if kind == "usb":
        python = str(USB_VENV / "bin" / "python")
        env["PYTHONPATH"] = str(USB_VENV / "stubs")
    else:
        # this checkout first, before what the caller had (e.g. the GPU check's wheel folder)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")) if p
        )
    cmd = [python, str(Path(__file__).resolve()), "--worker", kind, *_shared_flags(args),
           *([f"--override={override}"] if override else [])]  # fmt: skip
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def _warm_up(workers: dict[str, subprocess.Popen]) -> None:
    """Warm the workers up one after another. They were all started at once, so that their
    imports and set-up (~7 s each, mostly one core) overlap instead of adding up."""
    for kind, proc in workers.items():
        try:
            proc.stdin.write("warmup\n")
            proc.stdin.flush()
            ready = _expect(proc, "ready")
        except BrokenPipeError:  # it died while importing or setting up
            ready = None
        if ready is None:
            _stop_all(workers)
            raise SystemExit(
                f"bench_vs_usb: the {kind} worker failed to start (see its stderr above)"
            )


def _stop_all(workers: dict[str, subprocess.Popen]) -> None:
    """Close each worker's stdin and wait: it ends its loop and removes its run folder."""
    for proc in workers.values():
        with contextlib.suppress(BrokenPipeError):  # it has exited already
            proc.stdin.close()
    for proc in workers.values():
        proc.wait()


def _expect(proc: subprocess.Popen, word: str) -> str | None:
    """The worker's next protocol line starting with `word`; other prints are passed through."""
    for line in proc.stdout:
        if line.startswith(word):
            return line
        print(line, end="", file=sys.stderr)
    return None


def _shared_flags(args: argparse.Namespace) -> list[str]:
    return [f"--batch-size={args.batch_size}", f"--uratio={args.uratio}",
            f"--threads={args.threads}", f"--warmup={args.warmup}", f"--pool={args.pool}",
            f"--usb-workers={args.usb_workers}", f"--precision={args.precision}",
            f"--steps={args.steps}", f"--rounds={args.rounds}", f"--backbone={args.backbone}",
            *([f"--compile={args.compile}"] if args.compile else []),
            *(["--usb-keep-host-memory"] if args.usb_keep_host_memory else [])]  # fmt: skip


def drive(args: argparse.Namespace) -> dict:
    if "usb" in args.only and args.backbone != USB_BACKBONE:
        raise SystemExit(f"bench_vs_usb: --backbone {args.backbone} beside usb, whose step is "
                         f"{USB_BACKBONE}: drop usb from --only or the --backbone")  # fmt: skip
    if "usb" in args.only and not (USB_VENV / "bin" / "python").exists():
        raise SystemExit(f"bench_vs_usb: no USB venv at {USB_VENV}; run with --setup-usb first")
    workers = {kind: _start(kind, args) for kind in args.only}
    if args.variant:  # interleaved with the others: rsmatch's contenders once more, overridden
        for kind in (k for k in RSMATCH_CONTENDERS if k in args.only):
            workers[f"{kind} {args.variant}"] = _start(kind, args, args.variant)
    _warm_up(workers)
    times: dict[str, list[float]] = {kind: [] for kind in workers}
    try:
        for r in range(args.rounds):
            for kind, proc in workers.items():
                proc.stdin.write(f"run {args.steps}\n")
                proc.stdin.flush()
                line = _expect(proc, "seconds")
                if line is None:  # its stdout closed: it died (its stderr says why)
                    raise SystemExit(f"bench_vs_usb: the {kind} worker died in round {r}")
                seconds = float(line.split()[1])
                times[kind].append(seconds)
                print(json.dumps({"round": r, "step": kind, "s_per_step": _digits(seconds)}))
    finally:
        _stop_all(workers)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {}
    for tail in ("", *([f" {args.variant}"] if args.variant else [])):
        fm, rsm = f"fixmatch{tail}", f"rsmatch{tail}"
        if {"bare", fm} <= med.keys():
            ratios[f"bare / rsmatch {fm} (>= 0.9 wanted)"] = med["bare"] / med[fm]
        if {"usb", fm} <= med.keys():
            ratios[f"usb / rsmatch {fm} (speed-up over USB)"] = med["usb"] / med[fm]
        if {rsm, fm} <= med.keys():
            ratios[f"{rsm} / rsmatch {fm} (<= 1.2 wanted)"] = med[rsm] / med[fm]
    return {
        "machine": _machine(), "batch_size": args.batch_size, "uratio": args.uratio,
        "threads": args.threads, "backbone": args.backbone, "rsmatch_precision": args.precision, "compile": args.compile, "variant": args.variant,
        "usb_keep_host_memory": args.usb_keep_host_memory, "steps_per_round": args.steps, "rounds": args.rounds,
        "median_s_per_step": {k: _digits(v) for k, v in med.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
    }  # fmt: skip


def _digits(seconds: float) -> float:
    """Four significant digits: a GPU step of 0.016 s kept to 4 decimals had only 3, and ratios
    taken from the printed medians were off by up to 0.6%."""
    return float(f"{seconds:.4g}")


def _machine() -> str:
    import platform

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
                  if line.startswith("model name")), platform.processor())  # fmt: skip
    import torch

    from rsmatch.hardware import cpu_bf16_support

    gpu = f"; GPU: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{model}, {os.cpu_count()} CPUs, {cpu_bf16_support()[1]}{gpu}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setup-usb", action="store_true", help="create the semilearn venv and exit")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--uratio", type=int, default=7)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round and contender")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--pool", type=int, default=50_000, help="unlabeled images (CIFAR-10: 50k)")
    ap.add_argument("--backbone", default=USB_BACKBONE,
                    help="the classifier of the bare step and rsmatch's contenders (any timm name; "
                         "not with usb, whose step trains WRN-28-2)")  # fmt: skip
    ap.add_argument("--usb-workers", type=int, default=0,
                    help="USB DataLoader workers (0: its augmentation runs in the timed process, "
                         "as rsmatch's does)")  # fmt: skip
    ap.add_argument("--precision", default="auto", choices=("auto", "no", "bf16"),
                    help="rsmatch's train.mixed_precision, also used by the bare step "
                         "(`no` forces fp32, as on a CPU without native bf16)")  # fmt: skip
    ap.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                    help="rsmatch's train.compile for its contenders in this train.compile_mode "
                         "(default: default), and the bare step's model compiled the same way "
                         "(USB is never compiled)")  # fmt: skip
    ap.add_argument("--usb-keep-host-memory", action="store_true",
                    help="give USB's worker rsmatch's host-memory setting too (not USB as shipped: "
                         "shows how much of the gap is the allocator)")  # fmt: skip
    ap.add_argument("--only", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    ap.add_argument("--variant", metavar="KEY=VALUE",
                    help="also time rsmatch's contenders with this config override, interleaved "
                         "(an A/B in one run, e.g. train.prefetch=false)")  # fmt: skip
    ap.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.setup_usb:
        setup_usb()
    elif args.worker:
        worker(args)
    else:
        print(json.dumps(drive(args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
