"""Activation recompute (model.recompute) for one compute piece of a block.

    step = recomputed(fn, mode)      # mode: none | selective | full
    outs = step(*inputs)             # same values; what backward keeps depends on mode

Applied per compute sub-step (framework/model/substeps.py: attention, experts, a dense block;
the plain Block.forward cuts the same way), never around a dispatch or combine, so the
all-to-all results are kept and never communicated again.
    none       autograd keeps what it keeps.
    full       only the step's inputs are kept; the whole step runs again in backward.
    selective  DeepSeek-V3's choice: the RMSNorms, the MLA up-projections (wq_b, wkv_b), the
               SwiGLU activations and the expert outputs are recomputed. Realised as a selective
               checkpoint: GEMM and attention outputs are kept (the latents, the attention core's
               output, the SwiGLU inputs, the router's logits) except the up-projections' and the
               output projections' (attention wo, SwiGLU w2: backward never reads them);
               everything else (norms, activations, rope, elementwise) is recomputed.
A recompute re-runs the router on the same tokens: load counting is off inside it
(framework.model.moe.no_load_counting), so the expert-bias update counts each token once.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
    set_checkpoint_early_stop,
)

from framework.config import RECOMPUTE_MODES
from framework.model.moe import Recomputed, no_load_counting

_aten = torch.ops.aten
# Ops whose outputs selective recompute keeps (unless inside an up-projection).
# A Triton GEMM (the FP8 kernels on GPUs) is no aten op: selective recomputes it (cost, not numbers).
_SAVED = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten._grouped_mm.default,
          _aten._scaled_mm.default,
          _aten._scaled_dot_product_flash_attention_for_cpu.default,
          _aten._scaled_dot_product_efficient_attention.default,
          _aten._scaled_dot_product_flash_attention.default,
          _aten._scaled_dot_product_cudnn_attention.default}


def _enter(module, args) -> None:
    Recomputed.depth += 1


def _leave(module, args, out) -> None:
    Recomputed.depth -= 1


# Modules whose GEMM outputs selective recompute does not keep: MLA's up-projections (V3), and
# the output projections of attention and of the (shared / dense) SwiGLU, which backward never
# reads (the routed experts' w2 marks itself in framework/model/moe.py).
_NOT_KEPT = ("wq_b", "wkv_b", "wo", "w2")


def mark_up_projections(model: torch.nn.Module) -> None:
    """Hook the modules of _NOT_KEPT so the selective policy recomputes them (idempotent)."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in _NOT_KEPT and isinstance(module, torch.nn.Linear) \
                and not getattr(module, "_duet_up", False):
            module.register_forward_pre_hook(_enter)
            module.register_forward_hook(_leave)
            module._duet_up = True


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in _SAVED and Recomputed.depth == 0:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


class SavedBytes:
    """Bytes of the distinct storages backward holds: every tensor autograd saves (seen through
    torch.autograd.graph.saved_tensors_hooks, released with its graph node) plus the GEMM outputs
    selective recompute keeps (its cache, which those hooks do not see). Deterministic: the
    sizes of tensors, no allocator. `peak` is the largest total seen at any save or `sample()`.

        with SavedBytes() as meter:
            ... forward ...
            meter.sample()
        meter.peak
    """

    active: list[SavedBytes] = []

    def __init__(self, exclude=(), gradient_shaped: bool = False) -> None:
        """exclude: tensors (the parameters) whose storages are not activations. gradient_shaped:
        also skip saved tensors shaped like a (matrix) parameter -- a weight gradient computed
        ahead (the head's chunked loss does that for small heads), which a memory plan counts
        with the gradients."""
        exclude = list(exclude)
        self.skip = {t.untyped_storage().data_ptr() for t in exclude}
        self.shapes = {tuple(t.shape) for t in exclude if t.dim() >= 2} if gradient_shaped else set()
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, holders]
        self.caches: list[dict] = []  # selective recompute caches created inside
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        SavedBytes.active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        SavedBytes.active.remove(self)
        self._hooks.__exit__(*exc)

    def _pack(self, t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key in self.skip or tuple(t.shape) in self.shapes:
            return t
        entry = self.live.setdefault(key, [t.untyped_storage().nbytes(), 0])
        entry[1] += 1
        self.sample()
        return _Held(t, key, self)

    @staticmethod
    def _unpack(held) -> torch.Tensor:
        return held.t if isinstance(held, _Held) else held

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if not entry[1]:
            del self.live[key]

    def held(self) -> int:
        sizes = {k: v[0] for k, v in self.live.items()}
        for cache in self.caches:
            for t in _tensors(cache):
                if t.untyped_storage().data_ptr() not in self.skip:
                    sizes.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return sum(sizes.values())

    def sample(self) -> int:
        now = self.held()
        self.peak = max(self.peak, now)
        return now


def _tensors(x):
    """The tensors in a selective-checkpoint cache (dicts of per-op slots, wrapped outputs)."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, list | tuple):
        for v in x:
            yield from _tensors(v)
    elif hasattr(x, "val"):
        yield from _tensors(x.val)


class _Held:
    def __init__(self, t: torch.Tensor, key: int, meter: SavedBytes) -> None:
        self.t, self.key, self.meter = t, key, meter

    def __del__(self) -> None:
        self.meter._release(self.key)


def _selective_contexts():
    forward, again = create_selective_checkpoint_contexts(_policy)
    for meter in SavedBytes.active:  # its cache holds the kept GEMM outputs
        meter.caches.append(forward.storage)
    return forward, _Both(again, no_load_counting())


class _Both(contextlib.ExitStack):
    def __init__(self, *managers) -> None:
        super().__init__()
        self._managers = managers

    def __enter__(self):
        super().__enter__()
        for m in self._managers:
            self.enter_context(m)
        return self


class _Full(torch.autograd.Function):
    """Full recompute: keep the inputs (saved like any tensor autograd keeps), run fn without a
    graph, and in backward run it again with one, then backpropagate through it."""

    @staticmethod
    def forward(ctx, fn, autocast, *inputs):
        ctx.fn, ctx.autocast = fn, autocast
        ctx.save_for_backward(*[t if isinstance(t, torch.Tensor) else None for t in inputs])
        ctx.others = [None if isinstance(t, torch.Tensor) else t for t in inputs]
        with torch.no_grad(), _autocast(autocast):
            outs = fn(*inputs)
        ctx.single = not isinstance(outs, tuple)
        if ctx.single:
            return outs
        ctx.mark_non_differentiable(*[t for t in outs if isinstance(t, torch.Tensor)
                                      and not t.is_floating_point()])
        return outs

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        inputs = [o if t is None else t.detach().requires_grad_(t.requires_grad)
                  for t, o in zip(saved, ctx.others, strict=True)]
        with torch.enable_grad(), _autocast(ctx.autocast), no_load_counting():
            outs = ctx.fn(*inputs)
        outs = (outs,) if ctx.single else outs
        pairs = [(t, g) for t, g in zip(outs, grads, strict=True)
                 if g is not None and isinstance(t, torch.Tensor) and t.requires_grad]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        return (None, None, *[t.grad if isinstance(t, torch.Tensor) and t.requires_grad else None
                              for t in inputs])


def _autocast(state):
    device, enabled, dtype = state
    return torch.autocast(device, dtype=dtype, enabled=enabled) if enabled else contextlib.nullcontext()


def _autocast_state(inputs) -> tuple:
    device = next((t.device.type for t in inputs if isinstance(t, torch.Tensor)), "cpu")
    enabled = torch.is_autocast_enabled(device)
    return device, enabled, torch.get_autocast_dtype(device) if enabled else None


def recomputed(fn, mode: str):
    """fn, run so that its backward recomputes per `mode` (module docstring)."""
    if mode == "none":
        return fn
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute={mode!r}: choose one of {', '.join(RECOMPUTE_MODES)}")

    @functools.wraps(fn)
    def run(*args):
        if not torch.is_grad_enabled():
            return fn(*args)
        if mode == "full":
            return _Full.apply(fn, _autocast_state(args), *args)
        # No early stop: a recompute cut short would skip the hooks' exits (Recomputed.depth).
        with set_checkpoint_early_stop(False):
            return checkpoint(fn, *args, use_reentrant=False, context_fn=_selective_contexts)
    return run
