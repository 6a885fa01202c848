"""parallel/comm.py's device contract (DESIGN.md rule 9) and its per-backend timings.

NCCL cannot run here (no GPU), so the NCCL side is checked in two honest halves: the pure
check `comm.check_devices` against tensors on real and fake CUDA devices
(FakeTensorMode makes device="cuda" tensors on a CPU-only machine), and every op of a real
two-rank gloo group with `comm.backend` standing in "nccl", which must refuse CPU tensors
before anything is issued. The same ops then run for real on gloo with CPU tensors. The
CUDA-event timings are checked for their bookkeeping (lazy resolution) with a stand-in timer;
whether CUDA events give the right number needs a GPU (benchmarks/gpu_check.sh territory).
"""

from __future__ import annotations

import inspect
import threading
import time

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from launch.ranks import run_ranks
from parallel import comm, watchdog
from parallel.mesh import NCCL_HANG_ENV, set_nccl_hang_env

OPS = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "all_to_all_single",
       "send", "recv", "batch_isend_irecv")


def _call(op: str, rank: int, device: str = "cpu") -> object:
    """Issue `op` once on a two-rank world with tensors on `device`; returns what it produced.
    Sends and receives pair up across the ranks, so a call that is not refused still matches."""
    t = torch.arange(4, dtype=torch.float32, device=device) + 10 * rank
    if op == "all_reduce":
        return comm.all_reduce(t).wait()
    if op == "all_gather_into_tensor":
        out = torch.empty(8, device=device)
        return comm.all_gather_into_tensor(out, t).wait()
    if op == "reduce_scatter_tensor":
        out = torch.empty(2, device=device)
        return comm.reduce_scatter_tensor(out, t).wait()
    if op == "broadcast":
        return comm.broadcast(t, src=1).wait()
    if op == "all_to_all_single":
        out = torch.empty(4, device=device)
        return comm.all_to_all_single(out, t).wait()
    if op == "send":  # rank 0 sends, rank 1 receives (the pair of the "send" case)
        return comm.send(t, 1).wait() if rank == 0 else comm.recv(t, 0).wait()
    if op == "recv":  # rank 1 sends, rank 0 receives
        return comm.recv(t, 1).wait() if rank == 0 else comm.send(t, 0).wait()
    if op == "batch_isend_irecv":
        got = torch.empty(4, device=device)
        comm.batch_isend_irecv([("send", t, 1 - rank), ("recv", got, 1 - rank)])
        return got
    raise AssertionError(op)


def _device_worker(rank: int, world: int) -> dict:
    out: dict = {"refused": {}, "real": {}}
    real_backend = comm.backend
    comm.backend = lambda group=None: "nccl"  # what the checks see; the group stays gloo
    try:
        for op in OPS:
            try:
                _call(op, rank)
                out["refused"][op] = None
            except comm.CollectiveDeviceError as err:
                out["refused"][op] = str(err)
    finally:
        comm.backend = real_backend
    out["backend"] = comm.backend()
    comm.reset_comm_stats()
    for op in OPS:  # CPU tensors on gloo: accepted and right
        result = _call(op, rank)
        out["real"][op] = None if result is None else result.clone()
    out["stats"] = comm.comm_stats()
    try:  # a meta tensor is on no backend's device
        comm.all_reduce(torch.empty(3, device="meta"))
        out["meta"] = None
    except comm.CollectiveDeviceError as err:
        out["meta"] = str(err)
    # Two messages in flight between the same pair, told apart by issue order alone (no tags).
    a, b = torch.full((2,), 1.0), torch.full((3,), 2.0)
    if rank == 0:
        handles = [comm.send(a, 1, async_op=True), comm.send(b, 1, async_op=True)]
    else:
        a, b = torch.empty(2), torch.empty(3)
        handles = [comm.recv(a, 0, async_op=True), comm.recv(b, 0, async_op=True)]
    for h in handles:
        h.wait()
    out["ordered"] = (a, b)
    timed = comm.all_reduce(torch.ones(2), async_op=True)
    time.sleep(0.2)
    timed.wait()
    out["handle_seconds"] = timed.seconds()
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_device_worker, 2, timeout_s=90)


def test_every_op_refuses_a_cpu_tensor_on_nccl_naming_op_backend_and_device(ranks):
    for rank, got in enumerate(ranks):
        for op in OPS:
            message = got["refused"][op]
            assert message is not None, f"rank {rank}: {op} took a CPU tensor on nccl"
            called = {"send": ("send", "recv"), "recv": ("recv", "send")}.get(op, (op, op))[rank]
            assert message.startswith(f"{called}: tensor on device cpu given to a nccl group"), message
            assert "needs tensors on cuda" in message
            assert "create it on comm.collective_device(group)" in message


def test_cpu_tensors_on_gloo_pass_and_every_op_is_right(ranks):
    r0, r1 = (got["real"] for got in ranks)
    base = torch.arange(4, dtype=torch.float32)
    assert ranks[0]["backend"] == ranks[1]["backend"] == "gloo"
    for rank, real in enumerate((r0, r1)):
        assert torch.equal(real["all_reduce"], 2 * base + 10)
        assert torch.equal(real["all_gather_into_tensor"], torch.cat([base, base + 10]))
        assert torch.equal(real["reduce_scatter_tensor"], (2 * base + 10)[2 * rank:2 * rank + 2])
        assert torch.equal(real["broadcast"], base + 10)
        assert torch.equal(real["all_to_all_single"],
                           torch.cat([base[2 * rank:2 * rank + 2], base[2 * rank:2 * rank + 2] + 10]))
        assert torch.equal(real["batch_isend_irecv"], base + 10 * (1 - rank))
    assert torch.equal(r1["send"], base) and torch.equal(r0["recv"], base + 10)  # received what the peer sent
    stats = ranks[0]["stats"]
    assert {k: v["calls"] for k, v in stats.items()} == {
        "all_reduce": 1, "all_gather": 1, "reduce_scatter": 1, "broadcast": 1, "all_to_all": 1,
        "send": 1, "recv": 1, "batch_p2p": 1}
    assert all(v["seconds"] > 0 for v in stats.values())  # host clock on CPU tensors


def test_a_meta_tensor_is_refused_on_gloo_too(ranks):
    message = ranks[0]["meta"]
    assert message and message.startswith("all_reduce: tensor on device meta given to a gloo group")
    assert "needs tensors on cpu or cuda" in message


def test_p2p_has_no_tags_and_matches_in_issue_order(ranks):
    for fn in (comm.send, comm.recv):
        assert "tag" not in inspect.signature(fn).parameters
    a, b = ranks[1]["ordered"]
    assert torch.equal(a, torch.full((2,), 1.0)) and torch.equal(b, torch.full((3,), 2.0))


def test_handle_seconds_is_the_measured_time_of_one_op(ranks):
    # issue -> wait, on the host clock: covers the peer's deliberate 0.2 s delay (a sleep's lower
    # bound cannot flake; no upper bound, which would depend on the machine's load)
    assert all(got["handle_seconds"] >= 0.2 for got in ranks)


def test_the_pure_check_per_backend_with_fake_cuda_tensors():
    with FakeTensorMode():
        cuda = torch.empty(4, device="cuda")
    cpu, meta = torch.empty(4), torch.empty(4, device="meta")
    assert cuda.device.type == "cuda"
    comm.check_devices("all_reduce", "nccl", [cuda, cuda])
    comm.check_devices("all_reduce", "gloo", [cuda, cpu])  # gloo stages CUDA tensors through the host
    comm.check_devices("all_reduce", "mpi", [meta])  # other backends are not checked
    for backend, bad in (("nccl", cpu), ("nccl", meta), ("gloo", meta)):
        with pytest.raises(comm.CollectiveDeviceError) as err:
            comm.check_devices("send", backend, [cuda, bad])
        assert str(err.value).startswith(f"send: tensor on device {bad.device} given to a {backend} group")


class _DeviceTimer:
    """Stands in for a CUDA-event Timer: counts how often its (blocking) seconds() is read."""

    on_device = True

    def __init__(self, seconds: float, done: bool = True) -> None:
        self.value, self.done, self.reads = seconds, done, 0

    def ready(self) -> bool:
        return self.done

    def seconds(self) -> float:
        self.reads += 1
        return self.value


def test_device_timings_are_resolved_lazily_when_the_stats_are_read(monkeypatch):
    comm.reset_comm_stats()
    timers = [_DeviceTimer(0.25), _DeviceTimer(0.5)]
    for timer in timers:
        comm._book("all_to_all", 100, timer)
    host = comm.Timer()
    time.sleep(0.01)
    comm._book("all_reduce", 8, host.stop())
    assert [t.reads for t in timers] == [0, 0]  # nothing synchronised while training
    stats = comm.comm_stats()
    assert stats["all_to_all"] == {"calls": 2, "bytes": 200, "seconds": 0.75}
    assert stats["all_reduce"]["seconds"] >= 0.01 and not host.on_device
    assert [t.reads for t in timers] == [1, 1]
    assert comm.comm_stats()["all_to_all"]["seconds"] == 0.75  # resolved once
    # Past _DRAIN_AT unresolved timers, the finished ones are drained without blocking.
    comm.reset_comm_stats()
    monkeypatch.setattr(comm, "_DRAIN_AT", 3)
    late = _DeviceTimer(1.0, done=False)
    for timer in (late, _DeviceTimer(0.5), _DeviceTimer(0.25)):
        comm._book("batch_p2p", 1, timer)
    assert late.reads == 0 and len(comm._unresolved) == 1
    assert comm.comm_stats()["batch_p2p"]["seconds"] == 1.75
    comm.reset_comm_stats()


def test_host_timer_and_handle_seconds_contract():
    timer = comm.Timer("cpu")
    time.sleep(0.02)
    assert timer.stop().ready() and timer.seconds() >= 0.02  # covers the sleep; no upper bound
    with pytest.raises(RuntimeError, match="not stopped"):
        _unstopped_seconds()
    handle = comm.Handle("all_reduce", 4)
    with pytest.raises(RuntimeError, match="wait"):
        handle.seconds()
    assert comm.all_reduce(torch.ones(2)).seconds() == 0.0  # a local no-op (no process group)


def _unstopped_seconds() -> float:
    # A device timer that was never stopped; built without CUDA by leaving _start a fake event.
    timer = comm.Timer.__new__(comm.Timer)
    timer._start, timer._end, timer._seconds, timer._device = object(), None, None, None
    return timer.seconds()


def test_watchdog_arms_its_host_clock_check_only_off_nccl():
    assert watchdog.arm(5.0, 0, backend="nccl") is False
    assert not watchdog.armed() and watchdog.enter("all_reduce") is None
    try:
        assert watchdog.arm(5.0, 0, backend="gloo") is True and watchdog.armed()
        token = watchdog.enter("all_reduce")
        assert token == threading.get_ident()
        watchdog.leave(token)
    finally:
        watchdog.disarm()
    assert watchdog.arm(5.0, 0) is True  # no process group: asks comm, which says "" (not nccl)
    watchdog.disarm()


def test_nccl_hang_env_fills_in_only_what_the_user_left_unset():
    env = {"TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}
    set_nccl_hang_env(env)
    assert env == {**NCCL_HANG_ENV, "TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}
    assert NCCL_HANG_ENV["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    env = {"TORCH_FR_BUFFER_SIZE": "500"}  # the newer name of the trace buffer's size
    set_nccl_hang_env(env)
    assert "TORCH_NCCL_TRACE_BUFFER_SIZE" not in env and env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
