"""DualPipe's sub-layer overlap on real ranks: how much expert-parallel all-to-all time the
interleaved FB hides, and the step time, against the sequential FB (forward, then backward).

    python -m benchmarks.pipeline_overlap [--rounds 5] [--seq 128] [--dim 128] [--micro-batches 4]

4 gloo ranks: pp=2 x dp=2 with ep=2 (the two dp ranks of a stage share its experts), DualPipe,
the tiny preset's model shape (4 blocks, the first dense), one thread per rank. Rounds alternate
the two contenders (interleaved, sequential), each a full training step of the same batch.
Per step and rank:
    blocked  seconds the rank sat waiting on expert-parallel communication: the count exchange
             and the host read of each dispatch, and every wait for rows in flight, forward and
             backward (the dispatchers' own counters, DispatchStats)
    alone    the same all-to-alls (recorded from the step: splits, shapes, dtypes, the host read
             after each count exchange) issued back to back with nothing else to do, in the same
             run, right after the step
    hidden   1 - blocked / alone
Printed: per contender the median over rounds of the slowest rank's step time and of the
ranks' mean hidden share, with min; and the step-time ratio interleaved / sequential.
On 2 cores shared by 4 ranks the figures are indicative only (the ranks' compute and gloo's
threads compete for the cores); speed is never asserted (DESIGN.md rule 8).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import time

import torch

CONTENDERS = ("interleaved", "sequential")


def _record_all_to_alls(log: list):
    """Wrap parallel.comm.all_to_all_single so every call on the ep group is logged."""
    from parallel import comm

    real = comm.all_to_all_single

    def logged(out, t, out_splits=None, in_splits=None, group=None, async_op=False):
        log.append((out.shape, t.shape, out.dtype, out_splits and list(out_splits),
                    in_splits and list(in_splits), group))
        return real(out, t, out_splits, in_splits, group=group, async_op=async_op)
    return real, logged


def _alone(log: list) -> float:
    """Replay logged all-to-alls back to back (host read after each count exchange)."""
    from parallel import comm

    start = time.perf_counter()
    for out_shape, in_shape, dtype, out_splits, in_splits, group in log:
        out, t = torch.empty(out_shape, dtype=dtype), torch.zeros(in_shape, dtype=dtype)
        comm.all_to_all_single(out, t, out_splits, in_splits, group=group, async_op=True).wait()
        if out_splits is None:  # the count exchange: a dispatch reads its sizes here
            out.tolist()
    return time.perf_counter() - start


def _rank(rank: int, world: int, rounds: int, seq: int, dim: int, chunks: int) -> dict:
    torch.set_num_threads(1)
    from framework.config import ModelConfig
    from framework.model import Transformer
    from parallel import comm
    from parallel import expert_parallel as ep_mod
    from parallel.mesh import Layout, build_mesh
    from parallel.pipeline.runtime import PipelineRunner, hold_stages
    from parallel.pipeline.schedules import Placement
    from parallel.pipeline.wgrad import split_weight_grads

    mesh = build_mesh(Layout(pp=2, dp=2, ep=2))
    cfg = dataclasses.replace(ModelConfig(), n_layers=4, dim=dim, max_seq_len=seq)
    torch.manual_seed(0)
    model = split_weight_grads(Transformer(cfg))
    ep_mod.enable_expert_parallel(model, mesh)
    placement = Placement("dualpipe", 2, chunks)
    stages = hold_stages(model.split_stages(2, [2, 2]), placement, mesh.pp_rank)
    peers = [mesh.layout.rank_of(p, mesh.dp_rank) for p in range(2)]
    runners = {c: PipelineRunner(stages, placement, mesh.pp_rank, peers, mesh.pp_group,
                                 interleave=c == "interleaved") for c in CONTENDERS}
    g = torch.Generator().manual_seed(1 + mesh.dp_rank)
    tokens = list(torch.randint(0, cfg.vocab_size, (chunks, 2, seq), generator=g))
    targets = list(torch.randint(0, cfg.vocab_size, (chunks, 2, seq), generator=g))
    dispatchers = ep_mod.dispatchers(model)
    out = {c: {"step_s": [], "blocked_s": [], "alone_s": []} for c in CONTENDERS}
    for r in range(rounds + 1):  # round 0 warms up
        order = CONTENDERS if r % 2 else CONTENDERS[::-1]
        for c in order:
            for d in dispatchers:
                d.stats.reset()
            log: list = []
            real, logged = _record_all_to_alls(log)
            comm.barrier()
            comm.all_to_all_single = logged
            try:
                start = time.perf_counter()
                runners[c].step(tokens, targets, (2, seq, dim), torch.float32, torch.device("cpu"),
                                contextlib.nullcontext)
                step_s = time.perf_counter() - start
            finally:
                comm.all_to_all_single = real
            model.zero_grad(set_to_none=True)
            blocked = sum(d.stats.dispatch_wait_s + d.stats.combine_wait_s + d.stats.backward_wait_s
                          for d in dispatchers)
            ep_log = [e for e in log if e[5] is mesh.ep_group]
            comm.barrier()
            alone = _alone(ep_log)
            if r:
                out[c]["step_s"].append(step_s)
                out[c]["blocked_s"].append(blocked)
                out[c]["alone_s"].append(alone)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--micro-batches", type=int, default=4)
    args = parser.parse_args(argv)
    from launch.ranks import run_ranks

    per_rank = run_ranks(_rank, 4, args.rounds, args.seq, args.dim, args.micro_batches, timeout_s=1200)
    summary = {}
    print(f"4 gloo ranks (pp=2 x dp=2, ep=2), DualPipe, {args.micro_batches} micro-batches of "
          f"2 x {args.seq}, dim {args.dim}, {args.rounds} alternated rounds")
    print(f"{'contender':<12} {'step s median':>13} {'step s min':>10} {'hidden median':>13} "
          f"{'hidden min':>10} {'blocked ms':>10} {'alone ms':>9}")
    for c in CONTENDERS:
        steps = [max(r[c]["step_s"][i] for r in per_rank) for i in range(args.rounds)]
        hidden = [statistics.mean(1 - r[c]["blocked_s"][i] / r[c]["alone_s"][i] for r in per_rank)
                  for i in range(args.rounds)]
        blocked = statistics.median(statistics.mean(r[c]["blocked_s"][i] for r in per_rank)
                                    for i in range(args.rounds))
        alone = statistics.median(statistics.mean(r[c]["alone_s"][i] for r in per_rank)
                                  for i in range(args.rounds))
        summary[c] = {"step_s": statistics.median(steps), "step_min_s": min(steps),
                      "hidden": statistics.median(hidden), "hidden_min": min(hidden)}
        print(f"{c:<12} {summary[c]['step_s']:>13.3f} {min(steps):>10.3f} {summary[c]['hidden']:>13.1%} "
              f"{min(hidden):>10.1%} {1e3 * blocked:>10.1f} {1e3 * alone:>9.1f}")
    ratio = summary["interleaved"]["step_s"] / summary["sequential"]["step_s"]
    print(f"step time interleaved / sequential: {ratio:.3f} (medians); indicative only on a shared "
          "2-core host")
    summary["ratio"] = ratio
    return summary


if __name__ == "__main__":
    main()
