"""`auto` precision, memory format and host memory: what they resolve to on each hardware."""

import platform
import subprocess
import sys

import pytest

from rsmatch.config import ConfigError
from rsmatch.hardware import cpu_flags, keep_host_memory, native_cpu_bf16, resolve


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
    zen3.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    zen4 = tmp_path / "zen4"
    zen4.write_text("processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16\n")
    spr = tmp_path / "spr"
    spr.write_text("flags\t\t: avx2 avx512f amx_tile amx_bf16\n")
    assert not native_cpu_bf16(cpu_flags(zen3))
    assert native_cpu_bf16(cpu_flags(zen4)) and native_cpu_bf16(cpu_flags(spr))
    assert cpu_flags(tmp_path / "missing") == set()
    skylake = {"avx512f", "avx512bw"}  # AVX512 without BF16: oneDNN would emulate
    assert not native_cpu_bf16(skylake)


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
