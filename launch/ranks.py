"""Run a function on N gloo ranks (spawned processes on loopback) and collect what each returns.

    results = run_ranks(fn, 4, arg1, arg2)   # fn(rank, world, arg1, arg2) on every rank
    results[r]                               # rank r's return value (tensors allowed)

fn must be importable (a module-level function of a test module or helper). Each rank joins
the group through parallel.mesh.init_distributed (the torchrun environment variables), runs
with one intra-op thread, and sends back its result with torch.save, so tensors survive the
trip. If any rank raises, the others are stopped and one error lists every rank's traceback;
a rank that hangs is killed at the deadline. Spawning four ranks costs about 10 s on two
cores, so share one spawn across several checks (a module-scoped fixture).
"""

from __future__ import annotations

import io
import os
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from launch.spawn import free_port


class RankError(RuntimeError):
    """One or more ranks failed; the message holds each failing rank's traceback."""


def _entry(fn: Callable, rank: int, world: int, port: int, args: tuple, results, threads: int,
           timeout_s: float, backend: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only, whatever the host's interfaces
    torch.set_num_threads(threads)
    from parallel.mesh import init_distributed, shutdown

    ok = False
    try:
        init_distributed(backend, timeout_s=timeout_s)
        value = fn(rank, world, *args)
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
        ok = True
        shutdown()
    except BaseException:  # noqa: B036 -- report everything, including KeyboardInterrupt
        if not ok:
            results.put((rank, False, traceback.format_exc()))
    finally:
        # Flush the queue, then leave without running interpreter teardown: a rank whose peers
        # died may otherwise block in gloo's destructors.
        results.close()
        results.join_thread()
        os._exit(0 if ok else 1)


def run_ranks(fn: Callable, world: int, *args: Any, timeout_s: float = 180.0, threads: int = 1,
              backend: str = "gloo") -> list[Any]:
    """fn(rank, world, *args) on `world` ranks; returns the results in rank order. backend
    "nccl" gives rank r the GPU r (init_distributed sets it from LOCAL_RANK)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, args, results, threads, timeout_s, backend),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    give_up_at = deadline  # moved closer once a rank failed: its peers may wait forever
    try:
        while len(got) + len(errors) < world:
            now = time.monotonic()
            if now >= give_up_at:
                for r in sorted(set(range(world)) - set(got) - set(errors)):
                    errors[r] = (f"no result within {timeout_s:.0f} s" if now >= deadline
                                 else "stopped after another rank failed")
                break
            try:
                rank, ok, payload = results.get(timeout=min(give_up_at - now, 1.0))
            except queue.Empty:
                for r, p in enumerate(procs):
                    if p.exitcode not in (None, 0) and r not in got and r not in errors:
                        errors[r] = f"exited with code {p.exitcode} without a result"
                        give_up_at = min(give_up_at, time.monotonic() + 5.0)
                continue
            if ok:
                got[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors[rank] = payload
                give_up_at = min(give_up_at, time.monotonic() + 5.0)
    finally:
        for p in procs:
            p.join(timeout=0 if errors else 10)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        detail = "\n".join(f"--- rank {r} ---\n{text}" for r, text in sorted(errors.items()))
        raise RankError(f"{len(errors)} of {world} ranks failed:\n{detail}")
    return [got[r] for r in range(world)]
