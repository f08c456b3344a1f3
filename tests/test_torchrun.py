"""The multi-process tests' launcher retries a native gloo abort from the same starting files."""

import os
import subprocess
import sys

from .torchrun import NATIVE_ABORT, torchrun

# Rank 0 of the first launch consumes the prepared file and aborts as gloo does; a retry
# succeeds only if the prepared file was put back.
SCRIPT = f"""
import os, sys
from pathlib import Path
out, marker = Path(sys.argv[1]), Path(sys.argv[2])
if os.environ["RANK"] != "0":
    sys.exit(0)
if not marker.exists():
    marker.write_text("aborted once")
    (out / "prepared.txt").unlink()
    (out / "half-written.txt").write_text("x")
    print({NATIVE_ABORT!r}, file=sys.stderr)
    sys.exit(134)
sys.exit(0 if (out / "prepared.txt").read_text() == "step 2" else 1)
"""


def test_a_native_abort_is_retried_from_the_prepared_files(tmp_path, recwarn):
    script, out, marker = tmp_path / "worker.py", tmp_path / "out", tmp_path / "marker"
    script.write_text(SCRIPT, encoding="utf-8")
    out.mkdir()
    (out / "prepared.txt").write_text("step 2", encoding="utf-8")
    res = torchrun(script, [str(out), str(marker)], restore=out, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert marker.exists() and not (out / "half-written.txt").exists()
    assert any("native abort" in str(w.message) for w in recwarn)


def test_any_other_failure_is_not_retried(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text("import sys, pathlib\np = pathlib.Path(sys.argv[1])\n"
                      "p.write_text(p.read_text() + 'x') if p.exists() else p.write_text('x')\nsys.exit(3)\n", encoding="utf-8")  # fmt: skip
    count = tmp_path / "count"
    res = torchrun(script, [str(count)], processes=1, timeout=120)
    assert res.returncode != 0 and count.read_text(encoding="utf-8") == "x"


def test_a_launched_process_ends_flushed_without_finalising_python(tmp_path):
    """`exit_process` (rsmatch-train's end): output flushed, the exit code kept, and under a
    launcher (WORLD_SIZE > 1) Python not finalised (atexit work skipped), where a gloo worker
    thread would abort it; a single process ends normally."""
    script = tmp_path / "worker.py"
    script.write_text(
        "import atexit, pathlib, sys\nfrom rsmatch.cli import exit_process\n"
        "atexit.register(lambda: pathlib.Path(sys.argv[1]).write_text('finalised'))\n"
        "print('metrics', end='')\nexit_process(3)\n",
        encoding="utf-8",
    )
    for world, finalised in (("2", False), ("1", True)):
        marker = tmp_path / f"finalised-{world}"
        res = subprocess.run([sys.executable, str(script), str(marker)], capture_output=True,
                             text=True, env={**os.environ, "WORLD_SIZE": world})  # fmt: skip
        assert res.returncode == 3 and res.stdout == "metrics", res.stderr
        assert marker.exists() == finalised


def test_a_crash_under_a_launcher_is_reported_and_exits_1_without_finalising(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(
        "import atexit, pathlib, sys\nfrom rsmatch.cli import run_process\n"
        "atexit.register(lambda: pathlib.Path(sys.argv[1]).write_text('finalised'))\n"
        "def crash():\n    raise RuntimeError('out of memory')\nrun_process(crash)\n",
        encoding="utf-8",
    )
    marker = tmp_path / "finalised"
    res = subprocess.run([sys.executable, str(script), str(marker)], capture_output=True,
                         text=True, env={**os.environ, "WORLD_SIZE": "2"})  # fmt: skip
    assert res.returncode == 1 and "RuntimeError: out of memory" in res.stderr
    assert not marker.exists()
