"""Expert-parallel communication: how much split-phase overlap hides, and what dedup saves.

    python -m benchmarks.ep_overlap [--ranks 4] [--tokens 2048] [--dim 1024] [--compute-ms 20]
                                    [--reps 5] [--quick]

1. Exposed communication. N gloo ranks run dispatch -> expert compute -> combine through
   parallel.expert_parallel.AllToAllDispatcher with random top-k routing, in two schemes that
   do the same three fixed-duration computes per iteration:
     serial      dispatch | shared expert | experts | combine | next micro-batch
     overlapped  dispatch_start | shared expert | dispatch_wait | experts | combine_start
                 | next micro-batch | combine_wait
   (the overlapped order is what a transformer block does: the shared expert runs while the
   tokens travel, the next micro-batch's attention while they come back). Exposed time is what
   the dispatcher itself counts as blocked on communication (DispatchStats: the count exchange
   and the waits for rows in flight, not the buffer gathers and index_adds around them); per
   repetition take the slowest rank, then the median over repetitions.
   hidden = 1 - exposed_overlapped / exposed_serial.
2. Bytes per token of dispatch at DeepSeek-V3's routing shape (top-8 of 256 experts), random
   routing: with dedup a token goes once to each rank owning one of its experts (DeepEP); without,
   once per (token, expert) pair. Pure arithmetic over a random topk_idx, no processes.

Speed is never asserted (DESIGN.md rule 8): the figures depend on the host.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from benchmarks.timing import slowest_median

TABLE_HEADING = "scheme        exposed ms/iter   wall ms/iter   blocked in (ms, median)"
V3_EXPERTS, V3_TOPK, V3_HIDDEN, BF16_BYTES = 256, 8, 7168, 2
EP_EXPERTS, EP_TOPK = 64, 8  # routing shape of the live benchmark (part 1)
ROUTING_TOKENS = 8192  # tokens drawn for the part-2 arithmetic


def _compute(ms: float) -> None:
    """Stand-in for a kernel of fixed duration. time.sleep releases the GIL and leaves the cores
    free, as a GPU kernel would: gloo's worker threads (which move the async all-to-alls) can run
    meanwhile. A CPU-bound torch op would instead fight the ranks' comm threads for 2 cores and
    measure core contention rather than overlap."""
    time.sleep(ms / 1000)


def _blocked(d) -> tuple[float, float]:
    """The dispatcher's own counters: seconds blocked on communication in dispatch and combine
    (the count exchange and waits for rows in flight; not the buffer work around them)."""
    return d.stats.dispatch_wait_s, d.stats.combine_wait_s


def _serial(d, x_TD, idx_TK, w_TK, ms: float) -> None:
    recv_x_ND, handle = d.dispatch(x_TD, idx_TK, w_TK)
    _compute(ms)  # shared expert, after dispatch instead of during it
    _compute(ms)  # routed experts
    d.combine(recv_x_ND, handle)  # identity experts: y_ND = recv_x_ND
    _compute(ms)  # next micro-batch's attention, after combine instead of during it


def _overlapped(d, x_TD, idx_TK, w_TK, ms: float) -> None:
    pending = d.dispatch_start(x_TD, idx_TK, w_TK)
    _compute(ms)  # shared expert while the tokens travel
    recv_x_ND, handle = d.dispatch_wait(pending)
    _compute(ms)  # routed experts (they need the tokens: nothing to overlap with)
    pending = d.combine_start(recv_x_ND, handle)
    _compute(ms)  # next micro-batch's attention while the outputs come back
    d.combine_wait(pending)


def _rank(rank: int, world: int, tokens: int, dim: int, compute_ms: float, reps: int) -> dict:
    """One rank of part 1: (exposed s, wall s, {call: s}) per repetition and scheme, after a warm-up."""
    from parallel import comm
    from parallel.expert_parallel import AllToAllDispatcher, layout_stats

    gen = torch.Generator().manual_seed(1234 + rank)  # each rank routes its own tokens
    x_TD = torch.randn(tokens, dim, generator=gen)
    idx_TK = torch.rand(tokens, EP_EXPERTS, generator=gen).topk(EP_TOPK, dim=1).indices
    w_TK = torch.rand(tokens, EP_TOPK, generator=gen).softmax(dim=1)
    d = AllToAllDispatcher(None, rank, world, EP_EXPERTS)
    times: dict[str, list[tuple[float, float, dict[str, float]]]] = {"serial": [], "overlapped": []}
    with torch.no_grad():
        for rep in range(reps + 1):
            # Alternate the schemes so that drift on a shared host hits both alike.
            for name, scheme in (("serial", _serial), ("overlapped", _overlapped)):
                comm.barrier()  # start together: waiting for a late peer is not comm cost
                d.stats.reset()
                began = time.perf_counter()
                scheme(d, x_TD, idx_TK, w_TK, compute_ms)
                wall = time.perf_counter() - began
                dispatch_s, combine_s = _blocked(d)
                if rep > 0:  # rep 0 warms up (buffers, gloo connections)
                    times[name].append((dispatch_s + combine_s, wall,
                                        {"dispatch": dispatch_s, "combine": combine_s}))
        _, handle = d.dispatch(x_TD, idx_TK, w_TK)
    stats = layout_stats(handle)
    return {"times": times, "rows_per_token": stats["token_rank_pairs"] / tokens}


def _summarise(per_rank: list[dict], name: str, which: int) -> float:
    """Median over repetitions of the slowest rank, in ms (which: 0 exposed, 1 wall)."""
    return 1000 * slowest_median([[t[which] for t in r["times"][name]] for r in per_rank])


def bytes_per_token(ranks: int, tokens: int = ROUTING_TOKENS, seed: int = 0) -> dict[str, float]:
    """Dispatch payload per token at V3's routing shape, dedup vs per-expert, random routing."""
    gen = torch.Generator().manual_seed(seed)
    idx_TK = torch.rand(tokens, V3_EXPERTS, generator=gen).topk(V3_TOPK, dim=1).indices
    dest_TK = idx_TK // (V3_EXPERTS // ranks)
    hit_TR = torch.zeros(tokens, ranks, dtype=torch.bool)
    hit_TR[torch.arange(tokens)[:, None], dest_TK] = True  # duplicates collapse: the dedup
    pairs_per_token = hit_TR.sum().item() / tokens
    # Cross-check: a rank is missed when all K distinct experts fall among the other ranks'.
    p_miss = math.comb(V3_EXPERTS - V3_EXPERTS // ranks, V3_TOPK) / math.comb(V3_EXPERTS, V3_TOPK)
    expected = ranks * (1 - p_miss)
    row_bytes = V3_HIDDEN * BF16_BYTES
    dedup, per_expert = pairs_per_token * row_bytes, V3_TOPK * row_bytes
    return {"pairs_per_token": pairs_per_token, "expected_pairs_per_token": expected,
            "dedup": dedup, "per_expert": per_expert, "ratio": dedup / per_expert}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--compute-ms", type=float, default=20.0, help="duration of each synthetic compute")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 ranks, 256 tokens, dim 128, 2 reps")
    args = parser.parse_args(argv)
    if args.quick:
        args.ranks, args.tokens, args.dim, args.reps = 2, 256, 128, 2
    from launch.ranks import run_ranks

    print("Exposed expert-parallel communication (time blocked on dispatch/combine) with and\n"
          "without split-phase overlap, and dispatch bytes per token with and without dedup.\n"
          "Speed is never asserted.")
    print(f"\n{args.ranks} gloo ranks, {args.tokens} tokens x {args.dim} fp32 per rank, top-{EP_TOPK} of "
          f"{EP_EXPERTS} experts,\n3 computes of {args.compute_ms:g} ms per iteration, "
          f"median of {args.reps} reps of the slowest rank")
    per_rank = run_ranks(_rank, args.ranks, args.tokens, args.dim, args.compute_ms, args.reps)
    result: dict = {"ranks": args.ranks, "tokens": args.tokens, "dim": args.dim,
                    "compute_ms": args.compute_ms, "reps": args.reps,
                    "rows_per_token": statistics.mean(r["rows_per_token"] for r in per_rank)}
    print(TABLE_HEADING)
    for name in ("serial", "overlapped"):
        exposed, wall = _summarise(per_rank, name, 0), _summarise(per_rank, name, 1)
        result[f"{name}_exposed_ms"], result[f"{name}_wall_ms"] = exposed, wall
        # Per call: median over reps and ranks (where the exposed time sits, not a max).
        calls = {c: 1000 * statistics.median(t[2][c] for r in per_rank for t in r["times"][name])
                 for c in per_rank[0]["times"][name][0][2]}
        result[f"{name}_calls_ms"] = calls
        per_call = ", ".join(f"{c} {v:.1f}" for c, v in calls.items())
        print(f"{name:<12}{exposed:>17.2f}{wall:>15.2f}   {per_call}")
    result["hidden_fraction"] = 1 - result["overlapped_exposed_ms"] / result["serial_exposed_ms"]
    # Only two computes can cover communication (the experts need the tokens), so when the
    # communication outlasts them no overlap can reach the goal: say how much was coverable at all.
    result["hidden_bound"] = min(1.0, 2 * args.compute_ms / result["serial_exposed_ms"])
    print(f"hidden fraction {100 * result['hidden_fraction']:.1f}% (goal >= 80%; at most "
          f"{100 * result['hidden_bound']:.0f}% coverable by 2 x {args.compute_ms:g} ms of compute)")
    print(f"dispatch sent {result['rows_per_token']:.2f} rows per token instead of {EP_TOPK}")

    print(f"\nDispatch bytes per token, top-{V3_TOPK} of {V3_EXPERTS} experts, random routing over "
          f"{ROUTING_TOKENS} tokens, bf16 hidden {V3_HIDDEN}")
    print(f"{'ranks':>5}{'ranks/token':>13}{'expected':>10}{'dedup B':>10}{'per-expert B':>14}{'ratio':>7}")
    result["bytes_per_token"] = {}
    for ranks in (4, 8):
        b = result["bytes_per_token"][ranks] = bytes_per_token(ranks)
        print(f"{ranks:>5}{b['pairs_per_token']:>13.3f}{b['expected_pairs_per_token']:>10.3f}"
              f"{b['dedup']:>10,.0f}{b['per_expert']:>14,.0f}{b['ratio']:>7.3f}")
    return result


if __name__ == "__main__":
    main()
