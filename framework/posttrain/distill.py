"""Distillation (R1): rejection-sample the policy's correct answers into an SFT set, then SFT a
smaller student on it and compare the two on the same held-out problems.

    rows = rejection_sample(policy, task, problems, c, seed)   # one correct completion per solved prompt
"""

from __future__ import annotations

from framework.posttrain.config import PosttrainConfig
from framework.posttrain.learner import Learner
from framework.posttrain.rewards import accuracy_reward, format_reward
from framework.posttrain.rollout import sample
from framework.posttrain.sft import Row, decode, encode
from framework.posttrain.tasks import Problem, Task


def rejection_sample(policy: Learner, task: Task, problems: list[Problem], c: PosttrainConfig,
                     seed: int) -> list[Row]:
    """group_size samples per problem at the RL temperature; keep the first correct, well-formed
    completion of each problem (problems the policy never solves contribute nothing)."""
    prompts = [encode(p.prompt) for p in problems for _ in range(c.group_size)]
    responses, _, _ = sample(policy.sampling_model(), prompts, c.max_new_tokens, c.temperature, seed,
                             policy.ep_group)
    rows = []
    for i, problem in enumerate(problems):
        for text in (decode(r) for r in responses[i * c.group_size:(i + 1) * c.group_size]):
            if accuracy_reward(task, problem, text) and format_reward(task, problem, text):
                rows.append(Row(problem.prompt, text))
                break
    return rows
