"""Run a schedule on paper: unit costs instead of processes, the same action lists as the runtime.

    result = simulate(build("dualpipe", 8, 20), Placement("dualpipe", 8, 20), Costs(F=1, B=2, W=1, FB=3))
    result.makespan, result.bubble[r], result.peak_live[r], result.spans[r]

Rules (what the runtime's data dependencies are): a forward of micro-batch m at stage s waits
for its forward at stage s-1; a backward at stage s waits for the backward at stage s+1 (the last
stage: for its own forward); W runs queued weight work; every rank runs its list in order, one
action at a time, communication free. B is a whole backward; a split backward (zero bubble)
costs B - W and leaves W for a later W action. FB (an overlapped forward and backward) costs FB.
A schedule whose ranks wait on each other in a cycle raises (the runtime would hang).

bubble[r] = makespan - busy time of rank r; peak_live[r] = most micro-batches whose forward ran
and whose backward did not yet, at any time on rank r (activation memory, in micro-batches,
counting both of a DualPipe rank's stages).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from parallel.pipeline.schedules import Action, Placement


@dataclass(frozen=True)
class Costs:
    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: float = 3.0


@dataclass
class SimResult:
    makespan: float
    busy: list[float]
    bubble: list[float]
    peak_live: list[int]
    spans: list[list[tuple[float, float, Action]]] = field(default_factory=list)


def action_parts(action: Action) -> list[tuple[str, int, int]]:
    """(kind, phase, micro-batch) of the forward/backward pieces of an action."""
    if action.kind == "F":
        return [("F", action.phase, action.mb)]
    if action.kind == "B":
        return [("B", action.phase, action.mb)]
    if action.kind == "FB":
        return [("F", action.phase, action.mb), ("B", action.b_phase, action.b_mb)]
    return []


def simulate(schedule: list[list[Action]], placement: Placement, costs: Costs = Costs()) -> SimResult:
    P, last = len(schedule), placement.n_stages - 1
    done: dict[tuple[str, int, int], float] = {}  # (kind, stage, mb) -> finish time
    clock = [0.0] * P
    busy = [0.0] * P
    pos = [0] * P
    live = [0] * P
    peak = [0] * P
    spans: list[list[tuple[float, float, Action]]] = [[] for _ in range(P)]

    def ready_at(rank: int, action: Action) -> float | None:
        t = clock[rank]
        for kind, phase, mb in action_parts(action):
            stage = placement.stage_of(rank, phase)
            if kind == "F":
                dep = ("F", stage - 1, mb) if stage > 0 else None
            else:
                dep = ("B", stage + 1, mb) if stage < last else ("F", stage, mb)
            if dep is not None:
                if dep not in done:
                    return None
                t = max(t, done[dep])
        return t

    def cost(action: Action) -> float:
        if action.kind == "F":
            return costs.F
        if action.kind == "W":
            return costs.W
        if action.kind == "FB":
            return costs.FB
        return costs.B - costs.W if action.split else costs.B

    remaining = sum(len(a) for a in schedule)
    while remaining:
        progressed = False
        for r in range(P):
            while pos[r] < len(schedule[r]):
                action = schedule[r][pos[r]]
                start = ready_at(r, action)
                if start is None:
                    break
                end = start + cost(action)
                for kind, phase, mb in action_parts(action):
                    done[(kind, placement.stage_of(r, phase), mb)] = end
                    live[r] += 1 if kind == "F" else -1
                    peak[r] = max(peak[r], live[r])
                spans[r].append((start, end, action))
                clock[r], busy[r] = end, busy[r] + end - start
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: str(schedule[r][pos[r]]) for r in range(P) if pos[r] < len(schedule[r])}
            raise RuntimeError(f"schedule {placement.name} deadlocks: ranks wait on each other at {stuck}")
    makespan = max(clock)
    return SimResult(makespan, busy, [makespan - b for b in busy], peak, spans)
