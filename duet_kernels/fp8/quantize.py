"""Triton FP8 quantisers: 1x128 activation tiles, 128x1 (transposed) tiles, 128x128 weight blocks.

Each public function takes `backend="auto"|"triton"|"torch"`: auto runs Triton on CUDA
tensors and the plain-torch twin in reference.py otherwise; "triton" also works on CPU
tensors under TRITON_INTERPRET=1 (how the tests run it).

Bit-exactness with `torch.Tensor.to(torch.float8_e4m3fn)` matters (tests compare bytes), so
the kernels (a) divide with IEEE round-to-nearest (`div_rn`; plain `/` is approximate on
NVIDIA GPUs) and (b) round to the e4m3 grid in fp32 before the fp8 cast, because the
interpreter's fp32 -> float8e4nv cast mis-rounds across powers of two (31.6 -> 16).

NaN propagates as in the torch twins: a tile holding a NaN gets a NaN amax (a reduction
with a NaN-propagating max; `tl.max` drops NaN on GPUs), hence a NaN scale (0.0 with
power-of-2 scales, whose bit trick maps NaN to 0 in both) and the values that follow from it.

Legend (shape suffixes):
  M rows (tokens)   K channels / reduction dim   N weight rows   B leading batch (experts)
  Mb, Nb, Kb = ceil(M|N|K / 128)   T = 128 elements of one tile
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import reference as ref
from .reference import FP8_DTYPE, TILE, cdiv

# ----------------------------------------------------------------------------- dispatch


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (same test Triton itself applies)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Resolve backend="auto"|"triton"|"torch" for these operands."""
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return on_cuda
    if backend != "triton":
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if not on_cuda and not interpreting():
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                           "triton is imported; use backend='torch' or 'auto' instead")
    return True


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def round_to_e4m3(x):
    """Round fp32 x to the nearest e4m3fn value (ties to even, saturating at +-448), in fp32.

    After this every value is exactly representable, so any fp8 cast is exact. Numbers only:
    a NaN comes out as some number here, and `to_e4m3` is what turns it into e4m3's NaN.
    """
    mag = tl.minimum(tl.abs(x), 448.0)  # saturate first: also keeps the bit add below in range
    # Normal range (>= 2^-6): keep 3 of fp32's 23 mantissa bits; RNE on the 20 dropped bits.
    # A carry out of the mantissa correctly bumps the exponent (e.g. 31.6 -> 32).
    bits = mag.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lsb) & 0x7FF00000).to(tl.float32, bitcast=True)
    # Subnormal range (< 2^-6): the grid is multiples of 2^-9; round q = mag * 2^9 (exact) to
    # an even-tie integer. Clamped so that large values cannot overflow the int conversion.
    q = tl.minimum(mag, 0.015625) * 512.0
    n = q.to(tl.int32)  # truncation toward zero
    frac = q - n.to(tl.float32)
    n += ((frac > 0.5) | ((frac == 0.5) & ((n & 1) == 1))).to(tl.int32)
    subnormal = n.to(tl.float32) * 0.001953125
    r = tl.where(mag < 0.015625, subnormal, normal)
    # Test the sign bit, not x < 0, so that -0.0 (and tiny negatives) map to fp8 -0 like torch.
    return tl.where(x.to(tl.int32, bitcast=True) < 0, -r, r)


@triton.jit
def to_e4m3(x):
    """fp32 x -> float8e4nv exactly as torch casts it (saturating RNE), NaN included.

    NaN becomes e4m3's NaN with x's sign (0x7F / 0xFF), as torch's cast gives. It is set on
    the bytes: the min in round_to_e4m3 would turn it into 448 (PTX's min.f32 drops a NaN
    operand), the bit rounding can carry a NaN's mantissa out of the exponent (the GPU's NaN,
    0x7FFFFFFF, would give 0), and the interpreter's fp8 cast makes NaN 0x7C (384).
    """
    y = round_to_e4m3(x).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    sign = ((x.to(tl.int32, bitcast=True) >> 24) & 0x80).to(tl.uint8)
    y = tl.where(x != x, sign | 0x7F, y)
    return y.to(tl.float8e4nv, bitcast=True)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def amax_nan(x, axis: tl.constexpr):
    """max(|x|) along axis, NaN if any element is NaN (torch's amax).

    tl.max cannot propagate NaN (its combine is max.f32, which drops a NaN operand), so the
    reduction uses a NaN-propagating maximum as its combine function instead.
    """
    return tl.reduce(tl.abs(x), axis, _max_nan)


@triton.jit
def tile_scale(amax, POW2: tl.constexpr):
    """scale = max(amax, 1e-4) / 448, optionally rounded up to a power of two (bit trick).

    A NaN amax gives a NaN scale, like the reference's clamp; the power-of-two bit trick then
    turns every NaN into 0.0 (the mantissa carries out of the exponent), also as there.
    """
    clamped = tl.maximum(amax, 1e-4, propagate_nan=tl.PropagateNan.ALL)
    scale = tl.math.div_rn(clamped, tl.full(amax.shape, 448.0, tl.float32))
    if POW2:
        scale = ((scale.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    return scale


@triton.jit
def cast_out(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE for a store. bf16 is rounded to nearest even on the int32 view first:
    the interpreter truncates fp32 -> bf16 (GPUs round), and this keeps the two equal.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536 == 0xFFFF0000
        # NaN is kept as it is: rounding its mantissa can carry into the sign (the GPU's NaN
        # 0x7FFFFFFF would become -0.0).
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(DTYPE)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, to_e4m3(x), mask=offs < n)


@triton.jit
def _quant_rows_kernel(x_ptr, y_ptr, s_ptr, M, K, stride_xm, stride_ym, stride_sm,
                       POW2: tl.constexpr, BLOCK_M: tl.constexpr, T: tl.constexpr):
    # One program: BLOCK_M rows x one 128-wide tile; one scale per row.
    rows_M = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_T = tl.program_id(1) * T + tl.arange(0, T)
    mask = (rows_M < M)[:, None] & (cols_T < K)[None, :]
    x_MT = tl.load(x_ptr + rows_M[:, None] * stride_xm + cols_T[None, :], mask=mask, other=0.0)
    x_MT = x_MT.to(tl.float32)
    scale_M = tile_scale(amax_nan(x_MT, 1), POW2)
    y_MT = to_e4m3(tl.math.div_rn(x_MT, scale_M[:, None] + tl.zeros_like(x_MT)))
    tl.store(y_ptr + rows_M[:, None] * stride_ym + cols_T[None, :], y_MT, mask=mask)
    tl.store(s_ptr + rows_M * stride_sm + tl.program_id(1), scale_M, mask=rows_M < M)


@triton.jit
def _quant_cols_kernel(x_ptr, y_ptr, s_ptr, M, K, stride_xm, stride_yk, stride_sk,
                       POW2: tl.constexpr, BLOCK_K: tl.constexpr, T: tl.constexpr):
    # One program: a 128-token tile x BLOCK_K channels of x [M, K]; the scale runs down each
    # column (128x1), and the result is written transposed into y [K, M].
    rows_T = tl.program_id(0) * T + tl.arange(0, T)
    cols_K = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows_T < M)[:, None] & (cols_K < K)[None, :]
    x_TK = tl.load(x_ptr + rows_T[:, None] * stride_xm + cols_K[None, :], mask=mask, other=0.0)
    x_TK = x_TK.to(tl.float32)
    scale_K = tile_scale(amax_nan(x_TK, 0), POW2)
    y_TK = to_e4m3(tl.math.div_rn(x_TK, scale_K[None, :] + tl.zeros_like(x_TK)))
    tl.store(y_ptr + cols_K[None, :] * stride_yk + rows_T[:, None], y_TK, mask=mask)
    tl.store(s_ptr + cols_K * stride_sk + tl.program_id(0), scale_K, mask=cols_K < K)


@triton.jit
def _quant_blocks_kernel(w_ptr, y_ptr, s_ptr, N, K, stride_wb, stride_wn, stride_sb, stride_sn,
                         POW2: tl.constexpr, T: tl.constexpr):
    # One program: one 128x128 block of batch entry program_id(2); a single scalar scale.
    pid_n, pid_k, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows_T = pid_n * T + tl.arange(0, T)
    cols_T = pid_k * T + tl.arange(0, T)
    mask = (rows_T < N)[:, None] & (cols_T < K)[None, :]
    offs = pid_b.to(tl.int64) * stride_wb + rows_T[:, None] * stride_wn + cols_T[None, :]
    w_TT = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tile_scale(amax_nan(amax_nan(w_TT, 1), 0), POW2)
    y_TT = to_e4m3(tl.math.div_rn(w_TT, scale + tl.zeros_like(w_TT)))
    tl.store(y_ptr + offs, y_TT, mask=mask)
    tl.store(s_ptr + pid_b * stride_sb + pid_n * stride_sn + pid_k, scale)


@triton.jit
def _dequant_kernel(x_ptr, s_ptr, y_ptr, R, C, stride_xb, stride_xr, stride_sb, stride_sr,
                    SR: tl.constexpr, SC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # Scales are gathered per element (rows // SR, cols // SC), so one kernel serves every layout.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    offs = b * stride_xb + rows[:, None] * stride_xr + cols[None, :]
    x8 = tl.load(x_ptr + offs, mask=mask, other=0.0)
    # e4m3's NaN (S.1111.111) made NaN explicitly: the interpreter's fp8 -> fp32 cast reads it
    # as 480 (GPUs give NaN; there the where changes nothing).
    x = tl.where((x8.to(tl.uint8, bitcast=True) & 0x7F) == 0x7F, float("nan"), x8.to(tl.float32))
    s = tl.load(s_ptr + b * stride_sb + (rows // SR)[:, None] * stride_sr + (cols // SC)[None, :],
                mask=mask, other=0.0)
    tl.store(y_ptr + offs, cast_out(x * s, y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- public API

# GPU launch shapes (duet_kernels/sm90_report.py compiles exactly these for sm90).
CAST_BLOCK = 1024  # elements per program of the plain cast
ROWS_PER_PROGRAM = 32  # rows (quantize_act) or channels (quantize_act_transposed) per program
QUANT_BLOCKS_WARPS = 8  # one 128x128 fp32 weight block per program: 64 values per thread
DEQUANT_BLOCK = (32, 128)  # rows x columns per dequantisation program


# Rows (or channels) per program: small under the interpreter, where each program's numpy
# work is cheap but each launch of a tile is not; larger on GPU for fewer, fatter programs.
def _rows_per_program() -> int:
    return 16 if interpreting() else ROWS_PER_PROGRAM


def to_fp8_e4m3(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Saturating RNE cast of x to float8_e4m3fn (no scaling)."""
    if not use_triton(backend, x):
        return ref.to_fp8_e4m3(x)
    x_flat = x.contiguous().view(-1)
    y = torch.empty(x_flat.shape, dtype=FP8_DTYPE, device=x.device)
    _cast_kernel[(cdiv(x_flat.numel(), CAST_BLOCK),)](x_flat, y, x_flat.numel(), BLOCK=CAST_BLOCK)
    return y.view(x.shape)


def quantize_act(x: torch.Tensor, power_of_2_scale: bool = False, backend: str = "auto"):
    """x [..., K] -> (x_fp8 [..., K], scale [..., Kb] fp32), one scale per 1x128 tile."""
    if not use_triton(backend, x):
        return ref.quantize_act(x, power_of_2_scale)
    K = x.shape[-1]
    x_MK = x.reshape(-1, K).contiguous()
    M, Kb = x_MK.shape[0], cdiv(K, TILE)
    y_MK = torch.empty(M, K, dtype=FP8_DTYPE, device=x.device)
    scale_MKb = torch.empty(M, Kb, dtype=torch.float32, device=x.device)
    if M > 0 and K > 0:
        bm = _rows_per_program()
        _quant_rows_kernel[(cdiv(M, bm), Kb)](x_MK, y_MK, scale_MKb, M, K, x_MK.stride(0), y_MK.stride(0),
                                              scale_MKb.stride(0), POW2=power_of_2_scale, BLOCK_M=bm,
                                              T=TILE)
    return y_MK.view(*x.shape), scale_MKb.view(*x.shape[:-1], Kb)


def quantize_act_transposed(x: torch.Tensor, power_of_2_scale: bool = False, backend: str = "auto"):
    """x [M, K] (leading dims flattened into M) -> (xT_fp8 [K, M], scale [K, Mb]).

    128x1 tiles along the token dim, i.e. quantize_act(x.T): the Wgrad operand layout.
    """
    if not use_triton(backend, x):
        return ref.quantize_act_transposed(x, power_of_2_scale)
    x_MK = x.reshape(-1, x.shape[-1]).contiguous()
    M, K = x_MK.shape
    Mb = cdiv(M, TILE)
    y_KM = torch.empty(K, M, dtype=FP8_DTYPE, device=x.device)
    scale_KMb = torch.empty(K, Mb, dtype=torch.float32, device=x.device)
    if M > 0 and K > 0:
        bk = _rows_per_program()
        _quant_cols_kernel[(Mb, cdiv(K, bk))](x_MK, y_KM, scale_KMb, M, K, x_MK.stride(0), y_KM.stride(0),
                                              scale_KMb.stride(0), POW2=power_of_2_scale, BLOCK_K=bk,
                                              T=TILE)
    return y_KM, scale_KMb


def quantize_weight(w: torch.Tensor, power_of_2_scale: bool = False, backend: str = "auto"):
    """w [..., N, K] -> (w_fp8 [..., N, K], scale [..., Nb, Kb] fp32), one scale per 128x128 block."""
    if not use_triton(backend, w):
        return ref.quantize_weight(w, power_of_2_scale)
    N, K = w.shape[-2:]
    w_BNK = w.reshape(-1, N, K).contiguous()
    B, Nb, Kb = w_BNK.shape[0], cdiv(N, TILE), cdiv(K, TILE)
    y_BNK = torch.empty(B, N, K, dtype=FP8_DTYPE, device=w.device)
    scale_BNbKb = torch.empty(B, Nb, Kb, dtype=torch.float32, device=w.device)
    if B * N * K > 0:
        _quant_blocks_kernel[(Nb, Kb, B)](w_BNK, y_BNK, scale_BNbKb, N, K, w_BNK.stride(0), w_BNK.stride(1),
                                          scale_BNbKb.stride(0), scale_BNbKb.stride(1),
                                          POW2=power_of_2_scale, T=TILE, num_warps=QUANT_BLOCKS_WARPS)
    return y_BNK.view(w.shape), scale_BNbKb.view(*w.shape[:-2], Nb, Kb)


def dequantize(x_fp8: torch.Tensor, scale: torch.Tensor, block_shape=(1, TILE), out_dtype=torch.float32,
               backend: str = "auto") -> torch.Tensor:
    """x_fp8 [..., R, C] * scale [..., ceil(R/br), ceil(C/bc)] -> out_dtype.

    block_shape (1, 128): outputs of quantize_act / quantize_act_transposed;
    (128, 128): outputs of quantize_weight (leading dims, e.g. experts, allowed).
    """
    if not use_triton(backend, x_fp8, scale):
        return ref.dequantize(x_fp8, scale, block_shape, out_dtype)
    x3 = x_fp8.reshape(-1, *x_fp8.shape[-2:]) if x_fp8.dim() >= 2 else x_fp8.view(1, 1, -1)
    s3 = scale.reshape(-1, *scale.shape[-2:]) if scale.dim() >= 2 else scale.view(1, 1, -1)
    x3, s3 = x3.contiguous(), s3.float().contiguous()
    B, R, C = x3.shape
    y = torch.empty(B, R, C, dtype=out_dtype, device=x_fp8.device)
    if y.numel() > 0:
        br, bc = DEQUANT_BLOCK if not interpreting() else (16, 128)
        _dequant_kernel[(cdiv(R, br), cdiv(C, bc), B)](x3, s3, y, R, C, x3.stride(0), x3.stride(1),
                                                       s3.stride(0), s3.stride(1), SR=block_shape[0],
                                                       SC=block_shape[1], BLOCK_R=br, BLOCK_C=bc)
    return y.view(x_fp8.shape)


def dequantize_act(x_fp8, scale, out_dtype=torch.float32, backend: str = "auto"):
    """Dequantise a 1x128-tiled tensor (quantize_act or quantize_act_transposed output)."""
    return dequantize(x_fp8, scale, (1, TILE), out_dtype, backend)


def dequantize_weight(w_fp8, scale, out_dtype=torch.float32, backend: str = "auto"):
    """Dequantise a 128x128-blocked tensor (quantize_weight output)."""
    return dequantize(w_fp8, scale, (TILE, TILE), out_dtype, backend)
