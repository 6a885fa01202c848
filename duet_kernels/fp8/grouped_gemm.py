"""Grouped FP8 GEMM over experts in DeepGEMM's "contiguous" layout, and the layout builder.

Contiguous layout: the rows of a are sorted by expert, each expert's segment padded to a
multiple of `alignment` (128 on GPU, so a 128-row tile never straddles two experts);
m_indices[m] is the expert of row m, -1 for a padding row. Row m of the output is
a[m] @ b[m_indices[m]].T with the same block scaling as `gemm`; padding rows are zero.

The kernel does not rely on the alignment: a row tile loops over the experts it touches
(one when tiles are aligned, as in training) and stores only its own expert's rows, so
any alignment, including 1, gives the right answer.

Legend (shape suffixes):
  M rows of the padded layout   R routed rows before layout   N, K as in gemm.py
  E experts   Kb, Nb = ceil(K|N / 128)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import reference as ref
from .gemm import INTERPRET_BLOCKS, block_scaled_acc, tuning_configs
from .quantize import cast_out, interpreting, use_triton
from .reference import TILE, cdiv
from .tuning import ConfigTable, benchmark, launch_options, note_shape


@triton.jit
def _grouped_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, mi_ptr, M, N, K, E,
                         stride_am, stride_asm, stride_be, stride_bn, stride_bse, stride_bsn, stride_cm,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr):
    # GROUP_M is accepted for config compatibility with gemm; the grid here is 2-D.
    # b is scaled per 128x128 block: a BLOCK_N tile that divides 128 lies in one block column,
    # so each (expert, K block) needs a single scalar scale, not one register per column.
    tl.static_assert(128 % BLOCK_N == 0)
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows_M = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_M = rows_M < M
    mask_N = cols_N < N
    expert_M = tl.load(mi_ptr + rows_M, mask=mask_M, other=-1).to(tl.int32)
    c_ptrs = c_ptr + rows_M.to(tl.int64)[:, None] * stride_cm + cols_N[None, :]

    # Padding rows are written as zeros (not left undefined) so callers may reduce over them.
    pad_rows = mask_M & (expert_M < 0)
    tl.store(c_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=c_ptr.dtype.element_ty),
             mask=pad_rows[:, None] & mask_N[None, :])

    # Experts present in this tile lie in [lo, hi] (rows are sorted); an all-padding tile
    # gives lo = E > hi = -1 and the loop does not run.
    lo = tl.min(tl.where(expert_M >= 0, expert_M, E))
    hi = tl.max(expert_M)
    n_kb = tl.cdiv(K, BLOCK_K)
    # One flat loop over (expert, K block) pairs, not a K loop nested in an expert loop: the
    # nested form kept its pointer set-up live across the outer loop and spilled on sm90 in
    # every config. Pointers advance by scalars (rewound at each expert change), as in
    # gemm's loop, which is what lets Triton pipeline the loads (a branch that updates
    # them stops the pipeliner); the epilogue of each expert runs in the loop on its last
    # K block. Per expert the sums are those of gemm: same products, same order.
    offs_K = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows_M.to(tl.int64)[:, None] * stride_am + offs_K[None, :]
    b_ptrs = (b_ptr + lo.to(tl.int64) * stride_be + cols_N.to(tl.int64)[None, :] * stride_bn
              + offs_K[:, None])  # [BLOCK_K, BLOCK_N] view of expert lo
    sa_offs = rows_M * stride_asm  # int32: the scales are 128x smaller than a
    sb_ptr = bs_ptr + lo.to(tl.int64) * stride_bse + (pid_n * BLOCK_N // 128) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    kb = 0
    e = lo
    for _ in range(0, tl.maximum(hi - lo + 1, 0) * n_kb):
        k_ok = offs_K < K - kb * BLOCK_K  # ragged last K block reads zeros
        a = tl.load(a_ptrs, mask=mask_M[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & mask_N[None, :], other=0.0)
        sa = tl.load(as_ptr + kb + sa_offs, mask=mask_M, other=0.0)
        acc += tl.dot(a, b) * sa[:, None] * tl.load(sb_ptr)  # promotion to fp32 every 128 of K
        last = kb == n_kb - 1
        if last:
            tl.store(c_ptrs, cast_out(acc, c_ptr.dtype.element_ty),
                     mask=(expert_M == e)[:, None] & mask_N[None, :])
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        a_ptrs += tl.where(last, (1 - n_kb) * BLOCK_K, BLOCK_K)  # back to K block 0
        b_ptrs += tl.where(last, stride_be + (1 - n_kb) * BLOCK_K, BLOCK_K)  # next expert's K block 0
        sb_ptr += tl.where(last, stride_bse - kb, 1)
        kb = tl.where(last, 0, kb + 1)
        e += last.to(tl.int32)


def grouped_tuning_configs():
    """gemm's tiles, with BLOCK_N at most 128 (one scale block column per tile, see the kernel)."""
    configs = [c for c in tuning_configs() if c.kwargs["BLOCK_N"] <= TILE]
    # gemm's 64x256 in the other orientation: as many values per thread, and still 0 spills.
    configs.append(triton.Config({"BLOCK_M": 256, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=8, num_stages=3))
    return configs


# M (padded expert rows) follows the routing: bucketed to powers of two (duet_kernels/fp8/tuning.py).
_grouped_tuned = ConfigTable("grouped_gemm", grouped_tuning_configs(), ("M", "N", "K", "E", "out"), ("M",))


def grouped_gemm(a_fp8, a_scale, b_fp8, b_scale, m_indices, out_dtype=torch.bfloat16,
                 backend: str = "auto") -> torch.Tensor:
    """c [M, N]: row m = a[m] @ b[m_indices[m]].T, block-scaled; rows with m_indices -1 are zero.

    a_fp8 [M, K] with 1x128 scales [M, Kb]; b_fp8 [E, N, K] with 128x128 scales [E, Nb, Kb];
    m_indices [M] int (sorted by expert apart from -1 padding, as `contiguous_layout` builds).
    """
    M, K = a_fp8.shape
    E, N, Kw = b_fp8.shape
    if Kw != K or tuple(a_scale.shape) != (M, cdiv(K, TILE)) or tuple(b_scale.shape) != (E, cdiv(N, TILE),
                                                                                         cdiv(K, TILE)):
        raise ValueError(f"shapes do not fit: a {tuple(a_fp8.shape)} a_scale {tuple(a_scale.shape)} "
                         f"b {tuple(b_fp8.shape)} b_scale {tuple(b_scale.shape)}")
    if m_indices.shape != (M,):
        raise ValueError(f"m_indices must have shape ({M},), got {tuple(m_indices.shape)}")
    note_shape("grouped_gemm", M=M, N=N, K=K, E=E)
    if not use_triton(backend, a_fp8, b_fp8, m_indices):
        return ref.grouped_gemm(a_fp8, a_scale, b_fp8, b_scale, m_indices, out_dtype)
    a_fp8, b_fp8 = a_fp8.contiguous(), b_fp8.contiguous()
    a_scale, b_scale = a_scale.float().contiguous(), b_scale.float().contiguous()
    m_indices = m_indices.to(torch.int32).contiguous()
    c = torch.empty(M, N, dtype=out_dtype, device=a_fp8.device)
    if M == 0 or N == 0:
        return c
    if K == 0:  # an empty sum: the kernel's (expert, K block) loop would not run to store it
        return c.zero_()
    args = (a_fp8, a_scale, b_fp8, b_scale, c, m_indices, M, N, K, E,
            a_fp8.stride(0), a_scale.stride(0), b_fp8.stride(0), b_fp8.stride(1),
            b_scale.stride(0), b_scale.stride(1), c.stride(0))
    if interpreting():
        grid = (cdiv(M, INTERPRET_BLOCKS["BLOCK_M"]), cdiv(N, INTERPRET_BLOCKS["BLOCK_N"]))
        _grouped_gemm_kernel[grid](*args, BLOCK_K=TILE, **INTERPRET_BLOCKS)
    else:
        def run(cfg, out) -> None:
            grid = (cdiv(M, cfg.kwargs["BLOCK_M"]), cdiv(N, cfg.kwargs["BLOCK_N"]))
            _grouped_gemm_kernel[grid](*args[:4], out, *args[5:], BLOCK_K=TILE, **launch_options(cfg))

        key = _grouped_tuned.key(M=M, N=N, K=K, E=E, out=str(out_dtype))
        run(_grouped_tuned.pick(key, lambda cfg: benchmark(lambda: run(cfg, torch.empty_like(c)))), c)
    return c


# ----------------------------------------------------------------------------- k-grouped wgrad


@triton.jit
def _k_grouped_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, seg_ptr, M, N,
                      stride_am, stride_asm, stride_bn, stride_bsn, stride_bsk, stride_ce, stride_cm,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    """c[e] [M, N] fp32 = sum over the tokens of segment e of a[:, t] b[:, t] -- every expert's
    weight gradient in one launch (axis 1 = expert). Segments start at multiples of 128, so a
    segment's K loop is gemm_1x128's loop over its own token tiles (same products, same order)."""
    pid, e = tl.program_id(0), tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    # Say that lo is a multiple of 128: without it the offset operands lose their alignment, the
    # loads are no longer vectorised and the 128x128 tiles spill on sm90.
    lo = tl.multiple_of(tl.load(seg_ptr + e), 128)
    hi = tl.multiple_of(tl.load(seg_ptr + e + 1), 128)
    kb0 = lo // BLOCK_K
    # An empty segment runs no K block and stores zeros: every expert's gradient is written.
    acc = block_scaled_acc(a_ptr + lo, as_ptr + kb0, b_ptr + lo, bs_ptr + kb0 * stride_bsk,
                           pid_m * BLOCK_M, pid_n * BLOCK_N, M, N, hi - lo,
                           stride_am, stride_asm, stride_bn, stride_bsn, stride_bsk,
                           1, BLOCK_M, BLOCK_N, BLOCK_K)
    rows_M = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + e.to(tl.int64) * stride_ce + rows_M.to(tl.int64)[:, None] * stride_cm + cols_N[None, :]
    tl.store(c_ptrs, acc, mask=(rows_M < M)[:, None] & (cols_N < N)[None, :])


# P (tokens of the whole layout) follows the routing: bucketed; the weight shape and E are exact.
_k_grouped_tuned = ConfigTable("k_grouped_gemm", tuning_configs(), ("P", "M", "N", "E"), ("P",))


def k_grouped_gemm_1x128(a_fp8, a_scale, b_fp8, b_scale, offsets: list[int],
                         backend: str = "auto") -> torch.Tensor:
    """Weight gradients of all experts at once: c [E, M, N] fp32, c[e] = a[:, lo:hi] @ b[:, lo:hi].T
    over expert e's tokens lo = offsets[e], hi = offsets[e + 1] (host ints, multiples of 128).

    a_fp8 [M, P], b_fp8 [N, P], both 1x128-scaled along P (scales [M, P/128], [N, P/128]), as
    quantize_act_transposed gives them for the contiguous layout. Replaces one gemm_1x128 per
    expert (and the copies around it) with one launch.
    """
    M, P = a_fp8.shape
    N, E = b_fp8.shape[0], len(offsets) - 1
    if b_fp8.shape[1] != P or offsets[0] != 0 or offsets[-1] != P or any(o % TILE for o in offsets) \
            or any(hi < lo for lo, hi in zip(offsets, offsets[1:])):
        raise ValueError(f"k_grouped_gemm_1x128: a {tuple(a_fp8.shape)}, b {tuple(b_fp8.shape)} and offsets "
                         f"{offsets[:4]}... must share P, rise from 0 to P in multiples of {TILE}")
    note_shape("k_grouped_gemm_1x128", P=P, M=M, N=N, E=E)
    if not use_triton(backend, a_fp8, b_fp8):
        return ref.k_grouped_gemm_1x128(a_fp8, a_scale, b_fp8, b_scale, offsets)
    c = torch.empty(E, M, N, dtype=torch.float32, device=a_fp8.device)
    if M == 0 or N == 0 or E == 0:
        return c
    a_fp8, b_fp8 = a_fp8.contiguous(), b_fp8.contiguous()
    a_scale = a_scale.float().contiguous()
    b_scale = b_scale.float().t().contiguous()  # [Kb, N], as gemm_1x128 passes 1x128 b-scales
    seg = torch.tensor(offsets, dtype=torch.int32).to(a_fp8.device, non_blocking=True)
    args = (a_fp8, a_scale, b_fp8, b_scale, c, seg, M, N, a_fp8.stride(0), a_scale.stride(0),
            b_fp8.stride(0), b_scale.stride(1), b_scale.stride(0), c.stride(0), c.stride(1))
    if interpreting():
        grid = (cdiv(M, INTERPRET_BLOCKS["BLOCK_M"]) * cdiv(N, INTERPRET_BLOCKS["BLOCK_N"]), E)
        _k_grouped_kernel[grid](*args, BLOCK_K=TILE, **INTERPRET_BLOCKS)
        return c

    def run(cfg, out) -> None:
        grid = (cdiv(M, cfg.kwargs["BLOCK_M"]) * cdiv(N, cfg.kwargs["BLOCK_N"]), E)
        _k_grouped_kernel[grid](*args[:4], out, *args[5:], BLOCK_K=TILE, **launch_options(cfg))

    key = _k_grouped_tuned.key(P=P, M=M, N=N, E=E)
    run(_k_grouped_tuned.pick(key, lambda cfg: benchmark(lambda: run(cfg, torch.empty_like(c)))), c)
    return c


# ----------------------------------------------------------------------------- layout


@dataclass
class ContiguousLayout:
    """Where each routed row goes in the padded, expert-sorted layout, and back.

    m_indices  [M] int32  expert per padded row, -1 for padding
    src_rows   [M] int64  routed row feeding each padded row, -1 for padding
    dst_rows   [R] int64  padded row of each routed row, -1 if its expert id was negative
    rows_per_expert [E] int64  unpadded counts (for load statistics)
    """

    m_indices: torch.Tensor
    src_rows: torch.Tensor
    dst_rows: torch.Tensor
    rows_per_expert: torch.Tensor

    def gather(self, x_R: torch.Tensor) -> torch.Tensor:
        """x [R, ...] -> [M, ...] in layout order; padding rows are zero."""
        out = x_R.new_zeros((self.src_rows.numel(), *x_R.shape[1:]))
        keep = self.src_rows >= 0
        out[keep] = x_R[self.src_rows[keep]]
        return out

    def scatter(self, y_M: torch.Tensor) -> torch.Tensor:
        """[M, ...] -> [R, ...] back in routed-row order; rows that were not routed are zero."""
        out = y_M.new_zeros((self.dst_rows.numel(), *y_M.shape[1:]))
        keep = self.dst_rows >= 0
        out[keep] = y_M[self.dst_rows[keep]]
        return out


def contiguous_layout(expert_R: torch.Tensor, num_experts: int, alignment: int = TILE) -> ContiguousLayout:
    """Build the contiguous layout from one expert id per routed row (ids < 0 are skipped).

    For top-k routing pass the flattened [T * k] expert ids; row r then is token r // k.
    Each expert's segment is padded to a multiple of `alignment`; an expert with no rows
    gets no segment. One host sync (the padded total) is needed to size the output.
    """
    if alignment < 1:
        raise ValueError(f"alignment must be >= 1, got {alignment}")
    expert_R = expert_R.reshape(-1).long()
    device = expert_R.device
    valid = expert_R >= 0
    # Stable sort keeps the routed order within each expert; skipped rows sort last.
    key_R = torch.where(valid, expert_R, torch.full_like(expert_R, num_experts))
    order = torch.sort(key_R, stable=True).indices
    counts_E = torch.bincount(expert_R[valid], minlength=num_experts)[:num_experts]
    padded_E = (counts_E + alignment - 1) // alignment * alignment
    start_E = torch.cumsum(counts_E, 0) - counts_E  # first sorted position of each expert
    pad_start_E = torch.cumsum(padded_E, 0) - padded_E  # first padded row of each expert
    M = int(padded_E.sum())

    n_valid = int(valid.sum())
    sorted_rows = order[:n_valid]
    sorted_expert = expert_R[sorted_rows]
    dst_sorted = pad_start_E[sorted_expert] + (torch.arange(n_valid, device=device) - start_E[sorted_expert])

    m_indices = torch.full((M,), -1, dtype=torch.int32, device=device)
    src_rows = torch.full((M,), -1, dtype=torch.int64, device=device)
    dst_rows = torch.full((expert_R.numel(),), -1, dtype=torch.int64, device=device)
    m_indices[dst_sorted] = sorted_expert.to(torch.int32)
    src_rows[dst_sorted] = sorted_rows
    dst_rows[sorted_rows] = dst_sorted
    return ContiguousLayout(m_indices, src_rows, dst_rows, counts_E)
