"""Gradient reduction for data parallelism, overlapped with backward: flat buckets, dense and
expert apart, issued in one fixed order from post-accumulate-grad hooks; all-reduce, or
reduce-scatter for ZeRO-1 (parallel/data_parallel.py's optimizer then all-gathers). Also the
byte counts of a ZeRO-1 step (min_zero1_bytes), which duet-plan and the tests read.

Gradient scaling (the dp average, Megatron-LM's expert scaling): parallel/data_parallel.py's
module docstring.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from parallel import comm
from parallel.mesh import Mesh

EXPERT_MARK = ".experts."  # parameter names of routed experts (reduced over edp, not dp)


def is_expert(name: str) -> bool:
    return EXPERT_MARK in name


def trainable_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def pack_buckets(items: list, nbytes, key, cap_bytes: float) -> list[list]:
    """Split `items` (in order) into runs of equal key() of at most cap_bytes each (a single
    larger item gets a run of its own). Deterministic, so every rank builds the same buckets."""
    done, open_runs = [], {}
    for item in items:
        k = key(item)
        run = open_runs.setdefault(k, [[], 0])
        if run[0] and run[1] + nbytes(item) > cap_bytes:
            done.append(run[0])
            run[0], run[1] = [], 0
        run[0].append(item)
        run[1] += nbytes(item)
    return done + [run[0] for run in open_runs.values() if run[0]]


# --------------------------------------------------------------------------- shard plan and bytes


_REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def chunk_range(size: int, n: int, i: int) -> tuple[int, int]:
    """(start, length) of piece i when `size` is cut into n pieces the way torch.chunk and
    DTensor's Shard do: ceil(size / n) each, the last ones shorter or empty."""
    per = -(-size // n)
    start = min(per * i, size)
    return start, min(size, start + per) - start


@dataclass(frozen=True)
class _Cut:
    """How ZeRO-1 cuts one parameter: along `dim` into n torch.chunk pieces, piece `rank` here.
    One function (`cut_of`) decides it for the reducer and the optimizer, so the gradient
    piece the reduce-scatter delivers is the piece the optimizer updates."""
    dim: int  # 0 dense, 1 expert (dim 0 belongs to EP)
    n: int
    rank: int
    group: comm.Group

    def piece(self, shape, i: int) -> tuple[int, int]:
        return chunk_range(shape[self.dim], self.n, i)


def cut_of(name: str, p: nn.Parameter, mesh: Mesh, zero: bool) -> _Cut | None:
    """None where every rank keeps the whole parameter (no ZeRO, dp 1, a 0-d parameter)."""
    if not zero or mesh.dp == 1 or p.ndim == 0:
        return None
    expert = is_expert(name)
    if expert and p.ndim < 2:
        raise ValueError(f"{name}: expert parameters must have >= 2 dims (dim 0 is the expert)")
    if expert:
        return _Cut(1, mesh.edp, mesh.edp_rank, mesh.edp_group)
    return _Cut(0, mesh.dp, mesh.dp_rank, mesh.dp_group)


def ring_bytes(kind: str, nbytes: int, n: int) -> float:
    """Bytes one rank sends for a collective in the bandwidth-optimal ring (NCCL's large-message
    algorithm): all_reduce 2(n-1)/n of the buffer, reduce_scatter (n-1)/n of its input,
    all_gather (n-1) x its own piece (nbytes = what the rank hands to the op, as comm counts)."""
    if n <= 1:
        return 0.0
    return {"all_reduce": 2 * (n - 1) / n * nbytes, "reduce_scatter": (n - 1) / n * nbytes,
            "all_gather": (n - 1) * nbytes}[kind]


def min_zero1_bytes(model: nn.Module, mesh: Mesh, reduce_dtype: str = "fp32") -> float:
    """The least a rank can send per ZeRO-1 step in a ring: every gradient reduce-scattered and
    every parameter all-gathered, (n-1)/n of its bytes each, n = dp (dense) or edp (experts);
    a 0-d parameter (not cut) all-reduced. Unpadded: the reducer and the optimizer reach it when
    each cut dimension divides by n."""
    total = 0.0
    for name, p in trainable_params(model):
        n = mesh.edp if is_expert(name) else mesh.dp
        grad_bytes = p.numel() * (_REDUCE_DTYPES[reduce_dtype].itemsize if p.dtype == torch.float32
                                  else p.element_size())
        if p.ndim == 0:
            total += ring_bytes("all_reduce", grad_bytes, n)
        else:
            total += ring_bytes("reduce_scatter", grad_bytes, n) + (n - 1) / n * p.numel() * p.element_size()
    return total


# --------------------------------------------------------------------------- gradient reduction


@dataclass(eq=False)
class _GradBucket:
    """Flat gradients of a few parameters. Without `cuts` the buffer is all-reduced in place.
    With cuts (ZeRO-1) it is laid out rank-major -- segment j holds piece j of every parameter,
    each at its slot (slots sized for piece 0, the largest) -- and reduce-scattered, so this rank
    receives in `shard` exactly the pieces its optimizer updates, and nothing else travels twice."""
    params: list[nn.Parameter]
    group: comm.Group
    scale: float
    buffer: torch.Tensor  # flat, the reduction dtype
    cuts: list[_Cut] | None = None
    slots: list[int] = field(default_factory=list)  # offset of each param's piece in a segment
    shard: torch.Tensor | None = None  # this rank's reduced segment (ZeRO-1)
    ready: set[int] = field(default_factory=set)  # ids of params whose grad arrived this round
    handle: comm.Handle | None = None


def _piece_shape(p: torch.Tensor, cut: _Cut, i: int) -> list[int]:
    shape = list(p.shape)
    shape[cut.dim] = cut.piece(p.shape, i)[1]
    return shape


def narrow_to(t: torch.Tensor, cut: _Cut, i: int) -> torch.Tensor:
    return t.narrow(cut.dim, *cut.piece(t.shape, i))


def _weak_hook(reducer: GradReducer) -> Callable[[torch.Tensor], None]:
    """The reducer's gradient hook, holding it weakly: a parameter keeps its hooks in autograd's
    C++ side, which Python's gc cannot traverse, so a strong reference (parameter -> hook ->
    reducer -> buckets -> parameter) would keep a discarded model alive for good."""
    ref = weakref.ref(reducer)

    def on_grad(p: torch.Tensor) -> None:
        if (alive := ref()) is not None:
            alive._on_grad(p)

    return on_grad


class GradReducer:
    """Averages gradients across data-parallel ranks, overlapping the reductions with backward.

    Parameters are packed in reverse registration order (roughly the order backward produces
    their gradients) into flat buckets of about `bucket_mb`, dense and expert apart. When every
    gradient of a bucket has arrived (a post-accumulate-grad hook), the bucket's reduction is
    issued asynchronously -- but buckets are always issued in the same fixed order, so ranks
    whose backward finishes parameters in a different order (or skips one) never mismatch
    collectives. `finish()` issues whatever is left (a parameter without a gradient counts as
    zeros), waits, scales and writes the results into `.grad`.

    zero=False: each bucket is all-reduced; every rank's `.grad` holds the full average.
    zero=True (pair it with DataParallelOptimizer(zero=True)): each bucket is reduce-scattered
    (half an all-reduce's traffic), and after finish() a rank's `.grad` holds the average only
    on the pieces its ZeRO-1 optimizer updates -- elsewhere its own unreduced gradient, as in
    Megatron's distributed optimizer. The optimizer reads (norm, clipping, update) only those
    pieces. 0-d parameters, which ZeRO does not cut, are still all-reduced.
    reduce_dtype="bf16": fp32 gradients travel and are summed in bf16 (half the bytes again),
    then scaled in fp32; not exact, so the equality suites keep fp32.

    For gradient accumulation over micro-batches, run all but the last backward inside
    `no_sync()`. `sent_bytes` counts what this rank sent in a ring (see ring_bytes).
    """

    def __init__(self, model: nn.Module, mesh: Mesh, bucket_mb: float = 25.0, zero: bool = False,
                 reduce_dtype: str = "fp32") -> None:
        if reduce_dtype not in _REDUCE_DTYPES:
            raise ValueError(f"parallel.grad_reduce_dtype={reduce_dtype!r}: choose fp32 or bf16")
        self.mesh = mesh
        self.active = mesh.dp > 1
        self.zero = zero and self.active
        self.sent_bytes = 0.0
        self._sync = True
        self._next = 0  # index of the next bucket to issue
        self._hooks: list = []
        self.buckets: list[_GradBucket] = []
        if not self.active:
            return
        named = list(reversed(trainable_params(model)))
        expert_of = {id(p): is_expert(n) for n, p in named}
        cut_by_id = {id(p): cut_of(n, p, mesh, self.zero) for n, p in named}
        low = _REDUCE_DTYPES[reduce_dtype]
        wire = {id(p): low if p.dtype == torch.float32 else p.dtype for _, p in named}
        runs = pack_buckets([p for _, p in named], lambda p: p.numel() * p.element_size(),
                        lambda p: (expert_of[id(p)], cut_by_id[id(p)] is None, p.dtype, p.device),
                        bucket_mb * 2**20)
        self._bucket_of: dict[int, _GradBucket] = {}
        for params in runs:
            p0 = params[0]
            group = mesh.edp_group if expert_of[id(p0)] else mesh.dp_group
            if cut_by_id[id(p0)] is None:
                buffer = torch.zeros(sum(p.numel() for p in params), dtype=wire[id(p0)], device=p0.device)
                bucket = _GradBucket(params, group, 1.0 / mesh.dp, buffer)
            else:
                cuts = [cut_by_id[id(p)] for p in params]
                slots, total = [], 0
                for p, cut in zip(params, cuts, strict=True):
                    slots.append(total)
                    total += math.prod(_piece_shape(p, cut, 0))
                buffer = torch.zeros(cuts[0].n * total, dtype=wire[id(p0)], device=p0.device)
                bucket = _GradBucket(params, group, 1.0 / mesh.dp, buffer, cuts, slots,
                                     buffer.new_empty(total))
            self.buckets.append(bucket)
            for p in params:
                self._bucket_of[id(p)] = bucket
                self._hooks.append(p.register_post_accumulate_grad_hook(_weak_hook(self)))

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only accumulate; the reduction waits for a later backward."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    @property
    def in_flight(self) -> int:
        """Buckets issued and not yet finished (> 0 after backward means reduction overlapped it)."""
        return sum(b.handle is not None for b in self.buckets)

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._sync:
            return
        bucket = self._bucket_of[id(p)]
        if bucket.handle is not None:
            raise RuntimeError("GradReducer: a gradient accumulated again after its bucket was reduced; "
                               "run all but the last micro-batch's backward inside reducer.no_sync()")
        bucket.ready.add(id(p))
        while self._next < len(self.buckets) and len(self.buckets[self._next].ready) == len(
                self.buckets[self._next].params):
            self._issue(self.buckets[self._next])

    @torch.no_grad()
    def _issue(self, bucket: _GradBucket) -> None:
        n = comm.group_size(bucket.group)
        if bucket.cuts is None:
            offset = 0
            for p in bucket.params:
                piece = bucket.buffer[offset:offset + p.numel()]
                if p.grad is None:
                    piece.zero_()
                else:
                    piece.copy_(p.grad.reshape(-1))
                offset += p.numel()
            bucket.handle = comm.all_reduce(bucket.buffer, "sum", bucket.group, async_op=True)
            self.sent_bytes += ring_bytes("all_reduce", bucket.buffer.nbytes, n)
        else:
            segment = bucket.shard.numel()
            for p, cut, slot in zip(bucket.params, bucket.cuts, bucket.slots, strict=True):
                for j in range(cut.n):
                    shape = _piece_shape(p, cut, j)
                    dst = bucket.buffer[j * segment + slot:][:math.prod(shape)].view(shape)
                    if p.grad is None:
                        dst.zero_()
                    else:
                        dst.copy_(narrow_to(p.grad, cut, j))
            bucket.handle = comm.reduce_scatter_tensor(bucket.shard, bucket.buffer, "sum", bucket.group,
                                                       async_op=True)
            self.sent_bytes += ring_bytes("reduce_scatter", bucket.buffer.nbytes, n)
        self._next += 1

    @torch.no_grad()
    def finish(self) -> None:
        """Issue what backward did not, wait for everything, write the averaged grads back."""
        if not self.active:
            return
        while self._next < len(self.buckets):
            self._issue(self.buckets[self._next])
        for bucket in self.buckets:
            bucket.handle.wait()
            if bucket.cuts is None:
                self._write_full(bucket)
            else:
                self._write_pieces(bucket)
            bucket.ready.clear()
            bucket.handle = None
        self._next = 0

    @staticmethod
    def _write_full(bucket: _GradBucket) -> None:
        exact = bucket.buffer.dtype == bucket.params[0].dtype
        if exact:  # scale where the sum lies; a bf16 sum is scaled after the upcast, in fp32
            bucket.buffer.mul_(bucket.scale)
        offset = 0
        for p in bucket.params:
            reduced = bucket.buffer[offset:offset + p.numel()].view(p.shape)
            if p.grad is None:
                p.grad = torch.empty_like(p)
            p.grad.copy_(reduced)
            if not exact:
                p.grad.mul_(bucket.scale)
            offset += p.numel()

    @staticmethod
    def _write_pieces(bucket: _GradBucket) -> None:
        exact = bucket.shard.dtype == bucket.params[0].dtype
        if exact:
            bucket.shard.mul_(bucket.scale)
        for p, cut, slot in zip(bucket.params, bucket.cuts, bucket.slots, strict=True):
            shape = _piece_shape(p, cut, cut.rank)
            reduced = bucket.shard[slot:][:math.prod(shape)].view(shape)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            mine = narrow_to(p.grad, cut, cut.rank)
            mine.copy_(reduced)
            if not exact:
                mine.mul_(bucket.scale)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


# --------------------------------------------------------------------------- optimizer
