"""Which precision a run computes in, and the autocast context that applies it.

precision.compute = fp32 | bf16 | fp8 | auto. Master weights are fp32 in every mode; bf16 is
autocast around forward and backward; fp8 runs the FP8 layers' own GEMMs (framework/fp8.py) with
everything else in the device's companion precision.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from framework.fp8 import companion_compute

# CPU flags that give bf16 matmuls their own hardware path (oneDNN uses them): Intel AMX tiles and
# AVX512-BF16 dot products (Cooper Lake, Sapphire Rapids, AMD Zen 4). Without them bf16 is
# emulated and runs several times slower than fp32.
FAST_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """Whether /proc/cpuinfo's flags (or the given text of such a file) name a bf16 unit."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: no way to tell, stay on the safe side
            return False
    flags = {flag for line in cpuinfo.splitlines() if line.startswith("flags")
             for flag in line.partition(":")[2].split()}
    return any(flag in flags for flag in FAST_BF16_CPU_FLAGS)


def resolve_compute(compute: str, device: torch.device, cpuinfo: str | None = None) -> str:
    """auto -> bf16 on GPUs and on CPUs with AMX or AVX512-BF16 (cpuinfo: /proc/cpuinfo's text,
    read when None); fp32 on other CPUs, where bf16 matmuls are emulated and slower than fp32."""
    if compute == "auto":
        if torch.device(device).type == "cuda":
            return "bf16"
        return "bf16" if cpu_has_fast_bf16(cpuinfo) else "fp32"
    return compute


def autocast(device: torch.device, compute: str):
    """BF16 autocast around forward/backward; master weights stay FP32. Under fp8 the FP8
    layers run their own GEMMs and everything else runs as the device's companion precision."""
    if compute == "fp8":
        compute = companion_compute(device)
    if compute == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
