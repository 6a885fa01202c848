"""Causal attention for CPUs: PyTorch's flash forward with a blocked-GEMM backward.

PyTorch's CPU flash-attention forward is fast in bf16, but its backward is not: at MLA's shapes
(head dim 192, torch 2.13, 2 threads with AMX) the backward takes 86% of the core's time (4 x 512
tokens: 32 ms forward, 207 ms backward). This backward instead walks query blocks of BLOCK rows,
each against the keys it can see (the causal prefix), with large batched GEMMs in the input dtype,
recomputing the probabilities from the forward's log-sum-exp. On this kind of CPU the elementwise
passes over the scores cost as much as the GEMMs, so there are two (exp, and dS = p * (dP - D)):
the softmax scale, the causal mask and the sums of dK and dV over blocks ride in the GEMMs
(baddbmm's alpha, additive input and beta), and the large GEMM operands are laid out so that
oneDNN reads them without a copy (see backward; a short block's key prefix and the column slices
in the dK/dV products are still copied).

Precision. A bf16 GEMM rounds its output to bf16. Rounding the scores q.k (magnitude up to tens)
would put an error of |s| * 2^-9 into every exp; so the GEMM computes s - lse directly, by
appending the log-sum-exp as two extra columns of q (a bf16 high part and the remainder) against
columns of ones in k. What gets rounded is then about log p, which is small where p matters. The
same trick folds the softmax-backward row term D = rowsum(dO * O) into dP = dO v^T, so dP - D is
what gets rounded; a power-of-two shift per query row (see backward) keeps log p + c small at
flat attention too. dK and dV are summed over query blocks in the input dtype. Measured against
fp64 (tests/test_speed_paths.py), the gradients' error is 1.0-1.5x that of PyTorch's own bf16
flash backward, which keeps fp32 scores; in fp64 the two agree to 1e-10.

Legend: B batch, H heads, Z = B * H, T sequence, S visible keys (the causal prefix of a block),
K q/k head dim, V value head dim, Q query rows of one block.
"""

from __future__ import annotations

import math

import torch

BLOCK = 256  # query rows per backward block (of 128, 256 and 512 the fastest at 4 x 512 and 1 x 2048)


def _with_hi_lo(x_BHTK: torch.Tensor, c_BHT: torch.Tensor) -> torch.Tensor:
    """x with two columns appended that hold c (fp32 or fp64) as a high part in x's dtype plus the rest."""
    hi = c_BHT.to(x_BHTK.dtype)
    lo = (c_BHT - hi.to(c_BHT.dtype)).to(x_BHTK.dtype)
    return torch.cat([x_BHTK, hi.unsqueeze(-1), lo.unsqueeze(-1)], dim=-1)


def _padded(x_BHTK: torch.Tensor, n: int, value: float) -> torch.Tensor:
    """x with n columns of value appended. (F.pad fills the whole output before copying x in.)"""
    W = x_BHTK.shape[-1]
    out_BHTX = x_BHTK.new_empty(*x_BHTK.shape[:-1], W + n)
    out_BHTX[..., :W] = x_BHTK
    out_BHTX[..., W:] = value
    return out_BHTX


def _ones_columns(x_BHSK: torch.Tensor) -> torch.Tensor:
    return _padded(x_BHSK, 2, 1.0)


def _causal_mask_SQ(start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
    """Added to the transposed scores of queries start:end against keys :end: 0 where the key
    may be seen (s <= q), -inf where it may not, so exp gives exactly 0 there."""
    mask_SQ = torch.zeros(end, end - start, dtype=dtype)
    mask_SQ[start:] = torch.full((end - start, end - start), float("-inf"), dtype=dtype).tril_(-1)
    return mask_SQ


class FlashBlockedBackward(torch.autograd.Function):
    """softmax(q k^T * scale, causal) v for q_BHTK, k_BHTK, v_BHTV (V <= K) -> o_BHTV."""

    @staticmethod
    def forward(ctx, q_BHTK, k_BHTK, v_BHTV, scale: float):
        K, V = q_BHTK.shape[-1], v_BHTV.shape[-1]
        v_pad_BHTK = _padded(v_BHTV, K - V, 0.0)  # flash needs one head dim; zero columns add nothing
        o_BHTK, lse_BHT = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_BHTK, k_BHTK, v_pad_BHTK, 0.0, True, scale=scale)[:2]
        o_BHTV = o_BHTK[..., :V]
        ctx.save_for_backward(q_BHTK, k_BHTK, v_BHTV, o_BHTV, lse_BHT)
        ctx.scale = scale
        return o_BHTV

    @staticmethod
    def backward(ctx, do_BHTV):
        q_BHTK, k_BHTK, v_BHTV, o_BHTV, lse_BHT = ctx.saved_tensors
        scale, dtype, (B, H, T, K), V = ctx.scale, q_BHTK.dtype, q_BHTK.shape, v_BHTV.shape[-1]
        Z = B * H
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        d_BHT = (do_BHTV * o_BHTV).sum(-1, dtype=acc)
        # What the GEMM rounds is log p + c for a query that sees n keys, with c about log(n) / 2:
        # half of |log p| both where attention is flat (log p ~ -log n) and where it is peaked
        # (log p ~ 0 at the keys that matter). c is a whole number of ln 2, so the factor e^-c it
        # leaves in p is a power of two, taken out exactly by scaling do's rows (and D) by it:
        # then dV = p'^T (do e^-c) and dS = p' * (dP - D) e^-c are the true ones.
        shift_T = torch.arange(1, T + 1, dtype=acc).log2_().mul_(0.5).round_()
        row_T1 = torch.exp2(-shift_T)[:, None]
        # oneDNN copies a transposed operand unless its batch stride is whole (so the query-side
        # operands are built per block, each contiguous) and any operand that is a column slice
        # (so dq is formed against k with its ones columns, and those two columns dropped).
        c_BHT = (shift_T * math.log(2.0) - lse_BHT) / scale
        do_BHTV = do_BHTV * row_T1.to(dtype)
        dn_BHT = -d_BHT * row_T1[:, 0]
        # 3-D views (Z = B * H) for baddbmm, which folds the softmax scale, the causal mask and the
        # dK/dV accumulation into the GEMMs: each is applied to the fp32 accumulator before the one
        # rounding to the output dtype, and no pass over the scores is spent on them.
        k1_ZTK = _ones_columns(k_BHTK).view(Z, T, K + 2)
        v1_ZTV = _ones_columns(v_BHTV).view(Z, T, V + 2)
        dq_ZTK = torch.empty(Z, T, K, dtype=dtype)
        dk_ZTK = torch.empty(Z, T, K, dtype=dtype)
        dv_ZTV = torch.empty(Z, T, V, dtype=dtype)
        for start in reversed(range(0, T, BLOCK)):  # the last block sees every key: it starts dK and dV
            end = min(T, start + BLOCK)
            Q = end - start
            beta = 0.0 if end == T else 1.0  # (beta 0 ignores the empty buffers' contents)
            qa_ZQK = _with_hi_lo(q_BHTK[..., start:end, :], c_BHT[..., start:end]).view(Z, Q, K + 2)
            doa_ZQV = _with_hi_lo(do_BHTV[..., start:end, :], dn_BHT[..., start:end]).view(Z, Q, V + 2)
            # Scores transposed (keys x queries), so every large operand is read as stored.
            pT_ZSQ = torch.baddbmm(_causal_mask_SQ(start, end, dtype), k1_ZTK[:, :end],
                                   qa_ZQK.transpose(-1, -2), alpha=scale)  # log p + c
            pT_ZSQ.exp_()
            dv_ZTV[:, :end].baddbmm_(pT_ZSQ, doa_ZQV[..., :V], beta=beta)
            dsT_ZSQ = torch.bmm(v1_ZTV[:, :end], doa_ZQV.transpose(-1, -2)).mul_(pT_ZSQ)  # dS / scale
            dk_ZTK[:, :end].baddbmm_(dsT_ZSQ, qa_ZQK[..., :K], beta=beta, alpha=scale)
            dq_ZQK1 = torch.bmm(dsT_ZSQ.transpose(-1, -2), k1_ZTK[:, :end])
            torch.mul(dq_ZQK1[..., :K], scale, out=dq_ZTK[:, start:end])
        return dq_ZTK.view(B, H, T, K), dk_ZTK.view(B, H, T, K), dv_ZTV.view(B, H, T, V), None


def causal_attention(q_BHTK: torch.Tensor, k_BHTK: torch.Tensor, v_BHTV: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Causal attention on CPU tensors of one dtype with v's head dim at most q's."""
    with torch.autocast("cpu", enabled=False):
        return FlashBlockedBackward.apply(q_BHTK, k_BHTK, v_BHTV, scale)
