"""DualPipe's sub-layer overlap (framework/model/substeps.py, parallel/pipeline/runtime.py) and
activation recompute (framework/model/recompute.py), all fp32.

- The sub-step cut of a stage against today's plain forward (Stage.loss + autograd): losses
  torch.equal, gradients calc_diff < 1e-10, router loads torch.equal; each recompute mode too.
- The interleave's issue order and pairing rule on hand-made step lists.
- One spawn of 4 ranks: pp=2 x dp=2 x ep=2 DualPipe and pp=4 DualPipeV, the interleaved FB
  against the sequential one (losses torch.equal, gradients calc_diff < 1e-10), each recompute
  mode against none, and the timing-free trace: every all-to-all of an interleaved pair is
  issued before the computation meant to hide it and waited after it; every P2P batch that
  carries only sends is issued at its action's start and waited after a computation.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from duet_kernels.fp8.reference import calc_diff
from framework.model import Transformer
from framework.model.substeps import StagePass, Step, StepContext, interleave
from launch.ranks import run_ranks
from parallel.pipeline.p2p import p2p_plan
from parallel.pipeline.runtime import PipelineRunner, hold_stages, holders
from parallel.pipeline.schedules import Placement, build
from parallel.pipeline.wgrad import split_weight_grads
from tests.test_p2p_plan import boundary_messages
from tests.test_pipeline import MB, D, T, model_cfg

MODES = ("none", "selective", "full")


def make(n_layers: int, recompute: str = "none", split: bool = True) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(model_cfg(n_layers), recompute=recompute))
    return split_weight_grads(model) if split else model


def data(seed: int, n: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64, (n, MB, T), generator=g)
    return list(tokens), list(torch.randint(0, 64, (n, MB, T), generator=g))


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def loads_of(model) -> list[torch.Tensor]:
    return [m.router.expert_load.clone() for m in model.moe_layers()]


# --------------------------------------------------------------------------- one process


def test_substeps_and_recompute_equal_the_plain_block():
    (tokens,), (targets,) = data(1)
    ref_model = make(3, split=False)
    loss_ref, _ = ref_model.split_stages(1)[0].loss(tokens, targets)
    (loss_ref * 0.5).backward()
    ref = grads_of(ref_model)
    # (recompute, weight-gradient split, cut: the sub-step pass, else the plain forward of pp=1);
    # tests/test_pipeline.py covers the split sub-step pass without recompute
    runs = [("none", False, True)] + [(mode, True, cut) for mode in MODES[1:] for cut in (False, True)]
    for mode, split, cut in runs:
        model = make(3, mode, split)
        stage = model.split_stages(1)[0]
        if cut:
            pas = StagePass(stage, tokens, targets, StepContext(scale=0.5))
            for step in pas.forward_steps():
                step.run()
            loss, _ = pas.output()
            for step in pas.backward_steps():
                step.run()
        else:
            loss, _ = stage.loss(tokens, targets)
            (loss * 0.5).backward()
        label = (mode, split, cut)
        assert torch.equal(loss, loss_ref), label
        loads = zip(loads_of(model), loads_of(ref_model), strict=True)
        assert all(torch.equal(a, b) for a, b in loads), label  # each token counted once
        got = grads_of(model)
        assert set(got) == set(ref), label
        for n, want in ref.items():
            assert calc_diff(got[n], want) < 1e-10, (label, n)


def _steps(names: list[str]) -> list[Step]:
    return [Step(n, "compute", lambda: None, StepContext()) for n in names]


MOE_F = ["attention.F", "dispatch.F", "sizes.F", "experts.F", "combine.F"]
MOE_B = ["combine.B", "experts.B", "dispatch.B", "experts.W", "attention.B", "attention.W"]


def test_interleave_order_and_pairing_rule():
    # first stage forward (embedding, dense L0, MoE L1 L2) with a last-stage backward (tail, L5)
    f = ["embed.F", "L0.F"] + [f"L1.{s}" for s in MOE_F] + [f"L2.{s}" for s in MOE_F]
    b = ["head.B", "head.W"] + [f"L5.{s}" for s in MOE_B]
    got = [s.name for s in interleave(_steps(f), _steps(b))]
    assert got == ["embed.F", "L0.F", "head.B", "head.W",
                   "L5.combine.B", "L1.attention.F", "L1.dispatch.F", "L5.experts.B", "L1.sizes.F",
                   "L5.dispatch.B", "L5.experts.W", "L1.experts.F", "L1.combine.F", "L5.attention.B",
                   "L5.attention.W", "L2.attention.F", "L2.dispatch.F", "L2.sizes.F", "L2.experts.F",
                   "L2.combine.F"]
    # more MoE blocks on the backward side: the forward's remaining plain steps hide the first
    # extra block's combine(B); the next extra block runs as it is
    f = [f"L3.{s}" for s in MOE_F] + ["head.F"]
    b = [f"L2.{s}" for s in MOE_B] + [f"L1.{s}" for s in MOE_B] + [f"L0.{s}" for s in MOE_B] + ["embed.B"]
    got = [s.name for s in interleave(_steps(f), _steps(b))]
    assert got[:11] == ["L2.combine.B", "L3.attention.F", "L3.dispatch.F", "L2.experts.B", "L3.sizes.F",
                        "L2.dispatch.B", "L2.experts.W", "L3.experts.F", "L3.combine.F", "L2.attention.B",
                        "L2.attention.W"]
    assert got[11:] == (["L1.combine.B", "head.F"] + [f"L1.{s}" for s in MOE_B[1:]]
                        + [f"L0.{s}" for s in MOE_B] + ["embed.B"])
    assert sorted(got) == sorted(f + b)
    # the last stage's forward (L5, head, MTP L6) against the first stage's backward (L1, dense
    # L0, embedding): the MTP block's count exchange hides behind L0's backward, its payload
    # behind the embedding's
    f = [f"L5.{s}" for s in MOE_F] + ["head.F", "mtp1_in.F"] + [f"L6.{s}" for s in MOE_F] + ["mtp1_out.F"]
    b = [f"L1.{s}" for s in MOE_B] + ["L0.B", "L0.W", "embed.B", "embed.W"]
    got = [s.name for s in interleave(_steps(f), _steps(b))]
    assert got[11:] == ["head.F", "mtp1_in.F", "L6.attention.F", "L6.dispatch.F", "L0.B", "L0.W",
                        "L6.sizes.F", "embed.B", "embed.W", "L6.experts.F", "L6.combine.F", "mtp1_out.F"]
    assert sorted(got) == sorted(f + b)


# --------------------------------------------------------------------------- spawned ranks

# (label, schedule, pp, chunks, n_layers, layers per stage, recompute, interleave)
EP_CASES = [("dp", "dualpipe", 2, 4, 3, None, "none", True), ("dp", "dualpipe", 2, 4, 3, None, "none", False),
            ("dp", "dualpipe", 2, 4, 3, None, "full", True),
            ("dp", "dualpipe", 2, 4, 3, None, "selective", True),
            ("dp31", "dualpipe", 2, 4, 4, (3, 1), "none", True),  # stages of 2 and 1 MoE blocks
            ("dp31", "dualpipe", 2, 4, 4, (3, 1), "none", False)]
V_CASES = [("v", "dualpipev", 4, 8, 8, None, "none", True), ("v", "dualpipev", 4, 8, 8, None, "none", False),
           ("v", "dualpipev", 4, 8, 8, None, "full", True)]


def _run(case, pp_rank, peers, group, mesh, data_seed):
    _, name, pp, chunks, n_layers, layers, recompute, inter = case
    placement = Placement(name, pp, chunks)
    model = make(n_layers, recompute)
    if mesh is not None:
        from parallel.expert_parallel import enable_expert_parallel
        enable_expert_parallel(model, mesh)
    stages = model.split_stages(placement.n_stages, list(layers) if layers else None)
    runner = PipelineRunner(hold_stages(stages, placement, pp_rank), placement, pp_rank, peers, group,
                            interleave=inter)
    events = []
    runner.trace = lambda event, what: events.append((event, what))
    tokens, targets = data(data_seed, chunks)
    out = runner.step(tokens, targets, (MB, T, D), torch.float32, torch.device("cpu"), contextlib.nullcontext)
    held = {n for n, rs in holders(model, stages, placement).items() if pp_rank in rs}
    return {"losses": out.losses, "aux": out.aux, "events": events, "loads": loads_of(model),
            "grads": {n: g for n, g in grads_of(model).items() if n in held}}


def overlap_worker(rank: int, world: int) -> dict:
    from parallel.mesh import Layout, build_mesh

    mesh = build_mesh(Layout(pp=2, dp=2, ep=2))
    peers = [mesh.layout.rank_of(p, mesh.dp_rank) for p in range(2)]
    out = {c: _run(c, mesh.pp_rank, peers, mesh.pp_group, mesh, 7 + 100 * mesh.dp_rank) for c in EP_CASES}
    out.update({c: _run(c, rank, list(range(world)), None, None, 7) for c in V_CASES})
    out["pp_rank"] = mesh.pp_rank
    out["bf16_p2p_bytes"] = _bf16_p2p_bytes(mesh, peers)
    return out


def _bf16_p2p_bytes(mesh, peers) -> int:
    """P2P bytes one DualPipe step moves under bf16 autocast (sends and receives booked)."""
    from parallel import comm
    from parallel.expert_parallel import enable_expert_parallel
    from parallel.pipeline.runtime import boundary_dtype

    placement = Placement("dualpipe", 2, 4)
    model = make(3)
    enable_expert_parallel(model, mesh)
    stages = model.split_stages(2)
    runner = PipelineRunner(hold_stages(stages, placement, mesh.pp_rank), placement, mesh.pp_rank, peers,
                            mesh.pp_group)
    tokens, targets = data(3 + 100 * mesh.dp_rank, 4)

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    dtype = boundary_dtype("cpu", bf16)
    before = comm.comm_stats().get("batch_p2p", {}).get("bytes", 0)
    out = runner.step(tokens, targets, (MB, T, D), dtype, torch.device("cpu"), bf16)
    assert all(torch.isfinite(v) for v in out.losses.values())
    return comm.comm_stats()["batch_p2p"]["bytes"] - before


@pytest.fixture(scope="module")
def spawned():
    return run_ranks(overlap_worker, 4, timeout_s=400)


def _same(a: dict, b: dict, label) -> None:
    assert a["losses"].keys() == b["losses"].keys(), label
    for mb in a["losses"]:
        assert torch.equal(a["losses"][mb], b["losses"][mb]), (label, mb)
    assert a["aux"].keys() == b["aux"].keys() and all(torch.equal(a["aux"][k], b["aux"][k]) for k in a["aux"])
    assert all(torch.equal(x, y) for x, y in zip(a["loads"], b["loads"], strict=True)), label
    assert a["grads"].keys() == b["grads"].keys() and a["grads"], label
    for n in a["grads"]:
        assert calc_diff(a["grads"][n], b["grads"][n]) < 1e-10, (label, n)


def test_interleaved_equals_sequential_and_recompute_equals_none(spawned):
    for cases in (EP_CASES, V_CASES):
        base = {(c[0], c[6], c[7]): c for c in cases}
        for c in cases:
            if c[6] == "none" and c[7]:
                ref = base[(c[0], "none", False)]  # interleaved vs sequential FB
            elif c[6] != "none":
                ref = base[(c[0], "none", True)]  # recompute vs none, both interleaved
            else:
                continue
            for r, per_rank in enumerate(spawned):
                _same(per_rank[c], per_rank[ref], (c, ref, r))
            assert sum(len(per_rank[c]["losses"]) for per_rank in spawned) == c[3] * (2 if c[2] == 2 else 1)


HIDER = {"combine.B": "attention.F", "dispatch.F": "experts.B", "dispatch.B": "experts.F",
         "combine.F": "attention.B"}


def _fb_spans(events):
    """(action label, events inside) for every FB action ("F<p>.<mb>+B<p>.<mb>")."""
    out, current = [], None
    for event, what in events:
        if event == "action":
            current = (what, []) if "+" in what else None
        elif event == "done":
            if current is not None:
                out.append(current)
            current = None
        elif current is not None:
            current[1].append((event, what))
    return out


def _hidden_all_to_alls(inside, block: str | None = None) -> tuple[int, int]:
    """(all-to-alls issued with a computation of the other micro-batch between issue and wait,
    pairs of MoE blocks in this FB); block: count only that block's all-to-alls (e.g. "L3")."""
    hidden = 0
    for i, (event, what) in enumerate(inside):
        if block is not None and not what.startswith(f"{block}."):
            continue
        step, _, mb = what.partition("@")
        kind = step.split(".", 1)[-1]
        if event != "issue" or kind not in HIDER:
            continue
        waits = [j for j, e in enumerate(inside) if e == ("wait", what) and j > i]
        assert waits, f"{what} issued and never waited in its FB"
        between = inside[i + 1:waits[0]]
        hidden += any(e == "compute" and w.split("@")[0].endswith(HIDER[kind]) and w.split("@")[1] != mb
                      for e, w in between)
    moe_f = {w.split(".")[0] for e, w in inside if e == "compute" and ".attention.F@" in w}
    moe_b = {w.split(".")[0] for e, w in inside if e == "compute" and ".attention.B@" in w}
    return hidden, min(len(moe_f), len(moe_b))


def _reads_behind_experts_b(inside) -> int:
    """Dispatches whose host read (sizes.F) comes after a computation of the other micro-batch's
    experts(B) that was queued after their count exchange (dispatch.F) was issued."""
    behind = 0
    for i, (event, what) in enumerate(inside):
        step, _, mb = what.partition("@")
        if event != "issue" or not step.endswith(".sizes.F"):
            continue
        counts = inside.index(("issue", f"{step.removesuffix('sizes.F')}dispatch.F@{mb}"))
        behind += any(e == "compute" and w.split("@")[0].endswith(".experts.B") and w.split("@")[1] != mb
                      for e, w in inside[counts + 1:i])
    return behind


def test_trace_each_all_to_all_and_p2p_batch_is_hidden(spawned):
    hidden_p2p = 0
    early_fb = 0  # receives an FB action reads, issued one boundary early and hidden
    for cases, pp in ((EP_CASES, 2), (V_CASES, 4)):
        c = cases[0]
        assert c[6] == "none" and c[7]
        pairs_seen = 0
        for r, per_rank in enumerate(spawned):
            rank = per_rank["pp_rank"] if pp == 2 else r
            events = per_rank[c]["events"]
            for action, inside in _fb_spans(events):
                hidden, pairs = _hidden_all_to_alls(inside)
                assert hidden == 4 * pairs, (c, rank, action, hidden, pairs)
                assert _reads_behind_experts_b(inside) == pairs, (c, rank, action, pairs)
                pairs_seen += pairs
            for action, inside in _fb_spans(per_rank[cases[1]]["events"]):  # the sequential FB hides less
                hidden, pairs = _hidden_all_to_alls(inside)
                assert pairs == 0 or hidden < 4 * pairs, (cases[1], rank, action, hidden, pairs)
                assert _reads_behind_experts_b(inside) == 0, (cases[1], rank, action)
            # P2P batches: issued at their boundary, waited where the action first reads one of
            # their receives, else when it ends. A batch with no receive in or after it at its
            # boundary (batches finish in issue order) must travel behind a computation of its
            # action; which batches those are follows from the plan alone.
            plan = p2p_plan(c[1], pp, c[3], rank)
            issued = [w for e, w in events if e == "issue" and w.startswith("p2p")]
            assert len(issued) == len({op.batch for op in plan}), (c, rank)
            for before in sorted({op.before for op in plan}):
                batches = sorted({op.batch for op in plan if op.before == before})
                sends = [all(op.op == "send" for op in plan if op.batch == b) for b in batches]
                for i in range(len(batches)):
                    key = f"p2p{before}.{i}"
                    issue, wait = events.index(("issue", key)), events.index(("wait", key))
                    assert issue < wait, (c, rank, key)
                    assert not any(e in ("action", "done") for e, _ in events[issue:wait]), (c, rank, key)
                    if all(sends[i:]):
                        assert any(e == "compute" for e, _ in events[issue:wait]), (c, rank, key)
                        hidden_p2p += 1
            # Receives read only by a later action than the boundary they are issued at (the
            # plan's early receives, parallel/pipeline/p2p.py): that boundary's action computes
            # while they travel. Consumers follow from the schedule alone.
            actions = build(c[1], pp, c[3])[rank]
            _, consumer = boundary_messages(c[1], pp, c[3], rank)
            batch_key = {}
            for before in sorted({op.before for op in plan}):
                for i, b in enumerate(sorted({op.batch for op in plan if op.before == before})):
                    batch_key[b] = f"p2p{before}.{i}"
            for b, key in batch_key.items():
                recvs = [op for op in plan if op.batch == b and op.op == "recv"]
                if not recvs or min(consumer[op.message] for op in recvs) <= recvs[0].before:
                    continue
                issue, wait = events.index(("issue", key)), events.index(("wait", key))
                assert any(e == "compute" for e, _ in events[issue:wait]), (c, rank, key)
                early_fb += sum(actions[consumer[op.message]].kind == "FB" for op in recvs)
        assert pairs_seen > 0, c
    assert hidden_p2p > 0, hidden_p2p
    # The last stage's MTP block (L<n_layers>) is a unit like any MoE block: where the paired
    # backward has a block left for it (dp31: forward L3 + MTP L4 against backward L2 L1), its
    # forward dispatch and combine hide behind the other micro-batch (as a plain tail: none).
    c = EP_CASES[4]
    assert c[0] == "dp31" and c[6] == "none" and c[7]
    mtp_hidden = [_hidden_all_to_alls(inside, f"L{c[4]}")[0] for per_rank in spawned
                  for _, inside in _fb_spans(per_rank[c]["events"])]
    assert min(mtp_hidden) == 2, mtp_hidden
    # With no block left to pair with (dp: forward L2 + MTP L3 against backward L1, dense L0,
    # embedding), the backward's plain steps hide the MTP block's count exchange and payload.
    c, spans = EP_CASES[0], 0
    assert c[0] == "dp" and c[6] == "none" and c[7]
    for per_rank in spawned:
        for _, inside in _fb_spans(per_rank[c]["events"]):
            mb = next((w.split("@")[1] for e, w in inside if w.startswith(f"L{c[4]}.dispatch.F@")), None)
            if mb is None:
                continue
            marks = [inside.index(e) for e in (("issue", f"L{c[4]}.dispatch.F@{mb}"),
                                               ("issue", f"L{c[4]}.sizes.F@{mb}"),
                                               ("wait", f"L{c[4]}.dispatch.F@{mb}"))]
            for lo, hi in zip(marks, marks[1:]):
                assert any(e == "compute" and not w.endswith(f"@{mb}") for e, w in inside[lo:hi]), inside
            spans += 1
    assert spans > 0
    assert early_fb > 0, early_fb


def test_planner_activation_memory_within_25_percent_of_saved_bytes():
    """Bytes one micro-batch's forward leaves for backward on a stage, as saved_tensors_hooks see
    them (parameters and parameter-shaped weight gradients computed ahead excluded: the plan
    counts those as gradients), against duet-plan's model, for three stages x three modes."""
    from framework.config import ModelConfig
    from framework.model.recompute import SavedBytes
    from launch.planner import stage_activation_bytes

    cfg, B, T = ModelConfig(), 2, 40  # the tiny preset, fp32; 80 rows: no parameter has that size
    measured = {}
    for layout, index in (((2, 2), 0), ((1, 2, 1), 1), ((1, 2, 1), 2)):  # first, middle, last stage
        for mode in MODES:  # a fresh model each: nothing saved by an earlier pass is alive
            torch.manual_seed(0)
            model = Transformer(dataclasses.replace(cfg, n_layers=4, recompute=mode))
            stage = model.split_stages(len(layout), list(layout))[index]
            g = torch.Generator().manual_seed(0)
            x = (torch.randint(0, cfg.vocab_size, (B, T), generator=g) if stage.is_first
                 else torch.randn(B, T, cfg.dim, generator=g))
            targets = torch.randint(0, cfg.vocab_size, (B, T), generator=g) if stage.is_last else None
            with SavedBytes(model.parameters(), gradient_shaped=True) as meter:
                pas = StagePass(stage, x, targets, StepContext())
                for step in pas.forward_steps():
                    step.run()
                pas.output()
                meter.sample()
            lo, hi = stage.layer_range
            predicted = stage_activation_bytes(cfg, "fp32", mode, lo, hi, stage.is_last) * B * T
            measured[(layout, index, mode)] = meter.peak
            assert abs(predicted / meter.peak - 1) <= 0.25, (layout, index, mode, meter.peak, predicted)
    for layout, index in (((2, 2), 0), ((1, 2, 1), 1), ((1, 2, 1), 2)):
        assert measured[(layout, index, "full")] < measured[(layout, index, "selective")] \
            < measured[(layout, index, "none")]


def test_bf16_boundaries_move_the_bytes_the_planner_counts(spawned):
    """Under bf16 autocast the stage boundaries travel in bf16; duet-plan's per-rank PP bytes
    (sends) use the same element size: summed over the ranks, booked sends + receives = 2 x."""
    from launch.planner import _pp_bytes, act_bytes
    from parallel.pipeline.runtime import boundary_dtype

    assert boundary_dtype("cpu", lambda: torch.autocast("cpu", dtype=torch.bfloat16)) == torch.bfloat16
    assert boundary_dtype("cpu", contextlib.nullcontext) == torch.float32
    placement = Placement("dualpipe", 2, 4)
    planned = sum(_pp_bytes(placement, r["pp_rank"], MB * T * D * act_bytes("bf16")) for r in spawned)
    assert sum(r["bf16_p2p_bytes"] for r in spawned) == 2 * planned > 0


def test_validate_refuses_recompute_that_does_not_compose():
    from framework.config import TrainConfig, validate

    def problems(**changes):
        cfg = TrainConfig()
        cfg.model.recompute = changes.pop("recompute")
        for key, value in changes.items():
            setattr(cfg.engine, key, value)
        return [p for p in validate(cfg) if "recompute" in p]

    assert problems(recompute="selective") == [] and problems(recompute="full") == []
    assert len(problems(recompute="some")) == 1
    assert len(problems(recompute="full", name="deepspeed", zero_stage=3)) == 1
    assert problems(recompute="full", name="deepspeed", zero_stage=2) == []
