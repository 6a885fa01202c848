"""Hang detection: a watchdog over blocking waits on collectives.

A rank that dies or stalls leaves its peers blocked inside a collective. gloo only gives up
at the process group's timeout with a multi-line error naming neither the step nor the
operation (and NCCL, by default, after 30 minutes). This watchdog watches every blocking
`Handle.wait()` in parallel/comm.py: when one has waited longer than the configured timeout
(`launch.collective_timeout_s`), it prints one line naming the rank, the collective and the
training step, records it where the elastic agent looks for a worker's error, and exits the
process with EXIT_HANG so the launcher can restart the group from the last checkpoint.

Cheap when idle: entering and leaving a wait are two dict writes (no lock: each thread only
writes its own key, and single dict operations are atomic under the GIL); the thread wakes a
few times per timeout and reads that dict. Nothing runs unless `arm()` was called, which the
trainer does for the duration of a multi-rank run.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable

EXIT_HANG = 3

_waits: dict[int, tuple[str, float]] = {}  # thread id -> (collective kind, start of the wait)
_state = {"step": 0, "rank": 0, "timeout": 0.0}
_thread: threading.Thread | None = None
_stop = threading.Event()
# A hook run on entering a wait (fault injection stalls a rank here); None normally.
on_wait: Callable[[str, int], None] | None = None


def arm(timeout_s: float, rank: int) -> None:
    """Start watching blocking waits of this process (idempotent; re-arming updates the timeout)."""
    global _thread
    _state.update(timeout=float(timeout_s), rank=rank)
    if _thread is not None and _thread.is_alive():
        return
    _stop.clear()
    _thread = threading.Thread(target=_watch, name="duet-watchdog", daemon=True)
    _thread.start()


def disarm() -> None:
    global _thread, on_wait
    on_wait = None
    _stop.set()
    if _thread is not None:
        _thread.join(timeout=5)
    _thread = None
    _waits.clear()


def armed() -> bool:
    return _thread is not None


def set_step(step: int) -> None:
    """The training step now running, for the report (the trainer calls this every step)."""
    _state["step"] = step


def enter(kind: str) -> int | None:
    """Mark the start of a blocking wait on `kind`; returns a token for leave()."""
    if _thread is None:
        return None
    me = threading.get_ident()
    _waits[me] = (kind, time.monotonic())
    if on_wait is not None:
        on_wait(kind, _state["step"])
    return me


def leave(token: int | None) -> None:
    if token is not None:
        _waits.pop(token, None)


def report(kind: str, waited: float) -> str:
    return (f"rank {_state['rank']} hung: {kind} waited {waited:.1f} s at step {_state['step']} "
            f"(launch.collective_timeout_s={_state['timeout']:g}); a peer rank stalled or died, "
            "exiting so the launcher can restart the group (launch.max_restarts)")


def _watch() -> None:
    timeout = _state["timeout"]
    poll = min(1.0, max(timeout / 20, 0.05))
    while not _stop.wait(poll):
        now = time.monotonic()
        for kind, start in list(_waits.values()):
            if now - start > _state["timeout"]:
                _fail(report(kind, now - start))


def _fail(line: str) -> None:
    print(f"duet: {line}", file=sys.stderr, flush=True)
    # The elastic agent reads a failed worker's error file (what @record writes for an
    # exception); the launcher prints its message. The main thread is stuck in C code, so
    # raising there is not possible: write the file ourselves, then leave at once.
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w") as f:
                json.dump({"message": {"message": f"CollectiveTimeout: {line}",
                                       "extraInfo": {"py_callstack": f"duet: {line}",
                                                     "timestamp": str(int(time.time()))}}}, f)
        except OSError:
            pass
    os._exit(EXIT_HANG)
