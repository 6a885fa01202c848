"""Block-scaled FP8 GEMMs (NT, c = a @ b.T) and the FP8 linear layer built from them.

DeepSeek-V3 recipe: a is scaled per 1x128 tile, b per 128x128 block (forward, dgrad) or per
1x128 tile (wgrad, `gemm_1x128`). The kernel promotes to an fp32 accumulator once per
128-wide K block: `acc += dot(a_blk, b_blk) * sa[:, None] * sb[None, :]`, so the tensor
cores' reduced-precision fp8 accumulation never spans more than 128 products.

b's scales are gathered per output column as `scale[col // B_SCALE_ROWS]`, so the same
kernel serves 128x128 blocks (B_SCALE_ROWS=128) and 1x128 tiles (B_SCALE_ROWS=1), and any
BLOCK_N works; a tile inside one 128-column block loads a single scale per K block.

Legend (shape suffixes):
  M rows of a / c    N rows of b = columns of c    K reduction dim (multiple of 128 not needed)
  Kb = ceil(K/128)   Nb = ceil(N/128)   T tokens   I in-features   O out-features
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from duet_kernels.deferred import defer_or_return

from . import reference as ref
from .quantize import (
    cast_out,
    interpreting,
    quantize_act,
    quantize_act_transposed,
    use_triton,
)
from .reference import TILE, cdiv
from .tuning import ConfigTable, benchmark, launch_options, note_shape
from .weight_cache import quantize_weight_once


@triton.jit
def block_scaled_acc(a_ptr, as_ptr, b_ptr, bs_ptr, off_m, off_n, M, N, K,
                     stride_am, stride_asm, stride_bn, stride_bsn, stride_bsk,
                     B_SCALE_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] tile at (off_m, off_n) of sum_kb (a_blk @ b_blk.T) * sa * sb.

    K contiguous, BLOCK_K = 128. b's scale of column n and K block kb is at
    bs_ptr + (n // B_SCALE_ROWS) * stride_bsn + kb * stride_bsk.
    """
    rows_M = off_m + tl.arange(0, BLOCK_M)
    cols_N = off_n + tl.arange(0, BLOCK_N)
    offs_K = tl.arange(0, BLOCK_K)
    mask_M = rows_M < M
    mask_N = cols_N < N
    # int64 row offsets: M*K or E*N*K can pass 2^31 elements at training sizes. The scale
    # tensors are 128x smaller, so their offsets stay int32 (half the registers per pointer).
    a_ptrs = a_ptr + rows_M.to(tl.int64)[:, None] * stride_am + offs_K[None, :]
    b_ptrs = b_ptr + cols_N.to(tl.int64)[None, :] * stride_bn + offs_K[:, None]  # [BLOCK_K, BLOCK_N] view
    sa_offs = rows_M * stride_asm
    # A tile no wider than b's scale blocks, and aligned to them, needs one scale per K block:
    # a scalar load instead of BLOCK_N / 4 registers per thread (the wgmma layout spreads a
    # row of the tile over 4 threads). Same values, so the same products as the per-column form.
    SCALAR_SB: tl.constexpr = B_SCALE_ROWS % BLOCK_N == 0
    if SCALAR_SB:
        sb_ptr = bs_ptr + (off_n // B_SCALE_ROWS) * stride_bsn
    else:
        sb_offs = (cols_N // B_SCALE_ROWS) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_K < K - kb * BLOCK_K  # ragged last K block reads zeros
        a = tl.load(a_ptrs, mask=mask_M[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & mask_N[None, :], other=0.0)
        sa = tl.load(as_ptr + kb + sa_offs, mask=mask_M, other=0.0)
        # Promotion to the fp32 accumulator once per 128 of K, scaled as (dot * sa) * sb.
        if SCALAR_SB:
            acc += tl.dot(a, b) * sa[:, None] * tl.load(sb_ptr + kb * stride_bsk)
        else:
            sb = tl.load(bs_ptr + kb * stride_bsk + sb_offs, mask=mask_N, other=0.0)
            acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc


@triton.jit
def _gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K,
                 stride_am, stride_asm, stride_bn, stride_bsn, stride_bsk, stride_cm,
                 B_SCALE_ROWS: tl.constexpr, ACCUMULATE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped program order: GROUP_M row-blocks share each column-block while it is in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    acc = block_scaled_acc(a_ptr, as_ptr, b_ptr, bs_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, M, N, K,
                           stride_am, stride_asm, stride_bn, stride_bsn, stride_bsk,
                           B_SCALE_ROWS, BLOCK_M, BLOCK_N, BLOCK_K)
    # The epilogue's pointers are built only now, so that they are not live during the K loop.
    rows_M = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + rows_M.to(tl.int64)[:, None] * stride_cm + cols_N[None, :]
    mask = (rows_M < M)[:, None] & (cols_N < N)[None, :]
    if ACCUMULATE:  # wgrad into an existing fp32 gradient: one read-add-write, no extra buffer
        acc = tl.load(c_ptrs, mask=mask, other=0.0) + acc
    tl.store(c_ptrs, cast_out(acc, c_ptr.dtype.element_ty), mask=mask)


def tuning_configs():
    """H100/H200-sized tiles the autotuner chooses from; BLOCK_K stays 128 (the scale granularity).

    Every tile holds at most 64 accumulator values per thread (BLOCK_M * BLOCK_N <= 64 * 32 *
    num_warps): the per-128-K promotion keeps the running fp32 accumulator and the dot's own
    result in registers at once, so 128 values each (e.g. 128x128 on 4 warps, 128x256 on 8)
    cannot fit in 255 registers and spill. tests/test_sm90_compile.py holds every config to 0
    spills on sm90.
    """
    shapes = [(128, 128, 8, 4), (128, 128, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4), (64, 256, 8, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, w, s in shapes]


# Config tables for the GPU (duet_kernels/fp8/tuning.py): M and K bucketed to powers of two (M follows
# the batch; K, in the weight gradient, is the token count), N exact. The accumulating variant
# has its own table; tuning benchmarks it on a scratch copy of c, never on the gradient itself.
_gemm_tuned = ConfigTable("gemm", tuning_configs(), ("M", "N", "K", "B_SCALE_ROWS", "out"), ("M", "K"))
_gemm_acc_tuned = ConfigTable("gemm_acc", tuning_configs(), ("M", "N", "K", "B_SCALE_ROWS", "out"),
                              ("M", "K"))

# Under the interpreter each program is numpy work: small tiles keep the tests quick, and
# 32 (> the 16 minimum of tl.dot) still exercises multi-block M and N with ragged edges.
INTERPRET_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 2}


def _launch(a_fp8, a_scale, b_fp8, b_scale, c, b_scale_rows: int, accumulate: bool) -> None:
    # The kernel assumes K-contiguous operands, fp32 scales and a's scales kb-contiguous.
    a_fp8, b_fp8 = a_fp8.contiguous(), b_fp8.contiguous()
    a_scale = a_scale.float().contiguous()
    M, K = a_fp8.shape
    N = b_fp8.shape[0]
    if M == 0 or N == 0:
        return
    if b_scale_rows == 1:
        # Per-column scales go in as [Kb, N]: the columns one thread reads for a K block are
        # then adjacent in memory (paired, vectorised loads, constant offsets) instead of Kb
        # apart, which keeps the 128x128 wgrad tile within sm90's registers. A small copy:
        # N * Kb floats, 1/32 of b's bytes.
        b_scale = b_scale.float().t().contiguous()
        stride_bsn, stride_bsk = b_scale.stride(1), b_scale.stride(0)
    else:
        b_scale = b_scale.float().contiguous()
        stride_bsn, stride_bsk = b_scale.stride(0), b_scale.stride(1)
    args = (a_fp8, a_scale, b_fp8, b_scale, c, M, N, K,
            a_fp8.stride(0), a_scale.stride(0), b_fp8.stride(0), stride_bsn, stride_bsk, c.stride(0))
    if interpreting():
        grid = (cdiv(M, INTERPRET_BLOCKS["BLOCK_M"]) * cdiv(N, INTERPRET_BLOCKS["BLOCK_N"]),)
        _gemm_kernel[grid](*args, B_SCALE_ROWS=b_scale_rows, ACCUMULATE=accumulate, BLOCK_K=TILE,
                           **INTERPRET_BLOCKS)
        return
    table = _gemm_acc_tuned if accumulate else _gemm_tuned
    fixed = {"B_SCALE_ROWS": b_scale_rows, "ACCUMULATE": accumulate, "BLOCK_K": TILE}

    def run(cfg, out) -> None:
        grid = (cdiv(M, cfg.kwargs["BLOCK_M"]) * cdiv(N, cfg.kwargs["BLOCK_N"]),)
        _gemm_kernel[grid](*args[:4], out, *args[5:], **fixed, **launch_options(cfg))

    key = table.key(M=M, N=N, K=K, B_SCALE_ROWS=b_scale_rows, out=str(c.dtype))
    run(table.pick(key, lambda cfg: benchmark(lambda: run(cfg, c.clone()))), c)


def _check(a_fp8, a_scale, b_fp8, b_scale, b_scale_rows: int) -> None:
    M, K = a_fp8.shape
    N, Kb = b_fp8.shape[0], cdiv(K, TILE)
    if b_fp8.shape[1] != K:
        raise ValueError(f"K mismatch: a {tuple(a_fp8.shape)} vs b {tuple(b_fp8.shape)}")
    if tuple(a_scale.shape) != (M, Kb) or tuple(b_scale.shape) != (cdiv(N, b_scale_rows), Kb):
        raise ValueError(f"scale shapes a {tuple(a_scale.shape)} b {tuple(b_scale.shape)} do not fit "
                         f"M={M} N={N} K={K}")


def gemm(a_fp8, a_scale, b_fp8, b_scale, out_dtype=torch.bfloat16, backend: str = "auto") -> torch.Tensor:
    """c [M, N] = a [M, K] (1x128 scales [M, Kb]) @ b [N, K].T (128x128 scales [Nb, Kb])."""
    _check(a_fp8, a_scale, b_fp8, b_scale, TILE)
    note_shape("gemm", M=a_fp8.shape[0], N=b_fp8.shape[0], K=a_fp8.shape[1])
    if not use_triton(backend, a_fp8, b_fp8):
        return ref.gemm(a_fp8, a_scale, b_fp8, b_scale, out_dtype)
    c = torch.empty(a_fp8.shape[0], b_fp8.shape[0], dtype=out_dtype, device=a_fp8.device)
    _launch(a_fp8, a_scale, b_fp8, b_scale, c, TILE, accumulate=False)
    return c


def gemm_1x128(a_fp8, a_scale, b_fp8, b_scale, accumulate_into=None, backend: str = "auto") -> torch.Tensor:
    """Wgrad GEMM: c [M, N] fp32 = a [M, K] @ b [N, K].T, both with 1x128 scales along K.

    With accumulate_into (a contiguous fp32 [M, N] tensor) the product is added to it in
    place and it is returned.
    """
    _check(a_fp8, a_scale, b_fp8, b_scale, 1)
    M, N = a_fp8.shape[0], b_fp8.shape[0]
    note_shape("gemm_1x128", M=M, N=N, K=a_fp8.shape[1])
    acc = accumulate_into
    if acc is not None and (acc.shape != (M, N) or acc.dtype != torch.float32 or not acc.is_contiguous()):
        raise ValueError("accumulate_into must be a contiguous fp32 tensor of shape [M, N]")
    if not use_triton(backend, a_fp8, b_fp8):
        return ref.gemm_1x128(a_fp8, a_scale, b_fp8, b_scale, accumulate_into)
    c = accumulate_into if accumulate_into is not None else torch.empty(M, N, device=a_fp8.device)
    _launch(a_fp8, a_scale, b_fp8, b_scale, c, 1, accumulate=accumulate_into is not None)
    return c


# ----------------------------------------------------------------------------- FP8 linear


def _forward(x, weight, backend):
    """Fprop GEMM: x 1x128, w 128x128 -> (y [..., O], x as [T, I], w_fp8, w_scale)."""
    n_out, n_in = weight.shape
    x_TI = x.reshape(-1, n_in)
    x_fp8, x_scale = quantize_act(x_TI, backend=backend)
    w_fp8_OI, w_scale = quantize_weight_once(weight, backend=backend)  # once per step in weight_cache()
    y_TO = gemm(x_fp8, x_scale, w_fp8_OI, w_scale, out_dtype=x.dtype, backend=backend)
    return y_TO.view(*x.shape[:-1], n_out), x_TI, w_fp8_OI, w_scale


class FP8Linear(torch.autograd.Function):
    """y = x @ w.T with all three GEMMs (fprop, dgrad, wgrad) in FP8 e4m3.

    Saved for backward: the FP8 weight and the FP8 activation, the latter already in the
    128x1 (token-tiled) layout wgrad consumes, quantised once from the high-precision x, so
    no fp32/bf16 copy of x is kept and no double quantisation happens.
    The transposed weight for dgrad is the FP8 weight transposed: a 128x128 block of w.T is
    the transpose of a block of w, with the same amax, so re-quantising w.T gives exactly
    these bytes and scales.
    """

    @staticmethod
    def forward(ctx, x, weight, backend="auto"):
        y, x_TI, w_fp8_OI, w_scale = _forward(x, weight, backend)
        xT_fp8_IT, xT_scale = (quantize_act_transposed(x_TI, backend=backend) if ctx.needs_input_grad[1]
                               else (None, None))
        ctx.save_for_backward(xT_fp8_IT, xT_scale, w_fp8_OI, w_scale)
        ctx.backend, ctx.x_shape, ctx.x_dtype, ctx.w_dtype = backend, x.shape, x.dtype, weight.dtype
        ctx.weight = weight  # a leaf parameter: where a deferred weight gradient goes
        return y

    @staticmethod
    def backward(ctx, grad_y):
        xT_fp8_IT, xT_scale, w_fp8_OI, w_scale = ctx.saved_tensors
        g_TO = grad_y.reshape(-1, w_fp8_OI.shape[0])
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # dgrad: dx [T, I] = g [T, O] @ (w.T [I, O]).T
            g_fp8, g_scale = quantize_act(g_TO, backend=ctx.backend)
            wT_fp8_IO, wT_scale = w_fp8_OI.t().contiguous(), w_scale.t().contiguous()
            grad_x = gemm(g_fp8, g_scale, wT_fp8_IO, wT_scale, out_dtype=ctx.x_dtype, backend=ctx.backend)
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:  # wgrad: dw [O, I] = g.T [O, T] @ (x.T [I, T]).T, tokens reduced
            backend, w_dtype = ctx.backend, ctx.w_dtype

            def wgrad() -> torch.Tensor:
                gT_fp8_OT, gT_scale = quantize_act_transposed(g_TO, backend=backend)
                return gemm_1x128(gT_fp8_OT, gT_scale, xT_fp8_IT, xT_scale, backend=backend).to(w_dtype)

            grad_w = defer_or_return(ctx.weight, wgrad)  # queued under the pipeline's weight split
        return grad_x, grad_w, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               backend: str = "auto") -> torch.Tensor:
    """Drop-in for F.linear(x, weight, bias) with FP8 GEMMs; output dtype follows x."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        y = FP8Linear.apply(x, weight, backend)
    else:  # inference / no_grad: skip the autograd node and the wgrad-layout quantisation
        y = _forward(x, weight, backend)[0]
    return y if bias is None else y + bias.to(y.dtype)
