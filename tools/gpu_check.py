"""Run the GPU check's steps, each under its own time limit, and write OUT/gpu_check.json.

Called by tools/gpu_check.sh after its offline install (docs/gpu-check.md). Steps, in order:
machine facts, `pytest -m gpu tests/` (every test that needs CUDA), the bare step, FixMatch and
RSMatch timed interleaved in rounds after a warm-up (tools/bench_vs_usb.py; WRN-28-2, B = 64,
mu = 7), each algorithm's step split and its operators counted (tools/profile_step.py), with
--compile the bare step, FixMatch and RSMatch again with train.compile in each mode, then
(unless --skip-train) FixMatch and RSMatch trained on CIFAR-10 (ddpm + cgan at r = 0.5, 25
labels per class) for as many steps as the measured throughput fits in --train-seconds. A step
that fails or runs out of time is recorded and the next one runs; the whole check ends within
--budget seconds of the script's start. At most 8 files land in --out (the device tool's limit).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ("fixmatch", "rsmatch")
FALLBACK_S_PER_STEP = 0.25  # when the throughput step gave nothing: a slow GPU's WRN-28-2 step
STARTUP_S = 45  # a training run's imports, data decoding, final evaluation and export
KILL_GRACE_S = 15  # SIGTERM first: the trainer saves a checkpoint and its evaluations stay

# Sizes: the paper's (GPU) or tiny ones that run in seconds on a CPU (--dry-run).
# `limits`: the most seconds for pytest and for one throughput run, and what is kept back for
# the steps after them (seconds per throughput run, a share of the budget for the trainings),
# so that a slow step cannot leave the trainings no time.
GPU = {
    "limits": {
        "pytest": 210,  # 150 s before the DeepSpeed GPU test (two launches)
        "throughput": 120,
        "profile": 60,
        "compile": 150,
        "train_share": 1 / 3,
    },
    "backbone": ["model.backbone=wrn28_2", "train.batch_size=64", "train.uratio=7"],
    "throughput": [
        "--batch-size",
        "64",
        "--uratio",
        "7",
        "--pool",
        "5000",
        "--warmup",
        "10",
        "--steps",
        "10",
        "--rounds",
        "3",
    ],  # fmt: skip
    "profile": ["--batch-size=64", "--uratio=7", "--pool=5000", "--warmup=5", "--rounds=5"],
    "train": [
        "data.labels_per_class=25",
        "train.eval_batch_size=1024",
        "train.log_every=50",
    ],
}
TINY = {
    "limits": {
        "pytest": 120,
        "throughput": 90,
        "profile": 90,
        "compile": 240,
        "train_share": 1 / 5,
    },
    "backbone": [
        "model.backbone=wrn10_1",
        "rsmatch.detector_backbone=wrn10_1",
        "train.batch_size=8",
        "train.uratio=2",
        "rsmatch.queue_length=4",
        "rsmatch.queue_picks=2",
        "ssl.threshold=0.5",
        "rsmatch.detector_threshold=0.5",
        "data.labels_per_class=4",
    ],
    "throughput": [
        "--batch-size",
        "2",
        "--uratio",
        "2",
        "--pool",
        "64",
        "--warmup",
        "1",
        "--steps",
        "1",
        "--rounds",
        "1",
        "--backbone",
        "wrn10_1",
    ],  # fmt: skip
    "profile": [
        "--batch-size=2",
        "--uratio=2",
        "--pool=64",
        "--warmup=1",
        "--rounds=1",
        "--backbone=wrn10_1",
    ],  # fmt: skip
    "train": ["train.eval_batch_size=256", "train.log_every=1"],
}
TINY_TRAIN_STEPS = 2
ENV_SCRIPT = """
import importlib.metadata as md, json, platform, torch
names = ["rsmatch", "torch", "torchvision", "accelerate", "timm", "datasets", "dill",
         "multiprocess", "fsspec", "pyarrow", "pandas", "huggingface_hub", "safetensors", "numpy",
         "deepspeed"]
def version(n):
    try:
        return md.version(n)
    except md.PackageNotFoundError:
        return None
cuda = torch.cuda.is_available()
print(json.dumps({
    "python": platform.python_version(), "torch_cuda": torch.version.cuda,
    "gpu": torch.cuda.get_device_name() if cuda else None,
    "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
    "bf16_native": bool(cuda and torch.cuda.is_bf16_supported(including_emulation=False)),
    "cpu_threads": torch.get_num_threads(), "packages": {n: version(n) for n in names},
}))
"""


class Clock:
    """The check's deadline, counted from the shell script's start so the install counts."""

    def __init__(self, started: float, budget: float) -> None:
        self.deadline = started + budget

    def left(self) -> float:
        return self.deadline - time.time()


def run(cmd: list[str], log: Path, limit: float, env: dict[str, str]) -> dict:
    """Run cmd with its output in log; past `limit` seconds stop its process group."""
    if limit < 5:
        return {"status": "skipped", "reason": "no time left in the budget"}
    start = time.monotonic()
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            rc = None
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    status = "timeout" if rc is None else "ok" if rc == 0 else "failed"
    return {
        "status": status,
        "rc": rc,
        "seconds": round(time.monotonic() - start, 1),
        "limit_s": round(limit),
    }


def last_json_line(log: Path) -> dict | None:
    for line in reversed(log.read_text(errors="replace", encoding="utf-8").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def trailing_json(text: str) -> dict | None:
    """The indented JSON object that ends a tool's output (bench_vs_usb.py's, profile_step.py's)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line == "{"]
    try:
        return json.loads("\n".join(lines[starts[-1] :])) if starts else None
    except json.JSONDecodeError:
        return None


def junit_results(path: Path, log: Path) -> dict:
    """Outcome of every test, grouped by test function: {function: {params: outcome}}."""
    outcomes: dict[str, str] = {}
    if path.is_file():
        for case in ET.parse(path).iter("testcase"):
            outcome = "passed"
            for kind in ("failure", "error", "skipped"):
                node = case.find(kind)
                if node is not None:
                    message = (node.get("message") or "").strip().splitlines()
                    outcome = f"{kind}: {message[0][:400] if message else ''}".rstrip(": ")
                    break
            outcomes[case.get("name", "?")] = outcome
    else:  # stopped before pytest wrote its report: read the verbose log's result lines
        for name, word in re.findall(
            r"::(\S+) (PASSED|FAILED|ERROR|SKIPPED)", log.read_text(encoding="utf-8")
        ):
            outcomes[name] = {
                "PASSED": "passed",
                "FAILED": "failure",
                "ERROR": "error",
                "SKIPPED": "skipped",
            }[word]
    groups: dict[str, dict[str, str]] = {}
    for name, outcome in outcomes.items():
        function, _, params = name.partition("[")
        groups.setdefault(function, {})[params.rstrip("]") or "-"] = outcome
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        key = outcome.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    return {"counts": counts, "tests": groups}


def overall(parts: list[dict]) -> str:
    statuses = {p.get("status") for p in parts}
    if statuses in ({"ok"}, {"skipped"}):
        return statuses.pop()
    return "partial" if "ok" in statuses else "failed"


def digest(summary: dict) -> list[str]:
    """A few lines for a terminal: each step's status and numbers, and every failed test."""
    steps, machine = summary["steps"], summary.get("machine") or {}
    lines = [f"machine: {machine.get('gpu')} torch {machine.get('packages', {}).get('torch')}"]
    for name, step in steps.items():
        scalars = {k: v for k, v in step.items() if k == "counts" or not isinstance(v, dict)}
        lines.append(f"{name}: {scalars}")
    for function, results in steps.get("gpu_tests", {}).get("tests", {}).items():
        lines += [f"  {function}[{p}] {o}" for p, o in results.items() if o[:4] in ("fail", "erro")]
    for group in ("throughput", "train"):
        for algo in ALGORITHMS:
            part = steps.get(group, {}).get(algo, {})
            keep = (
                "status",
                "s_per_step",
                "it_per_s",
                "steps_planned",
                "seconds",
                "loop_seconds",
                "test_acc",
                "detector_acc",
            )
            lines.append(f"  {group} {algo}: { {k: part[k] for k in keep if k in part} }")
    for name, part in steps.get("profile", {}).items():
        if isinstance(part, dict) and "median_s" in part:
            lines.append(f"  profile {name}: s {part['median_s']} aten ops {part['aten_ops']}")
    for mode, part in steps.get("compile", {}).items():
        if isinstance(part, dict):
            timed = {k: part[k].get("s_per_step") for k in ("bare", *ALGORITHMS) if k in part}
            lines.append(f"  compile {mode}: {part.get('status')} s_per_step {timed}")
    return lines


def data_overrides(root: Path) -> list[str]:
    return [
        f"data.real={root / 'real'}",
        f"data.synthetic={{ddpm: {root / 'synthetic/ddpm'}, cgan: {root / 'synthetic/cgan'}}}",
        "data.replace_ratio=0.5",
    ]


def unpack_data(source: Path, work: Path) -> tuple[Path | None, dict]:
    """The data folder: `source` itself, or its gpudata.tar.gz unpacked into work/."""
    start = time.monotonic()
    packed = source / "gpudata.tar.gz"
    if packed.is_file():
        target = work / "data"
        target.mkdir()
        done = subprocess.run(
            ["tar", "xzf", str(packed), "-C", str(target)], capture_output=True, text=True
        )
        if done.returncode:
            return None, {"status": "failed", "error": done.stderr.strip()[-400:]}
        source = target
    if not (source / "real").exists() or not (source / "synthetic").is_dir():
        return None, {"status": "failed", "error": f"{source}: needs real/ and synthetic/"}
    return source, {
        "status": "ok",
        "seconds": round(time.monotonic() - start, 1),
        "from": str(packed if packed.is_file() else source),
    }


def scratch_dir() -> str | None:
    """RAM-backed /dev/shm when roomy: 70,000 small files unpack and vanish in seconds there."""
    shm = Path("/dev/shm")
    roomy = shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2**31
    return str(shm) if roomy else None


@dataclass
class Check:
    """What every step needs: sizes, settings, where to write, and the clock."""

    dry: bool
    sizes: dict
    out: Path
    work: Path
    clock: Clock
    env: dict[str, str]
    precision: str  # train.mixed_precision
    channels_last: str  # train.channels_last
    keep_for_train: float
    variant: str | None = None  # a config override A/B-timed against the defaults
    py: str = sys.executable

    @property
    def limits(self) -> dict:
        return self.sizes["limits"]

    @property
    def tool_precision(self) -> str:
        """The precision as the bench and profiler tools take it."""
        return self.precision if self.precision in ("no", "bf16") else "auto"

    @property
    def variant_flags(self) -> list[str]:
        return ["--variant", self.variant] if self.variant else []

    @property
    def variant_share(self) -> float:
        """How much longer a bench may take with the variant's two more workers."""
        return 1.5 if self.variant else 1.0

    @property
    def precision_keys(self) -> list[str]:
        return [
            f"train.mixed_precision={self.precision}",
            f"train.channels_last={self.channels_last}",
        ]


def gpu_tests(c: Check) -> dict:
    """`pytest -m gpu tests/`; each test's outcome from its junit report."""
    junit, log = c.work / "pytest-junit.xml", c.out / "pytest.log"  # the report is in the JSON
    cmd = [c.py, "-m", "pytest", "-m", "gpu", "tests/", "-v", "-p", "no:cacheprovider",
           "-o", "junit_family=xunit1", f"--junitxml={junit}"]  # fmt: skip
    keep = c.keep_for_train + c.limits["throughput"]
    result = run(cmd, log, min(c.limits["pytest"], c.clock.left() - keep), c.env)
    if log.is_file():
        result.update(junit_results(junit, log))
    return result


def run_and_read(cmd: list[str], log: Path, limit: float, env: dict[str, str]) -> tuple[dict, str]:
    """run(), and what this run wrote to log (runs may share a log)."""
    before = log.stat().st_size if log.is_file() else 0
    result = run(cmd, log, limit, env)
    return result, log.read_bytes()[before:].decode(errors="replace") if log.is_file() else ""


def run_for_json(
    cmd: list[str], log: Path, limit: float, env: dict[str, str]
) -> tuple[dict, dict | None]:
    """run(), and the JSON summary that ends what this run wrote to log."""
    result, text = run_and_read(cmd, log, limit, env)
    return result, trailing_json(text)


def bench(c: Check, log: Path, limit: float, extra: list[str]) -> dict:
    """One interleaved run of tools/bench_vs_usb.py (the bare step, FixMatch, RSMatch): every
    contender warmed up first, then timed in alternating rounds; its medians, ratios, machine."""
    contenders = ("bare", *ALGORITHMS)
    cmd = [c.py, "tools/bench_vs_usb.py", "--only", *contenders, *c.sizes["throughput"],
           f"--threads={min(os.cpu_count() or 1, 8)}", f"--precision={c.tool_precision}", *extra]  # fmt: skip
    result, measured = run_for_json(cmd, log, limit, c.env)
    if result["status"] == "ok" and not measured:  # exited 0 without its summary: no numbers
        result["status"] = "failed"
    if measured:
        med = measured["median_s_per_step"]
        for name in med:
            result[name] = {"status": "ok", "s_per_step": med[name],
                            "it_per_s": round(1 / med[name], 2)}  # fmt: skip
        result["ratios"] = measured["ratios"]
        result["bench_machine"] = measured["machine"]
        result["backbone"] = measured["backbone"]
    for name in contenders:
        result.setdefault(name, {"status": result["status"]})
    return result


def throughput(c: Check) -> dict:
    """The bare step, FixMatch and RSMatch in one interleaved run (with --variant, FixMatch and
    RSMatch with that override too, in the same rounds)."""
    limit = min(c.variant_share * c.limits["throughput"], c.clock.left() - c.keep_for_train)
    result = bench(c, c.out / "throughput.log", limit, c.variant_flags)
    if all("s_per_step" in result[a] for a in ALGORITHMS):
        ratio = result["rsmatch"]["s_per_step"] / result["fixmatch"]["s_per_step"]
        result["rsmatch_over_fixmatch"] = round(ratio, 3)
    return result


def profile(c: Check) -> dict:
    """Where each algorithm's step goes (tools/profile_step.py, one run for all): batch making
    alone, the step on a made batch and the bare step, timed alternately, and the operators each
    dispatches (on a GPU bound by issuing kernels, the count is what a step costs). With
    --variant, each once more with it (batch making is where the variants act)."""
    names = [*ALGORITHMS, *(f"{a} {c.variant}" for a in ALGORITHMS if c.variant)]
    limit = min(len(names) * c.limits["profile"], c.clock.left() - c.keep_for_train)
    cmd = [c.py, "tools/profile_step.py", "--algorithm", *ALGORITHMS, *c.sizes["profile"],
           f"--precision={c.tool_precision}", *c.variant_flags]  # fmt: skip
    result, text = run_and_read(cmd, c.out / "profile.log", limit, c.env)
    # one JSON line per contender, printed as each is done: a run stopped midway keeps the first
    profiled = [json.loads(line) for line in text.splitlines() if line.startswith('{"profiled"')]
    figures = {p["profiled"]: {k: p[k] for k in ("median_s", "aten_ops")} for p in profiled}
    missing = {"status": "failed" if result["status"] == "ok" else result["status"]}
    for name in names:
        result[name] = {"status": "ok", **figures[name]} if name in figures else dict(missing)
    result["status"] = overall([result[name] for name in names])
    return result


# torch.compile modes timed with --compile (`reduce-overhead`: the compiled graphs replayed as
# CUDA graphs, without launching each kernel)
COMPILE_MODES = ("default", "reduce-overhead")


def compiled(c: Check, modes: list[str]) -> dict:
    """The bare step, FixMatch and RSMatch with `train.compile` (the bare model compiled alike),
    per mode; to compare with the throughput step's uncompiled figures (same machine, run just
    before). Not the variant: five compiled contenders did not finish in 112 s on an H100."""
    results: dict = {}
    for mode in modes:
        limit = min(c.limits["compile"], c.clock.left() - c.keep_for_train)
        results[mode] = bench(c, c.out / "compile.log", limit, [f"--compile={mode}"])
    results["status"] = overall([results[m] for m in modes])
    return results


def train(c: Check, data: Path | None, s_per_step: dict[str, float], seconds: float) -> dict:
    """Each algorithm for about `seconds` of training loop: steps = seconds / measured s/step."""
    results: dict = {}
    for i, algo in enumerate(ALGORITHMS):
        if data is None:
            results[algo] = {"status": "skipped", "reason": "no data"}
            continue
        share = c.clock.left() / (len(ALGORITHMS) - i)
        loop = min(seconds, share - STARTUP_S - 15)
        limit = min(share, loop + STARTUP_S + 45)  # slack for a loop slower than measured
        n = (
            TINY_TRAIN_STEPS
            if c.dry
            else max(20, int(loop / s_per_step.get(algo, FALLBACK_S_PER_STEP)))
        )
        run_dir = c.work / f"train-{algo}"
        cmd = [c.py, "-m", "rsmatch.cli.train", "--config", f"configs/{algo}.yaml",
               *c.sizes["backbone"], *data_overrides(data), *c.sizes["train"], *c.precision_keys,
               f"train.steps={n}", f"train.eval_every={max(1, n // 2)}", f"train.save_every={n}",
               "model.bn_momentum=0.1", "train.ema_warmup=true", "train.progress=false",
               f"train.output_dir={run_dir}"]  # fmt: skip
        result = run(cmd, c.out / f"train-{algo}.log", limit, c.env)
        result["steps_planned"] = n
        results[algo] = result | run_results(run_dir)
    results["status"] = overall([results[a] for a in ALGORITHMS])
    return results


def run_results(run_dir: Path) -> dict:
    """What a training run wrote: final metrics, every evaluation, the split's counts."""
    found: dict = {}
    if (run_dir / "metrics.json").is_file():
        m = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        found = {"test_acc": m.get("test_acc"), "detector_acc": m.get("detector_acc"),
                 "loop_seconds": m.get("seconds"),
                 "loop_s_per_step": round(m["seconds"] / max(m["step"], 1), 4), "metrics": m}  # fmt: skip
    if (run_dir / "evals.jsonl").is_file():  # the trainer's reader: skips a line cut off mid-write
        from rsmatch.runinfo import eval_entries  # installed by now (this runs after the install)

        found["evals"] = eval_entries(run_dir)
    if (run_dir / "run.json").is_file():
        found["counts"] = json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get(
            "counts"
        )
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, help="default .gpudata (GPU) or data/demo (--dry-run)")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument(
        "--budget", type=float, help="seconds for everything (default 450; dry run 300)"
    )
    ap.add_argument("--train-seconds", type=float, default=100.0,
                    help="training loop seconds per algorithm, shortened to fit the budget")  # fmt: skip
    ap.add_argument("--skip-train", action="store_true", help="stop before the trainings")
    ap.add_argument("--compile", nargs="+", choices=COMPILE_MODES, default=[],
                    help="also time the bare step, FixMatch and RSMatch with train.compile, in "
                         "each train.compile_mode (reduce-overhead: replayed as CUDA graphs)")  # fmt: skip
    ap.add_argument("--variant", metavar="KEY=VALUE",
                    help="also time FixMatch and RSMatch with this override, interleaved, in the "
                         "throughput step (e.g. train.prefetch=false)")  # fmt: skip
    ap.add_argument("--precision", help="train.mixed_precision (default auto; dry run: no)")
    ap.add_argument("--channels-last", help="train.channels_last (default auto; dry run: false)")
    ap.add_argument("--started", type=float, default=time.time())
    ap.add_argument("--install-status", default="skipped")
    ap.add_argument("--install-mode", default="pythonpath")
    args = ap.parse_args(argv)

    dry = args.dry_run
    sizes = TINY if dry else GPU
    budget = args.budget or (300 if dry else 450)
    precision = args.precision or ("no" if dry else "auto")
    channels_last = args.channels_last or ("false" if dry else "auto")
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU only: the GPU tests skip themselves
    args.out.mkdir(parents=True, exist_ok=True)
    c = Check(
        dry, sizes, args.out, Path(tempfile.mkdtemp(prefix="gpu_check_", dir=scratch_dir())),
        Clock(args.started, budget), env, precision, channels_last,
        keep_for_train=0.0 if args.skip_train else sizes["limits"]["train_share"] * budget,
        variant=args.variant,
    )  # fmt: skip
    steps: dict = {"install": {"status": args.install_status, "mode": args.install_mode,
                               "seconds": round(time.time() - args.started, 1), "log": "install.log"}}  # fmt: skip
    summary: dict = {"schema": 1, "dry_run": dry, "settings": {"precision": precision,
                     "channels_last": channels_last, "budget_s": budget, "sizes": sizes,
                     "variant": args.variant},
                     "machine": None, "steps": steps}  # fmt: skip
    try:
        env_log = c.work / "env.log"
        steps["machine"] = run([c.py, "-c", ENV_SCRIPT], env_log, min(60, c.clock.left()), env)
        summary["machine"] = last_json_line(env_log) if env_log.is_file() else None
        steps["gpu_tests"] = gpu_tests(c)
        steps["throughput"] = throughput(c)
        steps["profile"] = profile(c)
        if args.compile:
            steps["compile"] = compiled(c, args.compile)
        if not args.skip_train:
            data, steps["data"] = unpack_data(
                args.data or ROOT / ("data/demo" if dry else ".gpudata"), c.work
            )
            measured = {a: steps["throughput"][a]["s_per_step"] for a in ALGORITHMS
                        if "s_per_step" in steps["throughput"][a]}  # fmt: skip
            steps["train"] = train(c, data, measured, args.train_seconds)
    except Exception as e:  # recorded with whatever finished, then raised
        summary["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        summary["seconds"] = round(time.time() - args.started, 1)
        (c.out / "gpu_check.json").write_text(
            json.dumps(summary, indent=2) + "\n", encoding="utf-8"
        )
        bad = [k for k, v in steps.items() if v.get("status") not in ("ok", "skipped")]
        print("\n".join(digest(summary)))
        print(f"gpu_check: {c.out / 'gpu_check.json'}; steps not ok: {', '.join(bad) or 'none'}")
        shutil.rmtree(c.work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
