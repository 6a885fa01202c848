"""The engine protocol: what the trainer asks of whoever owns gradients, optimizer and checkpoints.

Two engines implement it: `NativeEngine` below (duet's bucketed gradient reduction and ZeRO-1
AdamW, parallel/data_parallel.py) and `DeepSpeedEngine` (parallel/deepspeed_engine.py, DeepSpeed's
ZeRO 1-3 over the same model and the same AdamW). `parallel.parallelize` builds the one the config
names; the trainer then has one training step:

    engine.set_lr(lr)
    with engine.accumulate():                 # on exit: gradients reduced over data parallelism
        loss, parts = engine.forward(inputs, targets)
        engine.backward(loss)                 # last=False for earlier micro-batches; under pp > 1
                                              # the pipeline runs forwards and backwards instead
    grad_norm, applied = engine.step(max_norm, loss_finite)

and one checkpoint path: `engine.save(saver, step, extra)` writes through `checkpoint.Saver`,
which publishes every engine's folder the same way (temporary folder, meta.json, manifest, rename,
prune); `engine.load(path, extra)` restores model and optimizer and returns the counters saved
beside them (step, data position).

`step` applies the update only when the loss was finite on every rank (the caller's flag, reduced
with the step's metrics) and the global gradient norm is finite; otherwise it leaves weights and
optimizer state as they were and clears the gradients (the trainer's NaN/Inf guard).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from framework import checkpoint
from framework.config import TrainConfig
from framework.errors import TrainingError
from parallel.data_parallel import DataParallelOptimizer, reduce_mean
from parallel.expert_parallel import expert_state_dict, local_state_dict
from parallel.grad_reducer import GradReducer
from parallel.mesh import Mesh


class Engine(Protocol):
    model: nn.Module
    optimizer: object  # its param_groups are duet's AdamW's
    collective_forward: bool  # True when every forward is a collective (ZeRO-3 gathers weights)

    def set_lr(self, lr: float) -> None: ...
    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]: ...
    def accumulate(self) -> contextlib.AbstractContextManager: ...
    def backward(self, loss: torch.Tensor, last: bool = True) -> None: ...
    def step(self, max_norm: float, loss_finite: bool) -> tuple[torch.Tensor | float, bool]: ...
    def params_changed(self) -> None: ...  # the module's weights were written from outside
    def model_state_dict(self) -> dict[str, torch.Tensor]: ...
    def save(self, saver: checkpoint.Saver, step: int, extra: dict[str, int]) -> Path: ...
    def load(self, path: Path, extra: dict[str, int]) -> dict[str, int]: ...


def release_step(model: nn.Module) -> None:
    """End of a step: drop what the model kept of its last forward. Each MoE layer keeps its
    balance loss for the loss to collect, and through it that forward's whole autograd graph
    (a pipeline stage's received input and its gradient included) until the next forward."""
    for module in model.modules():
        if getattr(module, "aux_loss", None) is not None:
            module.aux_loss = None


def counters(extra: dict[str, int]) -> dict[str, torch.Tensor]:
    """Counters as 0-dim int64 tensors: DCP stores only tensors (nothing is unpickled on load)."""
    return {k: torch.tensor(v, dtype=torch.int64) for k, v in extra.items()}


def load_weights(model: nn.Module, path: Path, mesh: Mesh) -> None:
    """A native checkpoint's weights (and expert biases) into this rank's share of `model`;
    experts are stored by global id, so any layout's checkpoint fits."""
    state = {"model": expert_state_dict(model.state_dict(), mesh)}
    try:
        checkpoint.load(path, state)
    except checkpoint.CheckpointError as err:
        raise TrainingError(str(err)) from None
    model.load_state_dict(local_state_dict(state["model"]))


class NativeEngine:
    """duet's own: GradReducer (bucketed all-reduce overlapping backward; dense over dp, experts
    over edp) and DataParallelOptimizer (AdamW, ZeRO-1 shards of its state). Checkpoints are DCP
    with experts as global-id DTensors, so they reshard on load."""

    collective_forward = False

    def __init__(self, model: nn.Module, cfg: TrainConfig, mesh: Mesh, pipeline=None) -> None:
        par = cfg.parallel
        self.model, self.mesh, self.pipeline = model, mesh, pipeline
        self.reducer = GradReducer(model, mesh, par.bucket_mb, zero=par.zero1,
                                   reduce_dtype=par.grad_reduce_dtype)
        self.optimizer = DataParallelOptimizer(model, cfg.optim, mesh, cfg.precision.moment_dtype,
                                               zero=par.zero1, bucket_mb=par.bucket_mb,
                                               pp_copies=pipeline.copies if pipeline else None,
                                               reducer=self.reducer)

    def set_lr(self, lr: float) -> None:
        self.optimizer.set_lr(lr)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self.model.loss(inputs, targets)

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        """One step's backward passes. Under pp > 1 gradients accumulate over the micro-batches
        and are reduced once after the last; then DualPipe's mirror stages (and a tied embedding)
        sum their copies."""
        with self.reducer.no_sync() if self.pipeline is not None else contextlib.nullcontext():
            yield
        self.reducer.finish()
        if self.pipeline is not None:
            self.pipeline.sync_shared_grads()

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        """last=False for all but a step's last backward: those only accumulate gradients; the
        reduction (overlapping the last backward) covers them all."""
        with contextlib.nullcontext() if last else self.reducer.no_sync():
            loss.backward()

    def params_changed(self) -> None:
        """The module's weights were overwritten from outside (post-training's Learner.load_from, on
        an engine that has not stepped): nothing to refresh. The parameters are what AdamW updates,
        and a low-precision parameter's fp32 master is made from it at its first step."""

    def step(self, max_norm: float, loss_finite: bool) -> tuple[torch.Tensor, bool]:
        grad_norm = self.optimizer.clip_grad_norm(max_norm)
        finite = bool(torch.isfinite(grad_norm))
        if not self.optimizer.zero:
            # Under ZeRO-1 the norm is reduced over the shards, so every rank sees the same value.
            # Without it the norm is this rank's own, and a non-finite gradient that appears after
            # the reduction is seen by one rank only: the ranks agree on the skip through one flag.
            finite = reduce_mean({"nonfinite": float(not finite)}, self.mesh)["nonfinite"] == 0
        applied = loss_finite and finite
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad()
        release_step(self.model)
        return grad_norm, applied

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """Under expert parallelism the routed experts are saved by global id (DTensors)."""
        return expert_state_dict(self.model.state_dict(), self.mesh)

    def _state(self, extra: dict[str, int]) -> dict[str, dict[str, torch.Tensor]]:
        return {"model": self.model_state_dict(), "optim": self.optimizer.state_dict(),
                "extra": counters(extra)}

    def save(self, saver: checkpoint.Saver, step: int, extra: dict[str, int]) -> Path:
        return saver.save(step, self._state(extra))

    def load(self, path: Path, extra: dict[str, int]) -> dict[str, int]:
        state = self._state(extra)
        try:
            checkpoint.load(path, state, verify=False)  # resume's starting point verified it
        except checkpoint.CheckpointError as err:
            raise TrainingError(str(err)) from None
        self.model.load_state_dict(local_state_dict(state["model"]))  # first: ZeRO masters follow it
        self.optimizer.load_state_dict(state["optim"])
        return {k: int(v) for k, v in state["extra"].items()}
