"""tools/gpu_check.sh: its CPU dry run end to end, and the parts that judge a GPU run."""

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from .conftest import ROOT, load_tool, write_class_folder

gpu_check = load_tool("gpu_check")


def _fake_sources(root: Path) -> tuple[Path, Path]:
    """Class folders laid out as the check reads them, and the three tarballs of
    ../shared/data made from them; 3 classes and a few images each."""
    layout = root / "layout"
    write_class_folder(layout / "real" / "train", 20, seed=0)
    write_class_folder(layout / "real" / "test", 5, seed=1)
    write_class_folder(layout / "synthetic" / "ddpm", 6, seed=2, synthetic=True)
    write_class_folder(layout / "synthetic" / "cgan", 6, seed=3, synthetic=True)
    shared = root / "shared"
    shared.mkdir()
    for name, folder, inside in [("cifar10-jpeg", "real", "cifar10"),
                                 ("synth-ddpm-jpeg", "synthetic/ddpm", "synth/ddpm"),
                                 ("synth-cgan-jpeg", "synthetic/cgan", "synth/cgan")]:  # fmt: skip
        with tarfile.open(shared / f"{name}.tar.gz", "w:gz") as tar:
            tar.add(layout / folder, arcname=inside)
    return layout, shared


@pytest.mark.slow
def test_dry_run_records_every_step(tmp_path):
    gpudata, out, tmp = tmp_path / "gpudata", tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TRAIN_PER_CLASS": "16", "PYTHON": sys.executable, "TMPDIR": str(tmp)}
    _, shared = _fake_sources(tmp_path)
    prep = subprocess.run(["bash", "tools/prepare_gpu_data.sh", str(shared), str(gpudata)],
                          cwd=ROOT, env=env, capture_output=True, text=True)  # fmt: skip
    assert prep.returncode == 0, prep.stderr
    with tarfile.open(gpudata / "gpudata.tar.gz") as tar:
        names = tar.getnames()
    assert sum(n.startswith("real/train/cat/") for n in names) == 16  # the first 16 of 20
    assert "real/test/ship/0004.jpg" in names and "synthetic/cgan/dog/0005.jpg" in names

    # without --variant: its two more bench workers and profiles cost ~30 s here, and each link
    # of it is tested by hand (tests/test_tools_by_hand.py)
    check = ["--dry-run", "--out", str(out), "--data", str(gpudata)]
    done = subprocess.run(["bash", "tools/gpu_check.sh", *check],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text(encoding="utf-8"))
    steps = summary["steps"]
    assert summary["dry_run"] is True and summary["machine"]["gpu"] is None
    assert set(steps) == {
        "install",
        "machine",
        "gpu_tests",
        "throughput",
        "profile",
        "data",
        "train",
    }
    assert steps["install"]["status"] == "skipped"
    assert all(steps[k]["status"] == "ok" for k in set(steps) - {"install"})
    # GPU tests: collected, each one recorded, all skipped on a CPU
    tests = steps["gpu_tests"]["tests"]
    assert len(tests["test_steady_state_step_has_no_host_sync"]) == 6
    outcomes = [o for group in tests.values() for o in group.values()]
    assert steps["gpu_tests"]["counts"] == {"skipped": len(outcomes)} and len(outcomes) >= 24
    # bare, FixMatch and RSMatch timed interleaved in one run of tools/bench_vs_usb.py
    assert steps["throughput"]["bare"]["s_per_step"] > 0
    assert steps["throughput"]["backbone"] == "wrn10_1"  # the dry run's small classifier
    assert set(steps["throughput"]["ratios"]) == {
        "bare / rsmatch fixmatch (>= 0.9 wanted)", "rsmatch / rsmatch fixmatch (<= 1.2 wanted)"}  # fmt: skip
    for algo in ("fixmatch", "rsmatch"):
        tp = steps["throughput"][algo]
        assert tp["status"] == "ok" and tp["s_per_step"] > 0
        assert tp["it_per_s"] == pytest.approx(
            1 / tp["s_per_step"], rel=0.02, abs=0.006
        )  # 2 decimals
        run = steps["train"][algo]
        assert run["status"] == "ok" and run["metrics"]["step"] == run["steps_planned"] == 2
        assert 0 <= run["test_acc"] <= 1 and len(run["evals"]) == 2
        assert (run["detector_acc"] is not None) == (algo == "rsmatch")
        assert run["counts"] == {"labeled": 12, "unlabeled": 36, "test": 15}  # 3 x (4, 12, 5)
    # each algorithm's step split, and more operators in RSMatch's step (its detector) than FixMatch's
    # (the trainer's step on a made batch adds losses, EMA, clipping and logging to the bare
    # step's operators, and batch making dispatches its own augmentation)
    prof = steps["profile"]
    parts = {"batch_making", "step_on_a_made_batch", "bare"}
    for a in ("fixmatch", "rsmatch"):
        assert prof[a]["median_s"].keys() == parts and min(prof[a]["median_s"].values()) > 0
        assert prof[a]["aten_ops"]["batch_making"] > 100
    made = {a: prof[a]["aten_ops"]["step_on_a_made_batch"] for a in ("fixmatch", "rsmatch")}
    assert made["rsmatch"] > made["fixmatch"] > prof["fixmatch"]["aten_ops"]["bare"] > 0
    assert steps["data"]["from"].endswith("gpudata.tar.gz")
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir())  # the device tool's limits
    assert {"gpu_check.json", "install.log", "pytest.log", "profile.log"} <= set(files)
    assert sorted(p.name for p in tmp.iterdir()) == [], "temporary files left behind"


def test_junit_outcomes_are_grouped_per_algorithm(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_gpu" name="test_sync[fixmatch]"/>'
        '<testcase classname="tests.test_gpu" name="test_sync[rsmatch]">'
        '<failure message="AssertionError: 2 host syncs: rsmatch/csqueue.py:80 x.item()&#10;more"/>'
        "</testcase>"
        '<testcase classname="tests.test_gpu" name="test_plain"><error message="boom"/></testcase>'
        "</testsuite></testsuites>",
        encoding="utf-8",
    )
    got = gpu_check.junit_results(junit, tmp_path / "unused.log")
    assert got["tests"] == {
        "test_sync": {
            "fixmatch": "passed",
            "rsmatch": "failure: AssertionError: 2 host syncs: rsmatch/csqueue.py:80 x.item()",
        },
        "test_plain": {"-": "error: boom"},
    }
    assert got["counts"] == {"passed": 1, "failure": 1, "error": 1}


def test_junit_missing_falls_back_to_the_verbose_log(tmp_path):
    log = tmp_path / "pytest.log"
    log.write_text(
        "tests/test_gpu.py::test_sync[fixmatch] PASSED [ 50%]\n"
        "tests/test_gpu.py::test_sync[rsmatch] FAILED [100%]\n",
        encoding="utf-8",
    )
    got = gpu_check.junit_results(tmp_path / "absent.xml", log)
    assert got["tests"] == {"test_sync": {"fixmatch": "passed", "rsmatch": "failure"}}


def test_a_step_past_its_limit_is_stopped_and_recorded(tmp_path):
    log = tmp_path / "step.log"
    start = time.monotonic()
    cmd = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    result = gpu_check.run(cmd, log, 5, dict(os.environ))
    assert result["status"] == "timeout" and result["rc"] is None
    assert time.monotonic() - start < 20 and "started" in log.read_text(encoding="utf-8")
    failed = gpu_check.run([sys.executable, "-c", "raise SystemExit(3)"], log, 30, dict(os.environ))
    assert failed["status"] == "failed" and failed["rc"] == 3
    assert gpu_check.run(cmd, log, 1, dict(os.environ))["status"] == "skipped"  # no time left


def test_a_bench_worker_whose_stdin_closes_before_warming_up_ends_and_cleans_up(tmp_path):
    """What the driver's stop relies on: a worker told nothing returns without a step, exit 0,
    its temporary run folder removed."""
    flags = ["--worker", "bare", "--batch-size", "2", "--uratio", "1", "--threads", "1",
             "--precision", "no"]  # fmt: skip
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_vs_usb.py"), *flags],
                          input="", capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(tmp_path)})  # fmt: skip
    assert done.returncode == 0 and done.stdout == "", done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_bench_worker_that_died_while_starting_is_named():
    """bench_vs_usb starts every worker at once, then warms each up: one that already exited
    (an import error, say) is named, no BrokenPipeError traceback, and the others are stopped
    by closing their stdin (a worker then returns and removes its run folder; a kill would
    leave it), not left running."""
    bench = load_tool("bench_vs_usb")
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"], **pipes)
    dead.wait()
    waiting = "import sys; sys.stdin.read(); print('stdin closed')"  # as a worker waits
    alive = subprocess.Popen([sys.executable, "-c", waiting], **pipes)
    with pytest.raises(SystemExit, match="the rsmatch worker failed to start"):
        bench._warm_up({"rsmatch": dead, "fixmatch": alive})
    assert alive.returncode == 0 and alive.stdout.read() == "stdin closed\n"
