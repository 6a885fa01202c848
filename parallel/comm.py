"""The one communication layer: every collective and point-to-point call in duet goes through here.

Why one layer (DESIGN.md rule 4): backends differ in what they can do, and the metrics want
bytes and time per kind of operation. This module hides the differences:

- gloo cannot move fp8 at all ("Invalid scalar type"): movement ops (gather, broadcast,
  all-to-all, send/recv) send fp8 as a `uint8` view of the same bytes; reductions of fp8 are
  refused with a clear error, since adding scaled fp8 codes is meaningless anyway.
- "avg" is done as sum-then-divide on every backend, so results do not depend on whether a
  backend build has a native AVG (older gloo builds do not).
- reduce_scatter is native where the backend has it (gloo does in torch >= 2.4) and otherwise
  falls back to all_reduce + taking this rank's slice.
- gloo with CUDA tensors (the "simulated" launch mode) stages through host memory.

Every op takes `async_op`; it always returns a `Handle` whose `wait()` finishes the op (divide,
copy back, slice) and books the seconds from issue until `wait()` returns. A synchronous call
returns a handle that is already complete.

Groups: `group=None` means the default (world) group when torch.distributed is initialised.
When there is nobody to talk to -- no process group at all (a single process) or a group of
one -- every op is a local no-op (outputs get the input copied where that is the result), so
single-process code runs the same calls. Peer and source ranks are *global* ranks, as in
torch.distributed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.distributed as dist

from parallel import watchdog

Group = dist.ProcessGroup | None
ReduceOp = Literal["sum", "avg", "max", "min"]

_FP8 = {getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                          "float8_e5m2fnuz") if hasattr(torch, name)}
_NATIVE_OPS = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM,
               "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
# torch 2.13 renamed the single-tensor gather/scatter (the old names warn); keep older torch working.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# --------------------------------------------------------------------------- counters

_stats_lock = threading.Lock()  # autograd hooks may issue ops from another thread (CUDA)
_stats: dict[str, dict[str, float]] = {}


def _book(kind: str, nbytes: int, seconds: float) -> None:
    with _stats_lock:
        entry = _stats.setdefault(kind, {"calls": 0, "bytes": 0, "seconds": 0.0})
        entry["calls"] += 1
        entry["bytes"] += nbytes
        entry["seconds"] += seconds


def comm_stats() -> dict[str, dict[str, float]]:
    """{op kind: {"calls", "bytes", "seconds"}} since the last reset (a copy).

    bytes is the payload this rank hands to the op (for recv and broadcast receivers: the
    payload it receives); seconds runs from issue until wait() returns. Ops that are local
    no-ops (nobody to talk to) are not counted.
    """
    with _stats_lock:
        return {kind: dict(entry) for kind, entry in _stats.items()}


def reset_comm_stats() -> None:
    with _stats_lock:
        _stats.clear()


# --------------------------------------------------------------------------- handles


class Handle:
    """A communication in flight (or finished). `wait()` is idempotent and returns `result`."""

    def __init__(self, kind: str, nbytes: int, works: Sequence[dist.Work] = (),
                 finish: Callable[[], None] | None = None, result: torch.Tensor | None = None,
                 start: float | None = None) -> None:
        self.kind, self.nbytes, self.result = kind, nbytes, result
        self._works, self._finish = list(works), finish
        self._start = time.perf_counter() if start is None else start
        self._done = False

    def wait(self) -> torch.Tensor | None:
        if not self._done:
            token = watchdog.enter(self.kind)  # hang detection (parallel/watchdog.py)
            try:
                for work in self._works:
                    work.wait()
            finally:
                watchdog.leave(token)
            if self._finish is not None:
                self._finish()
            self._done = True
            if self.kind:  # an empty kind marks a local no-op: nothing is booked
                _book(self.kind, self.nbytes, time.perf_counter() - self._start)
        return self.result

    def is_completed(self) -> bool:
        return self._done or all(work.is_completed() for work in self._works)


def _local(result: torch.Tensor | None = None) -> Handle:
    """A finished handle for an op with nobody to talk to."""
    handle = Handle("", 0, result=result)
    handle._done = True
    return handle


def _issue(kind: str, nbytes: int, launch: Callable[[], Sequence[dist.Work]], async_op: bool,
           finish: Callable[[], None] | None = None, result: torch.Tensor | None = None) -> Handle:
    start = time.perf_counter()
    handle = Handle(kind, nbytes, launch(), finish, result, start)
    if not async_op:
        handle.wait()
    return handle


# --------------------------------------------------------------------------- helpers


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_size(group: Group = None) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


def group_rank(group: Group = None) -> int:
    return dist.get_rank(group) if is_distributed() else 0


def global_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def collective_device(group: Group = None) -> torch.device:
    """Where small tensors made for a collective (a loss, a norm) must live for `group`'s backend."""
    if is_distributed() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _active(group: Group) -> bool:
    return is_distributed() and dist.get_world_size(group) > 1


def _stages_via_host(t: torch.Tensor, group: Group) -> bool:
    return t.device.type != "cpu" and dist.get_backend(group) == "gloo"


def _movable(t: torch.Tensor) -> torch.Tensor:
    """fp8 travels as the same bytes viewed as uint8 (gloo rejects fp8 dtypes)."""
    return t.view(torch.uint8) if t.dtype in _FP8 else t


def _check_reducible(t: torch.Tensor, op: str, what: str) -> None:
    if op not in _NATIVE_OPS:
        raise ValueError(f"{what}: op={op!r}; choose one of {', '.join(_NATIVE_OPS)}")
    if t.dtype in _FP8:
        raise TypeError(f"{what}: cannot reduce {t.dtype} tensors (block-scaled fp8 codes do not add); "
                        "dequantize to bf16/fp32 first, or use a movement op (all_gather, all_to_all)")
    if op == "avg" and not t.is_floating_point():
        raise TypeError(f"{what}: op='avg' needs a floating-point tensor, got {t.dtype}; use 'sum'")


def _staged(tensors: Sequence[torch.Tensor], group: Group,
            n_out: int = 1) -> tuple[list[torch.Tensor], Callable[[], None]]:
    """Host copies of tensors when gloo meets a device tensor, and a function that copies the
    first `n_out` of them (the outputs) back once the op is done. Identity otherwise."""
    if not any(_stages_via_host(t, group) for t in tensors):
        return list(tensors), lambda: None
    host = [t.to("cpu", copy=True) for t in tensors]

    def copy_back() -> None:
        for original, copy in zip(tensors[:n_out], host[:n_out], strict=True):
            original.copy_(copy)
    return host, copy_back


def _then(*steps: Callable[[], None] | None) -> Callable[[], None]:
    def run() -> None:
        for step in steps:
            if step is not None:
                step()
    return run


# --------------------------------------------------------------------------- collectives


def all_reduce(t: torch.Tensor, op: ReduceOp = "sum", group: Group = None, async_op: bool = False) -> Handle:
    """Reduce `t` in place over `group` (op: sum, avg, max, min)."""
    _check_reducible(t, op, "all_reduce")
    if not _active(group):
        return _local(t)
    (buf,), copy_back = _staged([t], group)
    n = dist.get_world_size(group)
    divide = (lambda: buf.div_(n)) if op == "avg" else None
    return _issue("all_reduce", t.nbytes,
                  lambda: [dist.all_reduce(buf, _NATIVE_OPS[op], group=group, async_op=True)],
                  async_op, _then(divide, copy_back), t)


def all_gather_into_tensor(out: torch.Tensor, t: torch.Tensor, group: Group = None,
                           async_op: bool = False) -> Handle:
    """out (group size * t.numel() elements, rank-ordered) <- every rank's `t`."""
    n = group_size(group)
    if out.numel() != n * t.numel() or out.dtype != t.dtype:
        raise ValueError(f"all_gather_into_tensor: out has {out.numel()} {out.dtype} elements, "
                         f"need {n} x {t.numel()} {t.dtype}")
    if not _active(group):
        out.view(-1).copy_(t.reshape(-1))
        return _local(out)
    # Flat views: the backend then only needs equal-sized pieces, whatever the shapes.
    (out_buf, in_buf), copy_back = _staged([out.view(-1), t.reshape(-1)], group)
    return _issue("all_gather", t.nbytes,
                  lambda: [_all_gather_single(_movable(out_buf), _movable(in_buf), group=group,
                                              async_op=True)],
                  async_op, copy_back, out)


# Whether the backend has a native reduce_scatter; learnt at the first call (a missing op
# raises synchronously and identically on every rank, so all ranks fall back together).
_native_reduce_scatter: dict[str, bool] = {}


def reduce_scatter_tensor(out: torch.Tensor, t: torch.Tensor, op: ReduceOp = "sum", group: Group = None,
                          async_op: bool = False) -> Handle:
    """out <- this rank's slice (rank-ordered, t.numel() / group size elements) of the reduction of `t`."""
    _check_reducible(t, op, "reduce_scatter_tensor")
    n = group_size(group)
    if t.numel() != n * out.numel() or out.dtype != t.dtype:
        raise ValueError(f"reduce_scatter_tensor: input has {t.numel()} {t.dtype} elements, "
                         f"need {n} x out's {out.numel()} {out.dtype}")
    if not _active(group):
        out.view(-1).copy_(t.reshape(-1))
        return _local(out)
    backend = str(dist.get_backend(group))
    if _native_reduce_scatter.get(backend, True):
        (out_buf, in_buf), copy_back = _staged([out.view(-1), t.reshape(-1)], group)
        divide = (lambda: out_buf.div_(n)) if op == "avg" else None
        try:
            return _issue("reduce_scatter", t.nbytes,
                          lambda: [_reduce_scatter_single(out_buf, in_buf, _NATIVE_OPS[op], group=group,
                                                          async_op=True)],
                          async_op, _then(divide, copy_back), out)
        except (RuntimeError, NotImplementedError) as err:
            if "support" not in str(err).lower():
                raise
            _native_reduce_scatter[backend] = False
    return _reduce_scatter_via_all_reduce(out, t, op, group, async_op)


def _reduce_scatter_via_all_reduce(out: torch.Tensor, t: torch.Tensor, op: ReduceOp, group: Group,
                                   async_op: bool) -> Handle:
    """Fallback: all-reduce a copy of the whole input, keep this rank's slice. Twice the traffic
    of a real reduce-scatter, same result; booked as one reduce_scatter."""
    full = t.detach().reshape(-1).to("cpu" if _stages_via_host(t, group) else t.device, copy=True)
    n, me = dist.get_world_size(group), dist.get_rank(group)

    def take_slice() -> None:
        piece = full[me * out.numel():(me + 1) * out.numel()]
        out.view(-1).copy_(piece / n if op == "avg" else piece)
    return _issue("reduce_scatter", t.nbytes,
                  lambda: [dist.all_reduce(full, _NATIVE_OPS[op], group=group, async_op=True)],
                  async_op, take_slice, out)


def broadcast(t: torch.Tensor, src: int, group: Group = None, async_op: bool = False) -> Handle:
    """Every rank's `t` <- global rank `src`'s `t` (in place)."""
    if not _active(group):
        return _local(t)
    (buf,), copy_back = _staged([t], group)
    return _issue("broadcast", t.nbytes,
                  lambda: [dist.broadcast(_movable(buf), src, group=group, async_op=True)],
                  async_op, copy_back, t)


def all_to_all_single(out: torch.Tensor, t: torch.Tensor, out_splits: Sequence[int] | None = None,
                      in_splits: Sequence[int] | None = None, group: Group = None,
                      async_op: bool = False) -> Handle:
    """Rows (dim 0) of `t` go to ranks in rank order, `in_splits[j]` rows to rank j; `out`
    receives `out_splits[j]` rows from rank j. Uneven splits are fine; None means equal."""
    n = group_size(group)
    for name, splits, tensor in (("in_splits", in_splits, t), ("out_splits", out_splits, out)):
        if splits is not None and (len(splits) != n or sum(splits) != tensor.shape[0]):
            raise ValueError(f"all_to_all_single: {name}={list(splits)} must have {n} entries summing "
                             f"to the {tensor.shape[0]} rows of its tensor")
    if not _active(group):
        out.copy_(t)
        return _local(out)
    (out_buf, in_buf), copy_back = _staged([out, t.contiguous()], group)
    return _issue("all_to_all", t.nbytes,
                  lambda: [dist.all_to_all_single(_movable(out_buf), _movable(in_buf),
                                                  None if out_splits is None else list(out_splits),
                                                  None if in_splits is None else list(in_splits),
                                                  group=group, async_op=True)],
                  async_op, copy_back, out)


def barrier(group: Group = None, async_op: bool = False) -> Handle:
    if not _active(group):
        return _local()
    return _issue("barrier", 0, lambda: [dist.barrier(group=group, async_op=True)], async_op)


# --------------------------------------------------------------------------- point to point


def _need_peer(what: str) -> None:
    if not is_distributed():
        raise RuntimeError(f"{what}: no process group; point-to-point needs torch.distributed initialised")


def send(t: torch.Tensor, dst: int, group: Group = None, async_op: bool = False, tag: int = 0) -> Handle:
    """dst is a global rank. A tag tells apart several messages in flight between two ranks."""
    _need_peer("send")
    (buf,), _ = _staged([t.contiguous()], group, n_out=0)
    return _issue("send", t.nbytes, lambda: [dist.isend(_movable(buf), dst, group=group, tag=tag)], async_op)


def recv(t: torch.Tensor, src: int, group: Group = None, async_op: bool = False, tag: int = 0) -> Handle:
    _need_peer("recv")
    (buf,), copy_back = _staged([t], group)
    return _issue("recv", t.nbytes, lambda: [dist.irecv(_movable(buf), src, group=group, tag=tag)],
                  async_op, copy_back, t)


def new_group(ranks: Sequence[int]) -> Group:
    """A process group over `ranks` (global ranks). Collective: every rank of the world calls it
    with the same arguments in the same order; None when not distributed."""
    if not is_distributed():
        return None
    return dist.new_group(sorted(ranks))


P2P = tuple[Literal["send", "recv"], torch.Tensor, int]  # (direction, tensor, global peer rank)


def batch_isend_irecv(ops: Sequence[P2P], group: Group = None, async_op: bool = False) -> Handle:
    """Issue several sends/receives together (pairwise exchanges cannot deadlock on ordering).
    Booked as one "batch_p2p" call with the bytes of all its sends and receives."""
    _need_peer("batch_isend_irecv")
    if not ops:
        return _local()
    p2p_ops, copy_backs = [], []
    for direction, tensor, peer in ops:
        if direction not in ("send", "recv"):
            raise ValueError(f"batch_isend_irecv: direction {direction!r}; use 'send' or 'recv'")
        receive = direction == "recv"
        (buf,), copy_back = _staged([tensor if receive else tensor.contiguous()], group, int(receive))
        fn = dist.isend if direction == "send" else dist.irecv
        p2p_ops.append(dist.P2POp(fn, _movable(buf), peer, group=group))
        copy_backs.append(copy_back)
    nbytes = sum(tensor.nbytes for _, tensor, _ in ops)
    return _issue("batch_p2p", nbytes, lambda: dist.batch_isend_irecv(p2p_ops), async_op, _then(*copy_backs))
