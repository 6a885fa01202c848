"""Plain-torch twins of the FP8 kernels (DeepSeek-V3 fine-grained recipe).

Every function here has the same signature and semantics as the Triton path in
quantize.py / gemm.py / grouped_gemm.py, and performs the same fp32 operations in the
same order, so the quantisers agree bit for bit and the GEMMs to fp32 summation order.
They are what runs on CPU, and the yardstick the tests hold the kernels to.

Legend (shape suffixes):
  M  rows (tokens)          N  output features        K  reduction dim
  E  experts                Kb = ceil(K/128)          Nb = ceil(N/128)     Mb = ceil(M/128)
  T  the 128 elements of one tile
  *_fp8 tensors are float8_e4m3fn; every scale is fp32 and multiplies the fp8 value back.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
TILE = 128  # quantisation granularity along K (and along N for weights)
AMAX_MIN = 1e-4  # keeps all-zero tiles from producing a zero (then inf) scale


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's relative difference 1 - 2<x,y>/(|x|^2+|y|^2), in float64 (0 = equal)."""
    x, y = x.double(), y.double()
    denominator = (x * x + y * y).sum()
    if denominator == 0:  # both all-zero: identical
        return 0.0
    return float(1 - 2 * (x * y).sum() / denominator)


def to_fp8_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Saturating round-to-nearest-even cast to e4m3fn (the grid the Triton path rounds to)."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def round_scale_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Round positive fp32 scales up to a power of two (mantissa bits -> 0, carry into exponent).

    Done on the int32 view so the Triton kernel can do exactly the same bit operation.
    """
    bits = scale.contiguous().view(torch.int32)
    bits = (bits + 0x7FFFFF) & 0x7F800000
    return bits.view(torch.float32)


def _pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = cdiv(x.shape[-1], multiple) * multiple - x.shape[-1]
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def _tile_scale(amax: torch.Tensor, power_of_2_scale: bool) -> torch.Tensor:
    scale = amax.clamp(min=AMAX_MIN) / FP8_MAX
    return round_scale_pow2(scale) if power_of_2_scale else scale


# ----------------------------------------------------------------------------- quantisers


def quantize_act(x: torch.Tensor, power_of_2_scale: bool = False):
    """x [..., K] -> (x_fp8 [..., K], scale [..., Kb]): one scale per 1x128 tile."""
    K = x.shape[-1]
    lead = x.shape[:-1]
    x_MK = x.reshape(-1, K).float()
    M, Kb = x_MK.shape[0], cdiv(K, TILE)
    x_MKbT = _pad_last(x_MK, TILE).view(M, Kb, TILE)  # zero padding never raises an amax
    scale_MKb = _tile_scale(x_MKbT.abs().amax(dim=-1), power_of_2_scale)
    q_MKbT = to_fp8_e4m3(x_MKbT / scale_MKb[..., None])
    x_fp8_MK = q_MKbT.view(M, Kb * TILE)[:, :K].contiguous()
    return x_fp8_MK.view(*lead, K), scale_MKb.view(*lead, Kb)


def quantize_act_transposed(x: torch.Tensor, power_of_2_scale: bool = False):
    """x [M, K] -> (xT_fp8 [K, M], scale [K, Mb]): 128x1 tiles of x, i.e. 1x128 tiles of x.T.

    This is the layout the weight-gradient GEMM needs, where tokens are the reduction dim.
    """
    x_MK = x.reshape(-1, x.shape[-1])
    return quantize_act(x_MK.t(), power_of_2_scale)


def quantize_weight(w: torch.Tensor, power_of_2_scale: bool = False):
    """w [..., N, K] -> (w_fp8 [..., N, K], scale [..., Nb, Kb]): one scale per 128x128 block."""
    N, K = w.shape[-2:]
    lead = w.shape[:-2]
    w_BNK = w.reshape(-1, N, K).float()
    B, Nb, Kb = w_BNK.shape[0], cdiv(N, TILE), cdiv(K, TILE)
    w_pad = _pad_last(_pad_last(w_BNK, TILE).transpose(1, 2), TILE).transpose(1, 2)
    w_blocks = w_pad.view(B, Nb, TILE, Kb, TILE)
    scale_BNbKb = _tile_scale(w_blocks.abs().amax(dim=(2, 4)), power_of_2_scale)
    q = to_fp8_e4m3(w_blocks / scale_BNbKb[:, :, None, :, None])
    w_fp8 = q.view(B, Nb * TILE, Kb * TILE)[:, :N, :K].contiguous()
    return w_fp8.view(*lead, N, K), scale_BNbKb.view(*lead, Nb, Kb)


def expand_scale(scale: torch.Tensor, block_shape: tuple[int, int], rows: int, cols: int) -> torch.Tensor:
    """Per-block scales [..., Rb, Cb] -> per-element scales [..., rows, cols]."""
    br, bc = block_shape
    return scale.repeat_interleave(br, dim=-2)[..., :rows, :].repeat_interleave(bc, dim=-1)[..., :cols]


def dequantize(x_fp8: torch.Tensor, scale: torch.Tensor, block_shape=(1, TILE), out_dtype=torch.float32):
    """Inverse of the quantisers: x_fp8 [..., R, C] * scale broadcast over (br, bc) blocks.

    block_shape (1, 128) for quantize_act / quantize_act_transposed outputs, (128, 128) for
    quantize_weight outputs. A 1-D x_fp8 is treated as one row.
    """
    x2 = x_fp8 if x_fp8.dim() >= 2 else x_fp8[None]
    s2 = scale if scale.dim() >= 2 else scale[None]
    full = expand_scale(s2.float(), tuple(block_shape), x2.shape[-2], x2.shape[-1])
    return (x2.float() * full).to(out_dtype).view(x_fp8.shape)


# ----------------------------------------------------------------------------- GEMMs


def block_scaled_mm(a_fp8, a_scale_MKb, b_fp8, b_scale_NKb) -> torch.Tensor:
    """fp32 c [M, N] = sum over 128-wide K blocks of (a_blk @ b_blk.T) * sa[:, None] * sb[None, :].

    b_scale_NKb is already per row of b (expanded from 128x128 blocks when needed). The
    per-block dot is exact-ish fp32 (e4m3 products are exact); promotion to the fp32
    accumulator happens once per block, in the same order as the Triton kernel.
    """
    M, K = a_fp8.shape
    N = b_fp8.shape[0]
    acc_MN = torch.zeros(M, N, dtype=torch.float32, device=a_fp8.device)
    for kb in range(cdiv(K, TILE)):
        a_blk = a_fp8[:, kb * TILE : (kb + 1) * TILE].float()
        b_blk = b_fp8[:, kb * TILE : (kb + 1) * TILE].float()
        acc_MN += (a_blk @ b_blk.T) * a_scale_MKb[:, kb, None] * b_scale_NKb[None, :, kb]
    return acc_MN


def gemm(a_fp8, a_scale, b_fp8, b_scale, out_dtype=torch.bfloat16) -> torch.Tensor:
    """NT block-scaled GEMM: c [M, N] = a [M, K] (1x128 scales) @ b [N, K].T (128x128 scales)."""
    N = b_fp8.shape[0]
    b_scale_NKb = b_scale.float().repeat_interleave(TILE, dim=0)[:N]
    return block_scaled_mm(a_fp8, a_scale.float(), b_fp8, b_scale_NKb).to(out_dtype)


def gemm_1x128(a_fp8, a_scale, b_fp8, b_scale, accumulate_into=None) -> torch.Tensor:
    """Wgrad GEMM: both operands 1x128-scaled along K; fp32 out, optionally added in place."""
    c_MN = block_scaled_mm(a_fp8, a_scale.float(), b_fp8, b_scale.float())
    if accumulate_into is None:
        return c_MN
    return accumulate_into.add_(c_MN)


def grouped_gemm(a_fp8, a_scale, b_fp8, b_scale, m_indices, out_dtype=torch.bfloat16) -> torch.Tensor:
    """Contiguous-layout grouped GEMM: row m uses expert m_indices[m]; rows with -1 are zero.

    a_fp8 [M, K], a_scale [M, Kb], b_fp8 [E, N, K], b_scale [E, Nb, Kb], m_indices [M].
    """
    M, N = a_fp8.shape[0], b_fp8.shape[1]
    c_MN = torch.zeros(M, N, dtype=torch.float32, device=a_fp8.device)
    for e in torch.unique(m_indices[m_indices >= 0]).tolist():
        rows = (m_indices == e).nonzero().squeeze(1)
        b_scale_NKb = b_scale[e].float().repeat_interleave(TILE, dim=0)[:N]
        c_MN[rows] = block_scaled_mm(a_fp8[rows], a_scale[rows].float(), b_fp8[e], b_scale_NKb)
    return c_MN.to(out_dtype)


def k_grouped_gemm_1x128(a_fp8, a_scale, b_fp8, b_scale, offsets: list[int]) -> torch.Tensor:
    """c [E, M, N] fp32: c[e] = gemm_1x128 of expert e's token columns offsets[e]:offsets[e + 1]
    (multiples of 128, so the scale tiles split with them); an empty segment gives zeros."""
    M, N, E = a_fp8.shape[0], b_fp8.shape[0], len(offsets) - 1
    c = torch.zeros(E, M, N, dtype=torch.float32, device=a_fp8.device)
    for e in range(E):
        lo, hi = offsets[e], offsets[e + 1]
        if hi > lo:
            tiles = slice(lo // TILE, hi // TILE)
            c[e] = gemm_1x128(a_fp8[:, lo:hi], a_scale[:, tiles], b_fp8[:, lo:hi], b_scale[:, tiles])
    return c
