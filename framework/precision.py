"""Which precision a run computes in, and the autocast context that applies it.

precision.compute = fp32 | bf16 | fp8 | auto. Master weights are fp32 in every mode; bf16 is
autocast around forward and backward; fp8 runs the FP8 layers' own GEMMs (framework/fp8.py) with
everything else in the device's companion precision.
"""

from __future__ import annotations

import contextlib

import torch

from framework.fp8 import companion_compute


def resolve_compute(compute: str, device: torch.device) -> str:
    """auto -> bf16 on GPUs; fp32 on CPU, where bf16 matmuls run about ten times slower."""
    if compute == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return compute


def autocast(device: torch.device, compute: str):
    """BF16 autocast around forward/backward; master weights stay FP32. Under fp8 the FP8
    layers run their own GEMMs and everything else runs as the device's companion precision."""
    if compute == "fp8":
        compute = companion_compute(device)
    if compute == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
