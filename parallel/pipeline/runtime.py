"""Pipeline execution: one rank runs its schedule's actions on its stages, exchanging stage
boundary tensors with the other pipeline ranks (activations forward, gradients backward).

    stages = hold_stages(model, placement, pp_rank)     # this rank's Stage per phase
    runner = PipelineRunner(stages, placement, schedule[pp_rank], peers)
    out = runner.step(tokens_mbs, targets_mbs)          # forward + backward of every micro-batch
    out.losses[mb], out.parts[mb]                       # last-stage losses of the micro-batches here

Communication (through parallel.comm): a forward's output is sent at once, asynchronously, to
the rank holding the next stage for that micro-batch; a backward's input gradient likewise to
the previous stage's rank. Receives are posted one action ahead and waited for when the action
needs them. Sends are eager, so a schedule runs without deadlock exactly when the simulator
can run it. Messages are tagged
with (kind, stage, micro-batch), so several may be in flight between two ranks. A stage
boundary on one rank (DualPipeV's turn) is handed over locally.

Loss scaling: every micro-batch's backward starts from loss / n_micro_batches (and each
non-last stage adds its MoE balance loss / n_micro_batches), so the accumulated gradients are
those of the mean loss over the rank's batch, as without a pipeline. Weight gradients of
split backwards wait in a FIFO for W actions (parallel/pipeline/wgrad.py).

Legend: B micro-batch sequences, T sequence, D model dim.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from framework.model.transformer import Stage, Transformer
from parallel import comm
from parallel.pipeline.schedules import Action, Placement
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
    """Runs one rank's action list. `peers[pp_rank]` is the global rank of that pipeline rank
    in this rank's dp column; `group` the pipeline process group."""

    def __init__(self, stages: list[Stage], placement: Placement, actions: list[Action], pp_rank: int,
                 peers: list[int], group=None, record: Callable[[str, float, float], None] | None = None,
                 overlap: bool = False):
        self.stages, self.placement, self.actions = stages, placement, actions
        # overlap: an FB pair runs its backward on a second thread beside its forward, so each
        # one's communication (P2P, and the all-to-alls of expert parallelism, which then need
        # their own backward groups: expert_parallel.enable_expert_parallel) hides behind the
        # other's computation. The arithmetic is unchanged: each graph runs the same ops.
        self.overlap = overlap
        self.pp_rank, self.peers, self.group = pp_rank, peers, group
        # Timeline hook: record(label, start, end) with perf_counter seconds; labels "F<phase>.<mb>",
        # "B<phase>.<mb>" (suffix z: weight gradients deferred), "W", "recv" (blocked receiving).
        self.record = record
        self.last_stage = placement.n_stages - 1

    # --- communication -------------------------------------------------------------------
    def _tag(self, grad: bool, stage: int, mb: int) -> int:
        return int(grad) + 2 * (stage + self.placement.n_stages * mb)

    def _send(self, t: torch.Tensor, grad: bool, stage: int, mb: int) -> None:
        """Deliver to whoever runs `stage` for `mb` (the receiver's stage names the message)."""
        rank, _ = self.placement.locate(stage, self.placement.direction_of(mb))
        if rank == self.pp_rank:
            self._local[(grad, stage, mb)] = t
            return
        handle = comm.send(t.detach().contiguous(), self.peers[rank], self.group, async_op=True,
                           tag=self._tag(grad, stage, mb))
        with self._sends_lock:  # an overlapped pair sends from two threads
            # Drop finished sends, and with them their staged buffers: a sent activation is freed.
            done = [h for h in self._sends if h.is_completed()]
            for h in done:
                h.wait()  # returns at once; books the bytes in parallel.comm's counters
            self._sends = [h for h in self._sends if h not in done] + [handle]

    def _source(self, grad: bool, stage: int, mb: int) -> int:
        """The pipeline rank that sends message (grad, stage, mb) to this rank."""
        from_stage = stage + 1 if grad else stage - 1
        return self.placement.locate(from_stage, self.placement.direction_of(mb))[0]

    def _post(self, grad: bool, stage: int, mb: int) -> None:
        """Post a receive early: gloo hands a message over only once its receive is posted, so
        a receive posted when the action starts costs a round trip the schedule can hide."""
        key = (grad, stage, mb)
        rank = self._source(grad, stage, mb)
        if rank == self.pp_rank or key in self._posted:
            return
        buf = torch.empty(self._shape, dtype=self._dtype, device=self._device)
        self._posted[key] = (buf, comm.recv(buf, self.peers[rank], self.group, async_op=True,
                                            tag=self._tag(grad, stage, mb)))

    def _recv(self, grad: bool, stage: int, mb: int) -> torch.Tensor:
        local = self._local.pop((grad, stage, mb), None)
        if local is not None:
            return local.detach()
        self._post(grad, stage, mb)
        buf, handle = self._posted.pop((grad, stage, mb))
        start = time.perf_counter()
        handle.wait()
        self._mark("recv", start)
        return buf

    def _prefetch(self, action: Action, forward_only: bool) -> None:
        """Post the receives `action` will need."""
        if action.kind in ("F", "FB"):
            stage = self.placement.stage_of(self.pp_rank, action.phase)
            if stage > 0:
                self._post(False, stage, action.mb)
        if not forward_only and action.kind in ("B", "FB"):
            phase, mb = (action.phase, action.mb) if action.kind == "B" else (action.b_phase, action.b_mb)
            stage = self.placement.stage_of(self.pp_rank, phase)
            if stage < self.last_stage:
                self._post(True, stage, mb)

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
            x = self._recv(False, stage_id, mb).requires_grad_(grad)
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
            self._send(live.out, False, stage_id + 1, mb)
        if grad:
            self._live[(phase, mb)] = live

    def _backward(self, phase: int, mb: int, split: bool) -> None:
        stage_id = self.placement.stage_of(self.pp_rank, phase)
        stage = self.stages[phase]
        live = self._live.pop((phase, mb))
        grad_out = None if stage.is_last else self._recv(True, stage_id, mb)
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
            self._send(live.x.grad, True, stage_id - 1, mb)

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
        self._local: dict = {}
        self._posted: dict = {}  # (grad, stage, mb) -> (buffer, receive handle)
        self._live: dict[tuple[int, int], _Live] = {}
        self._sends: list[comm.Handle] = []
        self._sends_lock = threading.Lock()
        self._wgrad: deque[WeightGradWork] = deque()
        self.out = StepOutput()

    def _finish(self) -> StepOutput:
        for handle in self._sends:
            handle.wait()
        if self._live or self._wgrad or self._local or self._posted:
            raise RuntimeError("pipeline step ended with work left: the schedule is inconsistent")
        self._sends = []
        return self.out

    def step(self, tokens: list[torch.Tensor], targets: list[torch.Tensor], hidden_shape: tuple,
             dtype: torch.dtype, device: torch.device, autocast) -> StepOutput:
        """Forward and backward of every micro-batch (lists indexed by global micro-batch id;
        entries this rank never reads may be anything). Gradients accumulate into .grad."""
        self._setup(tokens, targets, hidden_shape, dtype, device, autocast)
        for i, action in enumerate(self.actions):
            for ahead in self.actions[i:i + 2]:  # this action's receives and the next one's
                self._prefetch(ahead, forward_only=False)
            if action.kind == "F":
                self._forward(action.phase, action.mb, grad=True)
            elif action.kind == "B":
                self._backward(action.phase, action.mb, action.split)
            elif action.kind == "W":
                self._weight()
            else:
                self._forward_backward(action)
        return self._finish()

    def _forward_backward(self, action: Action) -> None:
        """An FB pair: forward of one micro-batch and backward of another, side by side when
        overlapping (the backward on a helper thread), else one after the other."""
        if not self.overlap:
            self._forward(action.phase, action.mb, grad=True)
            self._backward(action.b_phase, action.b_mb, action.split)
            return
        failure: list[BaseException] = []

        def backward() -> None:
            try:
                self._backward(action.b_phase, action.b_mb, action.split)
            except BaseException as err:  # noqa: B036 -- re-raised on the calling thread
                failure.append(err)

        helper = threading.Thread(target=backward, name="duet-pipeline-backward")
        helper.start()
        try:
            self._forward(action.phase, action.mb, grad=True)
        finally:
            helper.join()
        if failure:
            raise failure[0]

    @torch.no_grad()
    def forward_only(self, tokens: list[torch.Tensor], targets: list[torch.Tensor] | None, hidden_shape,
                     dtype, device, autocast) -> StepOutput:
        """Evaluation: the schedule's forwards in the same order (its backwards dropped, which
        cannot create a wait cycle). With targets: losses; without: logits on the last stage."""
        self._setup(tokens, targets, hidden_shape, dtype, device, autocast)
        forwards = [a for a in self.actions if a.kind in ("F", "FB")]
        for i, action in enumerate(forwards):
            for ahead in forwards[i:i + 2]:
                self._prefetch(ahead, forward_only=True)
            self._forward(action.phase, action.mb, grad=False)
        return self._finish()
