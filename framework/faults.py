"""Fault injection for tests and soak runs: make a rank fail at a chosen point, as real failures do.

    DUET_FAULT=<fault>[,<fault>...]     each fault is <kind>:<point>:<step>[:<rank>]

When rank <rank> (default 0) reaches <point> at step <step> (or any step of a range
<first>-<last>), the fault fires. Kinds and the points they apply to:

- `kill`  SIGKILLs the process (no cleanup, no exception handlers: like the OOM killer or a
  lost node). `raise` raises a RuntimeError (a bug in one rank). Points: `step` (after the
  optimizer step that completes <step>) and the stages of writing checkpoint <step>:
  `save-begin` (temporary folder made, nothing written), `save` (this rank's shards
  written, not yet committed), `publish-meta` (meta.json written, manifest not yet),
  `publish-manifest` (complete, not yet renamed into place), `publish-done` (renamed, old
  checkpoints not yet pruned). The publish points are reached by rank 0 only.
- `stall`  at point `collective`: the first blocking wait on a collective during <step>
  sleeps DUET_FAULT_STALL_S seconds (default an hour), as a rank stuck inside a collective
  does; the hang watchdog (parallel/watchdog.py) must notice.
- `nan` / `inf`  at point `loss` (the local loss before backward) or `grad` (one local
  gradient after the data-parallel reduction, so only this rank sees it): the value
  becomes non-finite. The NaN guard in the trainer must skip the step on every rank.

kill, raise and stall fire once: a marker file in the run folder lets a restarted job get
past them. nan and inf fire every time the step is reached, like a bad batch replayed after
a resume, so a resumed run skips the same steps as an uninterrupted one.

`corrupt_file` and `truncate_file` damage a checkpoint file the way bit rot and a full disk
do, for the checkpoint-integrity tests.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

ONCE = ("kill", "raise", "stall")
KINDS = (*ONCE, "nan", "inf")


def _faults() -> list[tuple[str, str, int, int, int]]:
    """(kind, point, first step, last step, rank) of every fault in DUET_FAULT."""
    out = []
    for spec in filter(None, os.environ.get("DUET_FAULT", "").split(",")):
        kind, point, steps, *who = spec.strip().split(":")
        first, _, last = steps.partition("-")
        if kind in KINDS:
            out.append((kind, point, int(first), int(last or first), int(who[0]) if who else 0))
    return out


def _matching(kinds: tuple[str, ...], point: str, step: int, rank: int) -> str | None:
    for kind, where, first, last, who in _faults():
        if kind in kinds and where == point and first <= step <= last and who == rank:
            return kind
    return None


def maybe_fail(point: str, step: int, rank: int, run_dir: str | Path) -> None:
    """Fire a kill/raise/stall fault planned for (point, step, rank), once per run folder."""
    kind = _matching(ONCE, point, step, rank)
    if kind is None:
        return
    marker = Path(run_dir) / f".fault-{point}-{step}-{rank}"
    if marker.exists():
        return
    marker.touch()
    if kind == "raise":
        raise RuntimeError(f"injected fault at {point} {step} on rank {rank} "
                           f"(DUET_FAULT={os.environ['DUET_FAULT']})")
    if kind == "stall":
        time.sleep(float(os.environ.get("DUET_FAULT_STALL_S", "3600")))
        return
    os.kill(os.getpid(), signal.SIGKILL)


def poison(point: str, step: int, rank: int) -> float | None:
    """nan or inf when a nan/inf fault is planned for (point, step, rank), else None."""
    kind = _matching(("nan", "inf"), point, step, rank)
    return None if kind is None else float(kind)


def planned(point: str) -> bool:
    """Whether any fault names `point` (lets hot paths skip the hook entirely)."""
    return any(where == point for _, where, *_ in _faults())


def corrupt_file(path: str | Path, seed: int = 0, n_bytes: int = 8) -> list[int]:
    """Flip the bits of `n_bytes` bytes at seeded positions (bit rot); returns the positions."""
    path = Path(path)
    data = bytearray(path.read_bytes())
    if not data:
        raise ValueError(f"{path} is empty; nothing to corrupt")
    positions = sorted(random.Random(seed).sample(range(len(data)), min(n_bytes, len(data))))
    for i in positions:
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return positions


def truncate_file(path: str | Path, keep: float = 0.5) -> int:
    """Cut `path` to `keep` of its length (a write that ran out of disk); returns the new size."""
    path = Path(path)
    size = int(path.stat().st_size * keep)
    with path.open("r+b") as f:
        f.truncate(size)
    return size
