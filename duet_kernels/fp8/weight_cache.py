"""Quantise each weight once per optimizer step, not once per micro-batch.

    with weight_cache():          # around one step's forward/backward passes
        for mb in micro_batches: loss(mb).backward()

Inside, `quantize_weight_once(w)` returns the FP8 bytes and 128x128 scales of `w` from the
first call and reuses them while `w` is unchanged -- judged by its version counter, which every
in-place update of the parameter (an optimizer step, a checkpoint load) moves on. Leaving the
context drops the cache, so an update the counter cannot see (a write through `.data`, a flat
buffer another library updates) can never leave stale bytes for the next step. Outside any
context it quantises every time, as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .quantize import quantize_weight

_caches: list[dict] = []


@contextlib.contextmanager
def weight_cache() -> Iterator[dict]:
    cache: dict = {}
    _caches.append(cache)
    try:
        yield cache
    finally:
        _caches.remove(cache)


def quantize_weight_once(w: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_weight(w), reused inside weight_cache() while w's version counter is unchanged."""
    if not _caches:
        return quantize_weight(w, backend=backend)
    cache = _caches[-1]
    # Keyed by identity; the entry holds w itself, so the id cannot be reused by another tensor.
    hit = cache.get(id(w))
    stamp = (w._version, w.dtype, backend)
    if hit is not None and hit[0] is w and hit[1] == stamp:
        return hit[2]
    out = quantize_weight(w.detach(), backend=backend)
    cache[id(w)] = (w, stamp, out)
    return out
