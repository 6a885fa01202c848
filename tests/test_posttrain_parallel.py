"""Parallel equals sequential for an RL step (DESIGN.md rule 6): one GRPO update on the same
rollouts under expert parallelism (ep=2 over dp=2, gloo ranks) and in one process. Both run two
micro-batches, the KL term to a frozen reference on the same layout, and routing replay of
rollout routes that are not the router's own choice (random experts per position, so replay
changes the loss); losses agree to 1e-6 and the reduced gradients to calc_diff < 1e-10 (every
expert compared by global id).

Under pipeline parallelism (pp=2 x dp=2: 1F1B, and DualPipe, whose two pipeline ranks hold both
stages) the micro-batches' GRPO losses travel to the last stage as heads on its logits, the old
and reference log-probabilities come from the same layout's forward-only pass, and routing
replay's hooks run inside each micro-batch's forward sub-steps on the rank that holds the layer;
rollouts sampled on the pipeline ranks' gathered copy of the weights equal the one process's.
"""

from __future__ import annotations

import dataclasses
import json

import torch

from framework.model.moe import MoE
from framework.posttrain import grpo
from framework.posttrain.config import PosttrainConfig
from framework.posttrain.driver import train_config
from framework.posttrain.learner import Learner
from framework.posttrain.sft import END
from framework.posttrain.tasks import build_task
from launch.ranks import run_ranks
from parallel.mesh import Mesh

B, LR = 8, 1e-3


def posttrain_cfg(replay: bool = True, micro_batches: int = 2) -> PosttrainConfig:
    return PosttrainConfig(micro_batches=micro_batches, kl_coef=0.05, routing_replay=replay, loss_agg="grpo",
                           max_new_tokens=6)


def rollouts() -> grpo.Rollouts:
    """Fixed rollouts: prompts of three lengths, responses of 1-6 tokens, random log-probs."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (3 + b % 3,), generator=g).tolist() for b in range(B)]
    responses = [torch.randint(0, 256, (b % 6,), generator=g).tolist() + [END] for b in range(B)]
    logps = [(-torch.rand(len(r), generator=g)).tolist() for r in responses]
    adv = torch.randn(B, generator=g)
    # The rollout's routes: 2 distinct random experts of 4 per position of the one MoE layer
    experts = [torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(len(p) + len(r))])[None]
               for p, r in zip(prompts, responses)]
    return grpo.pack_rollouts(prompts, responses, logps, adv, length=5 + 6 - 1, experts=experts)


def sampled(policy: Learner, c: PosttrainConfig) -> tuple:
    """Responses and sampler log-probs of 2 fixed problems x G on the policy's weights (same seed
    on every rank), before any update."""
    task = build_task(c.task, c.digits)
    _, responses, logps, _, rewards, _ = grpo.sample_group(policy, task, task.problems(2, seed=11), c, seed=5)
    return responses, logps, rewards


def one_update(mesh: Mesh, batch: grpo.Rollouts, c: PosttrainConfig | None = None, parallel=None,
               sample: bool = False) -> dict:
    c = c or posttrain_cfg()
    cfg = train_config(c, mesh)
    if parallel is not None:
        cfg.parallel = parallel
    cfg.parallel.zero1 = False  # full gradients on every rank, to compare
    policy = Learner.build(c.policy, cfg, mesh, torch.device("cpu"), seed=3)
    rollout = sampled(policy, c) if sample else None
    with torch.no_grad():  # a reference that differs from the policy, so the KL term is not 0
        reference = policy.frozen_copy()
        for p in reference.model.parameters():
            p.mul_(0.9)
    grads = {}
    step = policy.built.engine.step

    def capture(max_norm, finite):
        grads.update({n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None})
        return step(max_norm, finite)

    policy.built.engine.step = capture
    record = grpo.update_on(policy, reference, batch, c, LR)
    firsts = {n: m.first_expert for n, m in policy.model.named_modules() if hasattr(m, "first_expert")}
    moes = [n for n, m in policy.model.named_modules() if isinstance(m, MoE)]
    return {"loss": record["loss"], "grads": grads, "firsts": firsts, "load": record["expert_load"],
            "loads": dict(zip(moes, record["expert_load"], strict=True)), "kl": record["kl"],
            "clip_frac": record["clip_frac"], "sampled": rollout,
            "agreement": record["route_agreement_rollout"]}


def last_update_loss(mesh: Mesh, batch: grpo.Rollouts, engine: str = "native", updates: int = 2) -> float:
    """`updates` updates on one rollout batch (old log-probs fixed): the loss of the last, which the
    earlier updates' weights decide (an engine's reduced gradients are its own, e.g. DeepSpeed's).
    The policy gets its weights as RL's does, loaded into a freshly built learner (load_from)."""
    c = dataclasses.replace(posttrain_cfg(), updates_per_batch=updates)
    c.engine.name = engine
    cfg = train_config(c, mesh)
    source = Learner.build(c.policy, cfg, mesh, torch.device("cpu"), seed=3, trainable=False)
    policy = Learner.build(c.policy, cfg, mesh, torch.device("cpu"), seed=11)
    policy.load_from(source)
    return grpo.update_on(policy, source, batch, c, LR)["loss"]


def worker(rank: int, world: int) -> tuple[dict, float]:
    from parallel.mesh import Layout, build_mesh

    cfg = train_config(posttrain_cfg())
    cfg.parallel = dataclasses.replace(cfg.parallel, dp=2, ep=2)
    mesh = build_mesh(Layout.from_config(cfg.parallel))
    half = B // world
    rows = rollouts().rows(rank * half, (rank + 1) * half)
    return one_update(mesh, rows), last_update_loss(mesh, rows, "deepspeed")


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def test_grpo_update_under_ep2_equals_one_process():
    """ep2 x dp2 with the native engine (gradients compared), and with DeepSpeed ZeRO-1 (the loss
    after one update compared: it differs from the first update's, so the update is in it; it
    catches a wrong gradient direction, e.g. one rank's rows only, or weights loaded into the
    module that DeepSpeed's masters did not take, but not a uniform scale, which Adam's first
    step does not see)."""
    single = one_update(Mesh.single(), rollouts())
    single_second = last_update_loss(Mesh.single(), rollouts())
    runs = run_ranks(worker, 2)
    ranks = [native for native, _ in runs]
    assert abs(single_second - last_update_loss(Mesh.single(), rollouts(), updates=1)) > 1e-4
    for _, deepspeed_second in runs:
        assert abs(deepspeed_second - single_second) < 1e-6
    for r in ranks:
        assert abs(r["loss"] - single["loss"]) < 1e-6
        assert r["load"] == single["load"]  # expert loads of the global batch
    assert single["loss"] != 0.0
    for name, g in single["grads"].items():
        if ".experts." in name:  # each rank holds 2 of the 4 experts: put them back by global id
            module = name.rsplit(".", 1)[0]
            pieces = sorted((r["firsts"][module], r["grads"][name]) for r in ranks)
            got = torch.cat([p for _, p in pieces])
            assert got.shape == g.shape
        else:
            got = ranks[0]["grads"][name]
            assert torch.equal(got, ranks[1]["grads"][name])
        assert calc_diff(got, g) < 1e-10, name


PP_RUNS = (("1f1b", 2), ("dualpipe", 4))  # (schedule, micro-batches)


def pp_worker(rank: int, world: int) -> list[dict]:
    """Both schedules in one pair of processes (a spawn costs more than an update)."""
    from parallel.mesh import Layout, build_mesh

    out = []
    for schedule, micro in PP_RUNS:
        c = posttrain_cfg(micro_batches=micro)
        parallel = dataclasses.replace(train_config(c).parallel, pp=2, dp=world // 2, schedule=schedule,
                                       micro_batches=micro)
        mesh = build_mesh(Layout.from_config(parallel))
        half = B // mesh.dp  # the pipeline ranks of one dp column see the same rows
        rows = rollouts().rows(mesh.dp_rank * half, (mesh.dp_rank + 1) * half)
        out.append(one_update(mesh, rows, c, parallel, sample=schedule == "1f1b"))  # stages on disjoint ranks
    return out


def test_grpo_update_under_pp2_equals_one_process():
    """pp=2 x dp=2 on 4 ranks, each dp column on half the rollouts: 1F1B (stage 0: embedding +
    dense block; stage 1: the MoE block, head and the GRPO loss) and DualPipe (four micro-batches
    in two directions: both pipeline ranks hold both stages and sum their copies' gradients),
    with routing replay: the replayed update differs from one without it, and the pipeline's
    equals the one process's."""
    runs = run_ranks(pp_worker, 4)
    for k, (schedule, micro) in enumerate(PP_RUNS):
        sample = schedule == "1f1b"
        single = one_update(Mesh.single(), rollouts(), posttrain_cfg(micro_batches=micro), sample=sample)
        own_routes = one_update(Mesh.single(), rollouts(), posttrain_cfg(replay=False, micro_batches=micro))
        assert single["loss"] != 0.0 and single["kl"] > 0
        assert abs(single["loss"] - own_routes["loss"]) > 1e-4  # replay changed the experts used
        assert 0.2 < single["agreement"] < 0.8  # random rollout routes against the router's choice
        ranks = [run[k] for run in runs]
        if sample:  # rollouts on the gathered copy (Learner.sampling_model) are the one process's
            responses, logps, _ = single["sampled"]
            assert len({tuple(r) for r in responses}) == len(responses)  # sampled at temperature 1
            for r in ranks:
                assert r["sampled"][0] == responses and r["sampled"][1] == logps
                assert torch.equal(r["sampled"][2], single["sampled"][2])
        held = set()
        for r in ranks:
            # every rank reports the global numbers, wherever the heads ran
            assert abs(r["loss"] - single["loss"]) < 1e-6, schedule
            assert abs(r["kl"] - single["kl"]) < 1e-9 and r["clip_frac"] == single["clip_frac"]
            assert r["agreement"] == single["agreement"]  # counted on each rank's layers, summed
            for name, load in r["loads"].items():
                assert load == single["loads"][name], (schedule, name)
            for name, g in r["grads"].items():
                assert calc_diff(g, single["grads"][name]) < 1e-10, (schedule, name)
            held |= set(r["grads"])
        assert held == set(single["grads"]), schedule  # every gradient was computed somewhere
        if schedule == "dualpipe":
            assert all(set(r["grads"]) == held for r in ranks)
        else:
            assert not set(ranks[0]["grads"]) & set(ranks[-1]["grads"])  # pp rank 0 vs pp rank 1


# --------------------------------------------------------------------------- SFT on every layout

SFT_STEPS = 3
# (name, parallel sizes, engine) on 4 ranks; each is held to the one process's per-step losses
SFT_LAYOUTS = (("ep2 x dp4, ZeRO-1", {"dp": 4, "ep": 2, "zero1": True}, "native", "policy"),
               ("pp2 x dp2, 1F1B", {"pp": 2, "dp": 2, "micro_batches": 2}, "native", "policy"),
               ("ep2 x dp4, DeepSpeed ZeRO-1", {"dp": 4, "ep": 2}, "deepspeed", "policy"),
               ("dense student, dp4, DeepSpeed ZeRO-1", {"dp": 4}, "deepspeed", "student"))


def sft_rows() -> list:
    """Fixed SFT rows of differing lengths (prompt and response), so padding and masks vary."""
    from framework.posttrain.rewards import reference_completion
    from framework.posttrain.sft import Row

    task = build_task("addition", 2)
    return [Row(p.prompt, reference_completion(p)) for p in task.problems(24, seed=4)]


def sft_losses(mesh: Mesh, sizes: dict | None = None, engine: str = "native",
               model: str = "policy") -> list[float]:
    """SFT_STEPS supervised steps of `model` (the MoE policy or the dense student) on this rank's
    share of batches of 8 rows; the global losses."""
    from framework.posttrain import driver

    c = PosttrainConfig(batch_size=8)
    c.parallel = dataclasses.replace(c.parallel, **(sizes or {}))
    c.engine.name = engine
    learner = Learner.build(getattr(c, model), train_config(c, mesh), mesh, torch.device("cpu"), seed=3)
    rows_of = driver.file_rows(sft_rows(), c, mesh.dp_rank, mesh.dp)
    return driver.supervised(learner, rows_of, SFT_STEPS, 3e-3)


def sft_worker(rank: int, world: int) -> list[list[float]]:
    from parallel.mesh import Layout, build_mesh

    out = []
    for _, sizes, engine, model in SFT_LAYOUTS:
        parallel = dataclasses.replace(PosttrainConfig().parallel, **sizes)
        out.append(sft_losses(build_mesh(Layout.from_config(parallel)), sizes, engine, model))
    return out


def test_sft_on_every_layout_equals_one_process():
    """SFT (response-token CE over the global target count) under expert parallelism with ZeRO-1,
    a pipeline (the loss a head on the last stage's logits, 2 micro-batches) and DeepSpeed's
    ZeRO-1, and the dense distillation student under DeepSpeed: each step's loss equals one
    process's on the whole batch (1e-6), so every update did."""
    single = {model: sft_losses(Mesh.single(), model=model) for model in ("policy", "student")}
    assert all(losses[0] > losses[-1] for losses in single.values())  # it trains
    runs = run_ranks(sft_worker, 4)
    for k, (name, _, _, model) in enumerate(SFT_LAYOUTS):
        for r in runs:
            assert len(r[k]) == SFT_STEPS
            assert max(abs(a - b) for a, b in zip(r[k], single[model])) < 1e-6, (name, r[k], single[model])


TINY_R1 = ["pretrain_steps=4", "pretrain_until=0", "sft_steps=2", "grpo_steps=2", "prompts_per_step=4",
           "group_size=2", "distill_prompts=4", "distill_steps=2", "eval_prompts=8", "batch_size=8"]


def r1_worker(rank: int, world: int, run_dir: str) -> int:
    from launch.r1 import main

    return main(TINY_R1 + ["parallel.dp=2", "parallel.ep=2", "engine.name=deepspeed", f"run_dir={run_dir}"])


def test_duet_r1_runs_the_whole_path_on_a_layout(tmp_path, capsys):
    """duet-r1 under torchrun's environment (2 gloo ranks: ep2 x dp2, DeepSpeed ZeRO-1): every
    stage runs, rank 0 alone writes the outputs; outside torchrun the same layout is refused."""
    from launch.r1 import main

    run_dir = tmp_path / "r1"
    assert main(TINY_R1 + ["parallel.dp=2", "parallel.ep=2", f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the layout needs parallel.pp * parallel.dp = 2 ranks and 1 was" in err[0]
    assert not run_dir.exists()
    assert run_ranks(r1_worker, 2, str(run_dir)) == [0, 0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["stages"]) == ["pre-train", "SFT", "GRPO", "student"][:len(summary["stages"])]
    assert len(summary["stages"]) >= 3
    assert len((run_dir / "grpo.jsonl").read_text().splitlines()) == 2
    assert {p.name for p in run_dir.glob("*.png")} == {"reward.png", "accuracy.png", "response_length.png"}
