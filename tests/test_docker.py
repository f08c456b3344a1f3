"""The cluster files: the SLURM script run against stand-ins for srun, scontrol and docker, the
multi-node accelerate config forming one process group on this CPU, and the constraints."""

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, tiny_overrides

SCRIPT = ROOT / "docker" / "slurm_multinode.sh"

# srun: one task per node, each with its own SLURM_NODEID, as SLURM runs them.
SRUN = """#!/usr/bin/env bash
while [[ $1 == --* ]]; do shift; done
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" & done
status=0; for job in $(jobs -p); do wait "$job" || status=1; done; exit $status
"""
SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] && printf '%s\\n' $FAKE_HOSTS
"""
# docker: record the arguments; with FAKE_DOCKER_RUN, run the command after the image here.
DOCKER = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_LOG/node$SLURM_NODEID.args"
[[ -z ${FAKE_DOCKER_RUN:-} ]] && exit 0
while [[ $1 != "$IMAGE" ]]; do shift; done; shift
cd "$FAKE_DOCKER_RUN" && exec "$@"
"""


def _stubs(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("docker", DOCKER)):
        (bin_dir / name).write_text(text, encoding="utf-8")
        (bin_dir / name).chmod(stat.S_IRWXU)
    return bin_dir


def _sbatch(tmp_path: Path, args: list[str], hosts: str, gpus: str, **env: str):
    bin_dir = _stubs(tmp_path)
    (tmp_path / "log").mkdir()
    environ = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2",
               "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_GPUS_PER_NODE": gpus, "FAKE_HOSTS": hosts,
               "FAKE_LOG": str(tmp_path / "log"), "WORKDIR": str(tmp_path / "work"),
               "HF_CACHE": str(tmp_path / "hf"), **env}  # fmt: skip
    res = subprocess.run(["bash", str(SCRIPT), *args], env=environ, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    logs = {
        i: (tmp_path / "log" / f"node{i}.args").read_text(encoding="utf-8").splitlines()
        for i in (0, 1)
    }
    return res, logs


def _value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_slurm_script_gives_each_node_its_rank_and_the_first_host(tmp_path):
    res, logs = _sbatch(tmp_path, ["--config", "configs/rsmatch.yaml", "train.steps=10"],
                        hosts="gpu-a gpu-b", gpus="h100:4")  # fmt: skip
    assert res.returncode == 0, res.stderr
    for rank, args in logs.items():
        assert (
            args[:2] == ["run", "--rm"]
            and "--ipc=host" in args
            and _value(args, "--network") == "host"
        )
        assert f"{tmp_path}/work/synthetic:/work/synthetic" in args
        assert f"{tmp_path}/hf:/home/rsmatch/.cache/huggingface" in args
        assert _value(args, "--config_file") == "configs/accelerate/multi_node.yaml"
        assert _value(args, "--machine_rank") == str(rank)
        assert _value(args, "--main_process_ip") == "gpu-a"
        assert (_value(args, "--num_machines"), _value(args, "--num_processes")) == ("2", "8")
        assert args[-4:] == [
            "launch/train.py",
            "--config",
            "configs/rsmatch.yaml",
            "train.steps=10",
        ]
    assert all((tmp_path / "work" / d).is_dir() for d in ("runs", "synthetic", "benchmarks"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multi_node_config_forms_one_group_of_two_nodes(sources, tmp_path):
    """Two 'nodes' on this machine, one CPU process each, through the SLURM script."""
    out = tmp_path / "run"
    overrides = tiny_overrides(sources, out, algorithm="fixmatch", **{"train.steps": 2})
    res, _ = _sbatch(tmp_path, overrides, hosts="127.0.0.1 127.0.0.1", gpus="1",
                     MAIN_PORT=str(_free_port()), FAKE_DOCKER_RUN=str(ROOT))  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["world_size"] == 2


def test_constraints_pin_every_dependency_at_its_installed_version():
    from importlib.metadata import version

    res = subprocess.run([sys.executable, str(ROOT / "docker" / "freeze_constraints.py")],
                         capture_output=True, text=True, check=True)  # fmt: skip
    pins = dict(line.split("==") for line in res.stdout.splitlines() if not line.startswith("#"))
    assert pins["torch"] == version("torch") and pins["datasets"] == version("datasets")
    for name in ("accelerate", "timm", "deepspeed", "diffusers", "transformers", "tqdm", "pyarrow"):
        assert name in pins  # direct, extra and transitive dependencies alike
    # the committed file pins every package the image installs (a new dependency, scikit-learn,
    # went in unpinned); versions may move with the environment, names may not
    committed = (ROOT / "docker" / "constraints.txt").read_text(encoding="utf-8").splitlines()
    unpinned = set(pins) - {line.split("==")[0] for line in committed if "==" in line}
    assert not unpinned, (
        f"python docker/freeze_constraints.py > docker/constraints.txt ({unpinned})"
    )
