"""Pipeline bubbles measured on real ranks against the schedule simulator's (= ANCHORS.md's) formula.

    python -m benchmarks.pipeline_bubble [--pp 4] [--chunks 16] [--f-ms 20] [--reps 3]
                                         [--out bench-timeline] [--quick]

Every schedule (gpipe, 1f1b, dualpipe, dualpipev) runs through parallel.pipeline.runtime's
PipelineRunner on pp spawned gloo ranks with real P2P, on synthetic stages whose forward,
backward and weight-gradient work are sleeps of fixed length (DeepSeek's accounting: B = 2F,
W = F; a split backward sleeps B - W now and queues W through parallel/pipeline/wgrad.py).
Sleeping leaves the cores free, as a GPU kernel would, so pp ranks on 2 cores do not fight
over them and the timings show the schedule, not core contention. Tensors are tiny.

All schedules run the same model: a rank's share of it costs F per forward, so DualPipeV,
which cuts the model into 2 * pp stages, gets half of F, B and W per stage; DualPipe holds
pp stages twice (mirrors), each at full cost.

Per schedule: step time = median over repetitions of the slowest rank's step (barrier to
step end); measured bubble of a rank = step time - its busy time (its recorded spans except
"recv", the time blocked receiving; overlapping spans count once); formula bubble = the
simulator's for the same costs, worst rank, with F&B = F + B: the runner runs a pair's forward,
then its backward, in one thread (their sub-layer interleave is not built yet). For DualPipe and
DualPipeV that is ANCHORS.md's (S/2-1)(F&B+B-3W) for S stages; 1F1B and GPipe run split
backwards here (input gradient first, then W), which sends gradients upstream W earlier than
ANCHORS.md's unsplit (pp-1)(F+B): (pp-1)(F+B-W). "as run" simulates what the runner does with a
pair: F, whose output leaves with the next batch, then B; the formula instead finishes both
halves at the end of the pair.
The measured bubble also holds what the simulator leaves out: P2P latency (gloo hands a
message over only once the receiver posts its receive, and the runner issues the P2P plan's
batches at action boundaries: "recv ms" is the worst rank's time blocked in them), Python between
actions, sleeps overrunning on a busy host ("busy +%": measured busy time over the nominal).
The median DualPipe and 1F1B steps are written as timelines (PNG and Chrome trace) to --out.

Speed is never asserted (DESIGN.md rule 8): the figures depend on the host.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from duet_kernels.deferred import defer_or_return
from framework.plots import write_timeline
from parallel.pipeline.schedules import SCHEDULES, Action, Placement, build
from parallel.pipeline.simulator import Costs, simulate
from parallel.pipeline.timeline import Timeline, write_chrome_trace

MB_ROWS, DIM = 2, 8  # the boundary tensor of a micro-batch: tiny, communication is not the point
DRAWN = ("dualpipe", "1f1b")  # schedules whose median step is written as a timeline


class _Sleep(torch.autograd.Function):
    """y = x * weight, taking fixed times: forward f_s; backward b_s - w_s for the input gradient
    and w_s for the weight gradient, which a split backward queues for a later W action."""

    @staticmethod
    def forward(ctx, x, weight, f_s: float, b_s: float, w_s: float):
        time.sleep(f_s)
        ctx.save_for_backward(x, weight)
        ctx.b_s, ctx.w_s = b_s, w_s
        return x * weight

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        # The first stage's input needs no gradient, but it still pays the input-gradient time:
        # the formula gives every stage the same B.
        time.sleep(ctx.b_s - ctx.w_s)
        grad_x = grad_y * weight if ctx.needs_input_grad[0] else None
        w_s = ctx.w_s

        def weight_grad() -> torch.Tensor:
            time.sleep(w_s)
            return (grad_y * x).reshape(-1, x.shape[-1]).sum(0)

        return grad_x, defer_or_return(weight, weight_grad), None, None, None


class SleepBlock(nn.Module):
    """A dense block (framework.model.transformer.Block's interface for the runtime's sub-steps:
    no MoE, one compute step) that only takes time."""

    ffn = None
    layer_id = 0
    recompute = "none"

    def __init__(self, f_s: float, b_s: float, w_s: float) -> None:
        super().__init__()
        self.times = (f_s, b_s, w_s)
        self.weight = nn.Parameter(torch.ones(DIM))

    def whole(self, x: torch.Tensor) -> torch.Tensor:
        return _Sleep.apply(x, self.weight, *self.times)

    forward = whole


class SleepStage(nn.Module):
    """A pipeline stage (framework.model.transformer.Stage's interface) of one sleeping block;
    its embedding is the identity, its loss a squared error."""

    def __init__(self, is_first: bool, is_last: bool, f_s: float, b_s: float, w_s: float) -> None:
        super().__init__()
        self.is_first, self.is_last = is_first, is_last
        self.blocks = nn.ModuleDict({"0": SleepBlock(f_s, b_s, w_s)})
        self.mtp, self.mtp_weight = nn.ModuleList(), 0.0  # no multi-token prediction

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks["0"](x)

    def main_loss(self, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return h, (h - targets).square().mean()

    def loss(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = self.main_loss(self(x), targets)[1]
        return loss, {"main": loss.detach()}

    def balance_loss(self) -> torch.Tensor:
        return self.blocks["0"].weight.new_zeros(())


def stage_costs(name: str, pp: int, chunks: int, f_ms: float) -> Costs:
    """Per-stage costs in ms of the same model under each schedule (see the module docstring).
    A pair sleeps its forward, then its backward: F&B = F + B."""
    f = f_ms * pp / Placement(name, pp, chunks).n_stages
    return Costs(F=f, B=2 * f, W=f, FB=3 * f)


def as_run(schedule: list[list[Action]]) -> list[list[Action]]:
    """Each pair as the runner runs it: the forward, then the (unsplit) backward."""
    out = []
    for actions in schedule:
        seq: list[Action] = []
        for a in actions:
            if a.kind == "FB":
                seq += [Action("F", a.phase, a.mb), Action("B", a.b_phase, a.b_mb, split=a.split)]
            else:
                seq.append(a)
        out.append(seq)
    return out


def _rank(rank: int, world: int, names: tuple[str, ...], chunks: int, f_ms: float, reps: int) -> dict:
    """Per schedule, per repetition after a warm-up: this rank's step start, end and spans."""
    from parallel import comm
    from parallel.pipeline.runtime import PipelineRunner

    out: dict[str, list[dict]] = {}
    data = [torch.ones(MB_ROWS, DIM) for _ in range(chunks)]
    for name in names:
        placement = Placement(name, world, chunks)
        c = stage_costs(name, world, chunks, f_ms)
        last = placement.n_stages - 1
        stages = [SleepStage(s == 0, s == last, c.F / 1e3, c.B / 1e3, c.W / 1e3)
                  for s in (placement.stage_of(rank, p) for p in range(placement.phases))]
        out[name] = []
        for rep in range(reps + 1):  # rep 0 warms up (gloo connections, first autograd)
            timeline = Timeline()
            runner = PipelineRunner(stages, placement, rank, list(range(world)), record=timeline)
            comm.barrier()  # start together: waiting for a late peer is not the schedule's bubble
            start = time.perf_counter()
            runner.step(data, data, (MB_ROWS, DIM), torch.float32, torch.device("cpu"),
                        contextlib.nullcontext)
            end = time.perf_counter()
            for stage in stages:
                stage.zero_grad(set_to_none=True)
            if rep:
                out[name].append({"start": start, "end": end, "spans": timeline.spans[0]})
    return out


def _summarise(runs: list[list[dict]]) -> dict:
    """runs[rank][rep] -> medians over reps (ms): step (slowest rank), per rank busy, bubble and
    recv; and the median repetition, to draw."""
    reps, ranks = len(runs[0]), range(len(runs))
    steps = [max(r[i]["end"] - r[i]["start"] for r in runs) for i in range(reps)]
    busy = [[Timeline.from_ranks([r[i]["spans"]]).busy(0) for i in range(reps)] for r in runs]
    recv = [[sum(end - start for label, start, end in r[i]["spans"] if label == "recv") for i in range(reps)]
            for r in runs]

    def med(xs: list[float]) -> float:
        return 1e3 * statistics.median(xs)

    return {"step_ms": med(steps), "busy_ms": [med(busy[r]) for r in ranks],
            "bubble_ms": [med([steps[i] - busy[r][i] for i in range(reps)]) for r in ranks],
            "recv_ms": [med(recv[r]) for r in ranks],
            "median_rep": sorted(range(reps), key=steps.__getitem__)[reps // 2]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--chunks", type=int, default=16, help="micro-batches per step")
    parser.add_argument("--f-ms", type=float, default=20.0, help="forward ms of a rank's share of the model")
    parser.add_argument("--reps", type=int, default=3, help="measured steps per schedule (after a warm-up)")
    parser.add_argument("--out", type=Path, default=Path("bench-timeline"), help="where timelines go")
    parser.add_argument("--quick", action="store_true", help="pp 2, 4 micro-batches, F 5 ms, 1 rep")
    args = parser.parse_args(argv)
    if args.quick:
        args.pp, args.chunks, args.f_ms, args.reps = 2, 4, 5.0, 1
    from launch.ranks import run_ranks

    pp, chunks = args.pp, args.chunks
    print("Pipeline bubble: schedules run by PipelineRunner on gloo ranks with sleep-timed stages,\n"
          "against the simulator's bubble for the same costs. Speed is never asserted.")
    print(f"\npp={pp}, {chunks} micro-batches, per rank share F={args.f_ms:g} ms, B=2F, W=F "
          f"(DualPipeV stages: half), F&B=F+B; median of {args.reps} "
          "reps of the slowest rank")
    per_rank = run_ranks(_rank, pp, SCHEDULES, chunks, args.f_ms, args.reps, timeout_s=600)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"pp": pp, "chunks": chunks, "f_ms": args.f_ms, "reps": args.reps, "schedules": {},
                    "files": []}
    print(f"\n{'schedule':<10}{'step ms':>9}{'sim ms':>8}{'bubble':>8}{'formula':>9}{'as run':>8}"
          f"{'ratio':>7}{'recv ms':>9}{'busy +%':>9}{'x 1F1B':>8}   bubble ms per rank")
    for name in SCHEDULES:
        costs = stage_costs(name, pp, chunks, args.f_ms)
        placement = Placement(name, pp, chunks)
        sim = simulate(build(name, pp, chunks), placement, costs)
        run = simulate(as_run(build(name, pp, chunks)), placement, costs)  # each pair: F, then B
        e = _summarise([r[name] for r in per_rank])
        e.update(bubble_max_ms=max(e["bubble_ms"]), sim_step_ms=sim.makespan, sim_bubble_ms=sim.bubble,
                 formula_bubble_ms=max(sim.bubble), as_run_step_ms=run.makespan,
                 as_run_bubble_ms=max(run.bubble), busy_overrun=sum(e["busy_ms"]) / sum(sim.busy) - 1)
        formula = e["formula_bubble_ms"]
        e["ratio"] = e["bubble_max_ms"] / formula if formula > 0 else float("nan")
        result["schedules"][name] = e
        if name in DRAWN:
            spans = Timeline.from_ranks([r[name][e["median_rep"]]["spans"] for r in per_rank]).spans
            title = f"{name} pp={pp} chunks={chunks} F={args.f_ms:g}ms measured"
            result["files"] += [str(write_timeline(spans, args.out / f"{name}.png", title=title)),
                                str(write_chrome_trace(spans, args.out / f"{name}.trace.json"))]
    base = result["schedules"]["1f1b"]
    for name, e in result["schedules"].items():
        e["vs_1f1b"] = e["step_ms"] / base["step_ms"]
        e["sim_vs_1f1b"] = e["sim_step_ms"] / base["sim_step_ms"]
        print(f"{name:<10}{e['step_ms']:>9.1f}{e['sim_step_ms']:>8.0f}{e['bubble_max_ms']:>8.1f}"
              f"{e['formula_bubble_ms']:>9.1f}{e['as_run_bubble_ms']:>8.1f}{e['ratio']:>7.2f}"
              f"{max(e['recv_ms']):>9.1f}{100 * e['busy_overrun']:>9.1f}{e['vs_1f1b']:>8.3f}   "
              + " ".join(f"{b:.0f}" for b in e["bubble_ms"]))
    result["dualpipe_vs_1f1b"] = result["schedules"]["dualpipe"]["vs_1f1b"]
    print("\nbubble, formula, as run: worst rank, ms. ratio = measured / formula (goal: within 10%; nan "
          "where the formula is 0)."
          f"\nDualPipe step / 1F1B step: {result['dualpipe_vs_1f1b']:.3f} measured, "
          f"{result['schedules']['dualpipe']['sim_vs_1f1b']:.3f} simulated"
          " (each pair runs its F, then its B)")
    print("timelines: " + ", ".join(result["files"]))
    return result


if __name__ == "__main__":
    main()
