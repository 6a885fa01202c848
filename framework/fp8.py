"""DeepSeek-V3's FP8 training recipe, applied to a built duet model.

    apply_fp8(model)   # in place; returns the model

converts the GEMMs the recipe runs in FP8 e4m3 (fprop, dgrad and wgrad) and leaves the rest:

| converted (FP8 GEMMs)                                   | untouched (model precision)       |
|---------------------------------------------------------|-----------------------------------|
| MLA projections wq_a wq_b wq wkv_a wkv_b wo             | embedding, output head            |
| dense MLP and shared experts w1 w2 w3                   | router / gate (fp32 by design)    |
| MTP eh_proj (a plain linear layer, so the recipe's too) | RMSNorms, RoPE, attention core    |
| routed experts (grouped, contiguous layout)             |                                   |

Conversion swaps the class of each selected module for a subclass that overrides only the
forward (the trick torch.nn.utils.parametrize uses). Module and parameter identities,
names, shapes and dtypes stay the same, so a converted model has the same state_dict
(checkpoints, resharding and HF export are unaffected), an optimizer or pipeline stage
built before the conversion keeps working, and converting twice changes nothing. The
model files need no precision code: FP8 lives here and in duet_kernels/fp8.

Weights stay FP32 masters and are quantised (128x128 blocks) on the forward -- once per
optimizer step when the step runs inside `fp8_weight_cache()` (micro-batches reuse the bytes),
else on every forward; activations and output gradients are quantised per 1x128 tile, wgrad
operands per 128x1 tile. The routed experts' weight gradients run as one k-grouped launch.

Legend: M routed rows sorted by expert, P rows of the padded contiguous layout (segments
of multiples of 128), D model dim, I expert inner dim, E experts, *_fp8 float8_e4m3fn with
fp32 scales *_s.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from duet_kernels.deferred import defer_or_return
from duet_kernels.fp8 import (
    TILE,
    dequantize_act,
    fp8_linear,
    grouped_gemm,
    k_grouped_gemm_1x128,
    quantize_act,
    quantize_act_transposed,
    quantize_weight_once,
    weight_cache,
)
from duet_kernels.fp8.tuning import warming_up
from framework.model.attention import MLA
from framework.model.mlp import MLP
from framework.model.moe import ExpertRows, GroupedExperts
from framework.model.mtp import MTPModule

FP8_COMPUTE = "fp8"
# Around one optimizer step's forward/backward passes: each weight quantised once, not per
# micro-batch. Around the first step (or a warm-up): the FP8 GEMMs may tune even multi-rank.
fp8_weight_cache = weight_cache
fp8_warming_up = warming_up


def companion_compute(device: torch.device) -> str:
    """Precision of what FP8 leaves alone: bf16 autocast on GPU (V3's recipe), fp32 on CPU,
    where bf16 matmuls run about ten times slower than fp32."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


@contextlib.contextmanager
def _fp8_region(x: torch.Tensor):
    """Cast x as autocast would for a GEMM, then switch autocast off inside: the reference
    kernels' fp32 matmuls must not be rerouted to bf16, and the output dtype follows x, as
    an nn.Linear's does under autocast."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        x = x.to(torch.get_autocast_dtype(device))
    with torch.autocast(device, enabled=False):
        yield x


# ----------------------------------------------------------------------------- linear layers


class Float8Linear(nn.Linear):
    """nn.Linear whose three GEMMs run in FP8 (duet_kernels.fp8.FP8Linear). Made by apply_fp8."""

    fp8_backend = "auto"  # "auto" | "triton" | "torch", set per module by apply_fp8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _fp8_region(x) as x:
            return fp8_linear(x, self.weight, self.bias, backend=self.fp8_backend)


# ----------------------------------------------------------------------------- routed experts


class PaddedLayout:
    """DeepGEMM's contiguous layout of rows already sorted by expert: each expert's segment padded
    to a multiple of 128 rows, so no GEMM tile straddles two experts.

    Built without a host read: the sizes come from host counts (a dispatch handle's), the
    row positions from the same counts on the device. (duet_kernels.fp8.contiguous_layout sorts
    arbitrary rows and reads its sizes back; here the rows arrive sorted.)

    m_indices [P] int32  expert per padded row, -1 for padding
    dst_rows  [M] int64  padded row of each sorted row
    segments  (expert, first padded row, end row) of each non-empty segment, host ints
    offsets   [E + 1] first padded row of every expert, then P, host ints
    """

    def __init__(self, count_E: torch.Tensor, host_counts: list[int]) -> None:
        E, M = len(host_counts), sum(host_counts)
        padded = [-(-n // TILE) * TILE for n in host_counts]
        self.padded_rows = sum(padded)
        self.segments, self.offsets, start = [], [0], 0
        for e, n in enumerate(padded):
            if n:
                self.segments.append((e, start, start + n))
            start += n
            self.offsets.append(start)
        device = count_E.device
        count_E = count_E.long()
        padded_E = (count_E + TILE - 1) // TILE * TILE
        start_E = torch.cumsum(count_E, 0) - count_E  # first sorted row of each expert
        pad_start_E = torch.cumsum(padded_E, 0) - padded_E  # first padded row of each expert
        expert_M = torch.repeat_interleave(torch.arange(E, device=device), count_E, output_size=M)
        self.dst_rows = pad_start_E[expert_M] + torch.arange(M, device=device) - start_E[expert_M]
        self.m_indices = torch.full((self.padded_rows,), -1, dtype=torch.int32, device=device).index_copy_(
            0, self.dst_rows, expert_M.to(torch.int32))

    def gather(self, x_M: torch.Tensor) -> torch.Tensor:
        """[M, ...] -> [P, ...]; padding rows are zero (they raise no amax, give zero rows)."""
        out = x_M.new_zeros((self.padded_rows,) + tuple(x_M.shape[1:]))
        return out.index_copy_(0, self.dst_rows, x_M)

    def scatter(self, y_P: torch.Tensor) -> torch.Tensor:
        """[P, ...] -> [M, ...], dropping the padding rows."""
        return y_P.index_select(0, self.dst_rows)


def _transposed(w_fp8: torch.Tensor, w_s: torch.Tensor):
    """FP8 [E, N, K] with 128x128 scales -> the same for [E, K, N]. Exact: a block of w.T is
    the transpose of a block of w, with the same amax, so no re-quantisation is needed."""
    return w_fp8.transpose(1, 2).contiguous(), w_s.transpose(1, 2).contiguous()


def _wgrad(aT_fp8, aT_s, bT_fp8, bT_s, layout: PaddedLayout, backend: str) -> torch.Tensor:
    """Per expert e: out[e] = a_e.T @ b_e over its tokens, with a.T [A, P] and b.T [B, P] 128x1-
    quantised along tokens; one k-grouped launch for all experts. Segments start at multiples
    of 128, so each token tile lies inside one expert and a slice of the whole-layout
    quantisation is that expert's own quantisation."""
    return k_grouped_gemm_1x128(aT_fp8, aT_s, bT_fp8, bT_s, layout.offsets, backend=backend)


def _expert_forward(x_MD, w1, w3, w2, layout: PaddedLayout, backend: str):
    """SwiGLU experts in FP8; returns y_MD and what backward needs (padded x, SwiGLU input, fp8 weights)."""
    mi = layout.m_indices
    x_PD = layout.gather(x_MD)  # zero padding rows: they raise no amax and produce zero rows
    x_fp8, x_s = quantize_act(x_PD, backend=backend)
    weights = [quantize_weight_once(w, backend=backend) for w in (w1, w3, w2)]
    (w1_fp8, w1_s), (w3_fp8, w3_s), (w2_fp8, w2_s) = weights
    # fp32 GEMM outputs: the SwiGLU and its FP8 cache are computed from the unrounded values.
    h1_PI = grouped_gemm(x_fp8, x_s, w1_fp8, w1_s, mi, out_dtype=torch.float32, backend=backend)
    h3_PI = grouped_gemm(x_fp8, x_s, w3_fp8, w3_s, mi, out_dtype=torch.float32, backend=backend)
    a_fp8, a_s = quantize_act(F.silu(h1_PI) * h3_PI, backend=backend)
    y_PD = grouped_gemm(a_fp8, a_s, w2_fp8, w2_s, mi, out_dtype=x_MD.dtype, backend=backend)
    return layout.scatter(y_PD), x_PD, h1_PI, h3_PI, weights


class FP8GroupedSwiGLU(torch.autograd.Function):
    """y = w2_e(silu(w1_e x) * w3_e x) per row's expert e, all nine GEMMs in FP8.

    Saved for backward (V3's low-precision storage): x in FP8, already in the 128x1 layout
    wgrad consumes; the SwiGLU *input* (w1 x, w3 x) in FP8 1x128 tiles, from which backward
    recomputes the SwiGLU and its output instead of keeping them; the FP8 weights.
    """

    @staticmethod
    def forward(ctx, x_MD, w1_EID, w3_EID, w2_EDI, layout: PaddedLayout, backend: str = "auto"):
        y_MD, x_PD, h1_PI, h3_PI, weights = _expert_forward(x_MD, w1_EID, w3_EID, w2_EDI, layout, backend)
        xT_fp8, xT_s = quantize_act_transposed(x_PD, backend=backend)
        h1_fp8, h1_s = quantize_act(h1_PI, backend=backend)
        h3_fp8, h3_s = quantize_act(h3_PI, backend=backend)
        weight_tensors = [t for pair in weights for t in pair]
        ctx.save_for_backward(xT_fp8, xT_s, h1_fp8, h1_s, h3_fp8, h3_s, *weight_tensors)
        ctx.layout, ctx.backend, ctx.x_dtype, ctx.w_dtype = layout, backend, x_MD.dtype, w1_EID.dtype
        ctx.weights = (w1_EID, w3_EID, w2_EDI)  # leaf parameters: where deferred weight gradients go
        return y_MD

    @staticmethod
    def backward(ctx, g_MD):
        xT_fp8, xT_s, h1_fp8, h1_s, h3_fp8, h3_s, w1_fp8, w1_s, w3_fp8, w3_s, w2_fp8, w2_s = ctx.saved_tensors
        layout, backend = ctx.layout, ctx.backend
        need_x, need_w1, need_w3, need_w2 = ctx.needs_input_grad[:4]
        mi = layout.m_indices  # the offsets are host ints: no read in backward

        g_PD = layout.gather(g_MD)
        g_fp8, g_s = quantize_act(g_PD, backend=backend)
        # dgrad of w2: da [P, I] = g [P, D] @ w2_e [D, I]
        da_PI = grouped_gemm(g_fp8, g_s, *_transposed(w2_fp8, w2_s), mi, out_dtype=torch.float32,
                             backend=backend)
        # Recompute the SwiGLU from its cached FP8 input.
        h1_PI = dequantize_act(h1_fp8, h1_s, backend=backend)
        h3_PI = dequantize_act(h3_fp8, h3_s, backend=backend)
        sig_PI = torch.sigmoid(h1_PI)
        silu_PI = h1_PI * sig_PI
        dh1_PI = da_PI * h3_PI * sig_PI * (1 + h1_PI * (1 - sig_PI))  # d silu(h)/dh = s (1 + h (1 - s))
        dh3_PI = da_PI * silu_PI

        grad_x = grad_w1 = grad_w3 = grad_w2 = None
        w1, w3, w2 = ctx.weights
        w_dtype = ctx.w_dtype
        # Weight gradients go through defer_or_return: under the pipeline's weight-gradient split
        # they are queued for a later W chunk (zero bubble), else computed here.
        if need_w2:  # dW2_e [D, I] = g_e.T @ a_e
            def wgrad2() -> torch.Tensor:
                gT = quantize_act_transposed(g_PD, backend=backend)
                aT = quantize_act_transposed(silu_PI * h3_PI, backend=backend)
                return _wgrad(*gT, *aT, layout, backend).to(w_dtype)

            grad_w2 = defer_or_return(w2, wgrad2)
        if need_x:  # dx [P, D] = dh1 @ w1_e + dh3 @ w3_e
            dx_PD = grouped_gemm(*quantize_act(dh1_PI, backend=backend), *_transposed(w1_fp8, w1_s), mi,
                                 out_dtype=torch.float32, backend=backend)
            dx_PD += grouped_gemm(*quantize_act(dh3_PI, backend=backend), *_transposed(w3_fp8, w3_s), mi,
                                  out_dtype=torch.float32, backend=backend)
            grad_x = layout.scatter(dx_PD).to(ctx.x_dtype)
        def wgrad_up(dh_PI: torch.Tensor) -> torch.Tensor:  # dW_e [I, D] = dh_e.T @ x_e
            return _wgrad(*quantize_act_transposed(dh_PI, backend=backend), xT_fp8, xT_s, layout,
                          backend).to(w_dtype)

        if need_w1:
            grad_w1 = defer_or_return(w1, lambda: wgrad_up(dh1_PI))
        if need_w3:
            grad_w3 = defer_or_return(w3, lambda: wgrad_up(dh3_PI))
        return grad_x, grad_w1, grad_w3, grad_w2, None, None


def fp8_grouped_swiglu(x_MD, w1_EID, w3_EID, w2_EDI, rows: ExpertRows | torch.Tensor,
                       backend: str = "auto") -> torch.Tensor:
    """Rows sorted by expert -> expert outputs [M, D] in x's dtype. `rows`: the experts' ExpertRows
    (device counts plus the handle's host counts: no host read here), or a tensor of rows per
    expert for a standalone call (read once).

    Same contract as GroupedExperts.grouped_swiglu. Rows go to DeepGEMM's contiguous layout
    (each expert's segment padded to 128 rows, so no GEMM tile straddles two experts).
    Quantising here rather than before dispatch gives the same bytes (1x128 tiles are per
    row, and gathering rows commutes with them); a cross-rank dispatcher would send FP8.
    """
    if isinstance(rows, torch.Tensor):
        count_E = rows.to(x_MD.device)
        rows = ExpertRows(count_E, x_MD.shape[0], count_E.tolist(), exact=True)
    layout = PaddedLayout(rows.count_E, rows.host_counts)
    if torch.is_grad_enabled() and (x_MD.requires_grad or w1_EID.requires_grad):
        return FP8GroupedSwiGLU.apply(x_MD, w1_EID, w3_EID, w2_EDI, layout, backend)
    return _expert_forward(x_MD, w1_EID, w3_EID, w2_EDI, layout, backend)[0]  # no wgrad layouts


class FP8GroupedExperts(GroupedExperts):
    """GroupedExperts whose SwiGLU runs as FP8 grouped GEMMs. Made by apply_fp8.

    Only grouped_swiglu changes: sorting, the gate weights (applied after, in high precision,
    so they keep their gradient) and the combine are GroupedExperts.forward's.
    """

    fp8_backend = "auto"

    def needs_host_counts(self, x_ND: torch.Tensor) -> bool:
        return True  # the padded layout is sized on the host (from the handle's counts)

    def grouped_swiglu(self, x_MD: torch.Tensor, layout: ExpertRows) -> torch.Tensor:
        with _fp8_region(x_MD) as x_MD:
            return fp8_grouped_swiglu(x_MD, self.w1, self.w3, self.w2, layout, self.fp8_backend)


# ----------------------------------------------------------------------------- conversion

# Exact base class -> FP8 class. Exact, so a subclass with its own forward is never overridden.
_CONVERSIONS: dict[type, type] = {nn.Linear: Float8Linear, GroupedExperts: FP8GroupedExperts}
# Linear layers are converted only as children of these: the head, the gate (a bare
# parameter) and anything added later stay in model precision unless listed here.
_LINEAR_OWNERS = (MLA, MLP, MTPModule)


def _convert(module: nn.Module, backend: str) -> None:
    fp8_cls = _CONVERSIONS.get(type(module))
    if fp8_cls is not None:
        module.__class__ = fp8_cls
    if isinstance(module, (Float8Linear, FP8GroupedExperts)):
        module.fp8_backend = backend  # instance attribute: not a parameter or buffer


def apply_fp8(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Convert `model` (a Transformer, a Stage or any module containing duet blocks) in place.

    backend: "auto" (Triton on CUDA tensors, torch reference on CPU), "triton" or "torch".
    Idempotent; applying again only updates the backend.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    for module in list(model.modules()):
        if isinstance(module, _LINEAR_OWNERS):
            for child in module.children():
                if isinstance(child, nn.Linear):
                    _convert(child, backend)
        elif isinstance(module, GroupedExperts):
            _convert(module, backend)
    return model


def fp8_module_names(model: nn.Module) -> list[str]:
    """Qualified names of the modules that run FP8 GEMMs (for logs and tests)."""
    return [name for name, m in model.named_modules() if isinstance(m, (Float8Linear, FP8GroupedExperts))]
