"""Fault injection for tests: make a rank die at a chosen point, as real failures do.

    DUET_FAULT=kill:<point>:<step>[:<rank>]

SIGKILLs the process (no cleanup, no exception handlers: like the OOM killer or a lost
node) when rank <rank> (default 0) reaches <point> at step <step>. Points: `step` (after
the optimizer step that completes <step>), `save` (checkpoint <step> written but not yet
committed). A marker file in the run folder makes each fault fire once, so a restarted
job gets past it.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def maybe_fail(point: str, step: int, rank: int, run_dir: str | Path) -> None:
    spec = os.environ.get("DUET_FAULT")
    if not spec:
        return
    kind, where, at, *who = spec.split(":")
    if (kind, where, int(at), int(who[0]) if who else 0) != ("kill", point, step, rank):
        return
    marker = Path(run_dir) / f".fault-{point}-{step}-{rank}"
    if marker.exists():
        return
    marker.touch()
    os.kill(os.getpid(), signal.SIGKILL)
