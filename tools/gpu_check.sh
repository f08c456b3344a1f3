#!/usr/bin/env bash
# The GPU check in one command, for a GPU machine without network (docs/gpu-check.md):
# offline install, the GPU tests, FixMatch/RSMatch throughput at WRN-28-2, and two short
# CIFAR-10 trainings, summarised in OUT/gpu_check.json next to a few logs.
#
#     bash tools/gpu_check.sh [--dry-run] [--out DIR] [--data DIR] [--budget S]
#                             [--train-seconds S] [--precision P] [--channels-last V]
#                             [--compile default reduce-overhead] [--variant KEY=VALUE]
#
# --out defaults to $OUT when set (the device tool's folder), else runs/gpu_check.
# --dry-run: tiny sizes on the CPU, no installs, GPU tests skipped (CI runs it: ~1.5 minutes on a 2-core Zen 3).
# Wheels in .whl/ (tools/gpu_wheels.sh) and data in .gpudata/ (tools/prepare_gpu_data.sh) are
# used when present. Every other option goes to tools/gpu_check.py (see its --help).
set -uo pipefail
started=$(date +%s)
self=$(realpath "$0")  # before the cd: $0 may be relative
cd "$(dirname "$0")/.."
source tools/header.sh
python=${PYTHON:-python3}
out=${OUT:-runs/gpu_check}
dry=0
args=()
while (($#)); do
    case $1 in
        --dry-run) dry=1; args+=(--dry-run) ;;
        --out) out=${2:?--out needs a folder}; shift ;;
        --out=*) out=${1#--out=} ;;
        -h | --help)  # this header, then the checker's options; nothing installed or written
            print_header "$self"
            exec "$python" tools/gpu_check.py --help ;;
        *) args+=("$1") ;;
    esac
    shift
done
mkdir -p "$out"
out=$(cd "$out" && pwd)

# Install without network: carried wheels into their own folder, then the project itself
# (editable, no dependencies, no build isolation: nothing may be fetched). The tree is put
# first on PYTHONPATH as well, so the check runs this checkout even where the install fails.
install_status=ok
mode=pythonpath
{
    if ((dry)); then
        echo "dry run: no install, PYTHONPATH only"
    else
        if compgen -G ".whl/*.whl" >/dev/null; then
            site=${TMPDIR:-/tmp}/rsmatch-gpu-site
            "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                --upgrade --target "$site" .whl/*.whl || install_status=failed
            export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
        fi
        if [[ -d .whl/deepspeed ]]; then  # optional: without it the DeepSpeed GPU test skips
            # Only the wheels of what the image lacks, without pip's resolver: it also weighs the
            # requirements of the image's own torch, which a custom image need not meet.
            ds_missing=$("$python" -c 'import importlib.metadata as m, re, sys
for wheel in sys.argv[1:]:
    try:
        m.version(re.split(r"-\d", wheel.rsplit("/", 1)[-1])[0])
    except m.PackageNotFoundError:
        print(wheel)' .whl/deepspeed/*.whl)
            if [[ -n $ds_missing ]]; then
                # shellcheck disable=SC2086  # one wheel path per word
                "$python" -m pip install -q --no-index --no-deps --no-cache-dir $ds_missing ||
                    echo "deepspeed: not installed; its GPU test will skip"
            fi
        fi
        if "$python" -m pip install -q --no-index --no-deps --no-build-isolation -e .; then
            mode=editable
        else
            install_status=failed
        fi
    fi
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    if ((dry)); then
        install_status=skipped
    else
        "$python" -c "import rsmatch.trainer; print('import rsmatch.trainer: ok')" || install_status=failed
    fi
} >"$out/install.log" 2>&1

exec "$python" tools/gpu_check.py --out "$out" --started "$started" \
    --install-status "$install_status" --install-mode "$mode" "${args[@]}"
