"""`auto` precision, memory format and host memory: what they resolve to on each hardware."""

import platform
import subprocess
import sys

import pytest
import torch

from rsmatch import hardware
from rsmatch.config import ConfigError
from rsmatch.hardware import (
    complete_deepspeed_config,
    cpu_bf16_support,
    cpu_flags,
    keep_host_memory,
    resolve,
)


@pytest.mark.parametrize(
    "probes, expected",
    [
        ({"cuda": True, "cuda_bf16": True}, "bf16"),
        ({"cuda": True, "cuda_bf16": False}, "fp16"),
        ({"cuda": False, "cpu_bf16": True}, "bf16"),
        ({"cuda": False, "cpu_bf16": False}, "no"),  # AVX2 EPYC: emulated bf16 is ~15x slower
    ],
)
def test_auto_precision_follows_the_hardware(probes, expected):
    p = resolve("auto", "auto", **probes)
    assert p.mixed_precision == expected
    assert p.channels_last is True
    assert p.reason.startswith("auto: ") and p.warning is None


def test_explicit_values_are_obeyed_with_a_warning_when_emulated():
    p = resolve("bf16", False, cuda=False, cpu_bf16=False)
    assert (p.mixed_precision, p.channels_last) == ("bf16", False)
    assert "emulated" in p.warning and "fp32" in p.warning
    assert resolve("bf16", True, cuda=False, cpu_bf16=True).warning is None
    assert resolve("no", "auto", cuda=False, cpu_bf16=True).mixed_precision == "no"


def test_fp16_on_a_cpu_is_refused_not_silently_fp32():
    with pytest.raises(ConfigError, match=r"^train.mixed_precision='fp16': .*CUDA"):
        resolve("fp16", "auto", cuda=False, cpu_bf16=True)
    assert resolve("fp16", "auto", cuda=True, cuda_bf16=True).mixed_precision == "fp16"


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    zen3 = tmp_path / "zen3"
    zen3.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n", encoding="utf-8")
    zen4 = tmp_path / "zen4"
    zen4.write_text("processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16\n", encoding="utf-8")
    spr = tmp_path / "spr"
    spr.write_text("flags\t\t: avx2 avx512f amx_tile amx_bf16\n", encoding="utf-8")
    assert cpu_bf16_support(cpu_flags(zen3), env={}) == (False, "CPU without native bf16")
    assert cpu_bf16_support(cpu_flags(zen4), env={})[0] and cpu_bf16_support(cpu_flags(spr), {})[0]
    assert cpu_flags(tmp_path / "missing") == set()
    skylake = {"avx512f", "avx512bw"}  # AVX512 without BF16: oneDNN would emulate
    assert not cpu_bf16_support(skylake, env={})[0]


@pytest.mark.parametrize(
    "env, native",
    [
        ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, False),  # bf16 convolution measured 8x its fp32 time
        ({"ONEDNN_MAX_CPU_ISA": "avx512_core"}, False),  # AVX512 without its BF16 part
        ({"DNNL_MAX_CPU_ISA": "AVX2_VNNI"}, False),  # the older name
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}, False),  # Cascade Lake's: VNNI, no BF16
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "DNNL_MAX_CPU_ISA": "AVX2"}, True),
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, True),
        ({"ONEDNN_MAX_CPU_ISA": "ALL"}, True),
        ({"ONEDNN_MAX_CPU_ISA": ""}, True),
        ({}, True),
    ],
)
def test_a_onednn_isa_limit_below_bf16_means_fp32(env, native):
    flags = {"avx2", "avx512f", "avx512_bf16"}
    ok, why = cpu_bf16_support(flags, env)
    assert ok is native
    if not native:
        name, value = next(iter(env.items()))
        assert why == f"CPU with native bf16, which {name}={value} keeps from oneDNN"


def test_auto_names_the_isa_limit_in_its_reason_and_warning(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    p = resolve("auto", "auto", cuda=False)
    assert p.mixed_precision == "no"
    assert p.reason == (
        "auto: CPU with native bf16, which ONEDNN_MAX_CPU_ISA=AVX2 keeps from oneDNN: "
        "fp32 (bf16 would be emulated, several times slower)"
    )
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in resolve("bf16", "auto", cuda=False).warning
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert resolve("auto", "auto", cuda=False).mixed_precision == "bf16"


@pytest.mark.parametrize("major, expected", [(7, "fp16"), (8, "bf16"), (9, "bf16")])
def test_a_gpu_that_emulates_bf16_gets_fp16(monkeypatch, major, expected):
    """A T4 or V100 (compute capability 7) runs bf16 tensors, so torch.cuda.is_bf16_supported()
    says True by default; auto must still pick fp16, which it computes natively."""
    asked = []

    def is_bf16_supported(including_emulation: bool = True) -> bool:  # torch's rule
        asked.append(including_emulation)
        return major >= 8 or including_emulation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    p = resolve("auto", "auto")
    assert asked == [False]
    assert p.mixed_precision == expected
    assert p.reason == f"auto: CUDA GPU with{'out' * (major < 8)} native bf16"
    assert (resolve("bf16", "auto").warning is None) is (major >= 8)


@pytest.mark.parametrize(
    "probes, expected",
    [
        ({"cuda": True, "cuda_bf16": True}, "bf16"),
        ({"cuda": True, "cuda_bf16": False}, "no"),  # fp16 autocast would have no loss scaler
        ({"cuda": False, "cpu_bf16": True}, "bf16"),
        ({"cuda": False, "cpu_bf16": False}, "no"),
    ],
)
def test_under_deepspeed_auto_never_picks_fp16(probes, expected):
    p = resolve("auto", "auto", deepspeed=True, **probes)
    assert p.mixed_precision == expected and p.channels_last is True
    autocast = "torch autocast (the engine's torch_autocast too), " if expected == "bf16" else ""
    assert p.reason.endswith(
        f"; DeepSpeed: {autocast}fp32 weights kept contiguous (activations channels_last)"
    )
    assert "contiguous" not in resolve("auto", False, deepspeed=True, **probes).reason
    explicit = resolve("bf16", "auto", deepspeed=True, **probes)  # warns where emulated
    assert (explicit.warning is None) is (expected == "bf16")
    if explicit.warning:
        assert explicit.warning.endswith("auto picks fp32 here")
    with pytest.raises(ConfigError, match=r"^train.mixed_precision='fp16': .*DeepSpeed"):
        resolve("fp16", "auto", deepspeed=True, **probes)


def test_a_deepspeed_config_that_casts_the_whole_model_is_refused():
    complete_deepspeed_config({"bf16": {"enabled": False}, "fp16": {"enabled": False}}, "bf16", 0.0)
    for dtype in ("bf16", "fp16"):
        for enabled in (True, "true"):  # DeepSpeed (and Accelerate) take the string too
            with pytest.raises(ConfigError, match=f'enables "{dtype}".*"enabled": false'):
                complete_deepspeed_config({dtype: {"enabled": enabled}}, "bf16", 0.0)
    complete_deepspeed_config({"bf16": {"enabled": "auto"}}, "bf16", 0.0)


def test_the_deepspeed_config_gets_the_autocast_and_the_alignment():
    """Written out: the engine autocasts as train.mixed_precision says, reduces every gradient
    in fp32 (no lower-precision modules), and ZeRO-1/2 align each parameter."""
    config = {"zero_optimization": {"stage": 2}, "gradient_clipping": 0.0}
    complete_deepspeed_config(config, "bf16", 0.0)
    assert config == {
        "zero_optimization": {"stage": 2, "parameter_alignment": True},
        "gradient_clipping": 0.0,
        "torch_autocast": {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []},
    }  # fmt: skip
    for stage, aligned in ((0, None), (1, True), ("2", True)):
        config = {"zero_optimization": {"stage": stage}}
        complete_deepspeed_config(config, "no", 0.0)
        assert config["zero_optimization"].get("parameter_alignment") is aligned, stage
        assert config["torch_autocast"]["enabled"] is False
        # a second Trainer in the process meets this dict
        complete_deepspeed_config(config, "no", 0.0)
    with pytest.raises(ConfigError, match=r'"stage": 3}: not supported'):
        complete_deepspeed_config({"zero_optimization": {"stage": 3}}, "no", 0.0)
    complete_deepspeed_config(config := {}, "no", 0.0)
    assert config == {"torch_autocast": {"enabled": False, "dtype": "bfloat16", "lower_precision_safe_modules": []},
                      "gradient_clipping": 0.0}  # fmt: skip
    with pytest.raises(ConfigError, match='sets "torch_autocast": remove it'):
        complete_deepspeed_config({"torch_autocast": {"enabled": True}}, "bf16", 0.0)
    with pytest.raises(ConfigError, match='sets "torch_autocast": remove it'):  # written for bf16
        complete_deepspeed_config(config, "bf16", 0.0)
    for off in (False, "false"):
        with pytest.raises(ConfigError, match='"parameter_alignment": false.*misaligned'):
            complete_deepspeed_config({"zero_optimization": {"stage": 2, "parameter_alignment": off}}, "no", 0.0)  # fmt: skip


@pytest.mark.parametrize("written", [None, "auto", 0.5, "0.5", "5e-1"])
def test_the_deepspeed_config_clips_as_train_clip_grad_norm(written):
    """Left out (DeepSpeed's default) or `auto` (Accelerate's fill), the engine clips at 1.0,
    which train.clip_grad_norm=0 leaves alone: now the JSON gets train.clip_grad_norm."""
    config = {} if written is None else {"gradient_clipping": written}
    complete_deepspeed_config(config, "no", 0.5)
    assert config["gradient_clipping"] == 0.5


@pytest.mark.parametrize("written", [1.0, "1.0", 0, "none", [0.5]])
def test_a_deepspeed_config_that_clips_otherwise_is_refused(written):
    with pytest.raises(ConfigError) as error:
        complete_deepspeed_config({"gradient_clipping": written}, "no", 0.5)
    assert str(error.value) == (
        f"train.clip_grad_norm=0.5: the DeepSpeed config clips at {written}; "
        'set "gradient_clipping": 0.5 there, or leave it out'
    )


# Allocates and frees a 256 MB tensor 5 times and counts the page faults, then again after
# keep_host_memory. glibc mmaps such a block and unmaps it on free: 65536 faults of 4 KiB each
# per allocation (fewer with huge pages), every time.
FAULTS = """
import resource, sys, torch
from rsmatch.hardware import keep_host_memory

def faults():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(64 * 2**20)  # 256 MB of float32, written so every page is touched
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

before = faults()
done = keep_host_memory("auto", "cpu")
for _ in range(4):  # the heap grows until freed blocks coalesce into one that fits
    faults()
print(before, faults(), done)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_kept_host_memory_is_not_page_faulted_again():
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True)
    before, after, done = out.stdout.split(maxsplit=2)
    assert int(before) > 5 * 10_000  # every allocation faulted its pages in
    assert int(after) < 1_000, out.stdout  # the kept heap serves them all
    assert done.startswith("on")


def test_host_memory_is_left_alone_off_the_cpu_or_when_asked():
    assert keep_host_memory("auto", "cuda") == "off (cuda)"
    assert keep_host_memory(False, "cpu") == "off (train.keep_host_memory=false)"


def test_arm_cpu_flags_are_read_from_the_features_line(tmp_path):
    arm = tmp_path / "arm"
    arm.write_text(
        "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd bf16 i8mm\n", encoding="utf-8"
    )
    assert cpu_flags(arm) == {"fp", "asimd", "bf16", "i8mm"}
    assert cpu_bf16_support(cpu_flags(arm), env={}) == (False, "CPU without native bf16")


@pytest.mark.parametrize("native", [True, False])
def test_the_reason_names_the_hardware_as_probed(native):
    with_ = "with" if native else "without"
    cpu = resolve("auto", "auto", cuda=False, cpu_bf16=native)
    gpu = resolve("auto", "auto", cuda=True, cuda_bf16=native)
    if native:
        assert cpu.reason == "auto: CPU with native bf16"
        assert cpu_bf16_support({"amx_bf16"}, env={}) == (True, "CPU with native bf16 (amx_bf16)")
        assert cpu_bf16_support({"amx_bf16", "avx512_bf16"}, env={})[1] == (
            "CPU with native bf16 (avx512_bf16, amx_bf16)"
        )
    else:
        assert cpu.reason == (
            "auto: CPU without native bf16: fp32 (bf16 would be emulated, several times slower)"
        )
    assert gpu.reason == f"auto: CUDA GPU {with_} native bf16"


def test_the_emulated_bf16_warning_names_what_auto_picks_instead():
    # a GPU before Ampere: auto picks fp16 (with a loss scaler), a CPU without bf16 picks fp32
    gpu = resolve("bf16", "auto", cuda=True, cuda_bf16=False)
    assert gpu.mixed_precision == "bf16" and gpu.reason == "explicit train.mixed_precision"
    assert gpu.warning == (
        "train.mixed_precision=bf16 on a CUDA GPU without native bf16: emulated and slow; "
        "train.mixed_precision=auto picks fp16 here"
    )
    cpu = resolve("bf16", "auto", cuda=False, cpu_bf16=False, key="--precision")
    assert cpu.warning.endswith("--precision=auto picks fp32 here")


@pytest.mark.parametrize("setting, expected", [(True, True), (False, False), ("auto", True)])
def test_an_explicit_memory_format_is_obeyed(setting, expected):
    for probes in ({"cuda": False, "cpu_bf16": False}, {"cuda": True, "cuda_bf16": True}):
        assert resolve("no", setting, **probes).channels_last is expected
        assert resolve("auto", setting, **probes).channels_last is expected


def test_under_deepspeed_the_reason_keeps_the_precision_choice():
    p = resolve("auto", True, cuda=True, cuda_bf16=True, deepspeed=True)
    assert p.reason == (
        "auto: CUDA GPU with native bf16; DeepSpeed: torch autocast (the engine's "
        "torch_autocast too), fp32 weights kept contiguous (activations channels_last)"
    )
    p = resolve("no", False, cuda=True, cuda_bf16=True, deepspeed=True)
    assert p.reason == "explicit train.mixed_precision; DeepSpeed: fp32 weights"
    p = resolve("auto", False, cuda=False, cpu_bf16=False, deepspeed=True)  # no loss-scaler talk
    assert p.reason == (
        "auto: CPU without native bf16: fp32 (bf16 would be emulated, several times slower); "
        "DeepSpeed: fp32 weights"
    )


class _FakeLibc:
    """glibc's mallopt and malloc_trim, recorded instead of applied to the test process."""

    def __init__(self, accepts: bool = True) -> None:
        self.calls: list[tuple] = []
        self.accepts = accepts

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1 if self.accepts else 0

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.mark.parametrize("setting, device", [("auto", "cpu"), (True, "cpu"), (True, "cuda")])
def test_keep_host_memory_disables_mmap_and_trimming(monkeypatch, setting, device):
    """Explicit true applies on a GPU too; only `auto` leaves a GPU run's allocator alone."""
    libc = _FakeLibc()
    monkeypatch.setattr(hardware, "_glibc", lambda: libc)
    done = keep_host_memory(setting, device)
    assert done == "on: large tensors from the heap, freed memory kept (no page faults per step)"
    # M_MMAP_MAX = -4 set to 0 (no mmap'd chunks), M_TRIM_THRESHOLD = -1 set to -1 (never trim)
    assert libc.calls == [("mallopt", -4, 0), ("mallopt", -1, -1)]


def test_keep_host_memory_reports_what_it_could_not_do(monkeypatch):
    refusing = _FakeLibc(accepts=False)
    monkeypatch.setattr(hardware, "_glibc", lambda: refusing)
    assert keep_host_memory("auto", "cpu") == "off (glibc refused mallopt)"
    monkeypatch.setattr(hardware, "_glibc", lambda: None)
    assert keep_host_memory(True, "cpu") == (
        "off (not glibc: the system allocator is left as it is)"
    )


def test_hand_back_host_memory_trims_the_whole_heap(monkeypatch):
    libc = _FakeLibc()
    monkeypatch.setattr(hardware, "_glibc", lambda: libc)
    hardware.hand_back_host_memory()
    assert libc.calls == [("malloc_trim", 0)]
    monkeypatch.setattr(hardware, "_glibc", lambda: None)
    hardware.hand_back_host_memory()  # not glibc: nothing to call


def test_idle_cores_note_only_when_omp_threads_hold_a_process_below_its_share():
    from rsmatch.hardware import idle_cores_note

    omp1 = {"OMP_NUM_THREADS": "1"}
    assert idle_cores_note(1, 2, 1, omp1) == (
        "note: 1 CPU thread(s) per process, 2 cores for 1 process(es) here (OMP_NUM_THREADS=1, "
        "which `accelerate launch` sets to 1 unless told): `accelerate launch "
        "--num_cpu_threads_per_process 2` or OMP_NUM_THREADS=2 uses them"
    )
    assert "OMP_NUM_THREADS=16 uses them" in idle_cores_note(1, 32, 2, omp1)
    assert idle_cores_note(1, 2, 2, omp1) is None  # 2 processes on 2 cores: 1 each is right
    assert idle_cores_note(16, 32, 2, omp1) is None
    assert idle_cores_note(1, 2, 1, {}) is None  # no OMP_NUM_THREADS: torch chose, or the user
