"""Synthetic tasks with verifiable answers: every problem is solvable by construction and comes
with a verifier, so rewards need no model (R1's rule-based accuracy reward).

    task = build_task("addition", digits=2)
    problem = task.sample(random.Random(0))   # Problem(prompt="57+68=", answer="125", think="521", ...)
    task.verify(problem, "125")               # True

Each problem also carries a worked `think` (the chain of thought an SFT row shows between
<think> and </think>) that a tiny causal model can actually use:
    addition   a draft of the sum, then the answer: 57+68= -> <think>125</think>125 (a micro model
               has no use for a longer chain; the draft is where its pre-trained skill shows)
    sorting    the digits in descending order, then ascending:  s:3912= -> <think>9321</think>1239
    countdown  the running values of one solution, then its expression (each given number used
               exactly once, + - * /, exact arithmetic):  3 5 7>22= -> <think>15,22</think>3*5+7
"""

from __future__ import annotations

import ast
import random
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str  # one correct answer (the verifier accepts any correct one)
    think: str  # a worked chain of thought leading to `answer`
    data: tuple  # what the verifier needs: operands, numbers and target, ...


class Task:
    name = ""

    def sample(self, rng: random.Random) -> Problem:
        raise NotImplementedError

    def verify(self, problem: Problem, answer: str) -> bool:
        raise NotImplementedError

    def problems(self, n: int, seed: int) -> list[Problem]:
        """n problems from a fixed seed (held-out sets use a seed no training stream uses)."""
        rng = random.Random(seed)
        return [self.sample(rng) for _ in range(n)]


class Addition(Task):
    name = "addition"

    def __init__(self, digits: int = 2) -> None:
        self.lo, self.hi = 10 ** (digits - 1), 10 ** digits - 1

    def sample(self, rng: random.Random) -> Problem:
        a, b = rng.randint(self.lo, self.hi), rng.randint(self.lo, self.hi)
        total = str(a + b)
        return Problem(f"{a}+{b}=", total, total, (a, b))

    def verify(self, problem: Problem, answer: str) -> bool:
        a, b = problem.data
        return answer.strip() == str(a + b)


class Sorting(Task):
    name = "sorting"

    def __init__(self, digits: int = 4) -> None:
        self.n = digits

    def sample(self, rng: random.Random) -> Problem:
        values = [rng.randint(0, 9) for _ in range(self.n)]
        text = "".join(map(str, values))
        up, down = "".join(sorted(text)), "".join(sorted(text, reverse=True))
        return Problem(f"s:{text}=", up, down, tuple(values))

    def verify(self, problem: Problem, answer: str) -> bool:
        return answer.strip() == "".join(sorted("".join(map(str, problem.data))))


class Countdown(Task):
    """Reach the target from the given numbers with + - * / (exact: a division must come out
    whole), each number used exactly once; the target is built from a random solution."""

    name = "countdown"
    OPS = "+-*/"

    def __init__(self, digits: int = 3, max_number: int = 9) -> None:
        self.n, self.max_number = digits, max_number

    def sample(self, rng: random.Random) -> Problem:
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(self.n)]
            expr, value, steps = str(numbers[0]), Fraction(numbers[0]), []
            for x in numbers[1:]:
                op = rng.choice(self.OPS)
                if op == "/" and value % x:
                    op = "+"
                left = f"({expr})" if op in "*/" and any(c in expr for c in "+-") else expr
                expr = f"{left}{op}{x}"
                value = {"+": value + x, "-": value - x, "*": value * x, "/": value / x}[op]
                steps.append(str(value))
            if value > 0 and value.denominator == 1:
                return Problem(f"{' '.join(map(str, numbers))}>{int(value)}=", expr, ",".join(steps),
                               (tuple(numbers), int(value)))

    def verify(self, problem: Problem, answer: str) -> bool:
        numbers, target = problem.data
        try:
            tree = ast.parse(answer.strip(), mode="eval")
            used: list[int] = []
            value = _exact(tree.body, used)
        except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
            return False
        return Counter(used) == Counter(numbers) and value == target


def _exact(node: ast.AST, used: list[int]) -> Fraction:
    """Evaluate + - * / over integer literals exactly; anything else is not an answer."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_exact(node.left, used), _exact(node.right, used))
    raise ValueError("not an arithmetic expression")


_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}
TASKS = {"addition": Addition, "sorting": Sorting, "countdown": Countdown}


def build_task(name: str, digits: int) -> Task:
    """`digits`: operand digits (addition), list length (sorting), number count (countdown)."""
    return TASKS[name](digits)
