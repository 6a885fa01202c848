"""DeepSeek-V3 fine-grained FP8: 1x128 / 128x128 quantisers, block-scaled GEMMs, FP8 linear.

Every function takes backend="auto"|"triton"|"torch": auto runs the Triton kernel on CUDA
tensors and the plain-torch twin (reference.py) elsewhere.
"""

from .gemm import FP8Linear, fp8_linear, gemm, gemm_1x128
from .grouped_gemm import ContiguousLayout, contiguous_layout, grouped_gemm, k_grouped_gemm_1x128
from .quantize import (
    dequantize,
    dequantize_act,
    dequantize_weight,
    quantize_act,
    quantize_act_transposed,
    quantize_weight,
    to_fp8_e4m3,
)
from .reference import FP8_DTYPE, FP8_MAX, TILE, calc_diff
from .weight_cache import quantize_weight_once, weight_cache

__all__ = [
    "FP8_DTYPE", "FP8_MAX", "TILE", "calc_diff",
    "quantize_act", "quantize_act_transposed", "quantize_weight", "to_fp8_e4m3",
    "dequantize", "dequantize_act", "dequantize_weight",
    "gemm", "gemm_1x128", "FP8Linear", "fp8_linear",
    "quantize_weight_once", "weight_cache",
    "grouped_gemm", "k_grouped_gemm_1x128", "contiguous_layout", "ContiguousLayout",
]
