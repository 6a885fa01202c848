"""Deferred weight gradients: the queue behind the pipeline's weight-gradient split (zero
bubble). A backward run inside `capture()` computes input gradients at once and queues each
weight-gradient GEMM that goes through `defer_or_return`; `work.run()` later adds them into
`.grad`, FIFO. Outside `capture()` nothing is deferred.

It lives with the kernels so that every GEMM layer (nn.Linear's split twin, the routed experts,
the FP8 linear and FP8 experts) can defer its weight gradient without importing the pipeline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


class WeightGradWork:
    """Queued weight-gradient closures of one backward."""

    def __init__(self) -> None:
        self.closures: list[Callable[[], None]] = []

    def run(self) -> None:
        with torch.no_grad():
            for closure in self.closures:
                closure()
        self.closures.clear()


class _Capturing:
    # Process-wide, not thread-local: on CUDA, autograd runs backward functions on its own device
    # threads. One backward captures at a time (a forward running beside it never reads this).
    work: WeightGradWork | None = None


def current() -> WeightGradWork | None:
    return _Capturing.work


@contextlib.contextmanager
def capture() -> Iterator[WeightGradWork]:
    work, previous = WeightGradWork(), _Capturing.work
    _Capturing.work = work
    try:
        yield work
    finally:
        _Capturing.work = previous


def accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


def defer_or_return(weight: torch.Tensor, compute: Callable[[], torch.Tensor]):
    """Queue the weight gradient while capturing (returning None to autograd), else compute it."""
    work = current()
    if work is None:
        return compute()
    work.closures.append(lambda: accumulate(weight, compute()))
    return None
