"""A model of post-training on duet's layout: built by parallelize(), updated by its engine.

    learner = Learner.build(model_cfg, cfg, mesh, device, seed=0)      # policy or student
    frozen = learner.frozen_copy()                                     # the reference: same layout
    n = learner.global_sum(mask.sum())                                 # a count over every dp rank
    record = learner.update([lambda: loss_of(mb) for mb in micro], lr)  # one optimizer step

update() is the trainer's step for losses that are already normalised globally: each closure
returns its micro-batch's share of the global objective (a sum divided by a global count), the
backward of all but the last micro-batch only accumulates, and because the
reducer averages over dp (divides by dp) each share is multiplied by dp before backward, so the
reduced gradient is that of the global objective, the same as one process on the whole batch.

This goes through the engine protocol (parallel/engine.py), as the trainer's step does.
Pipeline parallelism is not supported here: its runtime would need to carry per-micro-batch loss
inputs (advantages, masks, old and reference log-probabilities) to the last stage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from framework.config import ModelConfig, TrainConfig
from parallel import comm
from parallel.data_parallel import all_reduce_expert_load
from parallel.mesh import Mesh
from parallel.parallelize import Parallelized, parallelize


@dataclass
class Learner:
    built: Parallelized
    cfg: TrainConfig
    mesh: Mesh
    device: torch.device
    bias_rate: float = 0.0  # aux-loss-free bias update rate applied after each step

    @classmethod
    def build(cls, model_cfg: ModelConfig, cfg: TrainConfig, mesh: Mesh, device: torch.device,
              seed: int, trainable: bool = True, bias_rate: float | None = None) -> Learner:
        """This rank's share of a model_cfg model; its weights a function of `seed` (every rank and
        one process agree)."""
        if cfg.parallel.pp > 1:
            raise ValueError("post-training runs with parallel.pp=1 (the pipeline runtime carries no "
                             "per-micro-batch loss inputs yet)")
        torch.manual_seed(seed)
        built = parallelize(model_cfg, cfg, mesh, device, "fp32", trainable=trainable)
        rate = model_cfg.bias_update_rate if bias_rate is None else bias_rate
        return cls(built, cfg, mesh, device, rate)

    @property
    def model(self):
        return self.built.model

    @property
    def ep_group(self):
        """The group that samples in lock step (every forward is its all-to-all), else None."""
        return self.mesh.ep_group if self.mesh.ep > 1 else None

    def frozen_copy(self, model_cfg: ModelConfig | None = None) -> Learner:
        """A frozen model on the same layout holding this one's current weights (the reference)."""
        other = Learner.build(model_cfg or self.model.cfg, self.cfg, self.mesh, self.device, seed=0,
                              trainable=False)
        other.load_from(self)
        return other

    @torch.no_grad()
    def load_from(self, source: Learner) -> None:
        """Copy source's weights (same layout: each rank copies its own shard)."""
        self.model.load_state_dict(source.model.state_dict())

    def global_sum(self, value: torch.Tensor | float) -> float:
        """Sum over the data-parallel ranks (a count of sequences or tokens)."""
        device = comm.collective_device(self.mesh.dp_group)
        t = torch.as_tensor(value, dtype=torch.float64).reshape(1).to(device)
        if self.mesh.dp > 1:
            comm.all_reduce(t, "sum", self.mesh.dp_group)
        return float(t.item())

    def update(self, closures: Sequence[Callable[[], torch.Tensor]], lr: float, max_norm: float = 1.0,
               after_forward: Callable[[], None] | None = None) -> dict[str, float]:
        """One optimizer step on the sum of the closures' (globally normalised) losses; returns the
        global loss, the gradient norm and the expert loads of the step's training forwards."""
        engine, model, dp = self.built.engine, self.model, self.mesh.dp
        engine.set_lr(lr)
        model.train()
        total = torch.zeros((), dtype=torch.float64)
        with engine.accumulate():  # on exit: gradients reduced over dp (once, after the last piece)
            for i, closure in enumerate(closures):
                last = i == len(closures) - 1
                with contextlib.nullcontext() if last else engine.reducer.no_sync():
                    loss = closure()
                    if after_forward is not None:
                        after_forward()
                    engine.backward(loss * dp)
                total += loss.detach().double().cpu()
        finite = bool(torch.isfinite(total))
        grad_norm, applied = engine.step(max_norm, finite)
        all_reduce_expert_load(model, self.mesh)
        loads = [moe.router.expert_load.tolist() for moe in model.moe_layers()]
        model.update_expert_bias(self.bias_rate if applied else 0.0)  # rate 0: counts reset only
        return {"loss": self.global_sum(total), "grad_norm": float(grad_norm), "applied": applied,
                "expert_load": loads}
