"""Cross-entropy of the output head without the full logits tensor.

`head_cross_entropy(h_ND, weight_VD, targets_N)` equals
`F.cross_entropy(F.linear(h, weight).float(), targets)` (mean over the rows whose target is not
ignore_index), in value and gradients, but never holds more than `rows_per_chunk` rows of
logits: forward keeps nothing but the head's input it needs anyway; backward recomputes each
chunk's logits, turns them into softmax - onehot and feeds the two GEMMs of the head's gradient.
At DeepSeek-V3's 129,280-token vocabulary a 4,096-token micro-batch's logits, log-softmax and
gradient would take gigabytes per output head on the last pipeline stage; here it is one chunk's
worth, at the price of one more head GEMM in backward.

Precision follows the head's nn.Linear: under autocast the logits GEMM runs in autocast's dtype
and the softmax in fp32 (duet's loss casts the logits to fp32 before cross_entropy), and the
gradient GEMMs run in the same dtype, as autograd would run them.

Legend: N rows (tokens), D model dim, V vocabulary, C rows of one chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # F.cross_entropy's default
# Logit elements per chunk: 4 M fp32 values (16 MiB) keep a chunk's softmax cheap to revisit; at
# least 64 rows keep the GEMMs from getting too thin (V3's vocabulary: 64 rows, 33 MiB).
CHUNK_ELEMENTS = 1 << 22
MIN_ROWS = 64


def rows_per_chunk(vocab: int) -> int:
    return max(MIN_ROWS, CHUNK_ELEMENTS // vocab)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, weight_VD, targets_N, chunk: int, ignore_index: int):
        dtype = _compute_dtype(h_ND)
        with torch.autocast(h_ND.device.type, enabled=False):
            h_c, w_c = h_ND.to(dtype), weight_VD.to(dtype)
            nll_N = torch.empty(h_ND.shape[0], dtype=torch.float32, device=h_ND.device)
            for lo in range(0, h_ND.shape[0], chunk):
                # log_softmax is one fused pass; logsumexp alone takes several (3x slower on CPU)
                logp_CV = torch.log_softmax(F.linear(h_c[lo:lo + chunk], w_c).float(), dim=-1)
                t_C = targets_N[lo:lo + chunk].clamp(min=0)  # ignored rows read column 0, then drop out
                nll_N[lo:lo + chunk] = logp_CV.gather(1, t_C[:, None])[:, 0].neg_()
            keep_N = targets_N != ignore_index
            count = keep_N.sum()
            loss = torch.where(keep_N, nll_N, 0.0).sum() / count
        ctx.save_for_backward(h_c, w_c, targets_N, count)
        ctx.chunk, ctx.ignore_index = chunk, ignore_index
        ctx.dtypes = (h_ND.dtype, weight_VD.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        h_c, w_c, targets_N, count = ctx.saved_tensors
        chunk, ignore_index = ctx.chunk, ctx.ignore_index
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h_ND = torch.empty_like(h_c) if need_h else None
        grad_w_VD = torch.zeros(w_c.shape, dtype=torch.float32, device=w_c.device) if need_w else None
        scale = grad_loss.float() / count  # d loss / d logit = (softmax - onehot) * scale, kept rows
        with torch.autocast(h_c.device.type, enabled=False):
            for lo in range(0, h_c.shape[0], chunk):
                h_CD, t_C = h_c[lo:lo + chunk], targets_N[lo:lo + chunk]
                g_CV = torch.softmax(F.linear(h_CD, w_c).float(), dim=-1)  # recomputed, one fused pass
                keep_C = t_C != ignore_index
                g_CV.scatter_add_(1, t_C.clamp(min=0)[:, None], torch.full_like(g_CV[:, :1], -1.0))
                g_CV.mul_(torch.where(keep_C, scale, 0.0)[:, None])
                g_CV = g_CV.to(w_c.dtype)
                if need_h:
                    grad_h_ND[lo:lo + chunk] = g_CV @ w_c
                if need_w:
                    # the GEMM in the compute dtype, summed over chunks in fp32 (the master grad's)
                    grad_w_VD += (g_CV.T @ h_CD).float()
        grad_h = grad_h_ND.to(ctx.dtypes[0]) if need_h else None
        grad_w = grad_w_VD.to(ctx.dtypes[1]) if need_w else None
        return grad_h, grad_w, None, None, None


def head_cross_entropy(h_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                       chunk: int | None = None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of the head `weight_VD` applied to h_ND against targets_N (module
    docstring); `chunk` rows of logits at a time (default: rows_per_chunk(V))."""
    chunk = rows_per_chunk(weight_VD.shape[0]) if chunk is None else chunk
    return _HeadCrossEntropy.apply(h_ND, weight_VD, targets_N, chunk, ignore_index)
