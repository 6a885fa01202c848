"""Pipeline timelines: collect what each rank did when, and write it as a Chrome trace.

    tl = Timeline()                                   # in a rank: the runner's record hook
    PipelineRunner(..., record=tl)                    # tl.spans[0] = [(label, start_s, end_s), ...]
    tl = Timeline.from_ranks([spans_r0, spans_r1])    # gathered from spawned ranks
    tl = Timeline.from_simulation(simulate(...), costs)   # the same picture, on paper
    write_chrome_trace(tl.spans, "step.trace.json")   # chrome://tracing, ui.perfetto.dev
    spans = read_chrome_trace("step.trace.json")      # back, times in seconds from the earliest start

Labels are the runtime's: "F<phase>.<mb>", "B<phase>.<mb>" (suffix "z": weight gradients
deferred to a later W), "W", "recv" (blocked receiving). An overlapped pair (FB) is two spans:
side by side in time when the runner overlaps them (its default in the trainer), else F then B.

Drawing is not done here: framework.plots.write_timeline draws the spans (or a trace read back)
as a PNG with matplotlib, which parallel/ does not import. Timestamps are perf_counter seconds,
which on Linux is CLOCK_MONOTONIC and so comparable across the processes of one host (not
across hosts).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from parallel.pipeline.simulator import Costs, SimResult

Span = tuple[str, float, float]  # (label, start, end), seconds


def kind(label: str) -> str:
    """The colour class of a label: "F0", "F1", "B0", "B1", "W", "recv" or "other"."""
    if label in ("W", "recv"):
        return label
    if label[:1] in ("F", "B") and label[1:2] in ("0", "1"):
        return label[:2]
    return "other"


def micro_batch(label: str) -> str:
    """"F1.12" -> "12", "B0.3z" -> "3"; "" for labels without one."""
    _, dot, rest = label.partition(".")
    return rest.rstrip("z") if dot else ""


class Timeline:
    """Spans per pipeline rank: spans[rank] = [(label, start_s, end_s), ...] in recording order.
    Calling the object records on rank 0, so one Timeline per process is the runner's hook."""

    def __init__(self, ranks: int = 1) -> None:
        self.spans: list[list[Span]] = [[] for _ in range(ranks)]

    def __call__(self, label: str, start: float, end: float) -> None:
        self.spans[0].append((label, start, end))

    def hook(self, rank: int) -> Callable[[str, float, float], None]:
        """A record hook for `rank` (several runners in one process, e.g. threads)."""
        while len(self.spans) <= rank:
            self.spans.append([])
        spans = self.spans[rank]
        return lambda label, start, end: spans.append((label, start, end))

    @classmethod
    def from_ranks(cls, per_rank: Sequence[Sequence[Span]]) -> Timeline:
        tl = cls(0)
        tl.spans = [list(s) for s in per_rank]
        return tl

    @classmethod
    def from_simulation(cls, result: SimResult, costs: Costs | None = None, unit_s: float = 1e-3) -> Timeline:
        """The simulator's spans with the runtime's labels; one cost unit lasts unit_s seconds.
        An FB span becomes F then B, split in proportion to the F and B costs (the simulator's
        defaults when none are given)."""
        costs = costs or Costs()
        tl = cls(len(result.spans))
        for rank, spans in enumerate(result.spans):
            out = tl.spans[rank]
            for start, end, action in spans:
                start, end = start * unit_s, end * unit_s
                if action.kind == "W":
                    out.append(("W", start, end))
                elif action.kind in ("F", "B"):
                    out.append((str(action), start, end))
                else:  # FB: the runtime runs the forward, then the backward
                    b_cost = costs.B - costs.W if action.split else costs.B
                    mid = start + (end - start) * costs.F / (costs.F + b_cost)
                    out.append((f"F{action.phase}.{action.mb}", start, mid))
                    out.append((f"B{action.b_phase}.{action.b_mb}" + ("z" if action.split else ""), mid, end))
        return tl

    def busy(self, rank: int) -> float:
        """Seconds a rank was working (everything but waiting to receive); time covered by two
        spans at once (an overlapped pair's forward and backward) counts once."""
        total, reach = 0.0, float("-inf")
        for start, end in sorted((s, e) for label, s, e in self.spans[rank] if label != "recv"):
            if end > reach:
                total += end - max(start, reach)
                reach = end
        return total


def bounds(per_rank: Sequence[Sequence[Span]]) -> tuple[float, float]:
    """(earliest start, latest end) over all ranks; (0, 1) when there are no spans."""
    starts = [s for spans in per_rank for _, s, _ in spans]
    ends = [e for spans in per_rank for _, _, e in spans]
    if not starts:
        return 0.0, 1.0
    return min(starts), max(ends)


# --------------------------------------------------------------------------- Chrome trace

def chrome_trace(per_rank: Sequence[Sequence[Span]]) -> dict:
    """Trace Event Format: one complete ("X") event per span, microseconds from the earliest
    start; pid 0, tid = rank, cat = the colour class. Metadata events name the rows."""
    t0, _ = bounds(per_rank)
    events: list[dict] = [{"ph": "M", "pid": 0, "name": "process_name", "args": {"name": "pipeline"}}]
    for rank, spans in enumerate(per_rank):
        events.append({"ph": "M", "pid": 0, "tid": rank, "name": "thread_name",
                       "args": {"name": f"rank {rank}"}})
        for label, start, end in spans:
            events.append({"ph": "X", "pid": 0, "tid": rank, "name": label, "cat": kind(label),
                           "ts": (start - t0) * 1e6, "dur": (end - start) * 1e6})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(per_rank: Sequence[Sequence[Span]], path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(chrome_trace(per_rank)))
    return path


def read_chrome_trace(path: str | Path) -> list[list[Span]]:
    """The spans of a trace written by write_chrome_trace, per rank (tid) in file order, in
    seconds from the earliest start: what the trainer draws after the engine wrote the trace."""
    per_rank: list[list[Span]] = []
    for e in json.loads(Path(path).read_text())["traceEvents"]:
        if "tid" not in e:
            continue
        while len(per_rank) <= e["tid"]:  # a rank's row-name event keeps it even without spans
            per_rank.append([])
        if e["ph"] == "X":
            per_rank[e["tid"]].append((e["name"], e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6))
    return per_rank
