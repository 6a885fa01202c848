"""Activation recompute (model.recompute) for one compute piece of a block.

    step = recomputed(fn, mode)      # mode: none | selective | full
    outs = step(*inputs)             # same values; what backward keeps depends on mode

Applied per compute sub-step (framework/model/substeps.py: attention, experts, a dense block;
the plain Block.forward cuts the same way), never around a dispatch or combine, so the
all-to-all results are kept and never communicated again.
    none       autograd keeps what it keeps.
    full       only the step's inputs are kept; the whole step runs again in backward.
    selective  DeepSeek-V3's choice: the RMSNorms, the MLA up-projections (wq_b, wkv_b) and the
               SwiGLU activations are recomputed, every other GEMM's output is kept. Realised as a
               selective checkpoint: GEMM and attention outputs are saved unless they belong to an
               up-projection; everything else (norms, activations, rope, elementwise) is
               recomputed from them.
A recompute re-runs the router on the same tokens: load counting is off inside it
(framework.model.moe.no_load_counting), so the expert-bias update counts each token once.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from framework.config import RECOMPUTE_MODES
from framework.model.moe import no_load_counting

_aten = torch.ops.aten
# Ops whose outputs selective recompute keeps (unless inside an up-projection).
_SAVED = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten._grouped_mm.default,
          _aten._scaled_dot_product_flash_attention_for_cpu.default,
          _aten._scaled_dot_product_efficient_attention.default,
          _aten._scaled_dot_product_flash_attention.default,
          _aten._scaled_dot_product_cudnn_attention.default}


class _UpProjection:
    depth = 0  # > 0 while an MLA up-projection runs (forward hooks on wq_b / wkv_b)


def _enter(module, args) -> None:
    _UpProjection.depth += 1


def _leave(module, args, out) -> None:
    _UpProjection.depth -= 1


def mark_up_projections(model: torch.nn.Module) -> None:
    """Hook the MLA up-projections so the selective policy recomputes them (idempotent)."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("wq_b", "wkv_b") and not getattr(module, "_duet_up", False):
            module.register_forward_pre_hook(_enter)
            module.register_forward_hook(_leave)
            module._duet_up = True


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in _SAVED and _UpProjection.depth == 0:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _contexts(mode: str):
    if mode == "selective":
        forward, again = create_selective_checkpoint_contexts(_policy)
    else:
        forward, again = contextlib.nullcontext(), contextlib.nullcontext()
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
        return checkpoint(fn, *args, use_reentrant=False, context_fn=functools.partial(_contexts, mode))
    return run
