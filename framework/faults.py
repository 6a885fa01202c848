"""Fault injection for tests: make a rank die at a chosen point, as real failures do.

    DUET_FAULT=<kind>:<point>:<step>[:<rank>]

When rank <rank> (default 0) reaches <point> at step <step>: kind `kill` SIGKILLs the
process (no cleanup, no exception handlers: like the OOM killer or a lost node); kind
`raise` raises a RuntimeError (a bug in one rank). Points: `step` (after
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
    if (where, int(at), int(who[0]) if who else 0) != (point, step, rank) or kind not in ("kill", "raise"):
        return
    marker = Path(run_dir) / f".fault-{point}-{step}-{rank}"
    if marker.exists():
        return
    marker.touch()
    if kind == "raise":
        raise RuntimeError(f"injected fault at {point} {step} on rank {rank} (DUET_FAULT={spec})")
    os.kill(os.getpid(), signal.SIGKILL)
