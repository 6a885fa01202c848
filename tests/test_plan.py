"""duet-plan: its arithmetic against hand-computed small cases, its parameters against the model's
exact count, its bubbles and live micro-batches against the schedule simulator, and its CLI."""

import math

import pytest

from framework.model import count_params
from launch.plan import main
from launch.planner import activation_items, ep_rows, ep_traffic, fp8_row_bytes, plan, stage_activation_bytes
from launch.run import compose
from parallel.pipeline.schedules import Placement, build
from parallel.pipeline.simulator import simulate

GiB = 2**30


def test_fp8_row_is_bytes_plus_a_scale_per_128():
    assert fp8_row_bytes(7168) == 7168 + 4 * 56 == 7392
    assert fp8_row_bytes(130) == 130 + 4 * 2


def test_ep_rows_one_node():
    # 8 experts on 2 ranks (4 each), top-2: P(a rank is hit) = 1 - C(4,2)/C(8,2) = 22/28.
    r = ep_rows(n_experts=8, top_k=2, ep=2, gpus_per_node=8, max_nodes=0)
    assert r.rows == pytest.approx(2 * 22 / 28)
    assert r.self_rows == pytest.approx(22 / 28) and r.intra_rows == pytest.approx(22 / 28)
    assert r.inter_rows == 0 and r.remote_nodes == 0


def test_ep_rows_node_limited():
    # 16 experts on 4 ranks in 2 nodes of 2; one node per token: its 8 experts, 2 ranks of 4.
    r = ep_rows(n_experts=16, top_k=2, ep=4, gpus_per_node=2, max_nodes=1)
    assert r.rows == pytest.approx(2 * 22 / 28)
    assert r.self_rows == pytest.approx(r.rows / 4) and r.intra_rows == pytest.approx(r.rows / 4)
    assert r.inter_rows == pytest.approx(r.rows / 2)
    assert r.remote_nodes == pytest.approx(0.5)  # the one node used is another with probability 1/2


def test_ep_traffic_bytes_fp8_dispatch_bf16_combine():
    cfg = compose(["model=tiny", "parallel.dp=4", "parallel.ep=4", "precision=fp8"])
    rows = ep_rows(8, 2, 4, 8, 0)
    t = ep_traffic(cfg, rows)
    moved = rows.intra_rows + rows.inter_rows
    assert t.dispatch_bytes == pytest.approx(moved * (128 + 4))  # dim 128: one fp32 scale
    assert t.combine_bytes == pytest.approx(moved * 2 * 128)
    assert t.ib_bytes == 0  # one node


def test_activations_hand_computed_full_recompute():
    cfg = compose(["model=tiny", "precision=fp32"])
    m = cfg.model  # dim 128, 3 blocks, 1 MTP depth, vocab 2048, fp32: 4 bytes
    # blocks' inputs (+ the 2 MoE blocks' experts-step inputs: normed rows and 2 fp32 gate weights),
    # MTP (projection input, 5 norm tensors, its MoE block), final-norm input, 2 heads' h
    blocks = 3 * 4 * 128 + 2 * (4 * 128 + 4 * 2)
    mtp = 4 * 2 * 128 + 4 * 5 * 128 + (2 * 4 * 128 + 4 * 2)
    per_token = blocks + mtp + 4 * 128 + 4 * 128 * 2
    assert stage_activation_bytes(m, "fp32", "full", 0, 3, last=True) == per_token == 8_728
    items = activation_items(m, "fp8", "selective", moe=True)
    # dim 128, top-2, expert inter 64, bf16: per routed row the w1 and w3 outputs (SwiGLU inputs)
    assert items["routed SwiGLU inputs"] == 2 * 2 * 2 * 64
    assert "q, k, v" not in items  # rebuilt from the latents under V3's recompute


def test_memory_and_dp_bytes_hand_computed():
    cfg = compose(["model=tiny", "precision=fp32", "parallel.dp=2", "parallel.zero1=true"])
    p = plan(cfg, "full")  # the hand count above
    counts = count_params(cfg.model)
    params = counts["total"] + counts["mtp"]
    mem = p.ranks[0].memory
    assert mem["weights"] == pytest.approx(4 * params / GiB) and mem["gradients"] == mem["weights"]
    assert mem["optimizer state"] == pytest.approx(2 * 4 * params / 2 / GiB)  # fp32 moments over dp 2
    tokens = 16 // 2 * 128
    assert mem["activations (1 live micro-batches)"] == pytest.approx(8_728 * tokens / GiB)  # test above
    # reduce-scatter of fp32 gradients + all-gather of fp32 weights, each (n-1)/n in a ring of 2
    assert p.ranks[0].dp_bytes == pytest.approx((4 + 4) * 0.5 * params)
    low = plan(compose(["model=tiny", "precision=fp32", "parallel.dp=2", "parallel.zero1=true",
                        "parallel.grad_reduce_dtype=bf16"]), "full")
    assert low.ranks[0].dp_bytes == pytest.approx((2 + 4) * 0.5 * params)  # bf16 gradients
    plain = plan(compose(["model=tiny", "precision=fp32", "parallel.dp=2"]), "full")
    assert plain.ranks[0].dp_bytes == pytest.approx(2 * 4 * 0.5 * params)  # all-reduce only


@pytest.mark.parametrize("schedule, expected", [("1f1b", [4, 4]), ("dualpipev", [8, 8])])
def test_pp_bytes_hand_computed(schedule, expected):
    cfg = compose(["model=tiny", "model.n_layers=4", "parallel.pp=2", f"parallel.schedule={schedule}",
                   "parallel.micro_batches=4", "data.batch_size=8"])
    p = plan(cfg)
    boundary = 2 * 128 * 128 * 2  # 2 sequences x 128 tokens x dim 128; auto plans as bf16 on a GPU
    assert [rp.pp_bytes / boundary for rp in p.ranks] == expected


@pytest.mark.parametrize("schedule, copies", [("1f1b", 1), ("dualpipe", 2), ("dualpipev", 1)])
def test_parameter_totals_equal_count_params(schedule, copies):
    cfg = compose(["model=tiny", "model.n_layers=4", "parallel.pp=2", f"parallel.schedule={schedule}",
                   "parallel.micro_batches=4", "data.batch_size=8"])
    p = plan(cfg)
    counts = count_params(cfg.model)
    held = sum(rp.holding.params for rp in p.ranks)
    # 1F1B: the MTP reads the embedding on the last rank, a second copy of the table
    tie = cfg.model.vocab_size * cfg.model.dim if schedule == "1f1b" else 0
    assert held == copies * (counts["total"] + counts["mtp"]) + tie


@pytest.mark.parametrize("schedule, pp, chunks", [("1f1b", 4, 8), ("dualpipe", 4, 8), ("dualpipev", 2, 6),
                                                  ("gpipe", 2, 4)])
def test_bubble_and_live_micro_batches_are_the_simulators(schedule, pp, chunks):
    cfg = compose(["model=tiny", "model.n_layers=4", f"parallel.pp={pp}", f"parallel.schedule={schedule}",
                   f"parallel.micro_batches={chunks}", f"data.batch_size={2 * chunks}", "parallel.dp=2",
                   "parallel.ep=2"])
    p = plan(cfg)
    actions = build(schedule, pp, chunks, cfg.parallel.wgrad_split)
    sim = simulate(actions, Placement(schedule, pp, chunks), p.costs)
    assert p.bubble_s == sim.bubble[p.critical_rank] and p.sim.bubble == sim.bubble
    assert [rp.peak_live for rp in p.ranks] == sim.peak_live
    assert [int(next(k for k in rp.memory if k.startswith("activations")).split("(")[1].split()[0])
            for rp in p.ranks] == sim.peak_live
    assert math.isclose(p.step_s, p.compute_s + p.exposed_ep_s + p.bubble_s + p.dp_s)


def test_layout_over_memory_exits_2_with_one_line(capsys):
    assert main(["model=tiny", "cluster.memory_gib=0.01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pipeline rank 0" in err[0] and "largest item is" in err[0]


@pytest.mark.parametrize("args, named", [
    (["parallel.dp=3"], "data.batch_size"), (["cluster=h900"], "cluster"),
    (["model.recompute=some"], "model.recompute")])
def test_bad_input_exits_2_with_one_line(capsys, args, named):
    assert main(["model=tiny", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0]


def test_v3_on_2048_h800_fits_and_compares(capsys):
    code = main(["model=deepseek_v3", "parallel=deepseek_v3", "cluster=h800", "data.seq_len=4096",
                 "data.batch_size=15360"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "published DeepSeek-V3: 180,000 on H800 (ratio" in out
    memory = [line for line in out.splitlines() if line.startswith("memory: largest")][0]
    assert float(memory.split()[2]) <= 80
    rows = {line.split()[0] + line.split()[1]: line for line in out.splitlines()
            if line.startswith(("as planned", "schedule 1f1b", "precision bf16"))}
    assert set(rows) == {"asplanned", "schedule1f1b", "precisionbf16"}
    assert rows["asplanned"].split()[3] == "yes"
