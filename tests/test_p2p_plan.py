"""The pipeline's P2P plan against a CPU model of NCCL's matching rules (tests/nccl_model.py),
for every schedule at pp 2..16, the shipped DeepSeek-V3 layout, training and evaluation; the
model itself on hand-made programs; and today's former issue order (individual isend/irecv,
receives posted one action ahead) as the negative control the model must reject.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from parallel.pipeline.p2p import p2p_plan
from parallel.pipeline.schedules import SCHEDULES, Placement, build
from tests.nccl_model import batched_program, channels, simulate

ROOT = Path(__file__).resolve().parents[1]


def layouts() -> list[tuple[str, int, int]]:
    out = []
    for name in SCHEDULES:
        for pp in (2, 4, 8, 16):
            out += [(name, pp, c) for c in (2 * pp, 2 * pp + 2, 4 * pp)]
    shipped = yaml.safe_load((ROOT / "configs/parallel/deepseek_v3.yaml").read_text())
    out.append((shipped["schedule"], shipped["pp"], shipped["micro_batches"]))
    return out


@pytest.mark.parametrize("forward_only", [False, True], ids=["train", "eval"])
def test_plan_meets_nccl_rules(forward_only):
    failures = []
    for name, pp, chunks in layouts():
        for split in (True, False):
            plans = [p2p_plan(name, pp, chunks, r, forward_only, split) for r in range(pp)]
            programs = [batched_program(plan) for plan in plans]
            problems = channels(programs) + simulate(programs)
            if problems:
                failures.append(f"{name} pp={pp} chunks={chunks} split={split}: {problems[:2]}")
    assert not failures, "\n".join(failures)


def boundary_messages(name: str, pp: int, chunks: int, rank: int) -> tuple[dict, dict]:
    """From the schedule alone: message -> index of the action on `rank` that sends it / receives it."""
    placement = Placement(name, pp, chunks)
    sends, recvs = {}, {}
    for k, a in enumerate(build(name, pp, chunks)[rank]):
        parts = {"F": [("F", a.phase, a.mb)], "B": [("B", a.phase, a.mb)], "W": [],
                 "FB": [("F", a.phase, a.mb), ("B", a.b_phase, a.b_mb)]}[a.kind]
        for what, phase, mb in parts:
            stage, d = placement.stage_of(rank, phase), placement.direction_of(mb)
            step = 1 if what == "F" else -1
            kind = "act" if what == "F" else "grad"
            nxt, prev = stage + step, stage - step
            if 0 <= nxt < placement.n_stages and placement.locate(nxt, d)[0] != rank:
                sends[(kind, nxt, mb)] = k
            if 0 <= prev < placement.n_stages and placement.locate(prev, d)[0] != rank:
                recvs[(kind, stage, mb)] = k
    return sends, recvs


@pytest.mark.parametrize("name", SCHEDULES)
def test_plan_carries_each_message_once_between_its_actions(name):
    pp, chunks = 4, 10
    for rank in range(pp):
        plan = p2p_plan(name, pp, chunks, rank)
        sends, recvs = boundary_messages(name, pp, chunks, rank)
        assert sorted(op.message for op in plan if op.op == "send") == sorted(sends)
        assert sorted(op.message for op in plan if op.op == "recv") == sorted(recvs)
        for op in plan:  # a send goes out after its producer, a receive lands before its consumer
            if op.op == "send":
                assert op.before > sends[op.message]
            else:
                assert op.before <= recvs[op.message]
        batches = [op.batch for op in plan]
        assert batches == sorted(batches) and sorted(set(batches)) == list(range(len(set(batches))))
        assert [op.before for op in plan] == sorted(op.before for op in plan)


def test_model_on_hand_made_programs():
    a, b = ("act", 1, 0), ("grad", 0, 0)
    # Each rank receives first, in its own batch, and sends after: a wait cycle.
    crossed = [[("issue", 0, "q", [("recv", 1, b)]), ("issue", 1, "q", [("send", 1, a)]), ("wait", 0)],
               [("issue", 0, "q", [("recv", 0, a)]), ("issue", 1, "q", [("send", 0, b)]), ("wait", 0)]]
    assert len(simulate(crossed)) == 2
    # The same operations, each rank's two in one batch: both finish.
    grouped = [[("issue", 0, "q", [("recv", 1, b), ("send", 1, a)]), ("wait", 0)],
               [("issue", 0, "q", [("recv", 0, a), ("send", 0, b)]), ("wait", 0)]]
    assert simulate(grouped) == [] and channels(grouped) == []
    # Two messages on one channel, received in the other order: the first send fills the
    # receive meant for the second (same shape on a GPU: no error, wrong tensor).
    swapped = [[("issue", 0, "q", [("send", 1, a), ("send", 1, ("act", 1, 1))])],
               [("issue", 0, "q", [("recv", 0, ("act", 1, 1)), ("recv", 0, a)])]]
    assert len(channels(swapped)) == 2 and simulate(swapped) == []
    # A receive nobody sends blocks its queue for good.
    assert simulate([[("issue", 0, "q", [("recv", 1, a)])], []])


def former_order(name: str, pp: int, chunks: int, rank: int) -> list[tuple]:
    """The runtime's issue order before this plan: lone tagged isend/irecv, every receive of the
    current and the next action posted before the current action runs, receives waited where
    used, sends waited at the end. Lone P2P ops run on one stream per peer pair."""
    placement = Placement(name, pp, chunks)
    last = placement.n_stages - 1
    program, posted, sends, n = [], {}, [], iter(range(10**9))

    def source(kind, stage, mb):
        return placement.locate(stage - 1 if kind == "act" else stage + 1, placement.direction_of(mb))[0]

    def post(msg):
        peer = source(*msg)
        if peer != rank and msg not in posted:
            posted[msg] = next(n)
            program.append(("issue", posted[msg], peer, [("recv", peer, msg)]))

    def parts(a):
        return {"F": [("F", a.phase, a.mb)], "B": [("B", a.phase, a.mb)], "W": [],
                "FB": [("F", a.phase, a.mb), ("B", a.b_phase, a.b_mb)]}[a.kind]

    def needs(part):
        what, phase, mb = part
        s = placement.stage_of(rank, phase)
        if what == "F":
            return ("act", s, mb) if s > 0 else None
        return ("grad", s, mb) if s < last else None

    actions = build(name, pp, chunks)[rank]
    for i, action in enumerate(actions):
        for ahead in actions[i:i + 2]:
            for part in parts(ahead):
                if needs(part):
                    post(needs(part))
        for part in parts(action):
            msg = needs(part)
            if msg and source(*msg) != rank:
                program.append(("wait", posted.pop(msg)))
            what, phase, mb = part
            s = placement.stage_of(rank, phase)
            to = s + 1 if what == "F" else s - 1
            if 0 <= to <= last and placement.locate(to, placement.direction_of(mb))[0] != rank:
                peer = placement.locate(to, placement.direction_of(mb))[0]
                sends.append(next(n))
                msg = ("act" if what == "F" else "grad", to, mb)
                program.append(("issue", sends[-1], peer, [("send", peer, msg)]))
    return program + [("wait", k) for k in sends]


def test_former_order_fails_the_model():
    def verdict(name, pp, chunks):
        programs = [former_order(name, pp, chunks, r) for r in range(pp)]
        return channels(programs), simulate(programs)

    for name in ("gpipe", "dualpipe", "dualpipev"):
        assert verdict(name, 4, 8)[1], f"{name}: the former order should deadlock"
    # Activations delivered into gradient buffers (same shapes, no error on a GPU).
    for name, pp in (("dualpipe", 8), ("dualpipev", 4)):
        mismatched, _ = verdict(name, pp, 2 * pp)
        assert any("act" in line and "grad" in line for line in mismatched), name


def test_early_receives_one_side_per_pair():
    """The plan posts a boundary's first receives from HIGHER ranks one boundary early
    (parallel/pipeline/p2p.py). Posting every such receive early, on both sides of a pair, is the
    control the NCCL model must reject (each side's receive waits on a send queued behind the
    other's receive); without early receives, no FB action gets a receive ahead of its boundary."""
    stuck = []
    for name, pp, chunks in [("dualpipe", 2, 4), ("dualpipe", 4, 8), ("dualpipev", 4, 8)]:
        programs = [batched_program(p2p_plan(name, pp, chunks, r, early="all")) for r in range(pp)]
        stuck.append(bool(channels(programs) + simulate(programs)))
        for early, expect in (("higher", True), ("none", False)):
            ahead = 0
            for r in range(pp):
                actions = build(name, pp, chunks)[r]
                _, consumer = boundary_messages(name, pp, chunks, r)
                ahead += sum(op.op == "recv" and op.before < consumer[op.message]
                             and actions[consumer[op.message]].kind == "FB"
                             for op in p2p_plan(name, pp, chunks, r, early=early))
            assert (ahead > 0) == expect, (name, pp, early, ahead)
    assert all(stuck), stuck
