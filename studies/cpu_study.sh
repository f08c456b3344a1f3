#!/usr/bin/env bash
# Issue #3 CPU study: RSMatch vs FixMatch vs FixMatch (real only) on CIFAR-10 JPEGs with half of
# a 1000-per-class unlabeled pool replaced by the ddpm and cgan images (equal shares),
# 25 labels per class, seeds 0 and 1, the same step budget for every method.
#   bash studies/cpu_study.sh [SHARED_DATA_DIR] [OUT_DIR] [STEPS]
# Environment: SEEDS (default "0 1"), METHODS (default "rsmatch fixmatch fixmatch_real_only"),
# EXTRA (more key=value overrides for every run, e.g. EXTRA="ssl.threshold=0.7").
set -euo pipefail
source "$(dirname "$0")/../tools/header.sh"
[[ ${1:-} == -h || ${1:-} == --help ]] && { print_header "$0"; exit 0; }
SHARED=${1:-../shared/data}
OUT=${2:-runs/study}
STEPS=${3:-500}
DATA=$OUT/data
archives=(cifar10-jpeg synth-ddpm-jpeg synth-cgan-jpeg)
for f in "${archives[@]}"; do  # each unpacked already or present, before anything is written
  [[ -e $DATA/.$f || -f $SHARED/$f.tar.gz ]] || { echo "cpu_study: missing $SHARED/$f.tar.gz (the first argument names the archives' folder: docs/studies.md)" >&2; exit 2; }
done
mkdir -p "$DATA"
for f in "${archives[@]}"; do
  if [[ ! -e $DATA/.$f ]]; then  # an if, not `||`: set -e is off inside a `||` list
    tar xzf "$SHARED/$f.tar.gz" -C "$DATA"
    touch "$DATA/.$f"
  fi
done
common=(--config configs/study_cpu.yaml data.real="$DATA/cifar10"
        "data.synthetic={ddpm: $DATA/synth/ddpm, cgan: $DATA/synth/cgan}" train.steps="$STEPS")
for seed in ${SEEDS:-0 1}; do
  for method in ${METHODS:-rsmatch fixmatch fixmatch_real_only}; do
    run=$OUT/$method-seed$seed
    [ -f "$run/metrics.json" ] && continue
    case $method in
      fixmatch_real_only) extra=(algorithm=fixmatch data.real_only=true) ;;
      *) extra=(algorithm=$method) ;;
    esac
    # shellcheck disable=SC2086  # EXTRA is a list of overrides
    python launch/train.py "${common[@]}" "${extra[@]}" train.seed=$seed data.split_seed=$seed \
      train.output_dir="$run" train.progress=false ${EXTRA:-}
  done
done
python tools/summarize_study.py "$OUT"
