"""Pipeline execution: one rank runs its schedule's actions on its stages, exchanging stage
boundary tensors with the other pipeline ranks (activations forward, gradients backward).

    stages = hold_stages(model, placement, pp_rank)     # this rank's Stage per phase
    runner = PipelineRunner(stages, placement, pp_rank, peers, group)   # runs build(...)[pp_rank]
    out = runner.step(tokens_mbs, targets_mbs)          # forward + backward of every micro-batch
    out.losses[mb], out.parts[mb]                       # last-stage losses of the micro-batches here

Communication (through parallel.comm, DESIGN.md rule 9): the rank issues exactly the P2P plan
of its schedule (`p2p_plan`, parallel/pipeline/p2p.py): before each action, the batches the plan
puts at that boundary go out as `batch_isend_irecv` calls on the pipeline group, with no tags,
and are waited before the action computes; the last batches follow the last action. A warm-up
all-reduce over the group precedes the first batch (PyTorch wants every rank of a group in its
first call). A stage boundary on one rank (DualPipeV's turn) is handed over locally. An FB pair
runs its forward and then its backward, on the calling thread (DESIGN.md rule 10); no second
thread ever issues work.

Loss scaling: every micro-batch's backward starts from loss / n_micro_batches (and each
non-last stage adds its MoE balance loss / n_micro_batches), so the accumulated gradients are
those of the mean loss over the rank's batch, as without a pipeline. Weight gradients of
split backwards wait in a FIFO for W actions (parallel/pipeline/wgrad.py).

Legend: B micro-batch sequences, T sequence, D model dim.
"""

from __future__ import annotations

import functools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from framework.model.transformer import Stage, Transformer
from parallel import comm
from parallel.pipeline.p2p import P2POp, forward_actions, p2p_plan
from parallel.pipeline.schedules import Placement, build
from parallel.pipeline.wgrad import WeightGradWork, capture


def hold_stages(all_stages: list[Stage], placement: Placement, pp_rank: int) -> list[Stage]:
    """This rank's stage for each phase."""
    return [all_stages[placement.stage_of(pp_rank, phase)] for phase in range(placement.phases)]


def holders(model: Transformer, all_stages: list[Stage], placement: Placement) -> dict[str, list[int]]:
    """Parameter (and buffer) name -> the pipeline ranks holding it, for every tensor of the model.
    Under DualPipe every stage lives on two ranks; a tied embedding can live on the first and
    the last stage."""
    name_of = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
    out: dict[str, set[int]] = {}
    for r in range(placement.pp):
        for stage in hold_stages(all_stages, placement, r):
            for t in [*stage.parameters(), *stage.buffers()]:
                out.setdefault(name_of[id(t)], set()).add(r)
    return {n: sorted(rs) for n, rs in out.items()}


def prune(model: Transformer, kept: list[Stage]) -> Transformer:
    """Drop every module this rank does not hold (in place): blocks become Identity, unheld
    embedding / norm / head / MTP become None. Names of what stays are unchanged, so the
    state_dict is the full model's restricted to this rank's stages."""
    kept_ids = {id(m) for stage in kept for m in stage.modules()}
    for i, block in enumerate(model.blocks):
        if id(block) not in kept_ids:
            model.blocks[i] = nn.Identity()
    for name in ("embed", "norm", "head", "mtp"):
        if id(getattr(model, name)) not in kept_ids:
            setattr(model, name, None)
    return model


@dataclass
class StepOutput:
    losses: dict[int, torch.Tensor] = field(default_factory=dict)  # mb -> last-stage loss (detached)
    parts: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # mb -> loss terms
    aux: dict[int, torch.Tensor] = field(default_factory=dict)  # mb -> balance loss of the other stages here
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # forward-only: mb -> logits


@dataclass
class _Live:
    """What a forward leaves for its backward."""
    x: torch.Tensor | None  # the stage input (requires grad unless the first stage)
    out: torch.Tensor  # the stage output, or the loss on the last stage
    aux: torch.Tensor | None  # this stage's balance loss (non-last stages)


class PipelineRunner:
    """Runs one pipeline rank's schedule (`build(placement.name, ...)[pp_rank]`). `peers[p]` is the
    global rank of pipeline rank p in this rank's dp column; `group` the pipeline process group
    (None: the default group)."""

    def __init__(self, stages: list[Stage], placement: Placement, pp_rank: int, peers: list[int],
                 group=None, wgrad_split: bool = True,
                 record: Callable[[str, float, float], None] | None = None):
        self.stages, self.placement = stages, placement
        self.pp_rank, self.peers, self.group = pp_rank, peers, group
        self.actions = build(placement.name, placement.pp, placement.chunks, wgrad_split)[pp_rank]
        self.eval_actions = forward_actions(self.actions)
        plan = functools.partial(p2p_plan, placement.name, placement.pp, placement.chunks, pp_rank,
                                 wgrad_split=wgrad_split)
        self._train_plan = _by_boundary(plan(forward_only=False), len(self.actions))
        self._eval_plan = _by_boundary(plan(forward_only=True), len(self.eval_actions))
        self._warm = False
        # Timeline hook: record(label, start, end) with perf_counter seconds; labels "F<phase>.<mb>",
        # "B<phase>.<mb>" (suffix z: weight gradients deferred), "W", "recv" (blocked in P2P).
        self.record = record
        self.last_stage = placement.n_stages - 1

    # --- communication -------------------------------------------------------------------
    def _put(self, kind: str, stage: int, mb: int, t: torch.Tensor) -> None:
        """Hand a result to whoever runs `stage` for `mb`: locally, or into the outbox from which
        the plan's next batch toward that rank takes it."""
        rank, _ = self.placement.locate(stage, self.placement.direction_of(mb))
        box = self._local if rank == self.pp_rank else self._outbox
        box[(kind, stage, mb)] = t.detach().contiguous()

    def _take(self, kind: str, stage: int, mb: int) -> torch.Tensor:
        key = (kind, stage, mb)
        return (self._local.pop(key) if key in self._local else self._inbox.pop(key)).detach()

    def _communicate(self, batches: list[list[P2POp]]) -> None:
        """Issue this boundary's batches in plan order, then wait for them."""
        if not batches:
            return
        start = time.perf_counter()
        handles = []
        for batch in batches:
            ops = []
            for op in batch:
                if op.op == "send":
                    ops.append(("send", self._outbox.pop(op.message), self.peers[op.peer]))
                else:
                    buf = torch.empty(self._shape, dtype=self._dtype, device=self._device)
                    self._inbox[op.message] = buf
                    ops.append(("recv", buf, self.peers[op.peer]))
            handles.append(comm.batch_isend_irecv(ops, self.group, async_op=True))
        for handle in handles:
            handle.wait()
        self._mark("recv", start)

    def _warm_up(self) -> None:
        """Once, before the first batch: PyTorch needs every rank of a group in the group's first
        call, which a batch between two of its ranks is not."""
        if not self._warm:
            comm.all_reduce(torch.zeros(1, device=comm.collective_device(self.group)), group=self.group)
            self._warm = True

    def _mark(self, label: str, start: float) -> None:
        if self.record is not None:
            self.record(label, start, time.perf_counter())

    # --- chunks --------------------------------------------------------------------------
    def _forward(self, phase: int, mb: int, grad: bool) -> None:
        stage_id = self.placement.stage_of(self.pp_rank, phase)
        stage = self.stages[phase]
        if stage.is_first:
            x = self._tokens[mb]
        else:
            x = self._take("act", stage_id, mb).requires_grad_(grad)
        start = time.perf_counter()
        with torch.set_grad_enabled(grad), self._autocast():
            if stage.is_last and self._targets is not None:
                loss, parts = stage.loss(x, self._targets[mb])
                self.out.losses[mb], self.out.parts[mb] = loss.detach(), parts
                live = _Live(x, loss, None)
            elif stage.is_last:
                self.out.logits[mb] = stage(x).detach()
                live = None
            else:
                h_BTD = stage(x)
                aux = stage.balance_loss() if grad else None
                if aux is not None:
                    self.out.aux[mb] = self.out.aux.get(mb, 0) + aux.detach()
                live = _Live(x, h_BTD, aux)
        self._mark(f"F{phase}.{mb}", start)
        if not stage.is_last:
            self._put("act", stage_id + 1, mb, live.out)
        if grad:
            self._live[(phase, mb)] = live

    def _backward(self, phase: int, mb: int, split: bool) -> None:
        stage_id = self.placement.stage_of(self.pp_rank, phase)
        stage = self.stages[phase]
        live = self._live.pop((phase, mb))
        grad_out = None if stage.is_last else self._take("grad", stage_id, mb)
        start = time.perf_counter()
        tensors, grads = [live.out * self._scale if stage.is_last else live.out], [grad_out]
        if live.aux is not None and live.aux.requires_grad:
            tensors.append(live.aux * self._scale)
            grads.append(None)
        if split:
            with capture() as work:
                torch.autograd.backward(tensors, grads)
            self._wgrad.append(work)
        else:
            torch.autograd.backward(tensors, grads)
        self._mark(f"B{phase}.{mb}" + ("z" if split else ""), start)
        if not stage.is_first:
            self._put("grad", stage_id - 1, mb, live.x.grad)

    def _weight(self) -> None:
        start = time.perf_counter()
        self._wgrad.popleft().run()
        self._mark("W", start)

    # --- one step ------------------------------------------------------------------------
    def _setup(self, tokens: list[torch.Tensor], targets: list[torch.Tensor] | None, hidden_shape,
               dtype, device, autocast) -> None:
        self._tokens, self._targets = tokens, targets
        self._shape, self._dtype, self._device = hidden_shape, dtype, device
        self._autocast = autocast
        self._scale = 1.0 / self.placement.chunks
        self._local: dict = {}  # message -> tensor handed over on this rank
        self._outbox: dict = {}  # message -> tensor waiting for its batch
        self._inbox: dict = {}  # message -> received (or receiving) buffer
        self._live: dict[tuple[int, int], _Live] = {}
        self._wgrad: deque[WeightGradWork] = deque()
        self.out = StepOutput()

    def _finish(self) -> StepOutput:
        if self._live or self._wgrad or self._local or self._outbox or self._inbox:
            raise RuntimeError("pipeline step ended with work left: the schedule is inconsistent")
        return self.out

    def step(self, tokens: list[torch.Tensor], targets: list[torch.Tensor], hidden_shape: tuple,
             dtype: torch.dtype, device: torch.device, autocast) -> StepOutput:
        """Forward and backward of every micro-batch (lists indexed by global micro-batch id;
        entries this rank never reads may be anything). Gradients accumulate into .grad."""
        self._setup(tokens, targets, hidden_shape, dtype, device, autocast)
        self._warm_up()
        for k, action in enumerate(self.actions):
            self._communicate(self._train_plan[k])
            if action.kind == "F":
                self._forward(action.phase, action.mb, grad=True)
            elif action.kind == "B":
                self._backward(action.phase, action.mb, action.split)
            elif action.kind == "W":
                self._weight()
            else:  # FB: the forward, then the backward (their sub-layer interleave is not built)
                self._forward(action.phase, action.mb, grad=True)
                self._backward(action.b_phase, action.b_mb, action.split)
        self._communicate(self._train_plan[len(self.actions)])
        return self._finish()

    @torch.no_grad()
    def forward_only(self, tokens: list[torch.Tensor], targets: list[torch.Tensor] | None, hidden_shape,
                     dtype, device, autocast) -> StepOutput:
        """Evaluation: the schedule's forwards in the same order, on their own plan. With
        targets: losses; without: logits on the last stage."""
        self._setup(tokens, targets, hidden_shape, dtype, device, autocast)
        self._warm_up()
        for k, action in enumerate(self.eval_actions):
            self._communicate(self._eval_plan[k])
            self._forward(action.phase, action.mb, grad=False)
        self._communicate(self._eval_plan[len(self.eval_actions)])
        return self._finish()


def _by_boundary(plan: list[P2POp], n_actions: int) -> list[list[list[P2POp]]]:
    """plan -> for each action boundary 0..n_actions, its batches in issue order."""
    out: list[list[list[P2POp]]] = [[] for _ in range(n_actions + 1)]
    last_batch = None
    for op in plan:
        if op.batch != last_batch:
            out[op.before].append([])
            last_batch = op.batch
        out[op.before][-1].append(op)
    return out
