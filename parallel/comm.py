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

Devices (DESIGN.md rule 9): every tensor handed to an op must live where the group's backend
works -- a CUDA tensor for NCCL, a CPU tensor for gloo, or a CUDA tensor that gloo stages
through the host. Every op checks this on every call (one device-type comparison per tensor)
and raises `CollectiveDeviceError` naming the op, the backend and the tensor's device; the fix
is to create the tensor on `collective_device(group)` (not on the CPU and moved later: gloo on
CPU forgives that, NCCL does not). Backends other than nccl and gloo are not checked.

P2P: `send`, `recv` and `batch_isend_irecv` take no tag. NCCL ignores tags and matches a pair
of ranks' operations strictly in issue order, so nothing here may rely on them (gloo would).

Every op takes `async_op`; it always returns a `Handle` whose `wait()` finishes the op (divide,
copy back, slice) and books the op. A synchronous call returns a handle that is already complete.

Timings: an op's seconds run from its issue until its result is usable, and are measured where
the work runs:

- on CUDA tensors (NCCL, or gloo staging through the host) with CUDA events on the current
  stream: a start event at issue, an end event after `work.wait()` (which makes the current
  stream wait for NCCL's stream) and the copy back. NCCL's `wait()` returns to the host at
  once, so the host clock around it would measure nothing. The events are kept and resolved
  (synchronised) lazily, when `comm_stats()` is read or `Handle.seconds()` is asked, never in
  the step; a long run with nobody reading drains the finished ones without blocking.
- on CPU tensors (gloo) with the host clock, from issue until `wait()` returns.

An async op that overlaps computation counts its whole time in flight on both paths (on CUDA,
also the work queued on the current stream between issue and wait). `Timer` is the same
measurement for any span (e.g. the exposed part of a wait): CUDA events on a CUDA device, the
host clock elsewhere; `Handle.seconds()` is the measured time of one finished op.

Groups: `group=None` means the default (world) group when torch.distributed is initialised.
When there is nobody to talk to -- no process group at all (a single process) or a group of
one -- every op is a local no-op (outputs get the input copied where that is the result), so
single-process code runs the same calls (the device check still runs for a group of one).
Peer and source ranks are *global* ranks, as in torch.distributed.
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

# --------------------------------------------------------------------------- timers


class Timer:
    """The elapsed time of a span of work, measured where the work runs: CUDA events on the
    current stream of a CUDA `device`, the host clock otherwise (device None or CPU).

        timer = comm.Timer(x.device)   # starts now
        ...                            # issue work, wait on a handle
        timer.stop()
        timer.seconds()                # on CUDA: synchronises on the end event, once

    `seconds()` blocks until the span's work has run; call it when the figure is read, not in
    the step. `ready()` tells without blocking whether it would return at once.
    """

    __slots__ = ("_device", "_start", "_end", "_seconds")

    def __init__(self, device: torch.device | str | None = None) -> None:
        self._end: torch.cuda.Event | None = None
        self._seconds: float | None = None
        self._device = None if device is None else torch.device(device)
        if self._device is not None and self._device.type == "cuda":
            self._start: torch.cuda.Event | float = torch.cuda.Event(enable_timing=True)
            self._start.record(torch.cuda.current_stream(self._device))
        else:
            self._start = time.perf_counter()

    @property
    def on_device(self) -> bool:
        """Whether this timer reads CUDA events (else the host clock)."""
        return not isinstance(self._start, float)

    def stop(self) -> Timer:
        if isinstance(self._start, float):
            self._seconds = time.perf_counter() - self._start
        else:
            self._end = torch.cuda.Event(enable_timing=True)
            self._end.record(torch.cuda.current_stream(self._device))
        return self

    def ready(self) -> bool:
        """Whether seconds() would return without waiting for the GPU."""
        return self._seconds is not None or (self._end is not None and self._end.query())

    def seconds(self) -> float:
        if self._seconds is None:
            if self._end is None:
                raise RuntimeError("Timer.seconds(): the timer was not stopped")
            self._end.synchronize()
            self._seconds = self._start.elapsed_time(self._end) / 1e3  # ms -> s
        return self._seconds


# --------------------------------------------------------------------------- counters

_stats_lock = threading.Lock()  # autograd hooks may issue ops from another thread (CUDA)
_stats: dict[str, dict[str, float]] = {}
_unresolved: list[tuple[str, Timer]] = []  # device-timed ops whose seconds are not read yet
_DRAIN_AT = 1024  # unresolved timers kept before the finished ones are drained (non-blocking)


def _book(kind: str, nbytes: int, timer: Timer) -> None:
    with _stats_lock:
        entry = _stats.setdefault(kind, {"calls": 0, "bytes": 0, "seconds": 0.0})
        entry["calls"] += 1
        entry["bytes"] += nbytes
        if timer.on_device:
            _unresolved.append((kind, timer))
            if len(_unresolved) >= _DRAIN_AT:
                _resolve(block=False)
        else:
            entry["seconds"] += timer.seconds()


def _resolve(block: bool) -> None:
    """Add the seconds of unresolved device timers (all of them, or only the finished ones).
    Called with _stats_lock held."""
    keep = []
    for kind, timer in _unresolved:
        if block or timer.ready():
            _stats[kind]["seconds"] += timer.seconds()
        else:
            keep.append((kind, timer))
    _unresolved[:] = keep


def comm_stats() -> dict[str, dict[str, float]]:
    """{op kind: {"calls", "bytes", "seconds"}} since the last reset (a copy).

    bytes is the payload this rank hands to the op (for recv and broadcast receivers: the
    payload it receives); seconds runs from issue until the result is usable (CUDA events for
    CUDA tensors, resolved here, which synchronises on them; the host clock until wait()
    returns for CPU tensors). Ops that are local no-ops (nobody to talk to) are not counted.
    """
    with _stats_lock:
        _resolve(block=True)
        return {kind: dict(entry) for kind, entry in _stats.items()}


def reset_comm_stats() -> None:
    with _stats_lock:
        _stats.clear()
        _unresolved.clear()


# --------------------------------------------------------------------------- handles


class Handle:
    """A communication in flight (or finished). `wait()` is idempotent and returns `result`;
    `seconds()` is the op's measured time once it has been waited."""

    def __init__(self, kind: str, nbytes: int, works: Sequence[dist.Work] = (),
                 finish: Callable[[], None] | None = None, result: torch.Tensor | None = None,
                 timer: Timer | None = None) -> None:
        self.kind, self.nbytes, self.result = kind, nbytes, result
        self._works, self._finish = list(works), finish
        self._timer = Timer() if timer is None else timer
        self._done = False

    def wait(self) -> torch.Tensor | None:
        if not self._done:
            token = watchdog.enter(self.kind)  # hang detection on the host clock (parallel/watchdog.py)
            try:
                for work in self._works:
                    work.wait()  # NCCL: makes the current stream wait, returns to the host at once
            finally:
                watchdog.leave(token)
            if self._finish is not None:
                self._finish()
            self._timer.stop()
            self._done = True
            if self.kind:  # an empty kind marks a local no-op: nothing is booked
                _book(self.kind, self.nbytes, self._timer)
        return self.result

    def is_completed(self) -> bool:
        return self._done or all(work.is_completed() for work in self._works)

    def seconds(self) -> float:
        """Seconds from issue until the result was usable, measured per backend (CUDA events
        for CUDA tensors -- this synchronises on the op's end event -- else the host clock);
        0.0 for a local no-op. The op must have been waited."""
        if not self._done:
            raise RuntimeError(f"Handle.seconds(): wait() for the {self.kind or 'local'} op first")
        return self._timer.seconds() if self.kind else 0.0


def _local(result: torch.Tensor | None = None) -> Handle:
    """A finished handle for an op with nobody to talk to."""
    handle = Handle("", 0, result=result)
    handle._done = True
    return handle


def _issue(kind: str, nbytes: int, launch: Callable[[], Sequence[dist.Work]], async_op: bool,
           finish: Callable[[], None] | None = None, result: torch.Tensor | None = None,
           timer: Timer | None = None) -> Handle:
    """Launch an op; `timer` was started before any host staging (which is part of the op)."""
    timer = Timer() if timer is None else timer
    handle = Handle(kind, nbytes, launch(), finish, result, timer)
    if not async_op:
        handle.wait()
    return handle


def _timer(tensors: Sequence[torch.Tensor]) -> Timer:
    """A timer started now, on the first CUDA tensor's device if there is one."""
    for t in tensors:
        if t.device.type == "cuda":
            return Timer(t.device)
    return Timer()


# --------------------------------------------------------------------------- helpers


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_size(group: Group = None) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


def group_rank(group: Group = None) -> int:
    return dist.get_rank(group) if is_distributed() else 0


def global_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def backend(group: Group = None) -> str:
    """`group`'s backend ("nccl", "gloo", ...); "" without a process group. The one place this
    module reads it, so tests can stand in another backend."""
    return str(dist.get_backend(group)) if is_distributed() else ""


def collective_device(group: Group = None) -> torch.device:
    """Where tensors made for a collective (a loss, a norm, a buffer) must live for `group`'s backend."""
    if backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class CollectiveDeviceError(RuntimeError):
    """A tensor handed to a collective or P2P op does not live where the group's backend works."""


# The device types each backend takes. gloo also takes CUDA tensors: it stages them through
# host memory (the simulated launch mode). Backends not listed are not checked.
_DEVICE_TYPES = {"nccl": ("cuda",), "gloo": ("cpu", "cuda")}


def check_devices(op: str, backend_name: str, tensors: Sequence[torch.Tensor]) -> None:
    """Raise CollectiveDeviceError unless every tensor's device type suits `backend_name`."""
    allowed = _DEVICE_TYPES.get(backend_name)
    if allowed is None:
        return
    for t in tensors:
        if t.device.type not in allowed:
            want = " or ".join(allowed)
            raise CollectiveDeviceError(
                f"{op}: tensor on device {t.device} given to a {backend_name} group, which needs tensors "
                f"on {want}; create it on comm.collective_device(group) (not on the CPU and moved later)")


def _check(op: str, group: Group, *tensors: torch.Tensor) -> None:
    if is_distributed():
        check_devices(op, backend(group), tensors)


def _active(group: Group) -> bool:
    return is_distributed() and dist.get_world_size(group) > 1


def _stages_via_host(t: torch.Tensor, group: Group) -> bool:
    return t.device.type != "cpu" and backend(group) == "gloo"


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
    _check("all_reduce", group, t)
    if not _active(group):
        return _local(t)
    timer = _timer([t])
    (buf,), copy_back = _staged([t], group)
    n = dist.get_world_size(group)
    divide = (lambda: buf.div_(n)) if op == "avg" else None
    return _issue("all_reduce", t.nbytes,
                  lambda: [dist.all_reduce(buf, _NATIVE_OPS[op], group=group, async_op=True)],
                  async_op, _then(divide, copy_back), t, timer)


def all_gather_into_tensor(out: torch.Tensor, t: torch.Tensor, group: Group = None,
                           async_op: bool = False) -> Handle:
    """out (group size * t.numel() elements, rank-ordered) <- every rank's `t`."""
    n = group_size(group)
    if out.numel() != n * t.numel() or out.dtype != t.dtype:
        raise ValueError(f"all_gather_into_tensor: out has {out.numel()} {out.dtype} elements, "
                         f"need {n} x {t.numel()} {t.dtype}")
    _check("all_gather_into_tensor", group, out, t)
    if not _active(group):
        out.view(-1).copy_(t.reshape(-1))
        return _local(out)
    timer = _timer([out, t])
    # Flat views: the backend then only needs equal-sized pieces, whatever the shapes.
    (out_buf, in_buf), copy_back = _staged([out.view(-1), t.reshape(-1)], group)
    return _issue("all_gather", t.nbytes,
                  lambda: [_all_gather_single(_movable(out_buf), _movable(in_buf), group=group,
                                              async_op=True)],
                  async_op, copy_back, out, timer)


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
    _check("reduce_scatter_tensor", group, out, t)
    if not _active(group):
        out.view(-1).copy_(t.reshape(-1))
        return _local(out)
    name = backend(group)
    if _native_reduce_scatter.get(name, True):
        timer = _timer([out, t])
        (out_buf, in_buf), copy_back = _staged([out.view(-1), t.reshape(-1)], group)
        divide = (lambda: out_buf.div_(n)) if op == "avg" else None
        try:
            return _issue("reduce_scatter", t.nbytes,
                          lambda: [_reduce_scatter_single(out_buf, in_buf, _NATIVE_OPS[op], group=group,
                                                          async_op=True)],
                          async_op, _then(divide, copy_back), out, timer)
        except (RuntimeError, NotImplementedError) as err:
            if "support" not in str(err).lower():
                raise
            _native_reduce_scatter[name] = False
    return _reduce_scatter_via_all_reduce(out, t, op, group, async_op)


def _reduce_scatter_via_all_reduce(out: torch.Tensor, t: torch.Tensor, op: ReduceOp, group: Group,
                                   async_op: bool) -> Handle:
    """Fallback: all-reduce a copy of the whole input, keep this rank's slice. Twice the traffic
    of a real reduce-scatter, same result; booked as one reduce_scatter."""
    timer = _timer([out, t])
    full = t.detach().reshape(-1).to("cpu" if _stages_via_host(t, group) else t.device, copy=True)
    n, me = dist.get_world_size(group), dist.get_rank(group)

    def take_slice() -> None:
        piece = full[me * out.numel():(me + 1) * out.numel()]
        out.view(-1).copy_(piece / n if op == "avg" else piece)
    return _issue("reduce_scatter", t.nbytes,
                  lambda: [dist.all_reduce(full, _NATIVE_OPS[op], group=group, async_op=True)],
                  async_op, take_slice, out, timer)


def broadcast(t: torch.Tensor, src: int, group: Group = None, async_op: bool = False) -> Handle:
    """Every rank's `t` <- global rank `src`'s `t` (in place)."""
    _check("broadcast", group, t)
    if not _active(group):
        return _local(t)
    timer = _timer([t])
    (buf,), copy_back = _staged([t], group)
    return _issue("broadcast", t.nbytes,
                  lambda: [dist.broadcast(_movable(buf), src, group=group, async_op=True)],
                  async_op, copy_back, t, timer)


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
    _check("all_to_all_single", group, out, t)
    if not _active(group):
        out.copy_(t)
        return _local(out)
    timer = _timer([out, t])
    (out_buf, in_buf), copy_back = _staged([out, t.contiguous()], group)
    return _issue("all_to_all", t.nbytes,
                  lambda: [dist.all_to_all_single(_movable(out_buf), _movable(in_buf),
                                                  None if out_splits is None else list(out_splits),
                                                  None if in_splits is None else list(in_splits),
                                                  group=group, async_op=True)],
                  async_op, copy_back, out, timer)


def all_gather_objects(items: list, group: Group = None) -> list:
    """Every rank's list of picklable items, concatenated in group-rank order (host-side, for
    small control data such as post-training's rejection-sampled rows; gloo groups only)."""
    if not _active(group):
        return list(items)
    parts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, items, group=group)
    return [x for part in parts for x in part]


def barrier(group: Group = None, async_op: bool = False) -> Handle:
    if not _active(group):
        return _local()
    return _issue("barrier", 0, lambda: [dist.barrier(group=group, async_op=True)], async_op)


# --------------------------------------------------------------------------- point to point


def _need_peer(what: str) -> None:
    if not is_distributed():
        raise RuntimeError(f"{what}: no process group; point-to-point needs torch.distributed initialised")


def send(t: torch.Tensor, dst: int, group: Group = None, async_op: bool = False) -> Handle:
    """dst is a global rank. No tag: NCCL matches a pair of ranks' sends and receives strictly
    in issue order, so two messages in flight between the same ranks are told apart by order."""
    _need_peer("send")
    _check("send", group, t)
    timer = _timer([t])
    (buf,), _ = _staged([t.contiguous()], group, n_out=0)
    return _issue("send", t.nbytes, lambda: [dist.isend(_movable(buf), dst, group=group)], async_op,
                  timer=timer)


def recv(t: torch.Tensor, src: int, group: Group = None, async_op: bool = False) -> Handle:
    """src is a global rank; receives the next message from it in issue order (no tag)."""
    _need_peer("recv")
    _check("recv", group, t)
    timer = _timer([t])
    (buf,), copy_back = _staged([t], group)
    return _issue("recv", t.nbytes, lambda: [dist.irecv(_movable(buf), src, group=group)],
                  async_op, copy_back, t, timer)


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
    _check("batch_isend_irecv", group, *(tensor for _, tensor, _ in ops))
    if not ops:
        return _local()
    timer = _timer([tensor for _, tensor, _ in ops])
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
    return _issue("batch_p2p", nbytes, lambda: dist.batch_isend_irecv(p2p_ops), async_op, _then(*copy_backs),
                  timer=timer)
