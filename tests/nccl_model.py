"""A CPU model of NCCL's point-to-point rules, for replaying a pipeline's communication order
without processes (DESIGN.md rule 9). Independent of the runtime: it only reads programs.

A rank's program is a list of events in host order:
    ("issue", key, queue, ops)   enqueue a batch of P2P ops (one batch_isend_irecv, or one
                                 lone isend / irecv) on a stream; ops are (op, peer, message)
    ("wait", key)                the host blocks until that batch has finished
The rules modelled:
- Per direction A -> B, A's sends to B match B's receives from A strictly in issue order
  (NCCL ignores tags): the n-th send meets the n-th receive, whatever their messages say.
- A stream runs its batches one after another: only the head batch of a queue executes, and it
  finishes when every one of its ops has met its counterpart, which must itself be executing
  (the head of the peer's queue) or already finished.
`channels` checks the first rule's consequence (do matched ops carry the same message?),
`simulate` the second (does every rank finish, or is there a wait cycle?).
"""

from __future__ import annotations

from collections import deque

Op = tuple[str, int, tuple]  # (op "send"/"recv", peer rank, message)


def _ops_in_order(program: list[tuple]) -> list[tuple[object, Op]]:
    return [(ev[1], op) for ev in program if ev[0] == "issue" for op in ev[3]]


def channels(programs: list[list[tuple]]) -> list[str]:
    """Per direction A -> B, the messages of A's sends to B against those of B's receives from A,
    in issue order. Returns one line per disagreement (empty: every message lands where named)."""
    sent: dict[tuple[int, int], list] = {}
    received: dict[tuple[int, int], list] = {}
    for rank, program in enumerate(programs):
        for _, (op, peer, msg) in _ops_in_order(program):
            if op == "send":
                sent.setdefault((rank, peer), []).append(msg)
            else:
                received.setdefault((peer, rank), []).append(msg)
    problems = []
    for pair in sorted(set(sent) | set(received)):
        s, r = sent.get(pair, []), received.get(pair, [])
        if len(s) != len(r):
            problems.append(f"{pair[0]}->{pair[1]}: {len(s)} sends but {len(r)} receives")
        for n, (a, b) in enumerate(zip(s, r)):
            if a != b:
                problems.append(f"{pair[0]}->{pair[1]} #{n}: sent {a} lands in the receive for {b}")
    return problems


def simulate(programs: list[list[tuple]]) -> list[str]:
    """Run the programs under the rules above. Returns [] when every rank finishes; otherwise one
    line per stuck rank naming what its host waits for and what heads its queues."""
    # Locate each op's counterpart: the n-th op of direction (src, dst) on either side.
    where: dict[tuple, tuple[int, object]] = {}  # (side, src, dst, n) -> (rank, batch key)
    counts: dict[tuple, int] = {}
    op_ids: dict[tuple[int, object], list[tuple]] = {}
    for rank, program in enumerate(programs):
        for key, (op, peer, _) in _ops_in_order(program):
            src, dst = (rank, peer) if op == "send" else (peer, rank)
            n = counts.get((op, src, dst), 0)
            counts[(op, src, dst)] = n + 1
            where[(op, src, dst, n)] = (rank, key)
            op_ids.setdefault((rank, key), []).append(("recv" if op == "send" else "send", src, dst, n))
    pc = [0] * len(programs)
    queues: list[dict[object, deque]] = [{} for _ in programs]
    done: set[tuple[int, object]] = set()

    def head(rank: int, key) -> bool:
        return any(q and q[0] == key for q in queues[rank].values())

    changed = True
    while changed:
        changed = False
        for rank, program in enumerate(programs):
            while pc[rank] < len(program):
                ev = program[pc[rank]]
                if ev[0] == "issue":
                    queues[rank].setdefault(ev[2], deque()).append(ev[1])
                elif (rank, ev[1]) not in done:
                    break
                pc[rank] += 1
                changed = True
        for rank in range(len(programs)):
            for q in queues[rank].values():
                if not q:
                    continue
                key = q[0]
                partners = [where.get(cp) for cp in op_ids.get((rank, key), [])]
                if all(p is not None and (p in done or head(*p)) for p in partners):
                    done.add((rank, key))
                    q.popleft()
                    changed = True
    stuck = []
    for rank, program in enumerate(programs):
        heads = {str(qk): q[0] for qk, q in queues[rank].items() if q}
        if pc[rank] < len(program) or heads:
            waiting = program[pc[rank]][1] if pc[rank] < len(program) else None
            stuck.append(f"rank {rank}: host waits for {waiting}, queue heads {heads}")
    return stuck


def batched_program(plan) -> list[tuple]:
    """A p2p_plan as a program: each batch issued on the rank's one stream, then waited."""
    batches: dict[int, list[Op]] = {}
    for op in plan:
        batches.setdefault(op.batch, []).append((op.op, op.peer, op.message))
    program = []
    for b in sorted(batches):
        program += [("issue", b, "pp", batches[b]), ("wait", b)]
    return program
