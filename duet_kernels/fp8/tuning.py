"""Autotuning that settles: bucketed keys, one config table per kernel, tuning only in a warm-up.

triton.autotune keys on exact argument values. The FP8 GEMMs see a new M (padded expert rows)
and, in the weight gradients, a new K (tokens per expert) almost every step, so it kept tuning
(about 0.65 s per new key on an H100, with a device-wide synchronize inside a multi-rank step,
where the other ranks wait). Here instead:

- A key buckets the sizes that follow the batch (M, and the wgrad's token K) up to a power of
  two; the sizes fixed by the model (N, K of a layer, experts E) stay exact. A 50-step run then
  touches a handful of keys per layer shape (tests/test_fp8_tuning.py counts them).
- A key with no entry is tuned only where tuning is allowed: in one process, or inside
  `warming_up()` (a warm-up before the first step, e.g. `framework.fp8.warm_up`). Inside a
  multi-rank run it takes the entry of the nearest tuned M (same other fields), else the
  kernel's first config, and tunes nothing.

Tuning benchmarks each config on scratch copies of the outputs, so an accumulating launch
never adds into the real gradient more than once. Any config gives the same numbers (the K
loop and its per-128 promotion are the same in every tile shape), so ranks that picked
different configs still agree bit for bit.

`recording()` collects the (kernel, key) of every launch and `shape_log()` the raw shapes
of every FP8 GEMM call, Triton or reference (tests, and recording the shapes of a run).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import triton

MIN_BUCKET = 16  # tl.dot's smallest tile: below it every size is the same launch


def pow2_bucket(n: int) -> int:
    """The power of two at or above n (at least MIN_BUCKET)."""
    return max(MIN_BUCKET, 1 << max(int(n) - 1, 0).bit_length())


_warm_depth = 0
_records: list[list] = []  # open recording() lists
_shape_logs: list[list] = []  # open shape_log() lists


@contextlib.contextmanager
def warming_up() -> Iterator[None]:
    """Allow tuning even in a multi-rank run (every rank in its warm-up, before step 1)."""
    global _warm_depth
    _warm_depth += 1
    try:
        yield
    finally:
        _warm_depth -= 1


def may_tune() -> bool:
    """Outside a warm-up, tune only in a single-process run: a multi-rank step must not stop to
    benchmark (the synchronize would stall every rank waiting on this one)."""
    if _warm_depth > 0:
        return True
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Yields a list that receives (kernel name, key) for each tuned-kernel launch inside."""
    got: list = []
    _records.append(got)
    try:
        yield got
    finally:
        _records.remove(got)


@contextlib.contextmanager
def shape_log() -> Iterator[list]:
    """Yields a list that receives (op, shape dict) for every FP8 GEMM call inside, any backend."""
    got: list = []
    _shape_logs.append(got)
    try:
        yield got
    finally:
        _shape_logs.remove(got)


def note_shape(op: str, **shape: int) -> None:
    for log in _shape_logs:
        log.append((op, dict(shape)))


class ConfigTable:
    """A kernel's configs and the table of the best one per key (see the module docstring).

    `configs` is a list of triton.Config, as on a triton.autotune object, so duet_kernels/sm90_report.py
    compiles every entry. Keys are tuples of `fields` built by `key()`, the `bucketed` ones
    rounded up to powers of two.
    """

    def __init__(self, name: str, configs: list[triton.Config], fields: tuple[str, ...],
                 bucketed: tuple[str, ...]) -> None:
        self.name, self.configs, self.fields, self.bucketed = name, configs, fields, bucketed
        self._loose = [i for i, f in enumerate(fields) if f in bucketed]
        self.table: dict[tuple, triton.Config] = {}
        self.tuned = 0  # keys benchmarked (tests: none inside a multi-rank step)

    def key(self, **sizes) -> tuple:
        return tuple(pow2_bucket(sizes[f]) if f in self.bucketed else sizes[f] for f in self.fields)

    def nearest(self, key: tuple) -> triton.Config | None:
        """The entry whose exact fields equal key's and whose bucketed ones are nearest (log scale)."""
        def distance(k: tuple) -> float:
            return sum(abs(math.log2(k[i]) - math.log2(key[i])) for i in self._loose)

        exact = [i for i in range(len(key)) if i not in self._loose]
        same = [(distance(k), k, cfg) for k, cfg in self.table.items()
                if all(k[i] == key[i] for i in exact)]
        return min(same, key=lambda t: (t[0], t[1]))[2] if same else None

    def pick(self, key: tuple, bench: Callable[[triton.Config], float]) -> triton.Config:
        """The config for `key`: the table's, else tuned now (where allowed), else the nearest."""
        for got in _records:
            got.append((self.name, key))
        cfg = self.table.get(key)
        if cfg is not None:
            return cfg
        if may_tune():
            cfg = min(self.configs, key=bench)
            self.table[key] = cfg
            self.tuned += 1
            return cfg
        return self.nearest(key) or self.configs[0]


def launch_options(cfg: triton.Config) -> dict:
    """The keyword arguments a `kernel[grid](...)` launch takes for one config."""
    out = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if cfg.maxnreg is not None:
        out["maxnreg"] = cfg.maxnreg
    return out


def benchmark(run: Callable[[], None]) -> float:
    """Median milliseconds of `run` on the GPU (only called when tuning)."""
    return triton.testing.do_bench(run, warmup=5, rep=20)
