"""Weight-gradient split (zero bubble): a backward computes input gradients now and queues the
weight-gradient GEMMs of linear layers and routed experts to run later, FIFO.

    split_weight_grads(model)            # once: nn.Linear, GroupedExperts -> their Split* twins
    with capture() as work:              # inside: weight GEMMs are queued on `work`, not run
        torch.autograd.backward(...)
    work.run()                           # later (a W action): accumulate the weight gradients

Outside `capture()` the converted modules compute the same gradients as the originals.
Deferred gradients are added straight into `.grad` (autograd sees no gradient for those
weights), so run every queued batch before reading or reducing gradients. Other
parameters (norms, embedding, the router gate) get their gradients during backward as usual.

The arithmetic is the same as autograd's for F.linear (grad_W = g^T x summed over rows, in the
weight's dtype), so results equal the unsplit backward up to summation order.

Legend: M rows, I input features, O output features, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from duet_kernels.deferred import WeightGradWork, capture, current, defer_or_return  # noqa: F401 (re-export)
from framework.model.moe import GroupedExperts


class _SplitLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        # The parameter itself, for the deferred accumulation: under activation recompute the
        # saved tensors come back as recomputed aliases, not the parameter.
        ctx.param = weight
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_out @ weight.to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            g_MO = grad_out.reshape(-1, grad_out.shape[-1])
            x_MI = x.reshape(-1, x.shape[-1])
            grad_w = defer_or_return(ctx.param, lambda: (g_MO.T @ x_MI.to(g_MO.dtype)).to(weight.dtype))
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


class SplitGroupedExperts(GroupedExperts):
    """GroupedExperts whose three grouped GEMMs defer their weight gradients: the same grouped
    function (framework.model.moe.grouped_swiglu), with defer_or_return as its weight-gradient
    hook. Outside capture() the hook computes the gradient at once and returns it to autograd."""

    weight_grad = staticmethod(defer_or_return)


def split_weight_grads(model: nn.Module) -> nn.Module:
    """Convert in place (class swap, parameters untouched). FP8 layers keep their own backward."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = SplitLinear
        elif type(module) is GroupedExperts:
            module.__class__ = SplitGroupedExperts
    return model
