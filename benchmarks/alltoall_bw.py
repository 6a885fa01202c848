"""All-to-all bandwidth: the raw collective over a size sweep, and duet's dispatcher beside it.

    python -m benchmarks.alltoall_bw [--ranks N] [--reps 10] [--tokens T] [--dim D] [--quick]

1. Raw `all_to_all_single` (parallel.comm) of S bytes per rank, S swept over powers of 4.
   Per size: the slowest rank's time per repetition, median over repetitions. Reported as
   algorithm bandwidth S / t and bus bandwidth S / t x (N-1)/N, the nccl-tests convention:
   the share of a rank's buffer that really crosses a link, comparable to the link speed.
2. duet's expert-parallel dispatch + combine (parallel.expert_parallel.AllToAllDispatcher,
   random top-k routing, bf16 rows) against the raw collective moving the same bytes twice
   (once out, once back) in the same run. The ratio is what routing adds: the count exchange,
   the dedup gathers and the index_add of the combine.

On a host with at least two GPUs the ranks use NCCL, one GPU each (all GPUs by default). Elsewhere
(CPU, or a single GPU: NCCL cannot put two ranks on one device) the ranks are gloo processes on
loopback, and the figures are memory-copy and socket speeds, not link speeds: it says so.

Legend: T tokens per rank, D hidden size, K experts per token, E experts, N ranks.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.timing import slowest_median

WARMUP = 2  # repetitions dropped: connection set-up and buffer allocation


def _timed(fn, reps: int, device: torch.device) -> list[float]:
    """Seconds of fn() per repetition, all ranks starting together; warm-up dropped."""
    from parallel import comm

    out = []
    for i in range(reps + WARMUP):
        comm.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= WARMUP:
            out.append(time.perf_counter() - t0)
    return out


def _rank(rank: int, world: int, sizes: list[int], reps: int, tokens: int, dim: int, topk: int,
          n_experts: int) -> dict:
    from parallel import comm
    from parallel.expert_parallel import AllToAllDispatcher, layout_stats

    device = comm.collective_device()  # this rank's GPU under NCCL, else the CPU

    def raw(nbytes: int) -> list[float]:
        numel = max(world, nbytes // 2 // world * world)  # bf16 elements, equal splits
        send = torch.ones(numel, dtype=torch.bfloat16, device=device)
        recv = torch.empty_like(send)
        return _timed(lambda: comm.all_to_all_single(recv, send), reps, device)

    result: dict = {"raw": {s: raw(s) for s in sizes}}

    gen = torch.Generator().manual_seed(100 + rank)  # each rank routes its own tokens
    x_TD = torch.randn(tokens, dim, generator=gen).to(device=device, dtype=torch.bfloat16)
    idx_TK = torch.rand(tokens, n_experts, generator=gen).topk(topk, dim=1).indices.to(device)
    w_TK = torch.rand(tokens, topk, generator=gen).softmax(dim=1).to(device)
    d = AllToAllDispatcher(None, rank, world, n_experts)

    def round_trip():
        recv_ND, handle = d.dispatch(x_TD, idx_TK, w_TK)
        d.combine(recv_ND, handle)  # identity experts: what went out comes back
        return handle

    with torch.no_grad():
        result["dispatcher"] = _timed(round_trip, reps, device)
        stats = layout_stats(round_trip())
        # The raw baseline moves the largest rank's payload (the slowest rank sets the pace).
        sent = torch.tensor([float(stats["payload_bytes"])], device=device)
        comm.all_reduce(sent, op="max")
        result["payload_bytes"] = int(sent.item())
        result["raw_same_bytes"] = raw(result["payload_bytes"])
    result["rows_per_token"] = stats["token_rank_pairs"] / tokens
    return result


def main(argv: list[str] | None = None) -> dict:
    from launch.ranks import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    nccl = gpus >= 2
    parser.add_argument("--ranks", type=int, default=gpus if nccl else 2)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=4096 if nccl else 1024, help="tokens per rank")
    parser.add_argument("--dim", type=int, default=7168 if nccl else 1024)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="2 ranks, 3 sizes, 3 reps, 256 tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.ranks, args.reps, args.tokens, args.dim = 2, 3, 256, 256
    if nccl and args.ranks > gpus:
        raise SystemExit(f"alltoall_bw: --ranks {args.ranks} but this host has {gpus} GPUs; "
                         f"pass --ranks <= {gpus}")
    n_experts = 256 if 256 % args.ranks == 0 else 32 * args.ranks  # V3's 256 where it divides
    top = 256 << 20 if nccl else 16 << 20
    sizes = [s for s in (1 << 16) * 4 ** torch.arange(8) if s <= top]
    sizes = [int(s) for s in (sizes[:: max(1, len(sizes) // 3)][:3] if args.quick else sizes)]

    if nccl:
        where = f"NCCL, {args.ranks} x {torch.cuda.get_device_name()}"
    else:
        why = "one GPU: NCCL needs a GPU per rank" if gpus == 1 else "no GPU"
        where = f"gloo on loopback, {args.ranks} CPU processes ({why}; not a link-speed figure)"
    print(f"All-to-all bandwidth, {where}; median of {args.reps} reps of the slowest rank. "
          "Speed is never asserted.")
    per_rank = run_ranks(_rank, args.ranks, sizes, args.reps, args.tokens, args.dim, args.topk, n_experts,
                         backend="nccl" if nccl else "gloo", timeout_s=600)

    factor = (args.ranks - 1) / args.ranks
    print(f"\n{'bytes per rank':>15}{'ms':>10}{'algbw GB/s':>12}{'busbw GB/s':>12}")
    table = []
    for s in sizes:
        t = slowest_median([r["raw"][s] for r in per_rank])
        algbw = s / t / 1e9
        table.append({"bytes": s, "ms": 1000 * t, "algbw_gbps": algbw, "busbw_gbps": algbw * factor})
        print(f"{s:>15,}{1000 * t:>10.3f}{algbw:>12.3f}{algbw * factor:>12.3f}")

    disp = slowest_median([r["dispatcher"] for r in per_rank])
    base = 2 * slowest_median([r["raw_same_bytes"] for r in per_rank])  # out and back
    payload = per_rank[0]["payload_bytes"]
    rows = statistics.fmean(r["rows_per_token"] for r in per_rank)
    print(f"\ndispatch + combine: {args.tokens} tokens x {args.dim} bf16 per rank, top-{args.topk} of "
          f"{n_experts} experts, {rows:.2f} rows per token, {payload:,} bytes out per rank (largest)")
    for name, t in (("dispatcher round trip", disp), ("raw all_to_all, same bytes, x2", base)):
        print(f"{name:<34}{1000 * t:>10.3f} ms  busbw {2 * payload / t / 1e9 * factor:.3f} GB/s")
    print(f"dispatcher / raw: {disp / base:.2f}x")
    return {"backend": "nccl" if nccl else "gloo", "ranks": args.ranks, "sizes": table,
            "dispatcher_ms": 1000 * disp, "raw_same_bytes_ms": 1000 * base,
            "dispatcher_over_raw": disp / base,
            "payload_bytes": payload, "rows_per_token": rows}


if __name__ == "__main__":
    main()
