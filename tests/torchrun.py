"""Launch a script under torchrun for the multi-process tests, with one guarded retry."""

import shutil
import socket
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

# Seen about once in 15 launches here: a gloo worker aborting natively ("terminate called
# without an active exception", SIGABRT) while Python finalised (a core dump: a gloo thread
# releasing the last collective's tensors, which a DDP model's process group keeps alive after
# `end_training()`). rsmatch-train and the test workers now end through
# `rsmatch.cli.exit_process`, which does not finalise; the retry stays as a guard (once,
# from the same starting files; any other failure is not retried).
NATIVE_ABORT = "terminate called without an active exception"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(
    script: Path | str,
    args: list[str],
    processes: int = 2,
    *,
    restore: Path | None = None,
    cwd: Path | None = None,
    timeout: int = 600,
) -> subprocess.CompletedProcess:
    """Run `script args` in `processes` processes. `restore` is a folder the run writes into:
    its content before the launch is put back before a retry (a prepared checkpoint survives)."""
    with tempfile.TemporaryDirectory() as keep:
        before = Path(keep) / "before"
        if restore is not None and restore.exists():
            shutil.copytree(restore, before)
        for attempt in range(2):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(free_port()), str(script), *args]  # fmt: skip
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
            if res.returncode == 0 or NATIVE_ABORT not in res.stderr or attempt == 1:
                return res
            warnings.warn(
                f"gloo native abort, launching once more; stderr tail:\n{res.stderr[-2000:]}",
                stacklevel=2,
            )
            if restore is not None:
                shutil.rmtree(restore, ignore_errors=True)
                if before.exists():
                    shutil.copytree(before, restore)
    raise AssertionError("unreachable")
