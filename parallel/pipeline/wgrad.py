"""Weight-gradient split (zero bubble): a backward computes input gradients now and queues the
weight-gradient GEMMs of linear layers and routed experts to run later, FIFO.

    split_weight_grads(model)            # once: nn.Linear, GroupedExperts -> their Split* twins
    with capture() as work:              # inside: weight GEMMs are queued on `work`, not run
        torch.autograd.backward(...)
    work.run()                           # later (a W action): accumulate the weight gradients

Outside `capture()` the converted modules compute the same gradients as the originals.
Deferred gradients are added straight into `.grad` (autograd sees no gradient for those
weights; the experts' always go that way), so run every queued batch before reading or
reducing gradients. Other
parameters (norms, embedding, the router gate) get their gradients during backward as usual.

The arithmetic is the same as autograd's for F.linear (grad_W = g^T x summed over rows, in the
weight's dtype), so results equal the unsplit backward up to summation order.

Legend: M rows, I input features, O output features, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from framework.model.moe import GroupedExperts
from kernels.deferred import WeightGradWork, capture, current, defer_or_return  # noqa: F401 (re-export)


class _SplitLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_out @ weight.to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            g_MO = grad_out.reshape(-1, grad_out.shape[-1])
            x_MI = x.reshape(-1, x.shape[-1])
            grad_w = defer_or_return(weight, lambda: (g_MO.T @ x_MI.to(g_MO.dtype)).to(weight.dtype))
        return grad_x, grad_w


class SplitLinear(nn.Linear):
    """nn.Linear (no bias) whose weight gradient can be deferred. Under autocast the inputs are
    cast the way autocast casts F.linear's, then autocast is off inside."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None or not self.weight.requires_grad:
            return super().forward(x)
        device = x.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            with torch.autocast(device, enabled=False):
                return _SplitLinearFn.apply(x.to(dtype), self.weight.to(dtype))
        return _SplitLinearFn.apply(x, self.weight)


class _ExpertMatmulFn(torch.autograd.Function):
    """x_MI @ w_EOI[e].T for one expert e; the weight gradient lands in w.grad[e] (deferrable)."""

    @staticmethod
    def forward(ctx, x, w, e: int):
        ctx.save_for_backward(x, w)
        ctx.e = e
        return x @ w[e].T

    @staticmethod
    def backward(ctx, grad_out):
        x, w = ctx.saved_tensors
        e = ctx.e
        grad_x = grad_out @ w[e] if ctx.needs_input_grad[0] else None
        if ctx.needs_input_grad[1]:
            # Straight into w.grad[e], now or when the queue runs: returning a gradient to
            # autograd would need a dense [E, O, I] buffer per expert matmul.
            work = current()
            if work is None:
                _accumulate_slice(w, e, grad_out.T @ x)
            else:
                work.closures.append(lambda: _accumulate_slice(w, e, grad_out.T @ x))
        return grad_x, None, None


def _accumulate_slice(w: torch.Tensor, e: int, grad: torch.Tensor) -> None:
    if w.grad is None:
        w.grad = torch.zeros_like(w)
    w.grad[e].add_(grad.to(w.dtype))


class SplitGroupedExperts(GroupedExperts):
    """GroupedExperts whose three expert GEMMs can defer their weight gradients."""

    def grouped_swiglu(self, x_MD: torch.Tensor, count_E: torch.Tensor) -> torch.Tensor:
        out, start = [], 0
        for e, n in enumerate(count_E.tolist()):
            if n:
                xe = x_MD[start:start + n]
                gate = _ExpertMatmulFn.apply(xe, self.w1, e)
                up = _ExpertMatmulFn.apply(xe, self.w3, e)
                out.append(_ExpertMatmulFn.apply(F.silu(gate) * up, self.w2, e))
                start += n
        return torch.cat(out) if out else x_MD.new_zeros(0, self.w2.shape[1])


def split_weight_grads(model: nn.Module) -> nn.Module:
    """Convert in place (class swap, parameters untouched). FP8 layers keep their own backward."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = SplitLinear
        elif type(module) is GroupedExperts:
            module.__class__ = SplitGroupedExperts
    return model
