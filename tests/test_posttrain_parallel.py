"""Parallel equals sequential for an RL step (DESIGN.md rule 6): one GRPO update on the same
rollouts under expert parallelism (ep=2 over dp=2, gloo ranks) and in one process. Both run two
micro-batches, the KL term to a frozen reference on the same layout, and routing replay; losses
agree to 1e-6 and the reduced gradients to calc_diff < 1e-10 (every expert compared by global id).
"""

from __future__ import annotations

import dataclasses

import torch

from framework.posttrain import grpo
from framework.posttrain.config import PosttrainConfig
from framework.posttrain.driver import train_config
from framework.posttrain.learner import Learner
from framework.posttrain.sft import END
from launch.ranks import run_ranks
from parallel.mesh import Mesh

B, LR = 8, 1e-3


def posttrain_cfg() -> PosttrainConfig:
    return PosttrainConfig(micro_batches=2, kl_coef=0.05, routing_replay=True, loss_agg="grpo",
                           max_new_tokens=6)


def rollouts() -> grpo.Rollouts:
    """Fixed rollouts: prompts of three lengths, responses of 1-6 tokens, random log-probs."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (3 + b % 3,), generator=g).tolist() for b in range(B)]
    responses = [torch.randint(0, 256, (b % 6,), generator=g).tolist() + [END] for b in range(B)]
    logps = [(-torch.rand(len(r), generator=g)).tolist() for r in responses]
    adv = torch.randn(B, generator=g)
    return grpo.pack_rollouts(prompts, responses, logps, adv, length=5 + 6 - 1)


def one_update(mesh: Mesh, batch: grpo.Rollouts) -> dict:
    c = posttrain_cfg()
    cfg = train_config(c, mesh)
    cfg.parallel.zero1 = False  # full gradients on every rank, to compare
    policy = Learner.build(c.policy, cfg, mesh, torch.device("cpu"), seed=3)
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
    return {"loss": record["loss"], "grads": grads, "firsts": firsts, "load": record["expert_load"]}


def worker(rank: int, world: int) -> dict:
    from parallel.mesh import Layout, build_mesh

    cfg = train_config(posttrain_cfg())
    cfg.parallel = dataclasses.replace(cfg.parallel, dp=2, ep=2)
    mesh = build_mesh(Layout.from_config(cfg.parallel))
    half = B // world
    return one_update(mesh, rollouts().rows(rank * half, (rank + 1) * half))


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def test_grpo_update_under_ep2_equals_one_process():
    single = one_update(Mesh.single(), rollouts())
    ranks = run_ranks(worker, 2)
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
