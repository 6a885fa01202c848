"""Hang detection: a watchdog over blocking waits on collectives (gloo), and what stands in for it on NCCL.

A rank that dies or stalls leaves its peers blocked inside a collective. gloo only gives up
at the process group's timeout with a multi-line error naming neither the step nor the
operation. On gloo (CPU runs, and the simulated mode, where gloo stages CUDA tensors through
the host) this watchdog watches every blocking `Handle.wait()` in parallel/comm.py: when one
has waited longer than the configured timeout (`launch.collective_timeout_s`), it prints one
line naming the rank, the collective and the training step, records it where the elastic
agent looks for a worker's error, and exits the process with EXIT_HANG so the launcher can
restart the group from the last checkpoint:

    duet: rank 1 hung: all_reduce waited 300.1 s at step 42 (launch.collective_timeout_s=300); ...

On NCCL the host clock cannot see a hang: `wait()` only makes the current CUDA stream wait
for NCCL's stream and returns at once, so the host never blocks where this watchdog looks.
`arm()` therefore does not start the host-clock check when the world group's backend is nccl
(it returns False). NCCL hangs are caught by PyTorch's own NCCL watchdog thread at the process
group's timeout, which the trainer sets to `launch.collective_timeout_s` plus its grace
(framework/trainer.py WATCHDOG_GRACE_S), with these environment variables, which
parallel.mesh.init_distributed sets for NCCL runs unless the user already did:
`TORCH_NCCL_ASYNC_ERROR_HANDLING=3` (tear the process down on a timeout or NCCL error; also
PyTorch's default), `TORCH_NCCL_TRACE_BUFFER_SIZE=2000` (the flight recorder: the last
collectives per rank, also read as TORCH_FR_BUFFER_SIZE) and `TORCH_NCCL_DUMP_ON_TIMEOUT=1`
(dump it on a timeout, to TORCH_NCCL_DEBUG_INFO_TEMP_FILE, by default /tmp/nccl_trace_rank_<rank>;
`torchfrtrace` reads the dumps and names the rank that did not join). What PyTorch prints on
each rank then looks like this (recent releases; the exact words vary by version):

    [rank1]:[E... ProcessGroupNCCL.cpp:...] [Rank 1] Watchdog caught collective operation timeout:
      WorkNCCL(SeqNum=808, OpType=ALLREDUCE, NumelIn=..., NumelOut=..., Timeout(ms)=360000) ran for
      360020 milliseconds before timing out.
    [rank1]:[E...] [PG ID 0 PG GUID 0(default_pg) Rank 1] Exception (either an error or timeout)
      detected by watchdog at work: 808, last enqueued NCCL work: 811, last completed NCCL work: 807.
    [rank1]:[E...] [Rank 1] Some NCCL operations have failed or timed out. Due to the asynchronous
      nature of CUDA kernels, subsequent GPU operations might run on corrupted/incomplete data.
    [rank1]:[E...] [Rank 1] To avoid data inconsistency, we are taking the entire process down.

and the process aborts (SIGABRT), which the launcher reports as the rank's failure. It names
the collective's kind and sequence number but not duet's step. This NCCL path is NOT verified
here: no development machine has two GPUs (NCCL refuses two ranks on one GPU), so neither the
message nor the dump has been seen from duet; the text above is PyTorch's, as reported by its
users. The fault injection that stalls a rank inside a wait (`on_wait`) also only runs on gloo.

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


def arm(timeout_s: float, rank: int, backend: str = "") -> bool:
    """Start watching blocking waits of this process (idempotent; re-arming updates the timeout).

    `backend` is the world group's backend (`parallel.comm.backend()`, which the caller passes:
    comm imports this module, not the other way round; "" when there is none). On nccl the
    host-clock check is not started (see the module docstring: NCCL's wait() does not block the
    host; the process group's timeout catches hangs) and False is returned; True otherwise."""
    global _thread
    _state.update(timeout=float(timeout_s), rank=rank)
    if "nccl" in backend:  # also "cpu:gloo,cuda:nccl": the training's collectives are NCCL's
        return False
    if _thread is not None and _thread.is_alive():
        return True
    _stop.clear()
    _thread = threading.Thread(target=_watch, name="duet-watchdog", daemon=True)
    _thread.start()
    return True


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
