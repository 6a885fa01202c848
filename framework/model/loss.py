"""Cross-entropy of the output head without the full logits tensor.

`head_cross_entropy(h_ND, weight_VD, targets_N)` equals
`F.cross_entropy(F.linear(h, weight).float(), targets)` (mean over the rows whose target is not
ignore_index), in value and gradients, but never holds more than `rows_per_chunk` rows of
logits: per chunk, the logits' fused log_softmax gives the loss, and softmax - onehot feeds the
two GEMMs of the head's gradient -- in forward when the head's weight gradient is small (then
forward keeps the two gradients), else in backward from recomputed logits (then forward keeps
the head's input, which it needs anyway); _HeadCrossEntropy says which when.
At DeepSeek-V3's 129,280-token vocabulary a 4,096-token micro-batch's logits, log-softmax and
gradient would take gigabytes per output head on the last pipeline stage; here it is one chunk's
worth.

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


def _softmax_grad_(p_CV: torch.Tensor, t_C: torch.Tensor, scale_C: torch.Tensor) -> torch.Tensor:
    """softmax -> (softmax - onehot(t)) * scale per row, in place (scale 0 drops ignored rows)."""
    p_CV.scatter_add_(1, t_C[:, None], torch.full_like(p_CV[:, :1], -1.0))
    return p_CV.mul_(scale_C[:, None])


class _HeadCrossEntropy(torch.autograd.Function):
    """Two ways to the same numbers. `eager` (the head's fp32 weight gradient, V x D, is no larger
    than one chunk of logits: small vocabularies or models): the gradients are computed in forward
    chunk by chunk, from the softmax the loss already has, and backward only scales them -- the
    head's three GEMMs, as without chunking. Otherwise (V3: a 3.7 GB weight gradient per head
    call) forward keeps the head's input and backward recomputes each chunk's logits -- one more
    GEMM, nothing V-sized kept between forward and backward."""

    @staticmethod
    def forward(ctx, h_ND, weight_VD, targets_N, chunk: int, ignore_index: int, eager: bool):
        dtype = _compute_dtype(h_ND)
        need_h, need_w = ctx.needs_input_grad[0] and eager, ctx.needs_input_grad[1] and eager
        with torch.autocast(h_ND.device.type, enabled=False):
            h_c, w_c = h_ND.to(dtype), weight_VD.to(dtype)
            keep_N = targets_N != ignore_index
            count = keep_N.sum()
            scale_N = keep_N / count  # d mean / d row loss (0 for ignored rows)
            t_N = targets_N.clamp(min=0)  # ignored rows read column 0, then drop out
            nll_N = torch.empty(h_ND.shape[0], dtype=torch.float32, device=h_ND.device)
            grad_h_ND = torch.empty_like(h_c) if need_h else None
            grad_w_VD = torch.zeros(w_c.shape, dtype=torch.float32, device=w_c.device) if need_w else None
            for lo in range(0, h_ND.shape[0], chunk):
                rows = slice(lo, lo + chunk)
                # log_softmax is one fused pass; logsumexp alone takes several (3x slower on CPU)
                logp_CV = torch.log_softmax(F.linear(h_c[rows], w_c).float(), dim=-1)
                nll_N[rows] = logp_CV.gather(1, t_N[rows, None])[:, 0].neg_()
                if need_h or need_w:
                    g_CV = _softmax_grad_(logp_CV.exp_(), t_N[rows], scale_N[rows]).to(dtype)
                    if need_h:
                        grad_h_ND[rows] = g_CV @ w_c
                    if need_w:
                        grad_w_VD += (g_CV.T @ h_c[rows]).float()
            loss = (nll_N * keep_N).sum() / count
        if eager:
            ctx.save_for_backward(grad_h_ND, grad_w_VD)
        else:
            ctx.save_for_backward(h_c, w_c, t_N, scale_N)
        ctx.chunk, ctx.eager, ctx.dtypes = chunk, eager, (h_ND.dtype, weight_VD.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.eager:
            grad_h_ND, grad_w_VD = ctx.saved_tensors
        else:
            grad_h_ND, grad_w_VD = _recomputed_grads(*ctx.saved_tensors, ctx.chunk, need_h, need_w)
        grad_loss = grad_loss.float()
        grad_h = (grad_h_ND * grad_loss).to(ctx.dtypes[0]) if need_h else None
        grad_w = (grad_w_VD * grad_loss).to(ctx.dtypes[1]) if need_w else None
        return grad_h, grad_w, None, None, None, None


def _recomputed_grads(h_c, w_c, t_N, scale_N, chunk: int, need_h: bool, need_w: bool):
    """Gradients of the mean loss (before grad_loss) from each chunk's recomputed logits."""
    grad_h_ND = torch.empty_like(h_c) if need_h else None
    grad_w_VD = torch.zeros(w_c.shape, dtype=torch.float32, device=w_c.device) if need_w else None
    with torch.autocast(h_c.device.type, enabled=False):
        for lo in range(0, h_c.shape[0], chunk):
            rows = slice(lo, lo + chunk)
            p_CV = torch.softmax(F.linear(h_c[rows], w_c).float(), dim=-1)  # one fused pass
            g_CV = _softmax_grad_(p_CV, t_N[rows], scale_N[rows]).to(w_c.dtype)
            if need_h:
                grad_h_ND[rows] = g_CV @ w_c
            if need_w:
                # the GEMM in the compute dtype, summed over chunks in fp32 (the master grad's)
                grad_w_VD += (g_CV.T @ h_c[rows]).float()
    return grad_h_ND, grad_w_VD


def head_cross_entropy(h_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                       chunk: int | None = None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of the head `weight_VD` applied to h_ND against targets_N (module
    docstring); `chunk` rows of logits at a time (default: rows_per_chunk(V))."""
    chunk = rows_per_chunk(weight_VD.shape[0]) if chunk is None else chunk
    V, D = weight_VD.shape
    wants_grad = torch.is_grad_enabled() and (h_ND.requires_grad or weight_VD.requires_grad)
    eager = wants_grad and D <= chunk  # the weight gradient is no larger than a chunk of logits
    return _HeadCrossEntropy.apply(h_ND, weight_VD, targets_N, chunk, ignore_index, eager)
