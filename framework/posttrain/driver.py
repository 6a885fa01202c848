"""R1's path on one task, stage by stage, on duet's layout (what `duet-r1` runs).

    pre-train   next-token loss on every token of the task's text in the template
                ("57+68=<think>125</think>125"): a base model that can sometimes do the task
    SFT         the think/answer template, loss on response tokens only (sft.py)
    GRPO        rule-based accuracy + format rewards, the objective of grpo.py
    distil      rejection-sampled correct answers of the policy -> SFT of a smaller student
                (itself pre-trained on the same text first, as R1's students are pre-trained bases)

The micro model learns the task only from text in the template: pre-trained on the bare
"57+68=125" it reaches ~50% and loses it again when SFT moves the answer 15 tokens further from
the operands (measured), so the pre-training text is the template's and SFT continues it on
the response tokens (or on a jsonl of the user's rows).

After every stage: greedy accuracy, mean reward and mean response length on `eval_prompts`
fixed held-out problems (a seed no training stream uses). `run()` returns every stage's numbers
and the GRPO records; each rank runs the same code on its own share of every batch.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from framework.config import OptimConfig
from framework.optim import lr_at
from framework.posttrain.config import PosttrainConfig, train_config
from framework.posttrain.distill import rejection_sample
from framework.posttrain.grpo import grpo_step, micro_slices, train_problems
from framework.posttrain.learner import Learner
from framework.posttrain.rewards import accuracy_reward, reference_completion, total_rewards
from framework.posttrain.rollout import sample
from framework.posttrain.sft import Row, collate, decode, encode, load_rows, response_ce
from framework.posttrain.tasks import Problem, Task, build_task
from parallel import comm
from parallel.mesh import Mesh

HELDOUT_SEED = 1_000_003  # the held-out problems' seed offset: no training stream uses it
STOP_EVERY = 10  # steps between the checks of pretrain_until


@dataclass
class R1Result:
    stages: dict[str, dict[str, float]] = field(default_factory=dict)  # stage -> accuracy, reward, ...
    grpo: list[dict] = field(default_factory=list)  # one record per GRPO step
    distilled_rows: int = 0


def schedule(lr: float, steps: int) -> Callable[[int], float]:
    """Warm-up over a tenth of the stage, then cosine to a tenth of lr."""
    o = OptimConfig(lr=lr, min_lr=lr / 10, warmup_steps=max(1, steps // 10), schedule="cosine")
    return lambda step: lr_at(step, steps, o)


@torch.no_grad()
def evaluate(learner: Learner, task: Task, problems: list[Problem], c: PosttrainConfig,
             template: bool = True) -> dict[str, float]:
    """Greedy accuracy, mean reward and response length (tokens, END included) on `problems`.
    template=False (after pre-training, which saw no template): accuracy of the bare answer."""
    prompts = [encode(p.prompt) for p in problems]
    responses, _, _ = sample(learner.sampling_model(), prompts, c.max_new_tokens, 0.0, 0, learner.ep_group)
    texts = [decode(r) for r in responses]
    rewards, _ = total_rewards(c.rewards, task, problems, texts)
    correct = [accuracy_reward(task, p, t) if template else float(task.verify(p, t))
               for p, t in zip(problems, texts)]
    n = len(problems)
    return {"accuracy": sum(correct) / n, "reward": sum(rewards) / n,
            "response_len": sum(map(len, responses)) / n}


def supervised(learner: Learner, rows_of: Callable[[int], list[Row]], steps: int, lr: float,
               whole: bool = False, stop: Callable[[], bool] | None = None) -> list[float]:
    """`steps` optimizer steps; step s trains on rows_of(s) (this rank's share), cut into the
    layout's micro-batches (parallel.micro_batches pieces of one padded shape). `stop`, asked
    every STOP_EVERY steps, ends the stage early when it returns True. Returns the global losses."""
    lr_of, losses = schedule(lr, steps), []
    for step in range(steps):
        if stop is not None and step and step % STOP_EVERY == 0 and stop():
            break
        batch = collate(rows_of(step), whole=whole).to(learner.device)
        n_targets = learner.global_sum(batch.mask_BT.sum())
        pieces = [batch.rows(lo, hi) for lo, hi in micro_slices(len(batch.tokens_BT), learner.micro_batches)]
        heads = [functools.partial(response_ce, batch=mb, n_targets=n_targets) for mb in pieces]
        rec = learner.update_heads([mb.tokens_BT for mb in pieces], heads, lr_of(step))
        losses.append(rec["loss"])
    return losses


def reached(learner: Learner, task: Task, c: PosttrainConfig) -> Callable[[], bool] | None:
    """pretrain_until's check: greedy accuracy on 256 problems of a stream no stage trains on
    (not the held-out set, whose numbers the stages report)."""
    if not c.pretrain_until:
        return None
    probe = task.problems(256, seed=c.seed + 2 * HELDOUT_SEED)
    return lambda: evaluate(learner, task, probe, c)["accuracy"] >= c.pretrain_until


def task_rows(task: Task, c: PosttrainConfig, rank: int, dp: int, stream: int,
              template: bool = True) -> Callable[[int], list[Row]]:
    """This rank's rows of step s, drawn fresh from the task (in the template, or the bare
    answer); each stage reads its own `stream` of problems."""
    share = c.batch_size // dp

    def rows_of(step: int) -> list[Row]:
        seed = (((c.seed * 7919 + stream) * 1_000_003 + step) * 64 + rank) % 2**31
        problems = task.problems(share, seed=seed)
        return [Row(p.prompt, reference_completion(p) if template else p.answer) for p in problems]

    return rows_of


def file_rows(rows: list[Row], c: PosttrainConfig, rank: int, dp: int) -> Callable[[int], list[Row]]:
    """Batches of a jsonl set: a fixed shuffle per epoch, this rank's share of each batch."""
    share = c.batch_size // dp

    def rows_of(step: int) -> list[Row]:
        order = list(range(len(rows)))
        random.Random(c.seed + step * c.batch_size // max(len(rows), 1)).shuffle(order)
        start = (step * c.batch_size) % len(rows) + rank * share
        return [rows[order[(start + i) % len(rows)]] for i in range(share)]

    return rows_of


def run(c: PosttrainConfig, mesh: Mesh | None = None, device: torch.device | None = None,
        say: Callable[[str], None] = print) -> tuple[R1Result, Learner]:
    mesh = mesh or Mesh.single()
    device = device or torch.device("cpu")
    cfg = train_config(c, mesh)
    task = build_task(c.task, c.digits)
    heldout = task.problems(c.eval_prompts, seed=c.seed + HELDOUT_SEED)
    result = R1Result()
    rank, dp = mesh.dp_rank, mesh.dp

    def report(stage: str, learner: Learner, template: bool = True) -> None:
        numbers = evaluate(learner, task, heldout, c, template)
        result.stages[stage] = numbers
        say(f"duet-r1: {stage:<9} greedy accuracy {numbers['accuracy']:6.1%}  mean reward "
            f"{numbers['reward']:.3f}  response length {numbers['response_len']:.1f} tokens")

    policy = Learner.build(c.policy, cfg, mesh, device, seed=c.seed)
    text = task_rows(task, c, rank, dp, stream=1)
    pretrained = len(supervised(policy, text, c.pretrain_steps, c.pretrain_lr, whole=True,
                                stop=reached(policy, task, c)))
    report("pre-train", policy)
    sft_rows = (file_rows(load_rows(c.sft_data), c, rank, dp) if c.sft_data
                else task_rows(task, c, rank, dp, stream=2))
    supervised(policy, sft_rows, c.sft_steps, c.sft_lr)
    report("SFT", policy)

    # RL starts with a fresh optimizer on the SFT weights (a new stage, as R1's RL is a new run):
    # SFT's Adam moments would carry its direction, and its gradients' scale, into the first steps.
    sft_policy, policy = policy, Learner.build(c.policy, cfg, mesh, device, seed=c.seed)
    policy.load_from(sft_policy)
    del sft_policy
    grpo(policy, task, heldout, c, result, say)
    report("GRPO", policy)

    if c.distill_steps:
        problems = train_problems(task, c.distill_prompts // dp, c.seed, -1, rank)
        rows = rejection_sample(policy, task, problems, c, seed=(c.seed * 100_003 + 99_991 + rank) * 4096)
        rows = comm.all_gather_objects(rows, mesh.dp_group)  # every rank: the whole set, in rank order
        result.distilled_rows = len(rows)
        say(f"duet-r1: rejection sampling kept {result.distilled_rows} correct answers of "
            f"{c.distill_prompts} prompts")
        if rows:
            student = Learner.build(c.student, cfg, mesh, device, seed=c.seed + 1)
            # The student's pre-training gets the teacher's budget (the steps the policy took).
            supervised(student, text, pretrained, c.pretrain_lr, whole=True)
            supervised(student, file_rows(rows, c, rank, dp), c.distill_steps, c.distill_lr)
            report("student", student)
    return result, policy


def grpo(policy: Learner, task: Task, heldout: list[Problem], c: PosttrainConfig, result: R1Result,
         say: Callable[[str], None]) -> None:
    """c.grpo_steps GRPO steps; records land in result.grpo (greedy accuracy every eval_interval)."""
    policy.bias_rate = c.bias_update * c.policy.bias_update_rate
    reference = policy.frozen_copy() if c.kl_coef else None
    lr_of = schedule(c.grpo_lr, c.grpo_steps)
    per_rank = c.prompts_per_step // policy.mesh.dp
    for step in range(c.grpo_steps):
        problems = train_problems(task, per_rank, c.seed, step, policy.mesh.dp_rank)
        record = grpo_step(policy, reference, task, problems, c, step, lr_of(step))
        last = step + 1 == c.grpo_steps
        if last or (c.eval_interval and (step + 1) % c.eval_interval == 0):
            record["accuracy"] = evaluate(policy, task, heldout, c)["accuracy"]
        result.grpo.append(record)
        if reference is not None and c.ref_refresh and (step + 1) % c.ref_refresh == 0:
            reference.load_from(policy)
        acc = f"  greedy accuracy {record['accuracy']:.1%}" if "accuracy" in record else ""
        say(f"duet-r1: GRPO step {step + 1}/{c.grpo_steps}  reward {record['reward']:.3f}  "
            f"response length {record['response_len']:.1f}{acc}")
