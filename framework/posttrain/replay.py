"""Routing records and routing replay for MoE post-training, by forward hooks on the routers.

    with record(model) as routes:        # routes[l]: the [T, K] expert ids main MoE layer l chose
        model(tokens)
    with replay(model, routes):          # the training forward uses exactly those experts;
        model(tokens)                    # the gate weights come from the current scores
    same, total = agreement(routes, other)

Rollout routing replay (MoE RL): the routers of the training forward can pick other experts than
the rollout's (weights changed, or another engine's numerics), so the sampled tokens' log-probs
come from a different network. Replay forces the rollout's choices. The hook replaces the
router's output (ids, weights, scores) after Router.forward: ids <- recorded, weights <- the
current scores at those ids, normalised and scaled as Router.select does (two lines repeated
here: the router has no hook to take given ids; the issue's report asks for one in moe.py).
Two side effects of doing it from outside: the router's own expert_load counts its own choice,
not the replayed one, and the node/group limit is not re-applied (the recorded ids obeyed it).

Routes are keyed by main MoE layer (0 = the first MoE block, the sampler's order), not by call
order, so the hooks work on any layout: under a pipeline a rank holds some layers and enters a
micro-batch's context once per sub-step of its forward (parallel/pipeline/runtime.py's scope),
in an order interleaved with other micro-batches; `record(model, into)` adds to one dict per
micro-batch across those entries. A recompute in backward re-runs the router outside any
context, so replay is refused with model.recompute (posttrain/config.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from framework.model.moe import MoE, Router

Routes = dict[int, torch.Tensor]  # main MoE layer -> [T, K] expert ids of one micro-batch's tokens


def main_routers(model) -> dict[int, Router]:
    """The routers of the main blocks this rank holds, by MoE layer (MTP blocks excluded: the
    sampler does not route through them; blocks a pipeline rank pruned are Identity)."""
    return {i - model.cfg.n_dense_layers: block.ffn.router for i, block in enumerate(model.blocks)
            if isinstance(getattr(block, "ffn", None), MoE)}


@contextlib.contextmanager
def _hooked(model, hook_of) -> Iterator[None]:
    handles = [r.register_forward_hook(hook_of(layer)) for layer, r in main_routers(model).items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def record(model, into: Routes | None = None) -> Iterator[Routes]:
    """Router calls in this context write their ids into `into` (a new dict by default)."""
    routes: Routes = {} if into is None else into

    def hook_of(layer: int):
        def hook(router, args, output):
            routes[layer] = output[0].detach().clone()
        return hook

    with _hooked(model, hook_of):
        yield routes


def gate_weights(router: Router, s_TE: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
    """Router.select's weights for given ids: unbiased scores, renormalised, times route_scale."""
    w_TK = s_TE.gather(1, idx_TK)
    if router.norm_topk_prob:
        w_TK = w_TK / w_TK.sum(-1, keepdim=True)
    return w_TK * router.route_scale


@contextlib.contextmanager
def replay(model, routes: Routes, used: Routes | None = None) -> Iterator[Routes]:
    """Router calls in this context take the recorded ids of their layer; yields (and adds to
    `used`) the ids each layer used."""
    used = {} if used is None else used

    def hook_of(layer: int):
        def hook(router, args, output):
            if layer not in routes:
                raise RuntimeError(f"routing replay: no route recorded for MoE layer {layer}; replay the "
                                   "micro-batch the routes were recorded on")
            idx_TK = routes[layer].to(output[0].device)
            if idx_TK.shape != output[0].shape:
                raise RuntimeError(f"routing replay: recorded ids {tuple(idx_TK.shape)} for a router call "
                                   f"with {tuple(output[0].shape)}; replay the same micro-batch")
            s_TE = output[2]
            used[layer] = idx_TK
            return idx_TK, gate_weights(router, s_TE, idx_TK), s_TE
        return hook

    with _hooked(model, hook_of):
        yield used


def agreement(a: Routes, b: Routes) -> tuple[float, float]:
    """(decisions in both, decisions) over the layers of b (each must be in a): a decision is a
    (token, expert) selection, so the order of the top-k does not matter."""
    same = total = 0.0
    for layer, y_TK in b.items():
        x_TK = a[layer]
        E = int(max(x_TK.max(), y_TK.max())) + 1
        hot_x = torch.zeros(x_TK.shape[0], E).scatter_(1, x_TK.cpu(), 1.0)
        hot_y = torch.zeros(y_TK.shape[0], E).scatter_(1, y_TK.cpu(), 1.0)
        same += float((hot_x * hot_y).sum())
        total += y_TK.numel()
    return same, total
