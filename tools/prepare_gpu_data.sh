#!/usr/bin/env bash
# Pack the CIFAR-10 data of tools/gpu_check.sh into .gpudata/gpudata.tar.gz (about 23 MB).
#
#     bash tools/prepare_gpu_data.sh [SHARED_DATA] [OUT]     # defaults ../shared/data .gpudata
#
# ../shared/data does not travel to a GPU machine; this one compressed file does (carry .gpudata).
# Layout inside, read by gpu_check.sh as data.real and data.synthetic:
#   real/train/<class>/  first TRAIN_PER_CLASS (default 4025) files by name: 25 labels + 4000 unlabeled
#   real/test/<class>/   all 1000 per class
#   synthetic/{ddpm,cgan}/<class>/   all 1000 per class: r = 0.5 of 4000 needs exactly these
# JPEG bytes are kept as they are, so the tar stays compressed (~0.35 KB per image).
set -euo pipefail
source "$(dirname "$0")/header.sh"
[[ ${1:-} == -h || ${1:-} == --help ]] && { print_header "$0"; exit 0; }
repo=$(cd "$(dirname "$0")/.." && pwd)
shared=$(cd "${1:-$repo/../shared/data}" && pwd)
out=${2:-$repo/.gpudata}
per_class=${TRAIN_PER_CLASS:-4025}
for name in cifar10-jpeg synth-ddpm-jpeg synth-cgan-jpeg; do
    [[ -f $shared/$name.tar.gz ]] || { echo "prepare_gpu_data: missing $shared/$name.tar.gz" >&2; exit 2; }
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for name in cifar10-jpeg synth-ddpm-jpeg synth-cgan-jpeg; do
    tar xzf "$shared/$name.tar.gz" -C "$tmp"
done
pack=$tmp/pack
mkdir -p "$pack/real" "$pack/synthetic"
mv "$tmp/cifar10/test" "$pack/real/test"
for folder in "$tmp"/cifar10/train/*/; do
    class=$(basename "$folder")
    mkdir -p "$pack/real/train/$class"
    mapfile -t files < <(cd "$folder" && ls | LC_ALL=C sort)
    (cd "$folder" && mv -t "$pack/real/train/$class" "${files[@]:0:per_class}")
done
mv "$tmp/synth/ddpm" "$tmp/synth/cgan" "$pack/synthetic/"
mkdir -p "$out"
tar czf "$out/gpudata.tar.gz.tmp" -C "$pack" real synthetic
mv "$out/gpudata.tar.gz.tmp" "$out/gpudata.tar.gz"
echo "wrote $out/gpudata.tar.gz ($(du -h "$out/gpudata.tar.gz" | cut -f1)):" \
    "$(find "$pack/real/train" -type f | wc -l) train, $(find "$pack/real/test" -type f | wc -l) test," \
    "$(find "$pack/synthetic" -type f | wc -l) synthetic images"
