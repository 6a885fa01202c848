"""Rewards as plain Python functions: reward(task, problem, completion) -> float.

A completion is the decoded response (the text after the prompt, up to the end token). R1's
template is `<think>...</think>` followed by the answer; its rewards are rule-based:

    accuracy   1 when the template parses and the task's verifier accepts the answer, else 0
    format     1 when the completion is exactly <think>...</think> then a non-empty answer, else 0

`rewards` in the post-training config maps names to weights; a name is one of REWARDS or an
importable "package.module:function" with the same signature (for user rewards). The total
reward of a sample is the weighted sum; check_rewards() calls every function once on a dry
sample before anything trains, and total_rewards() stops a run at the first non-finite value,
naming the function and the sample.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable

from framework.errors import TrainingError
from framework.posttrain.tasks import Problem, Task

RewardFn = Callable[[Task, Problem, str], float]
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_TEMPLATE = re.compile(r"<think>(.*?)</think>(.+)", re.DOTALL)


def parse(completion: str) -> tuple[str, str] | None:
    """(think, answer) of a completion in the template, else None."""
    m = _TEMPLATE.fullmatch(completion)
    if m is None or THINK_OPEN in m.group(2) or THINK_CLOSE in m.group(2):
        return None
    return m.group(1), m.group(2)


def format_reward(task: Task, problem: Problem, completion: str) -> float:
    return 1.0 if parse(completion) is not None else 0.0


def accuracy_reward(task: Task, problem: Problem, completion: str) -> float:
    parsed = parse(completion)
    return 1.0 if parsed is not None and task.verify(problem, parsed[1]) else 0.0


REWARDS: dict[str, RewardFn] = {"accuracy": accuracy_reward, "format": format_reward}


def resolve(name: str) -> RewardFn:
    """A built-in reward by name, or "package.module:function"; ValueError with the fix."""
    if name in REWARDS:
        return REWARDS[name]
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr) if attr else None
    except (ImportError, AttributeError):
        fn = None
    if not callable(fn):
        raise ValueError(f"posttrain.rewards: unknown reward {name!r}; use one of {', '.join(REWARDS)} "
                         "or an importable 'package.module:function'")
    return fn


def reference_completion(problem: Problem) -> str:
    """The completion an SFT row teaches for `problem` (template around its worked solution)."""
    return f"{THINK_OPEN}{problem.think}{THINK_CLOSE}{problem.answer}"


def total_rewards(weights: dict[str, float], task: Task, problems: list[Problem],
                  completions: list[str]) -> tuple[list[float], dict[str, float]]:
    """Weighted reward per sample, and each function's mean (for the log). A value that is not a
    finite number stops the run: TrainingError naming the function and the sample."""
    totals = [0.0] * len(completions)
    means = {}
    for name, weight in weights.items():
        fn = resolve(name)
        values = []
        for i, (problem, completion) in enumerate(zip(problems, completions)):
            value = fn(task, problem, completion)
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number):
                raise TrainingError(f"reward {name} returned {value!r} for sample {i} (prompt "
                                    f"{problem.prompt!r}, completion {completion!r}); it must return a "
                                    "finite number")
            values.append(number)
            totals[i] += weight * number
        means[name] = sum(values) / max(len(values), 1)
    return totals, means


def check_rewards(weights: dict[str, float], task: Task, problem: Problem) -> list[str]:
    """Problems found by calling every reward once on a dry sample (the problem's reference
    completion): unknown names, exceptions, non-finite or non-numeric values. One line each."""
    lines = []
    for name in weights:
        try:
            total_rewards({name: 1.0}, task, [problem], [reference_completion(problem)])
        except (ValueError, TrainingError) as err:
            lines.append(str(err))
        except Exception as err:  # a user's reward may raise anything: report it in one line
            lines.append(f"reward {name} raised {type(err).__name__}: {err} on a dry sample "
                         f"({problem.prompt!r})")
    return lines
