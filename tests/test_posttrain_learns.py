"""Issue 19's acceptance "It learns": GRPO raises greedy accuracy on 256 fixed held-out prompts
by at least 10 points over its starting point, and a control run whose rewards are shuffled
across the batch (they no longer belong to their samples) does not (< 5 points).

The recipe, chosen by reasoning and measured (numbers in the README's R1 section):
- the micro policy of PosttrainConfig (dim 64, 2 layers: one dense, one MoE of 4 routed experts
  top-2 + a shared one; byte vocabulary), 3-element sorting (`s:391=` -> `<think>931</think>139`):
  it learns the task within ~200 pre-training steps, where 2-digit addition needs ~700;
- pre-training in the template, stopped at 30% greedy accuracy on a probe set (pretrain_until);
  that is the SFT'd starting point (the pre-training text already is the SFT template), shared by
  both runs through a module fixture;
- GRPO: 8 prompts x 8 samples per step at temperature 1, one update per rollout batch (on-policy:
  the ratio is 1, the clip inactive), lr 1e-4. Measured from one start, 30 steps: lr 1e-3 drives
  greedy accuracy to 0% within 5 steps (responses stop ending), 3e-4 reaches 56% but noisily,
  1e-4 +16 points, 3e-5 +14; the shuffled control at 1e-4 falls from 34% to 22%.

Both runs start from a fresh optimizer on the same weights; every seed is fixed.

Distillation: a dense student SFT'd from scratch on what rejection sampling keeps from a stub
policy (half its samples wrong) reaches a measurable greedy accuracy on 2-element sorting
(measured 0% -> 54% in 150 steps; asserted >= 20%).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from framework.posttrain import distill, driver
from framework.posttrain.config import PosttrainConfig
from framework.posttrain.learner import Learner
from framework.posttrain.rewards import reference_completion
from framework.posttrain.sft import END, decode, encode
from framework.posttrain.tasks import build_task
from parallel.mesh import Mesh

RISE, CONTROL_RISE = 0.10, 0.05


def recipe(seed: int = 0, **over) -> PosttrainConfig:
    return PosttrainConfig(task="sorting", digits=3, seed=seed, pretrain_until=0.3, sft_steps=0,
                           prompts_per_step=8, group_size=8, updates_per_batch=1, grpo_lr=1e-4,
                           grpo_steps=30, eval_interval=0, eval_prompts=256, distill_steps=0, **over)


def start_point(c: PosttrainConfig) -> tuple[dict, float]:
    """Pre-train until c.pretrain_until on the probe set; the weights and held-out accuracy."""
    mesh = Mesh.single()
    task = build_task(c.task, c.digits)
    policy = Learner.build(c.policy, driver.train_config(c, mesh), mesh, torch.device("cpu"), seed=c.seed)
    text = driver.task_rows(task, c, 0, 1, stream=1)
    driver.supervised(policy, text, c.pretrain_steps, c.pretrain_lr, whole=True,
                      stop=driver.reached(policy, task, c))
    return ({k: v.clone() for k, v in policy.model.state_dict().items()},
            driver.evaluate(policy, task, heldout(c), c)["accuracy"])


def heldout(c: PosttrainConfig):
    return build_task(c.task, c.digits).problems(c.eval_prompts, seed=c.seed + driver.HELDOUT_SEED)


def grpo_from(weights: dict, c: PosttrainConfig) -> driver.R1Result:
    """c.grpo_steps GRPO steps from `weights` with a fresh optimizer; the last record holds the
    held-out greedy accuracy."""
    mesh = Mesh.single()
    policy = Learner.build(c.policy, driver.train_config(c, mesh), mesh, torch.device("cpu"), seed=c.seed)
    policy.model.load_state_dict(weights)
    result = driver.R1Result()
    driver.grpo(policy, build_task(c.task, c.digits), heldout(c), c, result, say=lambda line: None)
    return result


@pytest.fixture(scope="module")
def start(one_thread):
    c = recipe()
    weights, accuracy = start_point(c)
    # "about 20-50%" (the issue): the stop is probed on its own set, and fp32 kernels differ
    # between hosts (Intel AMX: inside 20-50%; AMD EPYC: 53.1%), so the bound has some slack
    assert 0.15 <= accuracy <= 0.6, f"the start is outside about 20-50% greedy accuracy: {accuracy:.1%}"
    return c, weights, accuracy


def test_grpo_raises_greedy_accuracy_by_10_points(start):
    c, weights, before = start
    after = grpo_from(weights, c).grpo[-1]["accuracy"]
    assert after - before >= RISE, (before, after)


def test_shuffled_rewards_do_not_raise_it(start):
    c, weights, before = start
    result = grpo_from(weights, dataclasses.replace(c, control="shuffle"))
    after = result.grpo[-1]["accuracy"]
    assert after - before < CONTROL_RISE, (before, after)
    assert any(r["grad_norm"] > 0 for r in result.grpo)  # the control did update the weights


def test_student_distilled_from_rejection_samples_gets_measurable_accuracy(one_thread, monkeypatch):
    c = PosttrainConfig(task="sorting", digits=2, group_size=2, distill_lr=3e-3)
    task = build_task(c.task, c.digits)
    problems = {p.prompt: p for p in task.problems(128, seed=5)}

    def stub_sample(model, prompts, max_new_tokens, temperature, seed, ep_group=None):
        """Per problem: first a wrong answer (the digits reversed), then the right one."""
        texts = [f"<think></think>{problems[decode(ids)].answer[::-1]}" if i % 2 == 0
                 else reference_completion(problems[decode(ids)]) for i, ids in enumerate(prompts)]
        return [encode(t) + [END] for t in texts], [[0.0] * (len(t) + 1) for t in texts], None

    monkeypatch.setattr(distill, "sample", stub_sample)
    policy = SimpleNamespace(sampling_model=lambda: None, ep_group=None)
    rows = distill.rejection_sample(policy, task, list(problems.values()), c, seed=0)
    assert len(rows) == len(problems)  # every problem solved once: one row each, only right answers
    assert all(task.verify(problems[r.prompt], r.completion.split("</think>")[1]) for r in rows)
    mesh = Mesh.single()
    student = Learner.build(c.student, driver.train_config(c, mesh), mesh, torch.device("cpu"), seed=1)
    held = task.problems(256, seed=c.seed + driver.HELDOUT_SEED)
    assert driver.evaluate(student, task, held, c)["accuracy"] == 0.0
    driver.supervised(student, driver.file_rows(rows, c, 0, 1), 150, c.distill_lr)
    assert driver.evaluate(student, task, held, c)["accuracy"] >= 0.2


if __name__ == "__main__":  # robustness outside the test: python tests/test_posttrain_learns.py 1 2 3
    import sys

    torch.set_num_threads(1)
    for s in map(int, sys.argv[1:]):
        cs = recipe(s)
        w, acc = start_point(cs)
        learned = grpo_from(w, cs).grpo[-1]["accuracy"]
        control = grpo_from(w, dataclasses.replace(cs, control="shuffle")).grpo[-1]["accuracy"]
        print(f"seed {s}: start {acc:.1%}  GRPO {learned:.1%} ({learned - acc:+.1%})  "
              f"control {control:.1%} ({control - acc:+.1%})", flush=True)
