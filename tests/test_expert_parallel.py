"""parallel/expert_parallel.py against the single-process MoE (DESIGN.md rule 6).

One spawn per layout (ep = world = 2 and 4; dp = 4 with ep = 2) runs every case; the reference is
computed here, in the test process, on the concatenated batch. Loss: every rank r computes
L_r = sum(out_r * C_r) with a fixed cotangent slice C_r; the reference loss is
L = sum(out * C) = sum_r L_r. Hence
  - input gradients: rank r's x_r.grad equals the reference's rows of rank r;
  - replicated parameters (router.weight, shared expert): the SUM over ranks of the per-rank
    gradients equals the reference gradient (what a dp all-reduce-sum would give);
  - routed experts: rank r's local expert gradient already contains every token of its ep
    group routed to it (the backward all-to-all brings them home); summed over the ranks that
    hold the same experts (the edp group: one rank when ep = world) it equals the reference
    gradient's slice [ep_rank*E/ep, (ep_rank+1)*E/ep).
Also here: the FP8 dispatch payload, and node-limited routing against a direct per-token
implementation of V3's rule.
"""

from __future__ import annotations

import pytest
import torch

from duet_kernels.fp8.reference import dequantize, quantize_act
from framework.config import ModelConfig
from framework.model.init import draw_seed, init_weights
from framework.model.moe import MoE
from launch.ranks import run_ranks
from parallel import comm
from parallel.expert_parallel import AllToAllDispatcher, layout_stats, limit_nodes, shard_experts
from parallel.mesh import Layout, build_mesh

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
    init_weights(moe, draw_seed(), 0.2)
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


def ep_worker(rank: int, world: int, topk: int, ep: int) -> dict:
    mesh = build_mesh(Layout(1, world, ep))
    results = []
    for i, (_, bias) in enumerate(cases(ep)):
        moe = shard_experts(make_moe(topk, bias), mesh)
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
        # The per-expert counts of the count exchange match the ids that arrived with the rows.
        local = handle.topk_idx
        counts_ok = (handle.expert_counts == [int((local == e).sum()) for e in range(moe.experts.w1.shape[0])]
                     and handle.local_rows == int((local >= 0).sum()))
        results.append({
            "out": out.detach(), "x_grad": x_r.grad,
            "router_grad": moe.router.weight.grad, "shared_grads": [p.grad for p in moe.shared.parameters()],
            # None where this rank's experts received no token at all (no graph reached them)
            "expert_grads": [torch.zeros_like(w) if w.grad is None else w.grad
                             for w in (moe.experts.w1, moe.experts.w2, moe.experts.w3)],
            "expert_shape": tuple(moe.experts.w1.shape), "idx": idx, "stats": layout_stats(handle),
            "recv_rows": recv_x.shape[0], "dispatch_bytes": dispatch_bytes,
            "fwd_a2a_calls": fwd_stats["calls"],
            "split_ok": split_ok, "counts_ok": counts_ok,
        })
    x, _ = data(world, 0)
    x_TD = x[2 * rank:2 * rank + 2].reshape(-1, D)
    # FP8 payload: same routing, the experts see the rows quantised 1x128 and dequantised.
    fp8 = shard_experts(make_moe(topk, torch.zeros(E)), mesh, fp8_payload=True)
    fp8.eval()
    with torch.no_grad():
        fp8_out = fp8(x_TD.view(2, -1, D))
    idx, w, _ = fp8.router(x_TD)
    fp8_stats = layout_stats(fp8.dispatcher.dispatch(x_TD, idx, w)[1])
    # Node-limited routing, one rank per simulated node: every token's experts on one node.
    limited = shard_experts(make_moe(topk, torch.zeros(E)), mesh)
    limit_nodes(limited, n_nodes=ep, max_nodes=1)
    with torch.no_grad():
        limited_out = limited(x_TD.view(2, -1, D))
        idx, w, _ = limited.router(x_TD)
        handle = limited.dispatcher.dispatch(x_TD, idx, w)[1]
    rows_per_token = torch.bincount(handle.send_token, minlength=x_TD.shape[0])
    return {"cases": results, "ep_rank": mesh.ep_rank, "fp8_out": fp8_out, "fp8_stats": fp8_stats,
            "limited_out": limited_out, "limited_idx": idx, "limited_rows_per_token": rows_per_token}


def reference(topk: int, world: int, ep: int, case: int) -> dict:
    moe = make_moe(topk, cases(ep)[case][1])
    x, c = data(world, case)
    x = x.clone().requires_grad_(True)
    out = moe(x)
    (out * c).sum().backward()
    return {"out": out.detach(), "x_grad": x.grad, "router_grad": moe.router.weight.grad,
            "shared_grads": [p.grad for p in moe.shared.parameters()],
            "expert_grads": [torch.zeros_like(w) if w.grad is None else w.grad
                             for w in (moe.experts.w1, moe.experts.w2, moe.experts.w3)]}


PARAMS = [(2, 2, 3), (4, 4, 2), (4, 2, 2)]  # (world = dp, ep, top-k)


@pytest.fixture(scope="module", params=PARAMS, ids=[f"dp{dp}_ep{ep}_top{k}" for dp, ep, k in PARAMS])
def spawned(request):
    world, ep, topk = request.param
    per_rank = run_ranks(ep_worker, world, topk, ep)
    return world, ep, topk, per_rank


def test_matches_single_process(spawned):
    world, ep, topk, spawned_ranks = spawned
    per_rank = [r["cases"] for r in spawned_ranks]
    ep_rank = [r["ep_rank"] for r in spawned_ranks]
    L = E // ep
    worst = 0.0
    for i, (name, _) in enumerate(cases(ep)):
        ref = reference(topk, world, ep, i)
        got = [per_rank[r][i] for r in range(world)]
        checks = {
            "out": (torch.cat([g["out"] for g in got]), ref["out"]),
            "x_grad": (torch.cat([g["x_grad"] for g in got]), ref["x_grad"]),
            "router_grad": (sum(g["router_grad"] for g in got), ref["router_grad"]),
        }
        for j, p in enumerate(ref["shared_grads"]):
            checks[f"shared{j}"] = (sum(g["shared_grads"][j] for g in got), p)
        for j, wname in enumerate(("w1", "w2", "w3")):
            # each ep rank's block summed over its edp group is the reference's slice
            blocks = [sum(g["expert_grads"][j] for g, e in zip(got, ep_rank) if e == k) for k in range(ep)]
            checks[wname] = (torch.cat(blocks), ref["expert_grads"][j])
            assert all(g["expert_shape"] == (L, 16, D) for g in got)
        for what, (a, b) in checks.items():
            assert a.shape == b.shape, (name, what)
            diff = rel_diff(a, b)
            worst = max(worst, diff)
            assert diff <= TOL, f"{name}/{what}: rel diff {diff:.3e}"
        assert ref["router_grad"].abs().sum() > 0  # gradients really reached the routing weights
        assert all(g["split_ok"] for g in got), name
        assert all(g["counts_ok"] for g in got), name
    print(f"ep={ep} top{topk}: worst rel diff {worst:.3e}")


def test_edge_cases_really_happen(spawned):
    world, ep, topk, spawned_ranks = spawned
    per_rank = [r["cases"] for r in spawned_ranks]
    ep_rank = [r["ep_rank"] for r in spawned_ranks]
    names = [n for n, _ in cases(ep)]
    starve = names.index("starve_rank0")
    one = names.index("one_rank")
    for r in range(world):
        if ep_rank[r] == 0:
            assert per_rank[r][starve]["recv_rows"] == 0  # ep rank 0 receives nothing
        if ep_rank[r] != ep - 1:  # only the last ep rank works; the others' experts get no token
            assert per_rank[r][one]["recv_rows"] == 0
            assert per_rank[r][one]["expert_grads"][0].abs().sum() == 0
        else:
            assert per_rank[r][one]["expert_grads"][0].abs().sum() > 0


def test_dedup_bytes(spawned):
    world, ep, topk, spawned_ranks = spawned
    per_rank = [r["cases"] for r in spawned_ranks]
    one = [n for n, _ in cases(ep)].index("one_rank")
    for i in range(len(cases(ep))):
        for r in range(world):
            res = per_rank[r][i]
            idx = res["idx"]
            T, K = idx.shape
            # distinct (token, destination rank) pairs, counted independently of the code under test
            pairs = len({(t, int(e) // (E // ep)) for t in range(T) for e in idx[t]})
            st = res["stats"]
            assert st["token_rank_pairs"] == pairs and st["token_expert_pairs"] == T * K
            assert st["payload_bytes"] == pairs * D * 4
            # comm counters: counts (int32 [ep, 1 + E/ep]: rows and per-expert pairs per rank)
            # + x rows + local ids (int32) + weights (fp32)
            assert res["dispatch_bytes"] == ep * (1 + E // ep) * 4 + pairs * (D * 4 + K * 4 + K * 4)
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


def test_fp8_payload_is_the_quantised_rows(spawned):
    """FP8 dispatch = the single-process MoE whose routed experts see quantize->dequantize(x)
    (routing and the shared expert see x itself), at 1 + 4/128 bytes per element."""
    world, ep, topk, spawned_ranks = spawned
    moe = make_moe(topk, torch.zeros(E)).eval()
    x, _ = data(world, 0)
    x_TD = x.reshape(-1, D)
    with torch.no_grad():
        idx, w, _ = moe.router(x_TD)
        q, scale = quantize_act(x_TD)
        routed = moe.experts(dequantize(q, scale), idx, w)
        want = (routed + moe.shared(x_TD)).view(x.shape)
        exact = moe(x)
    got = torch.cat([r["fp8_out"] for r in spawned_ranks])
    assert rel_diff(got, want) <= TOL
    # the payload really was quantised, and stays within FP8's tolerance of the exact layer
    assert 1e-8 < rel_diff(got, exact) < 1e-3
    for r in spawned_ranks:
        st = r["fp8_stats"]
        assert st["payload_bytes"] == st["token_rank_pairs"] * (D + 4 * -(-D // 128))


def node_limited_reference(s_TE: torch.Tensor, bias: torch.Tensor, topk: int, n_nodes: int, max_nodes: int,
                           n_groups: int, topk_groups: int) -> list[set[int]]:
    """V3's node-limited, then group-limited, top-k selection written per token, plainly."""
    E = s_TE.shape[1]
    per_node, per_group, best = E // n_nodes, E // n_groups, -(-topk // max_nodes)
    chosen = []

    def rating(scores, experts, n):  # sum of the n best scores among `experts`
        return sum(sorted((scores[e] for e in experts), reverse=True)[:n])

    node_experts = [range(n * per_node, (n + 1) * per_node) for n in range(n_nodes)]
    for scores in (s_TE + bias).tolist():
        nodes = sorted(range(n_nodes), key=lambda n: rating(scores, node_experts[n], best),  # noqa: B023
                       reverse=True)[:max_nodes]
        allowed = {e for n in nodes for e in node_experts[n]}
        group_experts = [[e for e in range(g * per_group, (g + 1) * per_group) if e in allowed]
                         for g in range(n_groups)]
        groups = sorted((g for g in range(n_groups) if group_experts[g]),
                        key=lambda g: rating(scores, group_experts[g], 2), reverse=True)[:topk_groups]
        candidates = [e for g in groups for e in group_experts[g]]
        chosen.append(set(sorted(candidates, key=lambda e: scores[e], reverse=True)[:topk]))
    return chosen


def test_node_limited_routing(spawned):
    """max_nodes=1 with one rank per simulated node: each token goes to exactly one rank, its
    experts match the per-token reference rule, and the layer equals the single process."""
    world, ep, topk, spawned_ranks = spawned
    moe = make_moe(topk, torch.zeros(E))
    limit_nodes(moe, n_nodes=ep, max_nodes=1)
    x, _ = data(world, 0)
    with torch.no_grad():
        want = moe(x)
        s_TE = moe.router.scores(x.reshape(-1, D))
    got = torch.cat([r["limited_out"] for r in spawned_ranks])
    assert rel_diff(got, want) <= TOL
    expected = node_limited_reference(s_TE, moe.router.expert_bias, topk, ep, 1, 4, 2)
    routed = [set(row) for r in spawned_ranks for row in r["limited_idx"].tolist()]
    assert routed == expected
    unlimited = make_moe(topk, torch.zeros(E)).router(x.reshape(-1, D))[0]
    assert any(len({e // (E // ep) for e in row}) > 1 for row in unlimited.tolist())  # the limit bites
    for r in spawned_ranks:
        assert r["limited_rows_per_token"].tolist() == [1] * len(r["limited_rows_per_token"])
