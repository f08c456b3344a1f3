#!/usr/bin/env bash
# Download into .whl/ the wheels that tools/gpu_check.sh installs on a GPU machine without network.
#
#     bash tools/gpu_wheels.sh [PYTHON_VERSION]      # default 3.12, the GPU image's python3
#
# The GPU image (see docs/gpu-check.md) has torch, timm, accelerate, safetensors, pyarrow,
# pandas, xxhash and huggingface_hub but not `datasets` nor two of its needs (dill,
# multiprocess). fsspec travels too because datasets caps its version. Each is pinned to the
# version installed here, where the test suite passes, and fetched without its dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-3.12}
names=(datasets dill multiprocess fsspec)
pins=()
for name in "${names[@]}"; do
    version=$(python3 -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    pins+=("$name==$version")
done
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
rm -rf .whl.tmp
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
    --implementation cp "${platforms[@]}" -d .whl.tmp "${pins[@]}"
rm -rf .whl && mv .whl.tmp .whl
echo "wrote .whl/ ($(du -sh .whl | cut -f1)): ${pins[*]}"
