#!/usr/bin/env bash
# Train with the rsmatch image on N nodes x G GPUs: one container per node, each running
# `accelerate launch` with its SLURM node id as machine rank; the job's first host is the main
# process. Build or pull the image on every node first (docs/docker.md).
#
#   sbatch --nodes 4 --gpus-per-node 8 docker/slurm_multinode.sh --config configs/rsmatch.yaml
#
# Anything after the script name goes to launch/train.py. Environment: IMAGE (default rsmatch),
# GPUS_PER_NODE (default: from SLURM_GPUS_PER_NODE), MAIN_PORT (29500), WORKDIR (the folder
# holding runs/, synthetic/ and benchmarks/; default the submission folder), HF_CACHE (the Hub
# cache on the host, default ~/.cache/huggingface), HF_TOKEN. Containers run as the submitting
# user, so files on the shared file system stay theirs.
#SBATCH --job-name=rsmatch
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
set -euo pipefail

IMAGE=${IMAGE:-rsmatch}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_PER_NODE##*:}}  # "8" or "a100:8"
mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")  # no `| head`: SIGPIPE
MAIN_HOST=${HOSTS[0]}
MAIN_PORT=${MAIN_PORT:-29500}
WORKDIR=${WORKDIR:-${SLURM_SUBMIT_DIR:-$PWD}}
HF_CACHE=${HF_CACHE:-$HOME/.cache/huggingface}
mkdir -p "$WORKDIR/runs" "$WORKDIR/synthetic" "$WORKDIR/benchmarks" "$HF_CACHE"
export IMAGE GPUS_PER_NODE MAIN_HOST MAIN_PORT WORKDIR HF_CACHE

# One task per node; SLURM_NODEID is read inside the task, so each node gets its own rank.
# --network host: NCCL and the rendezvous talk between nodes; --ipc=host: NCCL's shared memory.
# shellcheck disable=SC2016
srun --ntasks-per-node=1 bash -c '
  exec docker run --rm --gpus all --ipc=host --network host \
    --user "$(id -u):$(id -g)" -e HOME=/tmp -e HF_TOKEN \
    -v "$WORKDIR/runs:/work/runs" -v "$WORKDIR/synthetic:/work/synthetic" \
    -v "$WORKDIR/benchmarks:/work/benchmarks" -v "$HF_CACHE:/home/rsmatch/.cache/huggingface" \
    "$IMAGE" accelerate launch --config_file configs/accelerate/multi_node.yaml \
      --num_machines "$SLURM_NNODES" --num_processes "$((SLURM_NNODES * GPUS_PER_NODE))" \
      --machine_rank "$SLURM_NODEID" --main_process_ip "$MAIN_HOST" \
      --main_process_port "$MAIN_PORT" launch/train.py "$@"
' bash "$@"
