"""Sub-layer steps: one micro-batch's pass through a pipeline stage, cut where DualPipe's
forward/backward interleave switches between micro-batches (DESIGN.md rule 10).

    pas = StagePass(stage, x, targets, StepContext(scale, autocast, trace))
    pas = StagePass(stage, x, None, ctx, head=fn)      # last stage: loss = fn(logits_BTV) instead
    for step in pas.forward_steps(): step.run()        # or interleaved with another pass's
    pas.output()                                       # h_BTD (non-last stage) / losses (last)
    pas.set_grad_output(g_BTD)                         # non-last stage: the gradient of h
    for step in pas.backward_steps(): step.run()
    pas.grad_input()                                   # the gradient of x (non-first stage)

The cut of an MoE block (every forward keeps these boundaries, so a plain backward runs the same
sub-step sequence as an interleaved one):
    attention  x -> a = x + MLA(attn_norm(x)), n = ffn_norm(a), the router on n (ids, gate
               weights) and the layer's sequence-wise balance loss
    dispatch   n's rows, ids and gate weights to their experts' ranks: the count exchange issued
               here; sizes (its own step) makes the one host read and issues the payload, so the
               interleave queues experts(B) between the two and the read waits behind it (a
               dispatcher without dispatch_counts issues everything in dispatch, sizes is a no-op);
               the payload is waited by experts(F)
    experts    the routed experts on the received rows (gate weights applied) and the shared
               expert on n: the shared expert sits with the experts, not beside combine, so the
               forward dispatch always has experts(B) of the other micro-batch to hide behind
    combine    the routed outputs back to their tokens (asynchronous), waited by the next
               step that reads h = a + (routed + shared)
Backward halves, each issuable alone: combine(B) (grad h passes to a and the shared output;
the routed rows' gradient goes out by a reverse all-to-all, not autograd), experts(B) (input
gradients; the weight gradients queued), dispatch(B) (the rows' and gate weights' gradients go
home by reverse all-to-alls: the router-weight gradient returns this way), experts(W),
attention(B) (roots a, n, the gate weights and the balance loss: the balance loss is the
second root of the layer's attention backward), attention(W).
A dense block is one compute step (no dispatch or combine), as is the embedding on the first
stage. The last stage's tail is a chain of units: head (final norm, head, main CE), then per
MTP depth k: mtp<k>_in (its input projection), its MoE block (cut and paired like any other,
so its all-to-alls interleave too) and mtp<k>_out (its norm and CE, a root of weight lambda/D).

A head (StagePass's `head`, e.g. a GRPO micro-batch's objective on its per-token log-probs)
replaces the last stage's losses: the tail is one unit, logits = head(norm(h)) and its one root
fn(logits); no MTP loss, and the balance losses are not roots (StepContext.aux_scale 0), so the
gradients are those of fn alone, as `fn(model(tokens)).backward()` in one process.

Every compute step runs on detached leaves (its own autograd graph); its weight gradients go
to the W step after it (run there, or handed to the schedule's later W action when the
backward is split). Recompute (model.recompute): full re-runs each compute step of a block in
its backward from the kept inputs (all-to-all results are kept, never communicated again);
selective keeps everything but RMSNorm outputs, the MLA up-projections' outputs and the SwiGLU
activations, which autograd recomputes (torch.utils.checkpoint inside the layers); the router
counts its load only in the first run (framework.model.moe.no_load_counting).

Legend: B batch, T sequence (or tokens when flattened), D model dim, K top-k, N received rows.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from duet_kernels.deferred import WeightGradWork, capture
from framework.model.moe import MoE
from framework.model.recompute import recomputed
from framework.model.transformer import mtp_depths, mtp_weighted

# (event "issue" | "compute" | "wait", sub-step name); issue and compute are noted when the
# step has run, a wait when it returns (inside the step that needs the result)
Trace = Callable[[str, str], None]


@dataclass
class StepContext:
    scale: float = 1.0  # every root's gradient (loss / micro-batches)
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    trace: Trace | None = None
    # The balance losses' root gradient (None: scale; 0: the balance losses are not roots).
    aux_scale: float | None = None
    # A split backward: W steps hand their work here instead of running it.
    deferred: WeightGradWork | None = None

    def note(self, event: str, name: str) -> None:
        if self.trace is not None:
            self.trace(event, name)


@dataclass
class Step:
    name: str  # e.g. "L3.dispatch.F"
    kind: str  # "compute" or "issue"
    fn: Callable[[], None]
    ctx: StepContext

    def run(self) -> None:
        # Noted when done: a wait inside the step (for its inputs) comes before its "compute".
        self.fn()
        self.ctx.note(self.kind, self.name)


def _leaf(t, grad: bool):
    if not isinstance(t, torch.Tensor):
        return t
    t = t.detach()
    return t.requires_grad_() if grad and t.is_floating_point() else t


def _detach(t):
    return t.detach() if isinstance(t, torch.Tensor) else t


class _Compute:
    """One compute sub-step: fn on detached leaf inputs, with its own graph; `mode` is the
    block's recompute (framework/model/recompute.py)."""

    def __init__(self, fn, inputs: list, ctx: StepContext, mode: str = "none") -> None:
        grad = torch.is_grad_enabled()
        self.ctx = ctx
        self.inputs = [_leaf(t, grad) for t in inputs]
        with ctx.autocast():
            self.outs = recomputed(fn, mode)(*self.inputs)
        self.values = [_detach(t) for t in self.outs]

    def backward(self, grads: list) -> list:
        """grads: one per output (None: no gradient). -> the inputs' gradients; the weight
        gradients wait in `work` for this step's W."""
        roots, seeds = [], []
        for t, g in zip(self.outs, grads, strict=True):
            if g is not None and isinstance(t, torch.Tensor) and t.requires_grad:
                roots.append(t)
                seeds.append(g.to(t.dtype) if g.dtype != t.dtype else g)
        with capture() as self.work:
            if roots:
                torch.autograd.backward(roots, seeds)
        self.outs = None  # the graph is spent
        return [t.grad if isinstance(t, torch.Tensor) and t.requires_grad else None for t in self.inputs]

    def run_weights(self) -> None:
        work = self.work
        if self.ctx.deferred is not None:
            self.ctx.deferred.closures.extend(work.closures)
        else:
            work.run()


class _Unit:
    """One piece of a stage's chain: forward steps, backward steps, its output and input grad."""

    moe = False

    def __init__(self, name: str, ctx: StepContext) -> None:
        self.name, self.ctx = name, ctx
        self.prev: _Unit | None = None
        self.next: _Unit | None = None
        self.x = None  # the stage input (first unit)
        self.g_out = None  # the stage output's gradient (last unit of a non-last stage)

    def input(self):
        if self.prev is not None:
            return self.prev.output()
        return self.x() if callable(self.x) else self.x  # a callable waits for its P2P receive

    def grad_output(self):
        if self.next is not None:
            return self.next.grad_input()
        return self.g_out() if callable(self.g_out) else self.g_out

    def forward_steps(self) -> list[Step]:
        raise NotImplementedError

    def backward_steps(self) -> list[Step]:
        raise NotImplementedError

    def step(self, what: str, kind: str, fn) -> Step:
        return Step(f"{self.name}.{what}", kind, fn, self.ctx)


class _Plain(_Unit):
    """A unit that is one compute step: the embedding, a dense block, a piece of the last stage's
    tail. fn -> (carry, *roots): carry flows to the next unit (None, or unused, at the end of
    the chain); each root is a loss term whose gradient seed is ctx.scale * its weight."""

    def __init__(self, name: str, ctx: StepContext, fn, mode: str = "none", weights: tuple = ()) -> None:
        super().__init__(name, ctx)
        self.fn, self.mode, self.weights = fn, mode, weights

    def _f(self) -> None:
        self.c = _Compute(self.fn, [self.input()], self.ctx, self.mode)

    def _b(self) -> None:
        seeds = [torch.full((), self.ctx.scale) * w for w in self.weights]
        self.g_in = self.c.backward([self.grad_output(), *seeds])[0]

    def forward_steps(self) -> list[Step]:
        return [self.step("F", "compute", self._f)]

    def backward_steps(self) -> list[Step]:
        return [self.step("B", "compute", self._b), self.step("W", "compute", self.c.run_weights)]

    def output(self):
        return self.c.values[0]

    def roots(self) -> list:
        return self.c.values[1:]

    def grad_input(self):
        return self.g_in


class _MoEBlock(_Unit):
    """An MoE block in four sub-steps, dispatch's forward in two (module docstring)."""

    moe = True

    def __init__(self, block, ctx: StepContext) -> None:
        super().__init__(f"L{block.layer_id}", ctx)
        self.block, self.moe_layer = block, block.ffn
        self.dispatcher = block.ffn.dispatcher
        self.mode = block.recompute
        self._h = None
        self.counting = None  # a dispatch between its count exchange and its host read

    # ---- forward
    def _attention(self) -> None:
        x_BTD = self.input()
        self.shape = x_BTD.shape
        self.att = _Compute(self.block.attention_step, [x_BTD], self.ctx, self.mode)
        a_BTD, n_TD, w_TK, idx_TK, aux = self.att.values
        if torch.is_grad_enabled():
            self.moe_layer.aux_loss = aux  # the stage's balance_loss() reads it (its value)

    def _dispatch(self) -> None:
        _, n_TD, w_TK, idx_TK, _ = self.att.values
        counts = getattr(self.dispatcher, "dispatch_counts", None)
        if counts is None:  # no split phase (LocalDispatcher): everything at once
            self.pending = self.dispatcher.dispatch_start(n_TD, idx_TK, w_TK)
        else:
            self.counting = counts(n_TD, idx_TK, w_TK)

    def _sizes(self) -> None:
        """The dispatch's one host read (its counts) and the payload's issue."""
        if self.counting is not None:
            self.pending = self.dispatcher.dispatch_sized(self.counting)
            self.counting = None

    def _experts(self) -> None:
        with torch.no_grad():
            recv_x, self.handle = self.dispatcher.dispatch_wait(self.pending)
        self.ctx.note("wait", f"{self.name}.dispatch.F")
        self.pending = None
        n_TD = self.att.values[1]
        self.exp = _Compute(functools.partial(self.moe_layer.experts_step, self.handle),
                            [recv_x, self.handle.topk_weight, n_TD], self.ctx, self.mode)

    def _combine(self) -> None:
        self.pending = self.dispatcher.combine_start(self.exp.values[0], self.handle)

    def output(self):
        if self._h is None:  # the consumer waits for combine(F) here
            with torch.no_grad():
                routed_TD = self.dispatcher.combine_wait(self.pending)
            self.ctx.note("wait", f"{self.name}.combine.F")
            self.pending = None
            self.routed_dtype = routed_TD.dtype
            shared_TD = self.exp.values[1]
            if shared_TD is not None:
                routed_TD = routed_TD + shared_TD
            self._h = self.att.values[0] + routed_TD.view(self.shape)
        return self._h

    def forward_steps(self) -> list[Step]:
        return [self.step("attention.F", "compute", self._attention),
                self.step("dispatch.F", "issue", self._dispatch),
                self.step("sizes.F", "issue", self._sizes),
                self.step("experts.F", "compute", self._experts),
                self.step("combine.F", "issue", self._combine)]

    # ---- backward
    def _combine_b(self) -> None:
        g_BTD = self.grad_output()
        self.g_a = g_BTD
        g_TD = g_BTD.reshape(-1, g_BTD.shape[-1])
        self.g_sum = g_TD.to(self.routed_dtype)  # the gradient of routed + shared
        self.pending = self.dispatcher.combine_backward_start(self.handle, self.g_sum)

    def _experts_b(self) -> None:
        g_y = self.dispatcher.combine_backward_wait(self.pending)
        self.ctx.note("wait", f"{self.name}.combine.B")
        g_rx, g_rw, self.g_n_shared = self.exp.backward([g_y, self.g_sum])
        recv_x, recv_w, _ = self.exp.inputs
        self.g_rx = g_rx if g_rx is not None else torch.zeros_like(recv_x)
        self.g_rw = g_rw if g_rw is not None else torch.zeros_like(recv_w)

    def _dispatch_b(self) -> None:
        self.pending = self.dispatcher.dispatch_backward_start(self.handle, self.g_rx, self.g_rw)
        self.g_rx = self.g_rw = None

    def _attention_b(self) -> None:
        g_n_TD, g_w_TK = self.dispatcher.dispatch_backward_wait(self.pending)
        self.ctx.note("wait", f"{self.name}.dispatch.B")
        self.pending = None
        if self.g_n_shared is not None:
            g_n_TD = g_n_TD + self.g_n_shared
        aux = self.att.values[4]
        aux_scale = self.ctx.scale if self.ctx.aux_scale is None else self.ctx.aux_scale
        g_aux = torch.full((), aux_scale) if aux is not None and aux_scale != 0 else None
        self.g_in = self.att.backward([self.g_a, g_n_TD, g_w_TK, None, g_aux])[0]
        self.g_a = self.g_sum = self.g_n_shared = None

    def grad_input(self):
        return self.g_in

    def backward_steps(self) -> list[Step]:
        return [self.step("combine.B", "issue", self._combine_b),
                self.step("experts.B", "compute", self._experts_b),
                self.step("dispatch.B", "issue", self._dispatch_b),
                self.step("experts.W", "compute", lambda: self.exp.run_weights()),
                self.step("attention.B", "compute", self._attention_b),
                self.step("attention.W", "compute", lambda: self.att.run_weights())]


@dataclass
class StagePass:
    """One micro-batch's forward and backward through one stage, as sub-steps (module docstring).
    targets: on the last stage, the loss targets; head: instead of them, fn(logits_BTV) -> the
    loss (module docstring)."""

    stage: object  # framework.model.transformer.Stage
    x: object  # tokens_BT / h_BTD, or a callable returning it when first needed
    targets: torch.Tensor | None
    ctx: StepContext
    head: Callable[[torch.Tensor], torch.Tensor] | None = None
    units: list[_Unit] = field(default_factory=list)

    def __post_init__(self) -> None:
        st, ctx = self.stage, self.ctx
        if st.is_first:
            self.units.append(_Plain("embed", ctx, lambda t: (st.embed(t),)))
        for block in st.blocks.values():
            self._block(block)
        self.main: _Plain | None = None  # the last stage's head unit (main CE)
        self.mtp_ce: list[_Plain] = []
        if st.is_last and self.head is not None:
            self.units.append(_Plain("head", ctx, self._head, weights=(1,)))
        elif st.is_last:
            self._tail()
        for a, b in zip(self.units, self.units[1:], strict=False):
            a.next, b.prev = b, a
        self.units[0].x = self.x

    def _block(self, block) -> None:
        if isinstance(block.ffn, MoE):
            self.units.append(_MoEBlock(block, self.ctx))
        else:
            self.units.append(_Plain(f"L{block.layer_id}", self.ctx, lambda h, b=block: (b.whole(h),),
                                     block.recompute))

    def _tail(self) -> None:
        """Final norm, head and main CE; then per MTP depth k its input, its MoE block (a unit
        like any other, so its all-to-alls pair in an FB) and its norm and CE. Roots: the main
        CE (seed scale), each depth's CE (scale * lambda/D); the MTP blocks' balance losses are
        roots of their attention backward, as in the main blocks."""
        st, ctx, t_BT = self.stage, self.ctx, self.targets
        self.main = _Plain("head", ctx, lambda h: st.main_loss(h, t_BT), weights=(1,))
        self.units.append(self.main)
        for k in range(1, mtp_depths(len(st.mtp), t_BT.shape[1]) + 1):
            self.units.append(_Plain(f"mtp{k}_in", ctx, lambda n, k=k: (st.mtp_enter(k, n, t_BT),)))
            self._block(st.mtp[k - 1].block)
            self.mtp_ce.append(_Plain(f"mtp{k}_out", ctx, lambda y, k=k: st.mtp_exit(k, y, t_BT),
                                      weights=(st.mtp_weight,)))
            self.units.append(self.mtp_ce[-1])

    def _head(self, h_BTD):
        """(None, head(logits)): the one root of a head pass (balance losses are not roots here)."""
        return None, self.head(self.stage.head(self.stage.norm(h_BTD)))

    def forward_steps(self) -> list[Step]:
        return [s for u in self.units for s in u.forward_steps()]

    def backward_steps(self) -> list[Step]:
        return [s for u in reversed(self.units) for s in u.backward_steps()]

    def output(self):
        """Non-last stage: h_BTD. Last: (loss, parts) with loss = main + mtp + balance, the
        stage's balance loss over all its MoE layers (its value; the roots are per step); with a
        head: (the head's value, {})."""
        if not self.stage.is_last:
            return self.units[-1].output()
        if self.head is not None:
            return self.units[-1].roots()[0], {}
        main = self.main.roots()[0]
        mtp = mtp_weighted(self.stage.mtp_weight, [u.roots()[0] for u in self.mtp_ce], main)
        balance = self.stage.balance_loss().detach().to(main.dtype)
        return main + mtp + balance, {"main_loss": main, "mtp_loss": mtp, "balance_loss": balance}

    def set_grad_output(self, g_BTD) -> None:
        """The gradient of h (a tensor, or a callable returning it when first needed)."""
        self.units[-1].g_out = g_BTD

    def grad_input(self):
        return self.units[0].grad_input()


def interleave(f_steps: list[Step], b_steps: list[Step]) -> list[Step]:
    """DualPipe's issue order for an FB action (forward steps of one pass, backward steps of
    another). Per pair of MoE blocks (the i-th of the forward with the i-th of the backward):
        combine(B) attention(F) dispatch(F) experts(B) sizes(F) dispatch(B) experts(W)
        experts(F) combine(F) attention(B) attention(W)
    so every all-to-all has a computation of the other micro-batch to hide behind, the
    dispatch's host read (sizes) comes after experts(B) is queued, and the next block's
    attention(F) waits for combine(F). Pairing rule: units that are not MoE blocks
    (embedding, dense blocks, the heads) run where they fall in their own chain, unpaired: before
    each pair, the forward's pending plain units, then the backward's. When one side has more
    MoE blocks than the other (stages with different layer counts; the last stage's MTP blocks
    count as MoE blocks), the other side's remaining plain steps hide the first extra block's
    communication -- a forward block's count exchange (first half of them) and payload (second
    half), a backward block's combine(B) -- and further extra blocks run as they are. The usual
    case: the last stage's forward (its blocks and the MTP block) against the first stage's
    backward (its blocks, the dense ones and the embedding)."""
    f_units, b_units = _group(f_steps), _group(b_steps)
    out: list[Step] = []
    while _has_moe(f_units, 5) and _has_moe(b_units, 6):
        out += _plain_prefix(f_units, 5) + _plain_prefix(b_units, 6)
        f, b = f_units.pop(0), b_units.pop(0)
        out += [b[0], f[0], f[1], b[1], f[2], b[2], b[3], f[3], f[4], b[4], b[5]]
    if _has_moe(f_units, 5):
        out += _plain_prefix(f_units, 5)
        f, rest = f_units.pop(0), _flat(b_units)
        b_units, half = [], (len(rest) + 1) // 2
        out += f[:2] + rest[:half] + [f[2]] + rest[half:] + f[3:]
    elif _has_moe(b_units, 6):
        out += _plain_prefix(b_units, 6)
        b, rest = b_units.pop(0), _flat(f_units)
        f_units = []
        out += b[:1] + rest + b[1:]
    return out + _flat(f_units) + _flat(b_units)


def _has_moe(units: list[list[Step]], n: int) -> bool:
    return any(len(u) == n for u in units)


def _plain_prefix(units: list[list[Step]], n: int) -> list[Step]:
    """Pops the plain units before the first MoE block (n steps) -> their steps."""
    out: list[Step] = []
    while units and len(units[0]) != n:
        out += units.pop(0)
    return out


def _flat(units: list[list[Step]]) -> list[Step]:
    return [s for u in units for s in u]


def _group(steps: list[Step]) -> list[list[Step]]:
    """Steps -> units (consecutive steps with one name prefix): 5 forward or 6 backward steps
    for an MoE block, 1 or 2 for a plain unit."""
    units: list[list[Step]] = []
    for s in steps:
        prefix = s.name.split(".")[0]
        if units and units[-1][0].name.split(".")[0] == prefix:
            units[-1].append(s)
        else:
            units.append([s])
    return units
