"""What `auto` precision and memory format mean on the machine at hand.

A CPU without native bf16 (AVX2-only x86, most ARM) emulates bf16 autocast in slow scalar loops:
a demo step took 23-30 s instead of 1.5 s in fp32 on an AVX2 EPYC. So `auto` picks bf16 on a
CPU only where the instruction set computes it (AVX512-BF16 or AMX-BF16) and oneDNN, which runs
the convolutions, is not held below those instructions by `ONEDNN_MAX_CPU_ISA` (a bf16
convolution held to AVX2 took 8x its fp32 time, 16x its native bf16 time). On CUDA it picks
bf16 where the GPU computes it (Ampere on; older GPUs emulate it) and fp16 with a loss scaler
elsewhere. channels_last is on wherever convolutions run: it made the bare WRN step 1.2-1.45x
faster on an AVX2 CPU, 1.5x with bf16 on an AMX CPU, and is what tensor cores want under mixed
precision.

Host memory: glibc serves every allocation above 32 MB (most CPU activations) from its own mmap
and unmaps it on free, so each CPU step page-faulted, and the kernel zeroed, every activation
again: 2.2 million faults and about 40% of a WRN-28-2 fp32 step at B = 64, mu = 7.
`keep_host_memory` tells glibc to serve them from the heap and keep what is freed.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rsmatch.config import ConfigError
from rsmatch.launcher import is_true

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# oneDNN's ISA limit (DNNL_ is its older prefix, read when ONEDNN_ is unset) and the values of it
# that leave out the bf16 instructions; unknown values are taken as no limit.
ONEDNN_ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
ONEDNN_ISAS_WITHOUT_BF16 = frozenset({
    "SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_MIC", "AVX512_MIC_4OPS",
    "AVX512_CORE", "AVX512_CORE_VNNI",
})  # fmt: skip
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


@dataclass(frozen=True)
class Precision:
    mixed_precision: (
        str  # the autocast: no, fp16, bf16 (Accelerate's, or the trainer's under DeepSpeed)
    )
    channels_last: bool
    reason: str  # why, for run.json and the log
    warning: str | None = None  # an explicit choice the hardware is bad at

    def record(self) -> dict:
        return asdict(self)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (Linux); empty where they cannot be read."""
    try:
        text = cpuinfo.read_text(encoding="utf-8")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def onednn_isa_limit(env: Mapping[str, str] | None = None) -> str | None:
    """`NAME=VALUE` of the variable that holds oneDNN below its bf16 instructions, else None."""
    env = os.environ if env is None else env
    for name in ONEDNN_ISA_VARIABLES:
        if value := env.get(name):
            return f"{name}={value}" if value.strip().upper() in ONEDNN_ISAS_WITHOUT_BF16 else None
    return None


def cpu_bf16_support(
    flags: set[str] | None = None, env: Mapping[str, str] | None = None
) -> tuple[bool, str]:
    """Whether bf16 autocast runs natively on this CPU, and what says so (for run.json)."""
    flags = cpu_flags() if flags is None else flags
    if not any(f in flags for f in NATIVE_BF16_FLAGS):
        return False, "CPU without native bf16"
    limit = onednn_isa_limit(env)
    if limit:
        return False, f"CPU with native bf16, which {limit} keeps from oneDNN"
    # which matters: WRN-28-2 trained 2.7-2.9x faster in bf16 than fp32 with AMX, 1.9x without
    present = ", ".join(f for f in NATIVE_BF16_FLAGS if f in flags)
    return True, f"CPU with native bf16 ({present})"


def _native_bf16(cuda: bool, cuda_bf16: bool | None, cpu_bf16: bool | None) -> tuple[bool, str]:
    """Whether the device computes bf16 natively (probed where not given), and the hardware
    named for the log."""
    if cuda:  # before Ampere a GPU "supports" bf16 by emulation: is_bf16_supported's default
        if cuda_bf16 is None:
            cuda_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return cuda_bf16, f"CUDA GPU {'with' if cuda_bf16 else 'without'} native bf16"
    if cpu_bf16 is None:
        return cpu_bf16_support()
    return cpu_bf16, f"CPU {'with' if cpu_bf16 else 'without'} native bf16"


def resolve(
    mixed_precision: str,
    channels_last: bool | str,
    cuda: bool | None = None,
    cuda_bf16: bool | None = None,
    cpu_bf16: bool | None = None,
    deepspeed: bool = False,
    key: str = "train.mixed_precision",
) -> Precision:
    """Resolve `auto` (and check explicit values) for CUDA or CPU; probes default to this host.
    Errors and warnings name the setting as `key` (a config key, or a tool's flag).

    Under DeepSpeed the weights stay fp32 and the autocast is torch's, in the trainer and, set
    by it, in the engine (`complete_deepspeed_config`): DeepSpeed's own bf16/fp16 casts the
    whole model, BatchNorm included. So fp16, which needs a loss scaler that DeepSpeed keeps
    for its own fp16 only, is not available there.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    bf16_ok, hardware = _native_bf16(cuda, cuda_bf16, cpu_bf16)
    if bf16_ok:
        auto, why = "bf16", hardware
    elif cuda and deepspeed:
        auto, why = "no", f"{hardware}: fp32 (fp16 autocast has no loss scaler under DeepSpeed)"
    elif cuda:
        auto, why = "fp16", hardware
    else:
        auto, why = "no", f"{hardware}: fp32 (bf16 would be emulated, several times slower)"
    warning = None
    if mixed_precision == "auto":
        chosen, reason = auto, f"auto: {why}"
    else:
        chosen, reason = mixed_precision, f"explicit {key}"
        if chosen == "fp16" and (deepspeed or not cuda):
            needs = (
                "a loss scaler (DeepSpeed has one for its own fp16 only)"
                if deepspeed
                else "a CUDA GPU"
            )
            raise ConfigError(f"{key}='fp16': fp16 autocast needs {needs}; use auto, bf16 or no")
        if chosen == "bf16" and not bf16_ok:
            warning = (
                f"{key}=bf16 on a {hardware}: "
                f"emulated and slow; {key}=auto picks "
                f"{'fp32' if auto == 'no' else auto} here"
            )
    layout = True if channels_last == "auto" else bool(channels_last)
    if deepspeed:
        autocast = "torch autocast (the engine's torch_autocast too), " if chosen == "bf16" else ""
        reason += f"; DeepSpeed: {autocast}fp32 weights"
        if layout:  # DeepSpeed broadcasts parameters as byte views, which need contiguous rows
            reason += " kept contiguous (activations channels_last)"
    return Precision(chosen, layout, reason, warning)


def complete_deepspeed_config(ds_config: dict, mixed_precision: str, clip_grad_norm: float) -> None:
    """Check a DeepSpeed config and add, in place, the three settings the trainer relies on.

    - Refused: DeepSpeed's own bf16/fp16, a cast of the whole model (BatchNorm and its
      statistics included; the fp32 images then meet bf16 weights). The trainer autocasts
      there as everywhere else, with `train.mixed_precision`.
    - `torch_autocast`, set from `train.mixed_precision` (refused when the JSON sets it
      otherwise): on a GPU the engine's forward otherwise switches the trainer's autocast off,
      so the model ran fp32 while run.json said bf16. No module communicates in bf16:
      gradients are reduced in fp32, as under DDP (with bf16 on, DeepSpeed then ignores a
      JSON's `communication_data_type`).
    - `gradient_clipping`, set from `train.clip_grad_norm` (the engine clips inside its step;
      refused when the JSON sets another number). Left out, DeepSpeed's own default is 1.0;
      `auto`, Accelerate fills in 1.0: either clipped what train.clip_grad_norm=0 leaves alone.
    - `zero_optimization.parameter_alignment` on for ZeRO-1/2 (refused when the JSON sets it
      false): ZeRO packs the parameters into one flat buffer, and the 10-way heads leave every
      parameter after them off 16-byte boundaries. The probable cause of a CUDA fault in the
      first forward ("misaligned address", H100, deepspeed 0.19.8); with it, ZeRO-2 trained on
      two H200s (27 Nov 2026).
      ZeRO-2's gradient buckets still hold unaligned views, which only DeepSpeed's own copies
      touch.
    - Refused: ZeRO-3, which partitions the parameters themselves (the EMA, the exports and the
      queue's model calls read whole parameters; never run).
    """
    for dtype in ("bf16", "fp16"):
        if is_true((ds_config.get(dtype) or {}).get("enabled")):
            raise ConfigError(
                f'the DeepSpeed config enables "{dtype}", which casts the whole model, BatchNorm '
                f'included; set "{dtype}": {{"enabled": false}} there: train.mixed_precision '
                "chooses the autocast precision under DeepSpeed too"
            )
    autocast = {"enabled": mixed_precision == "bf16", "dtype": "bfloat16",
                "lower_precision_safe_modules": []}  # fmt: skip
    # a JSON that already holds what rsmatch would set passes
    if ds_config.get("torch_autocast", autocast) != autocast:
        raise ConfigError(
            'the DeepSpeed config sets "torch_autocast": remove it; rsmatch sets it from '
            "train.mixed_precision"
        )
    ds_config["torch_autocast"] = autocast
    clipping = ds_config.get("gradient_clipping", "auto")
    if clipping != "auto" and not _equal_number(clipping, clip_grad_norm):
        raise ConfigError(
            f"train.clip_grad_norm={clip_grad_norm}: the DeepSpeed config clips at {clipping}; "
            f'set "gradient_clipping": {clip_grad_norm} there, or leave it out'
        )
    ds_config["gradient_clipping"] = clip_grad_norm
    zero = ds_config.get("zero_optimization") or {}
    stage = str(zero.get("stage"))
    if stage == "3":
        raise ConfigError(
            '"zero_optimization": {"stage": 3}: not supported (it partitions the parameters, '
            "which the EMA and the exports read whole); use stage 1 or 2"
        )
    if stage in ("1", "2"):
        if not is_true(zero.get("parameter_alignment", True)):
            raise ConfigError(
                'the DeepSpeed config sets "zero_optimization": {"parameter_alignment": false}: '
                "set it true; without it CUDA kernels met parameters off 16-byte boundaries "
                '("misaligned address")'
            )
        zero["parameter_alignment"] = True


def _equal_number(value: object, number: float) -> bool:
    """Whether a JSON value is `number` (a number, or a text of one, as DeepSpeed reads it)."""
    try:
        return float(value) == number  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc (whose mallopt and malloc_trim are used here), else None."""
    return ctypes.CDLL("libc.so.6") if platform.libc_ver()[0] == "glibc" else None


def keep_host_memory(setting: bool | str, device_type: str) -> str:
    """Apply `train.keep_host_memory` to this process; returns what was done, for run.json.

    `auto` keeps memory when the model runs on the CPU (a GPU step's host allocations are small).
    The process's resident memory then stays at its peak instead of shrinking between steps.
    """
    if setting is False:
        return "off (train.keep_host_memory=false)"
    if setting == "auto" and device_type != "cpu":
        return f"off ({device_type})"
    libc = _glibc()
    if libc is None:
        return "off (not glibc: the system allocator is left as it is)"
    # -1 disables trimming (mallopt(3)); no mmap'd chunks, so large tensors come from the heap
    if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, -1)):
        return "off (glibc refused mallopt)"
    return "on: large tensors from the heap, freed memory kept (no page faults per step)"


def hand_back_host_memory() -> None:
    """Return the freed heap to the OS now (glibc's malloc_trim), for a process that will idle
    while others work: with `keep_host_memory` it would otherwise hold its peak."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def usable_cores() -> int:
    """The cores this process may run on (its affinity, where the OS has one: Linux)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def idle_cores_note(
    threads: int, cores: int, local_processes: int, env: Mapping[str, str] | None = None
) -> str | None:
    """On a CPU, a note when OMP_NUM_THREADS holds each process below its share of the
    cores: `accelerate launch` sets it to 1 unless told otherwise, and the run is then as slow
    as one core, silently."""
    env = os.environ if env is None else env
    share = max(cores // max(local_processes, 1), 1)
    if "OMP_NUM_THREADS" not in env or threads >= share:
        return None
    return (
        f"note: {threads} CPU thread(s) per process, {cores} cores for {local_processes} "
        f"process(es) here (OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, which `accelerate launch` "
        f"sets to 1 unless told): `accelerate launch --num_cpu_threads_per_process {share}` or "
        f"OMP_NUM_THREADS={share} uses them"
    )
