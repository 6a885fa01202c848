"""The pipeline's point-to-point plan: every send and receive a rank issues, in issue order.

NCCL ignores P2P tags and matches a rank's operations toward a peer strictly in the order they
were issued; PyTorch runs all of a process group's batched P2P (`batch_isend_irecv`) on that
group's one communicator, so a rank's batches, toward every peer, execute one after another on
one stream, and an operation that never meets its peer blocks everything behind it (DESIGN.md
rule 9). So the order is not left to the runtime: `p2p_plan` derives it from the schedule, as a
pure function that every rank evaluates alike, that the runtime issues exactly (no tags), and
that tests replay under NCCL's rules without processes (tests/nccl_model.py).

Batching: rendezvous-ordered batches, each waited before the next action computes. DualPipe's
own rule (the sends of action k-1 batched with the receives of action k) deadlocks on these
schedule lists at every pp (tests/test_p2p_plan.py shows it): DeepSeek's implementation moves
individual sends around its middle ranks by hand. Instead the schedule is run on paper once
(parallel/pipeline/simulator.py, unit costs); each message gets a rendezvous time, the moment
both ends can take part: t = max(end of the producing action, the receiver's arrival at the
boundary before the consuming action). A rank puts each of its messages into the batch of its
rendezvous time (one batch per distinct time, ops sorted by (sender, receiver, message)) and
issues that batch at the first action boundary that starts no earlier than t, waiting for it
before that action computes. Every rank then runs its batches in one global order (by t), and
each message's two operations sit in batches of the same t on their two ranks, so:
- per direction, sends and receives meet in the same order (no message lands in another's
  buffer), and
- the earliest unfinished batches are at the head of every involved rank's queue at once,
  which is why no rank waits forever.
The costs only decide which boundary a message waits at; any positive costs give a correct plan.

Early receives: a batch issued at boundary k is often read by action k's first sub-step (an FB's
combine(B) or attention(F)), so it would be waited right after its issue. The receives of the
first batch at a boundary k >= 1 whose peer is a HIGHER pipeline rank therefore go out one
boundary earlier, as their own batch after boundary k-1's batches (before action k-1 computes, so
that action hides them); the rest of that batch stays at k. The rank's batch order is unchanged
(only the first batch of a boundary is split, receives ahead of its sends), so every earlier
message is still issued before these receives. Only one side of a pair may do this: the peer
at the same rendezvous time keeps its sends and receives in one batch, so the early receive's
send is executing when the receive heads the stream; if both sides posted their receives ahead
of their sends, each would wait on a send queued behind the other's receive (the NCCL model
finds that deadlock for "every receive early"). So about half of the receives an FB needs at
its start travel behind the previous action (tests/test_overlap.py's trace test counts them).

A message is named by its kind ("act" forward, "grad" backward), the stage that RECEIVES it and
the micro-batch, so sender and receiver name it alike. A stage boundary inside one rank
(DualPipeV's turn on the last rank) is handed over locally and is not in the plan.

The evaluation path (forward_only) is planned the same way over the schedule's forwards (F,
and the forward of each FB, in order).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from parallel.pipeline.schedules import Action, Placement, build
from parallel.pipeline.simulator import Costs, action_parts, simulate


@dataclass(frozen=True)
class P2POp:
    batch: int  # which batch_isend_irecv call of this rank (issue order)
    before: int  # issued and waited right before action `before` (len(actions): after the last)
    op: str  # "send" or "recv"
    peer: int  # the other pipeline rank
    kind: str  # "act" (a forward's output) or "grad" (a backward's input gradient)
    stage: int  # the stage that receives the message
    mb: int  # micro-batch

    @property
    def message(self) -> tuple[str, int, int]:
        return self.kind, self.stage, self.mb


def forward_actions(actions: list[Action]) -> list[Action]:
    """The evaluation path's actions: the forwards (F, and each FB's forward) in schedule order."""
    return [Action("F", a.phase, a.mb) for a in actions if a.kind in ("F", "FB")]


def messages(placement: Placement, rank: int, part: tuple[str, int, int], sending: bool
             ) -> list[tuple[int, tuple[str, int, int]]]:
    """(peer, message) of what one compute part (F or B, phase, mb) receives (sending=False) or
    sends (sending=True); empty at the ends of the pipeline and across a local boundary."""
    what, phase, mb = part
    stage = placement.stage_of(rank, phase)
    if what == "F":  # receives the activation for `stage`, sends one to stage + 1
        other, to = (stage + 1, stage + 1) if sending else (stage - 1, stage)
    else:  # a backward receives the gradient for `stage`, sends one to stage - 1
        other, to = (stage - 1, stage - 1) if sending else (stage + 1, stage)
    if not 0 <= other < placement.n_stages:
        return []
    peer = placement.locate(other, placement.direction_of(mb))[0]
    return [] if peer == rank else [(peer, ("act" if what == "F" else "grad", to, mb))]


EARLY = {"higher": lambda op, rank: op.peer > rank,  # the plan's rule (module docstring)
         "none": lambda op, rank: False, "all": lambda op, rank: True}  # the tests' controls


def p2p_plan(schedule: str, pp: int, micro_batches: int, rank: int, forward_only: bool = False,
             wgrad_split: bool = True, early: str = "higher") -> list[P2POp]:
    """The P2P operations pipeline rank `rank` issues for one step, in issue order (see the module
    docstring). wgrad_split: build the schedule with W actions (as the runtime does when
    parallel.wgrad_split is on); they never communicate but move the boundaries. early: which
    receives go out one boundary early (EARLY; "none" and "all" exist for the tests)."""
    return list(_plans(schedule, pp, micro_batches, forward_only, wgrad_split, early)[rank])


@functools.lru_cache(maxsize=32)
def _plans(schedule: str, pp: int, micro_batches: int, forward_only: bool, wgrad_split: bool,
           early: str) -> tuple[tuple[P2POp, ...], ...]:
    placement = Placement(schedule, pp, micro_batches)
    actions = build(schedule, pp, micro_batches, wgrad_split=wgrad_split)
    if forward_only:
        actions = [forward_actions(a) for a in actions]
    spans = simulate(actions, placement, Costs()).spans
    produced, consumed = {}, {}  # message -> (rank, action index)
    for r in range(pp):
        for k, action in enumerate(actions[r]):
            for part in action_parts(action):
                for _, msg in messages(placement, r, part, sending=True):
                    produced[msg] = (r, k)
                for _, msg in messages(placement, r, part, sending=False):
                    consumed[msg] = (r, k)
    if produced.keys() != consumed.keys():
        raise AssertionError(f"{schedule}: sent and received messages differ")
    # (rendezvous time, sender, receiver, message) for every message, in one global order
    meetings = []
    for msg, (src, p) in produced.items():
        dst, c = consumed[msg]
        arrival = spans[dst][c - 1][1] if c else 0.0
        meetings.append((max(spans[src][p][1], arrival), src, dst, msg))
    meetings.sort()
    plans = []
    for r in range(pp):
        starts = [span[0] for span in spans[r]]
        ops, batch, last_t = [], -1, None
        for t, src, dst, msg in meetings:
            if r not in (src, dst):
                continue
            if t != last_t:
                batch, last_t = batch + 1, t
            before = next((k for k, s in enumerate(starts) if s >= t), len(starts))
            op, peer = ("send", dst) if r == src else ("recv", src)
            ops.append(P2POp(batch, before, op, peer, *msg))
        plans.append(_early_receives(ops, r, EARLY[early]))
    return tuple(plans)


def _early_receives(ops: list[P2POp], rank: int, chosen) -> tuple[P2POp, ...]:
    """The module docstring's early receives: the first batch at each boundary k >= 1 gives its
    `chosen` receives (from higher ranks) a batch of their own at boundary k - 1; renumbered."""
    pieces: list[tuple[int, list[P2POp]]] = []  # (boundary, ops) in issue order
    seen_boundaries = set()
    for batch in sorted({op.batch for op in ops}):
        members = [op for op in ops if op.batch == batch]
        k = members[0].before
        first, seen_boundaries = k not in seen_boundaries, seen_boundaries | {k}
        early = [op for op in members if first and k >= 1 and op.op == "recv" and chosen(op, rank)]
        if early:
            pieces.append((k - 1, early))
        rest = [op for op in members if op not in early]
        if rest:
            pieces.append((k, rest))
    return tuple(dataclasses.replace(op, batch=i, before=k) for i, (k, members) in enumerate(pieces)
                 for op in members)
