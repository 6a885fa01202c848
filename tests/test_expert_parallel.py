"""parallel/expert_parallel.py against the single-process MoE (DESIGN.md rule 6).

One spawn per ep size (ep = world = 2 and 4) runs every case; the reference is computed here, in
the test process, on the concatenated batch. Loss: every rank r computes
L_r = sum(out_r * C_r) with a fixed cotangent slice C_r; the reference loss is
L = sum(out * C) = sum_r L_r. Hence
  - input gradients: rank r's x_r.grad equals the reference's rows of rank r;
  - replicated parameters (router.weight, shared expert): the SUM over ranks of the per-rank
    gradients equals the reference gradient (what a dp all-reduce-sum would give);
  - routed experts: rank r's local expert gradient already contains every rank's tokens routed
    to it (the backward all-to-all brings them home), so it equals the reference gradient's
    slice [r*E/ep, (r+1)*E/ep) exactly, with no further reduction.
"""

from __future__ import annotations

import pytest
import torch

from framework.config import ModelConfig
from framework.model.moe import MoE
from launch.ranks import run_ranks
from parallel import comm
from parallel.expert_parallel import AllToAllDispatcher, layout_stats, shard_experts

D, E, TOKENS_PER_RANK = 32, 8, 10  # 2 sequences of 5 tokens per rank
TOL = 1e-10


def cfg(topk: int) -> ModelConfig:
    return ModelConfig(dim=D, n_routed_experts=E, n_activated_experts=topk, moe_inter_dim=16,
                       n_shared_experts=1,
                       n_expert_groups=4, n_limited_groups=2, seq_aux_alpha=0.0)


def cases(ep: int) -> list[tuple[str, torch.Tensor]]:
    """(name, expert bias) per case. Groups are pairs of experts (E=8, 4 groups)."""
    L = E // ep
    starve0 = torch.zeros(E)
    starve0[:L] = -10.0  # rank 0's experts never chosen: rank 0 receives zero rows
    one_rank = torch.zeros(E)
    one_rank[-L:] = 10.0  # every token picks only the last rank's experts (also: experts with 0 tokens)
    return [("random", torch.zeros(E)), ("starve_rank0", starve0), ("one_rank", one_rank)]


def make_moe(topk: int, bias: torch.Tensor) -> MoE:
    torch.manual_seed(0)
    moe = MoE(cfg(topk))
    moe.init_weights(0.2)
    with torch.no_grad():
        moe.router.expert_bias.copy_(bias)
    return moe


def data(ep: int, case: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * ep + case)
    x = torch.randn(2 * ep, TOKENS_PER_RANK // 2, D, generator=g)
    c = torch.randn(2 * ep, TOKENS_PER_RANK // 2, D, generator=g)
    return x, c


def rel_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    denom = (x * x + y * y).sum()
    return 0.0 if denom == 0 else float(1 - 2 * (x * y).sum() / denom)


def ep_worker(rank: int, world: int, topk: int) -> list[dict]:
    results = []
    for i, (_, bias) in enumerate(cases(world)):
        moe = shard_experts(make_moe(topk, bias), (rank, world))
        x, c = data(world, i)
        x_r = x[2 * rank:2 * rank + 2].clone().requires_grad_(True)
        comm.reset_comm_stats()
        out = moe(x_r)
        fwd_stats = comm.comm_stats().get("all_to_all", {"calls": 0, "bytes": 0})
        (out * c[2 * rank:2 * rank + 2]).sum().backward()
        # Dispatch alone (no grad) for the byte count of one dispatch.
        x_TD = x_r.detach().reshape(-1, D)
        idx, w, _ = moe.router(x_TD)
        comm.reset_comm_stats()
        recv_x, handle = moe.dispatcher.dispatch(x_TD, idx, w)
        dispatch_bytes = comm.comm_stats().get("all_to_all", {"bytes": 0})["bytes"]
        # Split phase with two dispatches in flight, waited in reverse order.
        d = moe.dispatcher
        pa, pb = d.dispatch_start(x_TD, idx, w), d.dispatch_start(2 * x_TD, idx, w)
        rb, hb = d.dispatch_wait(pb)
        ra, ha = d.dispatch_wait(pa)
        split_ok = (torch.equal(ra, recv_x) and torch.equal(rb, 2 * recv_x)
                    and torch.equal(ha.topk_idx, hb.topk_idx))
        results.append({
            "out": out.detach(), "x_grad": x_r.grad,
            "router_grad": moe.router.weight.grad, "shared_grads": [p.grad for p in moe.shared.parameters()],
            # None where this rank's experts received no token at all (no graph reached them)
            "expert_grads": [torch.zeros_like(w) if w.grad is None else w.grad
                             for w in (moe.experts.w1, moe.experts.w2, moe.experts.w3)],
            "expert_shape": tuple(moe.experts.w1.shape), "idx": idx, "stats": layout_stats(handle),
            "recv_rows": recv_x.shape[0], "dispatch_bytes": dispatch_bytes,
            "fwd_a2a_calls": fwd_stats["calls"],
            "split_ok": split_ok,
        })
    return results


def reference(topk: int, ep: int, case: int) -> dict:
    moe = make_moe(topk, cases(ep)[case][1])
    x, c = data(ep, case)
    x = x.clone().requires_grad_(True)
    out = moe(x)
    (out * c).sum().backward()
    return {"out": out.detach(), "x_grad": x.grad, "router_grad": moe.router.weight.grad,
            "shared_grads": [p.grad for p in moe.shared.parameters()],
            "expert_grads": [torch.zeros_like(w) if w.grad is None else w.grad
                             for w in (moe.experts.w1, moe.experts.w2, moe.experts.w3)]}


PARAMS = [(2, 3), (4, 2)]  # (ep, top-k)


@pytest.fixture(scope="module", params=PARAMS, ids=[f"ep{ep}_top{k}" for ep, k in PARAMS])
def spawned(request):
    ep, topk = request.param
    return ep, topk, run_ranks(ep_worker, ep, topk)


def test_matches_single_process(spawned):
    ep, topk, per_rank = spawned
    L = E // ep
    worst = 0.0
    for i, (name, _) in enumerate(cases(ep)):
        ref = reference(topk, ep, i)
        got = [per_rank[r][i] for r in range(ep)]
        checks = {
            "out": (torch.cat([g["out"] for g in got]), ref["out"]),
            "x_grad": (torch.cat([g["x_grad"] for g in got]), ref["x_grad"]),
            "router_grad": (sum(g["router_grad"] for g in got), ref["router_grad"]),
        }
        for j, p in enumerate(ref["shared_grads"]):
            checks[f"shared{j}"] = (sum(g["shared_grads"][j] for g in got), p)
        for j, wname in enumerate(("w1", "w2", "w3")):
            checks[wname] = (torch.cat([g["expert_grads"][j] for g in got]), ref["expert_grads"][j])
            for r in range(ep):  # each rank's block is the reference's slice, no reduction needed
                assert got[r]["expert_shape"] == (L, 16, D)
                assert rel_diff(got[r]["expert_grads"][j], ref["expert_grads"][j][r * L:(r + 1) * L]) <= TOL
        for what, (a, b) in checks.items():
            assert a.shape == b.shape, (name, what)
            diff = rel_diff(a, b)
            worst = max(worst, diff)
            assert diff <= TOL, f"{name}/{what}: rel diff {diff:.3e}"
        assert ref["router_grad"].abs().sum() > 0  # gradients really reached the routing weights
        assert all(g["split_ok"] for g in got), name
    print(f"ep={ep} top{topk}: worst rel diff {worst:.3e}")


def test_edge_cases_really_happen(spawned):
    ep, topk, per_rank = spawned
    names = [n for n, _ in cases(ep)]
    starve = names.index("starve_rank0")
    one = names.index("one_rank")
    assert per_rank[0][starve]["recv_rows"] == 0  # rank 0 receives nothing
    assert all(per_rank[r][one]["recv_rows"] == 0 for r in range(ep - 1))  # only the last rank works
    # experts with zero tokens: every expert outside the last rank in the one-rank case
    assert all(per_rank[r][one]["expert_grads"][0].abs().sum() == 0 for r in range(ep - 1))
    assert per_rank[ep - 1][one]["expert_grads"][0].abs().sum() > 0


def test_dedup_bytes(spawned):
    ep, topk, per_rank = spawned
    one = [n for n, _ in cases(ep)].index("one_rank")
    for i in range(len(cases(ep))):
        for r in range(ep):
            res = per_rank[r][i]
            idx = res["idx"]
            T, K = idx.shape
            # distinct (token, destination rank) pairs, counted independently of the code under test
            pairs = len({(t, int(e) // (E // ep)) for t in range(T) for e in idx[t]})
            st = res["stats"]
            assert st["token_rank_pairs"] == pairs and st["token_expert_pairs"] == T * K
            assert st["payload_bytes"] == pairs * D * 4
            # comm counters: counts (ep int64) + x rows + local ids (int32) + weights (fp32)
            assert res["dispatch_bytes"] == ep * 8 + pairs * (D * 4 + K * 4 + K * 4)
            assert res["fwd_a2a_calls"] == 5  # counts, x, ids, weights, combine
            if i == one:  # every token's experts share one rank: one row per token, K times fewer
                assert pairs == T and st["payload_bytes"] * K == T * K * D * 4
                assert st["payload_bytes"] < T * K * D * 4


def test_local_fallback_without_group():
    """ep group of one (no process group): dispatch/combine reduce to the identity layout."""
    moe = make_moe(2, torch.zeros(E))
    x = torch.randn(2, 5, D)
    ref = moe(x)
    d = AllToAllDispatcher(None, 0, 1, E)
    moe.dispatcher = d
    torch.testing.assert_close(moe(x), ref, rtol=0, atol=1e-6)
