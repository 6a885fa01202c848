"""Pipeline execution: one rank runs its schedule's actions on its stages, exchanging stage
boundary tensors with the other pipeline ranks (activations forward, gradients backward).

    stages = hold_stages(model, placement, pp_rank)     # this rank's Stage per phase
    runner = PipelineRunner(stages, placement, pp_rank, peers, group)   # runs build(...)[pp_rank]
    out = runner.step(tokens_mbs, targets_mbs)          # forward + backward of every micro-batch
    out.losses[mb], out.parts[mb]                       # last-stage losses of the micro-batches here
    out = runner.step(tokens_mbs, None, ..., heads=fns, scale=dp)   # loss of mb = fns[mb](logits)
    runner.forward_only(tokens_mbs, None, ..., heads=fns).logits[mb]   # fns[mb](logits), no graph

Training actions run as sub-layer steps (framework/model/substeps.py): a forward is a StagePass
whose steps keep the block boundaries (attention, dispatch, experts, combine), and its backward
later runs the same boundaries in reverse. An FB pair issues its two passes' steps in DualPipe's
interleaved order (substeps.interleave: combine(B) attention(F) dispatch(F) experts(B) sizes(F)
dispatch(B) experts(W) experts(F) combine(F) attention(B) attention(W) per MoE block pair), so
each expert-parallel all-to-all travels while a computation of the other micro-batch runs; with
interleave=False (parallel.overlap_fb=false) the forward's steps, then the backward's (the same
numbers). One thread issues everything (DESIGN.md rule 10).

Communication (through parallel.comm, DESIGN.md rule 9): the rank issues exactly the P2P plan
of its schedule (`p2p_plan`, parallel/pipeline/p2p.py): before each action, the batches the plan
puts at that boundary go out as `batch_isend_irecv` calls on the pipeline group, with no tags,
in plan order; each batch is waited right before the action's first step that reads one of its
receives, and every batch still open is waited when the action ends (so sends, and receives a
later step needs, travel while earlier steps compute); the last batches follow the last action.
The plan's early receives (a boundary's first receives from higher ranks, issued one boundary
ahead) are such batches: the previous action computes while they travel, and its end waits them.
A warm-up all-reduce over the group precedes the first batch (PyTorch wants every rank of a
group in its first call). A stage boundary on one rank (DualPipeV's turn) is handed over locally.
The all-to-alls use the ep group's communicator, the P2P the pipeline group's: on NCCL separate
streams, and every rank of an ep group runs the same schedule, so both keep one order.

Loss scaling: every micro-batch's backward starts from loss / n_micro_batches (each MoE layer's
balance loss is a root of its attention backward with the same scale), so the accumulated
gradients are those of the mean loss over the rank's batch, as without a pipeline.
Per-micro-batch losses (`heads`, post-training): heads[mb](logits_BTV) is micro-batch mb's
share of an objective the caller has already normalised globally (e.g. a GRPO token sum over
the token count of every micro-batch and dp rank), so the runtime adds no 1/n_micro_batches:
the last stage's root gradient is `scale` (the caller's; Learner passes dp, undoing the
reducer's dp average), the MTP loss is not computed and the balance losses are not roots; the
accumulated gradient is that of sum_mb heads[mb], as one process computes it. Weight
gradients of split backwards (every sub-step's W) wait in a FIFO for W actions
(parallel/pipeline/wgrad.py); an unsplit backward runs each sub-step's W right after it.

Legend: B micro-batch sequences, T sequence, D model dim.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from framework.model.substeps import StagePass, StepContext, interleave
from framework.model.transformer import Stage, Transformer
from parallel import comm
from parallel.pipeline.p2p import P2POp, forward_actions, p2p_plan
from parallel.pipeline.schedules import Placement, build
from parallel.pipeline.wgrad import WeightGradWork


def boundary_dtype(device, autocast) -> torch.dtype:
    """The dtype stage boundaries travel in: the activation dtype, i.e. autocast's (bf16 under
    bf16 and fp8 runs) where `autocast()` enables it, else float32 (launch/planner.py counts the
    same bytes: act_bytes)."""
    kind = torch.device(device).type
    with autocast():
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else torch.float32


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
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # forward-only: mb -> logits (or heads[mb])


class PipelineRunner:
    """Runs one pipeline rank's schedule (`build(placement.name, ...)[pp_rank]`). `peers[p]` is the
    global rank of pipeline rank p in this rank's dp column; `group` the pipeline process group
    (None: the default group)."""

    def __init__(self, stages: list[Stage], placement: Placement, pp_rank: int, peers: list[int],
                 group=None, wgrad_split: bool = True,
                 record: Callable[[str, float, float], None] | None = None,
                 interleave: bool = True):
        self.stages, self.placement = stages, placement
        # interleave: an FB action runs its two passes' sub-steps in DualPipe's order (substeps
        # .interleave); False: the forward's steps, then the backward's (same numbers). Activation
        # recompute is each block's own (model.recompute).
        self.interleave = interleave
        # Trace hook: trace(event, name) for every sub-step and P2P batch, event "issue" |
        # "compute" | "wait", name "<step>@<mb>" or "p2p<boundary>.<batch>" (tests/test_overlap.py).
        self.trace: Callable[[str, str], None] | None = None
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
        # In the boundary dtype (the activation dtype: bf16 under bf16 autocast), also when
        # handed over locally, so every stage sees the same bytes whatever the placement.
        box[(kind, stage, mb)] = t.detach().to(self._dtype).contiguous()

    def _take(self, kind: str, stage: int, mb: int) -> torch.Tensor:
        key = (kind, stage, mb)
        if key in self._local:
            return self._local.pop(key).detach()
        self._settle(key)
        return self._inbox.pop(key).detach()

    def _communicate(self, boundary: int, batches: list[list[P2POp]]) -> None:
        """Issue this boundary's batches in plan order. Each is waited where the action first reads
        one of its receives (`_take`), or when the action ends (`_settle`): the computation before
        that point runs while the batch travels."""
        for i, batch in enumerate(batches):
            ops, received = [], set()
            for op in batch:
                if op.op == "send":
                    ops.append(("send", self._outbox.pop(op.message), self.peers[op.peer]))
                else:
                    buf = torch.empty(self._shape, dtype=self._dtype, device=self._device)
                    self._inbox[op.message] = buf
                    received.add(op.message)
                    ops.append(("recv", buf, self.peers[op.peer]))
            name = f"p2p{boundary}.{i}"
            self._note("issue", name)
            self._p2p.append((comm.batch_isend_irecv(ops, self.group, async_op=True), received, name))

    def _settle(self, needed=None) -> None:
        """Wait for the issued batches, in issue order, up to the one receiving `needed` (None:
        all of them)."""
        if needed is not None and not any(needed in received for _, received, _ in self._p2p):
            return
        start = time.perf_counter()
        while self._p2p:
            handle, received, name = self._p2p.pop(0)
            handle.wait()
            self._note("wait", name)
            if needed in received:
                break
        self._mark("recv", start)

    def _note(self, event: str, name: str) -> None:
        if self.trace is not None:
            self.trace(event, name)

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
    def _forward(self, phase: int, mb: int) -> None:
        """Evaluation: the stage's plain forward, no graph."""
        stage_id = self.placement.stage_of(self.pp_rank, phase)
        stage = self.stages[phase]
        x = self._tokens[mb] if stage.is_first else self._take("act", stage_id, mb)
        start = time.perf_counter()
        with self._mb_autocast(mb)():
            if stage.is_last and self._targets is not None:
                loss, parts = stage.loss(x, self._targets[mb])
                self.out.losses[mb], self.out.parts[mb] = loss.detach(), parts
            elif stage.is_last:
                logits_BTV = stage(x)
                value = logits_BTV if self._heads is None else self._heads[mb](logits_BTV)
                self.out.logits[mb] = value.detach()
            else:
                self._put("act", stage_id + 1, mb, stage(x))
        self._mark(f"F{phase}.{mb}", start)

    def _ctx(self, mb: int) -> StepContext:
        trace = None if self.trace is None else (lambda event, name: self.trace(event, f"{name}@{mb}"))
        return StepContext(self._scale, self._mb_autocast(mb), trace, aux_scale=self._aux_scale)

    def _mb_autocast(self, mb: int):
        """What each forward computation of `mb` runs inside: autocast, and the caller's scope(mb)
        (e.g. routing record/replay hooks), entered once per sub-step."""
        if self._scope is None:
            return self._autocast

        @contextlib.contextmanager
        def both():
            with self._autocast(), self._scope(mb):
                yield

        return both

    def _pass(self, phase: int, mb: int) -> StagePass:
        """A training forward of `mb` through this rank's stage of `phase`, not yet run."""
        stage_id = self.placement.stage_of(self.pp_rank, phase)
        stage = self.stages[phase]
        if stage.is_first:
            x = self._tokens[mb]
        else:
            x = functools.partial(self._take, "act", stage_id, mb)  # waited when first read
        if stage.is_last and self._heads is not None:
            return StagePass(stage, x, None, self._ctx(mb), head=self._heads[mb])
        return StagePass(stage, x, self._targets[mb] if stage.is_last else None, self._ctx(mb))

    def _forward_done(self, phase: int, mb: int, pas: StagePass) -> None:
        stage = self.stages[phase]
        if stage.is_last:
            loss, parts = pas.output()
            self.out.losses[mb], self.out.parts[mb] = loss.detach(), parts
        else:
            h_BTD = pas.output()
            if self._heads is None:  # with heads the balance losses are no part of the objective
                self.out.aux[mb] = self.out.aux.get(mb, 0) + stage.balance_loss().detach()
            self._put("act", self.placement.stage_of(self.pp_rank, phase) + 1, mb, h_BTD)
        self._live[(phase, mb)] = pas

    def _backward_pass(self, phase: int, mb: int, split: bool) -> StagePass:
        pas = self._live.pop((phase, mb))
        if not self.stages[phase].is_last:
            stage_id = self.placement.stage_of(self.pp_rank, phase)
            pas.set_grad_output(functools.partial(self._take, "grad", stage_id, mb))
        if split:
            pas.ctx.deferred = WeightGradWork()
        return pas

    def _backward_done(self, phase: int, mb: int, pas: StagePass) -> None:
        if pas.ctx.deferred is not None:
            self._wgrad.append(pas.ctx.deferred)
        if not self.stages[phase].is_first:
            self._put("grad", self.placement.stage_of(self.pp_rank, phase) - 1, mb, pas.grad_input())

    def _run(self, steps) -> None:
        for step in steps:
            step.run()

    def _train_forward(self, phase: int, mb: int) -> None:
        start = time.perf_counter()
        pas = self._pass(phase, mb)
        self._run(pas.forward_steps())
        self._forward_done(phase, mb, pas)
        self._mark(f"F{phase}.{mb}", start)

    def _backward(self, phase: int, mb: int, split: bool) -> None:
        start = time.perf_counter()
        pas = self._backward_pass(phase, mb, split)
        self._run(pas.backward_steps())
        self._backward_done(phase, mb, pas)
        self._mark(f"B{phase}.{mb}" + ("z" if split else ""), start)

    def _pair(self, action) -> None:
        """FB: the forward of one micro-batch and the backward of another, sub-step by sub-step."""
        start = time.perf_counter()
        f = self._pass(action.phase, action.mb)
        b = self._backward_pass(action.b_phase, action.b_mb, action.split)
        f_steps, b_steps = f.forward_steps(), b.backward_steps()
        self._run(interleave(f_steps, b_steps) if self.interleave else f_steps + b_steps)
        self._forward_done(action.phase, action.mb, f)
        self._backward_done(action.b_phase, action.b_mb, b)
        end = time.perf_counter()
        if self.record is not None:  # the pair's two spans side by side
            self.record(f"F{action.phase}.{action.mb}", start, end)
            self.record(f"B{action.b_phase}.{action.b_mb}", start, end)

    def _weight(self) -> None:
        start = time.perf_counter()
        self._wgrad.popleft().run()
        self._note("compute", "W")
        self._mark("W", start)

    # --- one step ------------------------------------------------------------------------
    def _setup(self, tokens: list[torch.Tensor], targets: list[torch.Tensor] | None, hidden_shape,
               dtype, device, autocast, heads=None, scale: float = 1.0, scope=None) -> None:
        if heads is not None and len(heads) != self.placement.chunks:
            raise ValueError(f"{len(heads)} heads for {self.placement.chunks} micro-batches")
        self._tokens, self._targets, self._heads = tokens, targets, heads
        self._shape, self._dtype, self._device = hidden_shape, dtype, device
        self._autocast, self._scope = autocast, scope
        # Heads are normalised by the caller (module docstring): their scale, no balance roots.
        self._scale = 1.0 / self.placement.chunks if heads is None else scale
        self._aux_scale = None if heads is None else 0.0
        self._local: dict = {}  # message -> tensor handed over on this rank
        self._outbox: dict = {}  # message -> tensor waiting for its batch
        self._inbox: dict = {}  # message -> received (or receiving) buffer
        self._live: dict[tuple[int, int], StagePass] = {}
        self._p2p: list = []  # issued P2P batches not yet waited: (handle, received messages, name)
        self._wgrad: deque[WeightGradWork] = deque()
        self.out = StepOutput()

    def _finish(self) -> StepOutput:
        if self._live or self._wgrad or self._local or self._outbox or self._inbox or self._p2p:
            raise RuntimeError("pipeline step ended with work left: the schedule is inconsistent")
        return self.out

    def step(self, tokens: list[torch.Tensor], targets: list[torch.Tensor] | None, hidden_shape: tuple,
             dtype: torch.dtype, device: torch.device, autocast, heads=None,
             scale: float = 1.0, scope=None) -> StepOutput:
        """Forward and backward of every micro-batch (lists indexed by global micro-batch id;
        entries this rank never reads may be anything). Gradients accumulate into .grad.
        heads: per micro-batch, fn(logits_BTV) -> its loss, instead of targets; its root's
        gradient is `scale` (module docstring). scope: mb -> a context every forward computation
        of mb runs inside (none of its backward)."""
        self._setup(tokens, targets, hidden_shape, dtype, device, autocast, heads, scale, scope)
        self._warm_up()
        for k, action in enumerate(self.actions):
            self._note("action", str(action))
            self._communicate(k, self._train_plan[k])
            if action.kind == "F":
                self._train_forward(action.phase, action.mb)
            elif action.kind == "B":
                self._backward(action.phase, action.mb, action.split)
            elif action.kind == "W":
                self._weight()
            else:
                self._pair(action)
            self._settle()
            self._note("done", str(action))
        self._communicate(len(self.actions), self._train_plan[len(self.actions)])
        self._settle()
        return self._finish()

    @torch.no_grad()
    def forward_only(self, tokens: list[torch.Tensor], targets: list[torch.Tensor] | None, hidden_shape,
                     dtype, device, autocast, heads=None, scope=None) -> StepOutput:
        """Evaluation: the schedule's forwards in the same order, on their own plan. With
        targets: losses; without: logits on the last stage (heads given: heads[mb](logits))."""
        self._setup(tokens, targets, hidden_shape, dtype, device, autocast, heads, scope=scope)
        self._warm_up()
        for k, action in enumerate(self.eval_actions):
            self._communicate(k, self._eval_plan[k])
            self._forward(action.phase, action.mb)
            self._settle()
        self._communicate(len(self.eval_actions), self._eval_plan[len(self.eval_actions)])
        self._settle()
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
