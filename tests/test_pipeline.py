"""Pipeline parallelism against the sequential single-process reference (DESIGN.md rule 6), and
the schedule simulator against ANCHORS.md's bubble and memory formulas.

One spawn per pp size runs every schedule, micro-batch count and weight-gradient setting. The
reference runs the same stages one micro-batch after another in this process, from the same
initial weights: per-micro-batch losses must be torch.equal (the stages compute the same ops on
the same bytes), gradients (summed over the ranks holding a parameter: DualPipe's mirrors, a
tied embedding) within calc_diff 1e-10, forward-only logits torch.equal.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading

import pytest
import torch

from duet_kernels.fp8.reference import calc_diff
from framework.config import ModelConfig
from framework.model import Transformer
from launch.ranks import run_ranks
from parallel.pipeline.runtime import PipelineRunner, hold_stages, holders
from parallel.pipeline.schedules import Placement, build, check
from parallel.pipeline.simulator import Costs, simulate
from parallel.pipeline.wgrad import split_weight_grads

MB, T, D = 2, 8, 16  # sequences per micro-batch, sequence length, model dim


def model_cfg(n_layers: int) -> ModelConfig:
    return ModelConfig(vocab_size=64, dim=D, n_layers=n_layers, n_dense_layers=1, dense_inter_dim=24,
                       max_seq_len=T, n_heads=2, q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=4,
                       qk_rope_head_dim=4, v_head_dim=4, n_routed_experts=4, n_shared_experts=1,
                       n_activated_experts=2, moe_inter_dim=8, n_expert_groups=1, n_limited_groups=1,
                       mtp_depth=1, seq_aux_alpha=0.01)


def cases(pp: int) -> list[tuple[str, int, bool]]:
    """(schedule, micro-batches, weight-gradient split)."""
    out = []
    for name in ("gpipe", "1f1b", "dualpipe", "dualpipev"):
        for chunks in (2 * pp, 2 * pp + (4 if name == "dualpipe" else 2)):
            out += [(name, chunks, False), (name, chunks, True)]
    return out


def make_model(n_stages: int, split: bool) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(model_cfg(n_stages)).double()  # one block per stage
    return split_weight_grads(model) if split else model


def batch(chunks: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(chunks)
    tokens = torch.randint(0, 64, (chunks, MB, T), generator=g)
    targets = torch.randint(0, 64, (chunks, MB, T), generator=g)
    return list(tokens), list(targets)


@contextlib.contextmanager
def thread_starts():
    """Names of the threads started inside (DESIGN.md rule 10: a step starts none)."""
    started, real_start = [], threading.Thread.start

    def start(thread):
        started.append(thread.name)
        return real_start(thread)
    threading.Thread.start = start
    try:
        yield started
    finally:
        threading.Thread.start = real_start


def pp_worker(rank: int, world: int) -> list[dict]:
    results = []
    for name, chunks, split in cases(world):
        placement = Placement(name, world, chunks)
        model = make_model(placement.n_stages, split)
        stages = model.split_stages(placement.n_stages)
        mine = hold_stages(stages, placement, rank)
        runner = PipelineRunner(mine, placement, rank, list(range(world)), wgrad_split=split)
        tokens, targets = batch(chunks)
        args = ((MB, T, D), torch.float64, torch.device("cpu"), contextlib.nullcontext)
        with thread_starts() as started:
            out = runner.step(tokens, targets, *args)
        held = {n for n, rs in holders(model, stages, placement).items() if rank in rs}
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if n in held and p.grad is not None}
        model.eval()
        logits = runner.forward_only(tokens, None, *args).logits
        results.append({"losses": out.losses, "aux": out.aux, "grads": grads, "logits": logits,
                        "held": held, "threads": started})
    return results


def run_sequential(stages, tokens, targets, chunks: int, backward: bool = True) -> tuple[dict, dict]:
    """Every micro-batch through every stage in turn: (last-stage losses, losses with the other
    stages' balance terms), backpropagating loss / chunks like the pipeline."""
    losses, totals = {}, {}
    for mb in range(chunks):
        h, aux = tokens[mb], []
        for stage in stages[:-1]:
            h = stage(h)
            aux.append(stage.balance_loss())
        loss, _ = stages[-1].loss(h, targets[mb])
        total = loss + sum(aux)
        if backward:
            (total / chunks).backward()
        losses[mb], totals[mb] = loss.detach(), total.detach()
    return losses, totals


@functools.cache
def reference(pp: int, name: str, chunks: int) -> dict:
    """The same stages run one after another, one micro-batch at a time, in one process."""
    n_stages = Placement(name, pp, chunks).n_stages
    model = make_model(n_stages, split=False)
    stages = model.split_stages(n_stages)
    tokens, targets = batch(chunks)
    losses, totals = run_sequential(stages, tokens, targets, chunks)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.eval()
    with torch.no_grad():
        logits = {mb: model(tokens[mb]) for mb in range(chunks)}
        full = {mb: model.train().loss(tokens[mb], targets[mb])[0] for mb in range(chunks)}
    return {"losses": losses, "totals": totals, "full": full, "grads": grads, "logits": logits}


@pytest.fixture(scope="module", params=[2, 4], ids=["pp2", "pp4"])
def spawned(request):
    return request.param, run_ranks(pp_worker, request.param, timeout_s=400)


def test_pipelined_step_equals_sequential_reference(spawned):
    pp, per_rank = spawned
    worst = 0.0
    for i, (name, chunks, split) in enumerate(cases(pp)):
        label = f"{name} pp={pp} chunks={chunks} split={split}"
        ref = reference(pp, name, chunks)
        got = [per_rank[r][i] for r in range(pp)]
        losses = {mb: v for g in got for mb, v in g["losses"].items()}
        assert sorted(losses) == list(range(chunks)), label
        for mb in range(chunks):
            assert torch.equal(losses[mb], ref["losses"][mb]), (label, mb)
            total = losses[mb] + sum(g["aux"].get(mb, 0) for g in got)
            assert abs(total - ref["totals"][mb]) <= 1e-6 * abs(ref["totals"][mb]), (label, mb)
            # the whole model's loss sums the same terms in another order (the loss is fp32)
            assert abs(total - ref["full"][mb]) <= 1e-6 * abs(ref["full"][mb]), (label, mb)
        held = set().union(*(g["held"] for g in got))
        assert held >= set(ref["grads"]), label  # every parameter lives somewhere
        for n, want in ref["grads"].items():
            pieces = [g["grads"][n] for g in got if n in g["grads"]]
            diff = calc_diff(sum(pieces), want)
            worst = max(worst, diff)
            assert diff < 1e-10, (label, n, diff)
        logits = {mb: v for g in got for mb, v in g["logits"].items()}
        assert sorted(logits) == list(range(chunks))
        assert all(torch.equal(logits[mb], ref["logits"][mb]) for mb in range(chunks)), label
    print(f"pp={pp}: {len(cases(pp))} cases, worst gradient calc_diff {worst:.2e}")


def test_pipeline_step_starts_no_thread(spawned):
    pp, per_rank = spawned
    assert sum(len(case["threads"]) for r in per_rank for case in r) == 0, per_rank[0][0]["threads"]


def test_dualpipe_holds_every_stage_twice(spawned):
    pp, per_rank = spawned
    i = [c[0] for c in cases(pp)].index("dualpipe")
    held = [per_rank[r][i]["held"] for r in range(pp)]
    for r in range(pp):
        assert held[r] == held[pp - 1 - r]  # rank r and its mirror hold the same stages
    assert "embed.weight" in held[0] and "head.weight" in held[0]  # first and last stage together


@pytest.mark.parametrize("pp", [4, 8, 16])
@pytest.mark.parametrize("costs", [Costs(F=1, B=2, W=1, FB=3), Costs(F=1, B=2, W=1, FB=2.5),
                                   Costs(F=2, B=4, W=2, FB=5), Costs(F=1, B=2, W=1, FB=2)])
def test_simulator_reproduces_bubble_formulas(pp, costs):
    """ANCHORS.md's table, in DeepSeek's accounting (B = 2F, W = F; F&B from no overlap gain to
    the full one): 1F1B's bubble on every rank, DualPipe's and DualPipeV's on the worst rank,
    and the peak number of live micro-batches on the first rank."""
    F, B, W, FB = costs.F, costs.B, costs.W, costs.FB
    for chunks in (2 * pp, 4 * pp):
        one = simulate(build("1f1b", pp, chunks, wgrad_split=False), Placement("1f1b", pp, chunks), costs)
        assert one.bubble == pytest.approx([(pp - 1) * (F + B)] * pp)
        assert one.peak_live[0] == pp
        dual = simulate(build("dualpipe", pp, chunks), Placement("dualpipe", pp, chunks), costs)
        assert max(dual.bubble) == pytest.approx((pp / 2 - 1) * (FB + B - 3 * W))
        assert dual.peak_live[0] == pp + 1
        # DualPipeV: 2 * pp stages on pp ranks; the formula counts stages
        v = simulate(build("dualpipev", pp, chunks), Placement("dualpipev", pp, chunks), costs)
        assert max(v.bubble) == pytest.approx((2 * pp / 2 - 1) * (FB + B - 3 * W))
        assert v.peak_live[0] == 2 * pp + 1
        assert dual.makespan < one.makespan  # what DualPipe is for


def test_schedule_rules_are_enforced():
    for name, pp, chunks, named in [("dualpipe", 3, 6, "even pp"), ("dualpipe", 4, 7, "even number"),
                                    ("dualpipe", 4, 6, ">= 2 * pp"), ("dualpipev", 4, 7, ">= 2 * pp"),
                                    ("zigzag", 2, 4, "choose one of")]:
        with pytest.raises(ValueError, match=re.escape(named)):
            check(name, pp, chunks)


EP_CASES = [("1f1b", 4, True), ("dualpipe", 4, True)]  # pp = 2, dp = 2, ep = 2


def pp_ep_worker(rank: int, world: int) -> list[dict]:
    """4 ranks: 2 pipeline stages x 2 data-parallel ranks, experts sharded over the 2 dp ranks
    of each stage; DualPipe's pairs run their forward, then their backward, in one thread."""
    from parallel.expert_parallel import enable_expert_parallel
    from parallel.mesh import Layout, build_mesh

    mesh = build_mesh(Layout(pp=2, dp=2, ep=2))
    results = []
    for name, chunks, split in EP_CASES:
        placement = Placement(name, 2, chunks)
        model = make_model(placement.n_stages, split)
        enable_expert_parallel(model, mesh)
        stages = model.split_stages(placement.n_stages)
        mine = hold_stages(stages, placement, mesh.pp_rank)
        peers = [mesh.layout.rank_of(p, mesh.dp_rank) for p in range(2)]
        runner = PipelineRunner(mine, placement, mesh.pp_rank, peers, mesh.pp_group, wgrad_split=split)
        tokens, targets = batch(chunks + 100 * mesh.dp_rank)  # each dp rank its own data
        with thread_starts() as started:
            out = runner.step(tokens[:chunks], targets[:chunks], (MB, T, D), torch.float64,
                              torch.device("cpu"), contextlib.nullcontext)
        held = {n for n, rs in holders(model, stages, placement).items() if mesh.pp_rank in rs}
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if n in held and p.grad is not None}
        # The same stages with the same expert parallelism, unpipelined: ranks 0 and 1 (one ep
        # group) run every micro-batch through all stages in turn. Their all-to-alls pair the
        # same micro-batches of the two dp ranks, so the experts see the same rows.
        sequential = {}
        if mesh.pp_rank == 0:
            ref_model = make_model(placement.n_stages, split=False)
            enable_expert_parallel(ref_model, mesh)
            sequential, _ = run_sequential(ref_model.split_stages(placement.n_stages), tokens, targets,
                                           chunks, backward=False)
        results.append({"losses": out.losses, "grads": grads, "dp_rank": mesh.dp_rank, "threads": started,
                        "ep_rank": mesh.ep_rank, "sequential": sequential})
    return results


def test_pipeline_with_expert_parallel_equals_sequential_reference():
    per_rank = run_ranks(pp_ep_worker, 4, timeout_s=400)
    for i, (name, chunks, _) in enumerate(EP_CASES):
        model = make_model(Placement(name, 2, chunks).n_stages, split=False)
        stages = model.split_stages(Placement(name, 2, chunks).n_stages)
        losses = {}
        for dp_rank in (0, 1):  # the reference: both dp ranks' micro-batches, one after another
            tokens, targets = batch(chunks + 100 * dp_rank)
            dp_losses, _ = run_sequential(stages, tokens, targets, chunks)
            losses.update({(dp_rank, mb): v for mb, v in dp_losses.items()})
        got = {(r[i]["dp_rank"], mb): v for r in per_rank for mb, v in r[i]["losses"].items()}
        assert sorted(got) == sorted(losses)
        for key, want in losses.items():  # one process: experts see other row groupings
            assert abs(got[key] - want) <= 1e-6 * abs(want), (name, key)
        assert not any(r[i]["threads"] for r in per_rank), name  # no second thread (rule 10)
        unpipelined = {(r[i]["dp_rank"], mb): v for r in per_rank for mb, v in r[i]["sequential"].items()}
        assert sorted(unpipelined) == sorted(got)
        assert all(torch.equal(got[k], unpipelined[k]) for k in got), name  # same rows: bit for bit
        E = 4
        for n, p in model.named_parameters():
            if ".experts." in n:  # each ep rank holds half the experts, with both dp ranks' tokens
                pieces = [sum(r[i]["grads"][n] for r in per_rank
                              if r[i]["ep_rank"] == k and n in r[i]["grads"]) for k in (0, 1)]
                got_grad = torch.cat(pieces)
                assert got_grad.shape[0] == E
            else:
                got_grad = sum(r[i]["grads"][n] for r in per_rank if n in r[i]["grads"])
            assert calc_diff(got_grad, p.grad) < 1e-10, (name, n)
