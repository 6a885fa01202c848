"""Routing records and routing replay for MoE post-training, by forward hooks on the routers.

    with record(model) as routes:        # routes[l]: the [T, K] expert ids layer l chose
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

A model whose forward is called several times inside one context records (or replays) the calls
in order: routes hold one entry per router call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from framework.model.moe import Router


def _routers(model) -> list[Router]:
    return [m for m in model.modules() if isinstance(m, Router)]


@contextlib.contextmanager
def nothing() -> Iterator[None]:
    yield None


@contextlib.contextmanager
def record(model) -> Iterator[list[torch.Tensor]]:
    routes: list[torch.Tensor] = []

    def hook(router, args, output):
        routes.append(output[0].detach().clone())

    handles = [r.register_forward_hook(hook) for r in _routers(model)]
    try:
        yield routes
    finally:
        for h in handles:
            h.remove()


def gate_weights(router: Router, s_TE: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
    """Router.select's weights for given ids: unbiased scores, renormalised, times route_scale."""
    w_TK = s_TE.gather(1, idx_TK)
    if router.norm_topk_prob:
        w_TK = w_TK / w_TK.sum(-1, keepdim=True)
    return w_TK * router.route_scale


@contextlib.contextmanager
def replay(model, routes: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Router calls in this context take the recorded ids, in call order; yields the ids used."""
    used: list[torch.Tensor] = []

    def hook(router, args, output):
        if len(used) >= len(routes):
            raise RuntimeError(f"routing replay: {len(routes)} routes recorded, more router calls made")
        idx_TK = routes[len(used)].to(output[0].device)
        if idx_TK.shape != output[0].shape:
            raise RuntimeError(f"routing replay: recorded ids {tuple(idx_TK.shape)} for a router call with "
                               f"{tuple(output[0].shape)}; replay the same micro-batch")
        s_TE = output[2]
        used.append(idx_TK)
        return idx_TK, gate_weights(router, s_TE, idx_TK), s_TE

    handles = [r.register_forward_hook(hook) for r in _routers(model)]
    try:
        yield used
    finally:
        for h in handles:
            h.remove()


def agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    """(decisions in both, decisions) over every router call: a decision is a (token, expert)
    selection, so the order of the top-k does not matter."""
    same = total = 0.0
    for x_TK, y_TK in zip(a, b):
        E = int(max(x_TK.max(), y_TK.max())) + 1
        hot_x = torch.zeros(x_TK.shape[0], E).scatter_(1, x_TK.cpu(), 1.0)
        hot_y = torch.zeros(y_TK.shape[0], E).scatter_(1, y_TK.cpu(), 1.0)
        same += float((hot_x * hot_y).sum())
        total += x_TK.numel()
    return same, total
