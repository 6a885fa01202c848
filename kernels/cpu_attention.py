"""Causal attention for CPUs: PyTorch's flash forward with a blocked-GEMM backward.

PyTorch's CPU flash-attention forward is fast in bf16, but its backward is not: at MLA's shapes
(head dim 192, torch 2.13, 2 threads with AMX) the backward takes 86% of the core's time (4 x 512
tokens: 32 ms forward, 207 ms backward). This backward instead walks query blocks of BLOCK rows,
each against the keys it can see (the causal prefix), with large batched GEMMs in the input dtype,
recomputing the probabilities from the forward's log-sum-exp. On this kind of CPU the elementwise
passes over the scores cost as much as the GEMMs, so there are three (exp, mask of the diagonal
block, dS = p * (dP - D)) and no large transposed operand (oneDNN copies those).

Precision. A bf16 GEMM rounds its output to bf16. Rounding the scores q.k (magnitude up to tens)
would put an error of |s| * 2^-9 into every exp; so the GEMM computes s - lse directly, by
appending the log-sum-exp as two extra columns of q (a bf16 high part and the remainder) against
columns of ones in k. What gets rounded is then about log p, which is small where p matters. The
same trick folds the softmax-backward row term D = rowsum(dO * O) into dP = dO v^T, so dP - D is
what gets rounded. dK and dV are summed over query blocks in the input dtype. Measured against
fp64 (tests/test_speed_paths.py), the gradients' error is 1.0-1.7x that of PyTorch's own bf16
flash backward, which keeps fp32 scores; in fp64 the two agree to 1e-10.

Legend: B batch, H heads, T sequence, S visible keys (the causal prefix of a block), K q/k head
dim, V value head dim, Q query rows of one block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BLOCK = 256  # query rows per backward block (128 and 512 measured slower at 4 x 512 and 1 x 2048)


def _with_hi_lo(x_BHQK: torch.Tensor, c_BHQ: torch.Tensor) -> torch.Tensor:
    """x with two columns appended that hold c (fp32 or fp64) as a high part in x's dtype plus the rest."""
    hi = c_BHQ.to(x_BHQK.dtype)
    lo = (c_BHQ - hi.to(c_BHQ.dtype)).to(x_BHQK.dtype)
    return torch.cat([x_BHQK, hi.unsqueeze(-1), lo.unsqueeze(-1)], dim=-1)


def _ones_columns(x_BHSK: torch.Tensor) -> torch.Tensor:
    return F.pad(x_BHSK, (0, 2), value=1.0)


class FlashBlockedBackward(torch.autograd.Function):
    """softmax(q k^T * scale, causal) v for q_BHTK, k_BHTK, v_BHTV (V <= K) -> o_BHTV."""

    @staticmethod
    def forward(ctx, q_BHTK, k_BHTK, v_BHTV, scale: float):
        K, V = q_BHTK.shape[-1], v_BHTV.shape[-1]
        v_pad_BHTK = F.pad(v_BHTV, (0, K - V))  # flash needs one head dim; zero columns add nothing
        o_BHTK, lse_BHT = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_BHTK, k_BHTK, v_pad_BHTK, 0.0, True, scale=scale)[:2]
        o_BHTV = o_BHTK[..., :V]
        ctx.save_for_backward(q_BHTK, k_BHTK, v_BHTV, o_BHTV, lse_BHT)
        ctx.scale = scale
        return o_BHTV

    @staticmethod
    def backward(ctx, do_BHTV):
        q_BHTK, k_BHTK, v_BHTV, o_BHTV, lse_BHT = ctx.saved_tensors
        scale, dtype, T = ctx.scale, q_BHTK.dtype, q_BHTK.shape[-2]
        # The model hands over transposed views (B T H K -> B H T K); one copy here saves a copy
        # of every block's operands inside the GEMMs.
        q_BHTK, k_BHTK, v_BHTV = q_BHTK.contiguous(), k_BHTK.contiguous(), v_BHTV.contiguous()
        do_BHTV = do_BHTV.to(dtype).contiguous()
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        d_BHT = (do_BHTV * o_BHTV).sum(-1, dtype=acc)
        k1_BHTK, v1_BHTV = _ones_columns(k_BHTK), _ones_columns(v_BHTV)
        kT_BHKT = k_BHTK.transpose(-1, -2).contiguous()
        dq_BHTK = torch.empty_like(q_BHTK)
        dk_BHTK = torch.zeros_like(k_BHTK)
        dv_BHTV = torch.zeros_like(v_BHTV)
        for start in range(0, T, BLOCK):
            end = min(T, start + BLOCK)
            q_BHQK, do_BHQV = q_BHTK[..., start:end, :], do_BHTV[..., start:end, :]
            # Scores are formed transposed (keys x queries) so that every large operand below is
            # read in its stored order: a transposed bf16 operand costs oneDNN a copy.
            # What the GEMM rounds is log p + c for a query that sees n keys, with c about
            # log(n) / 2: half of |log p| both where attention is flat (log p ~ -log n) and
            # where it is peaked (log p ~ 0 at the keys that matter). c is a whole number of
            # ln 2, so the factor e^-c it leaves in p is a power of two, taken out exactly on
            # the small operands (do, q and dq rows) instead of on the scores.
            shift_Q = torch.arange(start + 1, end + 1, dtype=acc).log2().mul_(0.5).round_()
            half_log_n_Q = shift_Q * math.log(2.0)
            row_Q = torch.exp2(-shift_Q).to(dtype)
            qa_BHKQ = _with_hi_lo(q_BHQK, (half_log_n_Q - lse_BHT[..., start:end]) / scale).transpose(-1, -2)
            pT_BHSQ = (k1_BHTK[..., :end, :] @ qa_BHKQ).mul_(scale)  # log p (module docstring)
            diag_QQ = torch.ones(end - start, end - start, dtype=torch.bool).tril(-1)
            pT_BHSQ[..., start:, :].masked_fill_(diag_QQ, float("-inf"))
            pT_BHSQ.exp_()
            dv_BHTV[..., :end, :] += pT_BHSQ @ (do_BHQV * row_Q[:, None])
            # dS / scale = p * (dP - D), with dP - D formed inside the GEMM.
            doa_BHVQ = _with_hi_lo(do_BHQV, -d_BHT[..., start:end]).transpose(-1, -2)
            dsT_BHSQ = (v1_BHTV[..., :end, :] @ doa_BHVQ).mul_(pT_BHSQ)
            dk_BHTK[..., :end, :] += dsT_BHSQ @ (q_BHQK * row_Q[:, None])
            dq_BHTK[..., start:end, :] = (kT_BHKT[..., :end] @ dsT_BHSQ).transpose(-1, -2) * row_Q[:, None]
        return dq_BHTK.mul_(scale), dk_BHTK.mul_(scale), dv_BHTV, None


def causal_attention(q_BHTK: torch.Tensor, k_BHTK: torch.Tensor, v_BHTV: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Causal attention on CPU tensors of one dtype with v's head dim at most q's."""
    with torch.autocast("cpu", enabled=False):
        return FlashBlockedBackward.apply(q_BHTK, k_BHTK, v_BHTV, scale)
