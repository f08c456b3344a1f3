#!/usr/bin/env bash
# Download into .whl/ the wheels that tools/gpu_check.sh installs on a GPU machine without network.
#
#     bash tools/gpu_wheels.sh [PYTHON_VERSION]      # default 3.12, the GPU image's python3
#
# The GPU image (see docs/gpu-check.md) has torch, timm, accelerate, safetensors, pyarrow,
# pandas, xxhash and huggingface_hub but not `datasets` nor two of its needs (dill,
# multiprocess). fsspec travels too because datasets caps its version. Each is pinned to the
# version installed here, where the test suite passes, and fetched without its dependencies.
# DeepSpeed and its needs go to .whl/deepspeed/ (below).
set -euo pipefail
source "$(dirname "$0")/header.sh"
[[ ${1:-} == -h || ${1:-} == --help ]] && { print_header "$0"; exit 0; }
cd "$(dirname "$0")/.."
py=${1:-3.12}
pin() {  # NAME==VERSION as installed here
    python3 -c "import importlib.metadata as m, sys; print(sys.argv[1] + '==' + m.version(sys.argv[1]))" "$1"
}
pins=()
for name in datasets dill multiprocess fsspec; do
    pins+=("$(pin "$name")")
done
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
rm -rf .whl.tmp
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
    --implementation cp "${platforms[@]}" -d .whl.tmp "${pins[@]}"

# DeepSpeed (PyPI has its source only: built here into a pure wheel, no ops) and what it needs
# beyond torch, numpy, packaging, psutil and tqdm (pydantic's own needs included), in their own
# folder: gpu_check.sh installs the wheels of what the image lacks. Optional: when
# this fails the other wheels are still written, and the DeepSpeed GPU test skips.
deepspeed_wheels() {
    local ds_pins=() name
    for name in deepspeed einops hjson msgpack ninja py-cpuinfo pydantic pydantic-core \
        annotated-types typing-inspection typing-extensions; do
        ds_pins+=("$(pin "$name")") || return 1
    done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
        --implementation cp "${platforms[@]}" -d .whl.tmp/deepspeed "${ds_pins[@]:1}" || return 1
    DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation \
        -w .whl.tmp/deepspeed "${ds_pins[0]}" || return 1
    echo "${ds_pins[*]}"
}
if ds=$(deepspeed_wheels); then
    ds="deepspeed/: $ds"
else
    rm -rf .whl.tmp/deepspeed
    ds="no deepspeed/ (not installed here, or a wheel failed): its GPU test will skip"
fi
rm -rf .whl && mv .whl.tmp .whl
echo "wrote .whl/ ($(du -sh .whl | cut -f1)): ${pins[*]}; $ds"
