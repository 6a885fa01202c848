"""A model of post-training on duet's layout: built by parallelize(), updated by its engine.

    learner = Learner.build(model_cfg, cfg, mesh, device, seed=0)      # policy or student
    frozen = learner.frozen_copy()                                     # the reference: same layout
    n = learner.global_sum(mask.sum())                                 # a count over every dp rank
    record = learner.update([lambda: loss_of(mb) for mb in micro], lr)  # one optimizer step
    record = learner.update_heads(tokens_mbs, [head_of(mb) for mb in micro], lr)   # under any pp
    logp = learner.forward_heads(tokens_mbs, [logp_of(mb) for mb in micro])       # no graph

update() is the trainer's step for losses that are already normalised globally: each closure
returns its micro-batch's share of the global objective (a sum divided by a global count), the
backward of all but the last micro-batch only accumulates, and because the
reducer averages over dp (divides by dp) each share is multiplied by dp before backward, so the
reduced gradient is that of the global objective, the same as one process on the whole batch.

Heads: a head is fn(logits_BTV) of one micro-batch (its loss share, or per-token values such as
log-probabilities). update_heads / forward_heads run them on the layout: in one process
fn(model(tokens)) per micro-batch; under pp > 1 the pipeline runtime carries the heads to the
last stage, which applies them to its logits (parallel/pipeline/runtime.py: no 1/micro-batches
on top, root gradient dp as here), and forward_heads' values reach every pipeline rank. The
micro-batches are then parallel.micro_batches pieces of one shape (rollouts padded to one
length). `scope` (i -> a context, e.g. routing record/replay hooks, replay.py) surrounds micro-
batch i's forward: in one process the whole forward, under pp > 1 each of its forward sub-steps
on this rank (the micro-batches' forwards interleave there), so a scope must be re-enterable.

Sampling under pp > 1 (sampling_model): generate() decodes through a whole model, so every
pipeline rank gathers the current weights into an unpruned copy of its own (every tensor summed
over pp from its holders, divided by their count: exact, the holders' copies are equal) and
samples on it; the ranks of a dp column then draw the same rollouts (same weights, same seeds).
The simplest honest route: it holds the whole model per rank (expert parallelism inside it is
not built: pp > 1 with ep > 1 is refused there).

This goes through the engine protocol (parallel/engine.py), as the trainer's step does.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from framework.config import ModelConfig, TrainConfig
from framework.model.transformer import Transformer
from parallel import comm
from parallel.data_parallel import all_reduce_expert_load
from parallel.mesh import Mesh
from parallel.parallelize import Parallelized, parallelize

# Around micro-batch i's forward (or each of its sub-steps under pp > 1): scope(i) -> a context
Scope = Callable[[int], contextlib.AbstractContextManager]


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
        torch.manual_seed(seed)
        built = parallelize(model_cfg, cfg, mesh, device, "fp32", trainable=trainable)
        rate = model_cfg.bias_update_rate if bias_rate is None else bias_rate
        return cls(built, cfg, mesh, device, rate)

    @property
    def model(self):
        return self.built.model

    @torch.no_grad()
    def sampling_model(self):
        """The model rollouts are sampled from: this rank's under pp=1, else a gathered whole copy
        (module docstring) holding the current weights."""
        if self.pipeline is None:
            return self.model
        if self.mesh.ep > 1:
            raise ValueError("sampling under parallel.pp > 1 gathers a whole model per rank, without expert "
                             "parallelism: use parallel.ep=1 with pp > 1")
        whole = Transformer(self.model.cfg, init_seed=self.model.init_seed)
        own = self.model.state_dict()
        target = whole.state_dict()
        where = comm.collective_device(self.mesh.pp_group)
        zeros = functools.partial(torch.zeros, dtype=torch.float64)
        flat = torch.cat([own[n].double().reshape(-1) if n in own else zeros(t.numel())
                          for n, t in target.items()]).to(where)
        held = torch.tensor([float(n in own) for n in target], dtype=torch.float64, device=where)
        flat, held = self.pipeline.sum_over_pp(flat), self.pipeline.sum_over_pp(held)
        offset = 0
        for t, count in zip(target.values(), held, strict=True):
            piece = flat[offset:offset + t.numel()] / count
            t.copy_(piece.view_as(t).to(t.dtype))
            offset += t.numel()
        return whole.to(self.device)

    @property
    def micro_batches(self) -> int:
        """Pieces per step on this layout (under pp > 1 the pipeline's micro-batches)."""
        return self.cfg.parallel.micro_batches

    @property
    def pipeline(self):
        """The PipelineEngine under pp > 1, else None."""
        return self.built.pipeline

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
        """Copy source's weights (same layout: each rank copies its own shard); an engine that keeps
        its own copy of them (DeepSpeed's fp32 masters) takes them too."""
        self.model.load_state_dict(source.model.state_dict())
        if self.built.engine is not None:
            self.built.engine.params_changed()

    def global_sum(self, value: torch.Tensor | float) -> float:
        """Sum over the data-parallel ranks (a count of sequences or tokens)."""
        device = comm.collective_device(self.mesh.dp_group)
        t = torch.as_tensor(value, dtype=torch.float64).reshape(1).to(device)
        if self.mesh.dp > 1:
            comm.all_reduce(t, "sum", self.mesh.dp_group)
        return float(t.item())

    def head_sum(self, value: torch.Tensor | float) -> float:
        """global_sum of a value that pipeline ranks produced in parts: the heads' (under pp > 1 on
        the last stage; the others hold zeros) or the routers' (each rank counts its own layers), so
        it is summed over pp too."""
        if self.pipeline is None:
            return self.global_sum(value)
        t = torch.as_tensor(value, dtype=torch.float64).reshape(1)
        t = t.to(comm.collective_device(self.mesh.pp_group))
        return self.global_sum(self.pipeline.sum_over_pp(t))

    def update(self, closures: Sequence[Callable[[], torch.Tensor]], lr: float, max_norm: float = 1.0,
               after_forward: Callable[[], None] | None = None) -> dict[str, float]:
        """One optimizer step on the sum of the closures' (globally normalised) losses; returns the
        global loss, the gradient norm and the expert loads of the step's training forwards.
        pp=1 only (a closure runs the whole model): under a pipeline, update_heads."""
        if self.pipeline is not None:
            raise ValueError("Learner.update runs whole-model closures (parallel.pp=1); under pp > 1 use "
                             "update_heads")
        engine, model, dp = self.built.engine, self.model, self.mesh.dp
        engine.set_lr(lr)
        model.train()
        total = torch.zeros((), dtype=torch.float64)
        with engine.accumulate():  # on exit: gradients reduced over dp (once, after the last piece)
            for i, closure in enumerate(closures):
                loss = closure()
                if after_forward is not None:
                    after_forward()
                engine.backward(loss * dp, last=i == len(closures) - 1)
                total += loss.detach().double().cpu()
        return self._step(total, max_norm)

    def update_heads(self, tokens_mbs: Sequence[torch.Tensor], heads: Sequence[Callable], lr: float,
                     max_norm: float = 1.0, scope: Scope | None = None,
                     hidden: bool = False) -> dict[str, float]:
        """update() on heads: micro-batch i's loss is heads[i](logits of tokens_mbs[i]), a share of
        a globally normalised objective (module docstring). hidden=True (pp=1 only): the heads
        take the final-normed hidden states instead (for losses beyond the head, e.g. MTP's)."""
        if self.pipeline is None:
            pieces = enumerate(zip(tokens_mbs, heads, strict=True))
            return self.update([functools.partial(self._head_loss, i, t, h, scope, hidden)
                                for i, (t, h) in pieces], lr, max_norm)
        if hidden:
            raise ValueError("heads on hidden states run in one process only (parallel.pp=1)")
        engine = self.built.engine
        engine.set_lr(lr)
        self.model.train()
        with engine.accumulate():  # the reducer's dp average, undone by scale=dp as in update()
            total = self.pipeline.train_heads(list(tokens_mbs), list(heads), self.device,
                                              contextlib.nullcontext, scale=self.mesh.dp, scope=scope)
        return self._step(total.cpu(), max_norm)

    @torch.no_grad()
    def forward_heads(self, tokens_mbs: Sequence[torch.Tensor], heads: Sequence[Callable],
                      scope: Scope | None = None) -> list[torch.Tensor]:
        """heads[i](logits of tokens_mbs[i]) in eval mode, no graph; per-token values [b, T] (fp32)
        on every rank of the layout."""
        model = self.model
        model.eval()
        try:
            if self.pipeline is not None:
                return self.pipeline.forward_heads(list(tokens_mbs), list(heads), self.device,
                                                   contextlib.nullcontext, scope)
            pieces = enumerate(zip(tokens_mbs, heads, strict=True))
            return [self._head_loss(i, t, h, scope) for i, (t, h) in pieces]
        finally:
            model.train()

    def _head_loss(self, i: int, tokens_BT: torch.Tensor, head: Callable, scope,
                   hidden: bool = False) -> torch.Tensor:
        model, tokens_BT = self.model, tokens_BT.to(self.device)
        with scope(i) if scope is not None else contextlib.nullcontext():
            return head(model.hidden(tokens_BT) if hidden else model(tokens_BT))

    def _step(self, total: torch.Tensor, max_norm: float) -> dict[str, float]:
        """The optimizer step after the backward passes (total: this rank's loss, float64)."""
        engine, model = self.built.engine, self.model
        finite = bool(torch.isfinite(total))
        grad_norm, applied = engine.step(max_norm, finite)
        if self.pipeline is not None:  # DualPipe's mirror routers saw different micro-batches
            self.pipeline.sync_shared_loads()
        all_reduce_expert_load(model, self.mesh)
        loads = [moe.router.expert_load.tolist() for moe in model.moe_layers()]
        model.update_expert_bias(self.bias_rate if applied else 0.0)  # rate 0: counts reset only
        return {"loss": self.global_sum(total), "grad_norm": float(grad_norm), "applied": applied,
                "expert_load": loads}
