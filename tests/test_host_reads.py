"""Sync-free experts: one host read per dispatch, none in the experts, combine or backward.

A device-to-host read stalls the host until the accelerator has caught up, so DESIGN.md rule 9
allows one per dispatch (the counts that size its buffers) and none elsewhere in a layer.
`HostReads` counts them on CPU: a TorchDispatchMode catches the ops that read a tensor's
values on the host (`_local_scalar_dense` behind item/int/bool, nonzero, boolean-mask index
and index_put, bincount, unique, masked_select, equal, repeat_interleave without output_size)
and a patch of Tensor.tolist catches what the mode cannot see. Each read is booked to the phase
running it: dispatch, experts, combine (wrappers set by `label`), or backward.

Also here: the grouped experts against a plain per-(token, k) loop written in this file
(grouped path with and without host counts, an expert with no rows, unaligned dims that force
the split fallback, rows past the last offset poisoned with NaN, deferred weight gradients),
and the FP8 experts' padded layout against duet_kernels.fp8.contiguous_layout.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from duet_kernels.fp8 import contiguous_layout
from framework.config import ModelConfig
from framework.fp8 import PaddedLayout
from framework.model.init import draw_seed, init_weights
from framework.model.moe import GroupedExperts, MoE
from launch.ranks import run_ranks
from parallel.pipeline.wgrad import SplitGroupedExperts, capture

D, INNER, E, TOPK, LAYERS = 32, 16, 8, 3, 2
TOL = 1e-6  # fp32, relative to the largest value: only the summation order differs from the loops


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    scale = float(want.detach().abs().max().clamp_min(1))
    torch.testing.assert_close(got, want, rtol=0, atol=TOL * scale, msg=what)


_ALWAYS = {"_local_scalar_dense", "item", "nonzero", "bincount", "unique", "_unique", "_unique2",
           "unique_dim", "unique_consecutive", "masked_select", "equal", "is_nonzero"}


def _is_host_read(func, args, kwargs) -> bool:
    name = func._schema.name.split("::")[-1]
    if name in _ALWAYS:
        return True
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(t is not None and t.dtype == torch.bool for t in indices)
    if name == "repeat_interleave":  # a tensor of repeats: its sum sizes the output, unless given
        repeats = args[0] if func._overloadname == "Tensor" else (args[1] if len(args) > 1 else None)
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    return False


class HostReads(TorchDispatchMode):
    """reads[phase]: host reads seen in each phase; ops: (phase, op) of every op, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "other"
        self.reads: Counter[str] = Counter()
        self.ops: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append((self.phase, str(func)))
        if _is_host_read(func, args, kwargs):
            self.reads[self.phase] += 1
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def counting(self):
        original, mode, inside = torch.Tensor.tolist, self, []

        def tolist(t):  # a method of the C tensor: the dispatch mode never sees it
            if inside:  # re-entered through a torch-function mode (the default-device one)
                return original(t)
            mode.reads[mode.phase] += 1
            mode.ops.append((mode.phase, "tolist"))
            inside.append(True)
            try:
                return original(t)
            finally:
                inside.pop()

        torch.Tensor.tolist = tolist
        try:
            with self:
                yield self
        finally:
            torch.Tensor.tolist = original


def label(counter: HostReads, phase: str, fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        previous, counter.phase = counter.phase, phase
        try:
            return fn(*args, **kwargs)
        finally:
            counter.phase = previous
    return wrapped


def label_layers(model: nn.Module, counter: HostReads) -> None:
    """Book each MoE layer's dispatcher calls and experts to their phases (instance attributes
    shadow the methods; nn.Module.__call__ finds the experts' forward there too)."""
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        d = moe.dispatcher
        for name, phase in (("dispatch_start", "dispatch"), ("dispatch_wait", "dispatch"),
                            ("combine_start", "combine"), ("combine_wait", "combine")):
            setattr(d, name, label(counter, phase, getattr(d, name)))
        moe.experts.forward = label(counter, "experts", moe.experts.forward)


def moe_cfg(dim: int = D, inter: int = INNER) -> ModelConfig:
    return ModelConfig(dim=dim, n_routed_experts=E, n_activated_experts=TOPK, moe_inter_dim=inter,
                       n_shared_experts=1, n_expert_groups=4, n_limited_groups=2, seq_aux_alpha=0.0)


def make_layers(dim: int = D, inter: int = INNER) -> nn.Sequential:
    torch.manual_seed(0)
    layers = nn.Sequential(*(MoE(moe_cfg(dim, inter)) for _ in range(LAYERS)))
    for layer in layers:
        init_weights(layer, draw_seed(), 0.2)
    return layers.train()  # training: the router also counts its load


def batch(rank: int, dim: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(2, 5, dim, generator=g), torch.randn(2, 5, dim, generator=g)


def count_step(model: nn.Module, x: torch.Tensor, c: torch.Tensor, strict_device: bool = False) -> HostReads:
    """One forward and backward under the counter. strict_device: the default device is `meta`
    meanwhile, so a tensor made without naming a device (a CPU tensor on an accelerator run)
    could not reach a collective or the math without failing."""
    counter = HostReads()
    label_layers(model, counter)
    default = torch.get_default_device()
    default = None if default.type == "cpu" else default  # None: no device mode left behind
    with counter.counting():
        if strict_device:
            torch.set_default_device("meta")
        try:
            counter.phase = "forward"
            out = model(x)
            counter.phase = "backward"
            (out * c).sum().backward()
        finally:
            torch.set_default_device(default)
    counter.out = out.detach()
    return counter


# ----------------------------------------------------------------------------- under ep = 2


def ep_worker(rank: int, world: int) -> dict:
    from parallel.expert_parallel import shard_experts
    from parallel.mesh import Layout, build_mesh

    model = shard_experts(make_layers(), build_mesh(Layout(1, world, world)))
    x, c = batch(rank)
    x.requires_grad_(True)
    counter = count_step(model, x, c, strict_device=True)
    dispatch_ops = [op for phase, op in counter.ops if phase == "dispatch"]
    return {"reads": dict(counter.reads), "dispatch_ops": dispatch_ops, "out": counter.out, "x_grad": x.grad,
            "expert_grads": [[w.grad for w in (m.experts.w1, m.experts.w2, m.experts.w3)] for m in model]}


@pytest.fixture(scope="module")
def spawned():
    return run_ranks(ep_worker, 2)


def test_one_host_read_per_dispatch(spawned):
    for r in spawned:
        # Exactly one per MoE layer, in its dispatch; none in the experts, combine, the rest
        # of the forward (router, shared expert) or backward.
        assert r["reads"] == {"dispatch": LAYERS}, r["reads"]
        # Each dispatch: the count all-to-all is issued and the send layout sorted on the device
        # before the read; the three payload all-to-alls (x, ids, weights) follow it.
        marks = {"c10d.alltoall_base_.default": "a2a", "aten.sort.stable": "sort", "tolist": "read"}
        seen = [marks[op] for op in r["dispatch_ops"] if op in marks]
        assert seen == ["a2a", "sort", "read", "a2a", "a2a", "a2a"] * LAYERS, seen


def plain_experts(ex: GroupedExperts, x_ND, idx_NK, w_NK) -> torch.Tensor:
    """The routed experts written out: for each expert, its (token, k) pairs found in Python,
    its SwiGLU on those rows, weighted and added back to the tokens."""
    out = torch.zeros_like(x_ND)
    N, K = idx_NK.shape
    for e in range(ex.w1.shape[0]):
        pairs = [(t, k) for t in range(N) for k in range(K) if int(idx_NK[t, k]) == e]
        if not pairs:
            continue
        token, slot = torch.tensor([t for t, _ in pairs]), torch.tensor([k for _, k in pairs])
        xe = x_ND[token]
        ye = (F.silu(xe @ ex.w1[e].T) * (xe @ ex.w3[e].T)) @ ex.w2[e].T
        out = out.index_add(0, token, ye * w_NK[token, slot][:, None])
    return out


def plain_moe(layer: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    idx_TK, w_TK, _ = layer.router(x_TD)
    return plain_experts(layer.experts, x_TD, idx_TK, w_TK) + layer.shared(x_TD)


def test_ep_equals_plain_reference(spawned):
    model = make_layers()
    xs, cs = zip(*(batch(r) for r in range(2)))
    x = torch.cat(xs).requires_grad_(True)
    h = x.reshape(-1, D)
    for layer in model:
        h = plain_moe(layer, h)
    (h * torch.cat(cs).reshape(-1, D)).sum().backward()
    assert_close(torch.cat([r["out"] for r in spawned]).reshape(-1, D), h.detach(), "out")
    assert_close(torch.cat([r["x_grad"] for r in spawned]), x.grad, "x.grad")
    L = E // 2
    for i, layer in enumerate(model):
        for j, w in enumerate((layer.experts.w1, layer.experts.w2, layer.experts.w3)):
            got = torch.cat([torch.zeros(L, *w.shape[1:]) if r["expert_grads"][i][j] is None
                             else r["expert_grads"][i][j] for r in spawned])
            assert_close(got, w.grad, f"layer {i} w{j + 1}")


# ----------------------------------------------------------------------------- one process


def test_local_dispatcher_reads_nothing():
    """The local dispatcher knows the pair count (N * K) from shapes: with grouped GEMMs the
    whole layer reads nothing back, forward or backward."""
    model = make_layers()
    x, c = batch(0)
    counter = count_step(model, x.requires_grad_(True), c, strict_device=True)
    assert sum(counter.reads.values()) == 0, counter.reads
    assert any(op == "aten._grouped_mm.default" for _, op in counter.ops)


def test_local_fallback_reads_once_per_layer():
    """Unaligned dims (D = 10, I = 6: 40- and 24-byte rows) force the split fallback, which needs
    host counts; without a handle's, the experts read them once per layer, backward none."""
    model = make_layers(10, 6)
    x, c = batch(0, 10)
    counter = count_step(model, x.requires_grad_(True), c)
    assert counter.reads == {"experts": LAYERS}, counter.reads
    assert not any(op == "aten._grouped_mm.default" for _, op in counter.ops)


def routed(dim: int):
    """12 rows, top-2 local ids; expert 1 gets no pair, -1 marks experts on other ranks."""
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(-1, 4, (12, 2), generator=g)
    idx[idx == 1] = 3
    x = torch.randn(12, dim, generator=g)
    w = torch.rand(12, 2, generator=g)
    counts = [int((idx == e).sum()) for e in range(4)]
    return x, idx, w, counts


@contextlib.contextmanager
def poisoned_grouped_mm(calls: list):
    """torch._grouped_mm that fills the rows past its last offset with NaN (what uninitialised
    memory may hold), counting its calls."""
    original = torch._grouped_mm

    def poisoned(a, b, offs=None, **kw):
        calls.append(a.shape)
        out = original(a, b, offs=offs, **kw)
        if a.dim() == 2 and b.dim() == 3:
            out[int(offs[-1]):] = float("nan")
        return out

    torch._grouped_mm = poisoned
    try:
        yield
    finally:
        torch._grouped_mm = original


@pytest.mark.parametrize("split", [False, True], ids=["autograd", "deferred"])
@pytest.mark.parametrize("dim,inner,hint", [(D, INNER, "none"), (D, INNER, "counts"), (D, INNER, "rows"),
                                            (10, 6, "none"), (10, 6, "counts")])
def test_experts_equal_plain_loop(dim, inner, hint, split):
    torch.manual_seed(1)
    ex = GroupedExperts(4, dim, inner)
    init_weights(ex, draw_seed(), 0.3)
    if split:
        ex.__class__ = SplitGroupedExperts
    x, idx, w, counts = routed(dim)
    if hint == "rows":  # every pair local, as the local dispatcher guarantees
        idx = idx.abs() % 4
        idx[idx == 1] = 2
        counts = [int((idx == e).sum()) for e in range(4)]
    assert counts[1] == 0 and (hint == "rows" or (idx < 0).any())
    x.requires_grad_(True)
    w.requires_grad_(True)
    g = torch.randn(12, dim, generator=torch.Generator().manual_seed(4))
    params = [x, w, ex.w1, ex.w2, ex.w3]
    want = plain_experts(ex, x, idx, w)
    want_grads = torch.autograd.grad(want, params, g)
    kwargs = {"none": {}, "counts": {"counts_E": counts}, "rows": {"rows": sum(counts)}}[hint]
    calls = []
    with poisoned_grouped_mm(calls), capture() as work:
        y = ex(x, idx, w, **kwargs)
        y.backward(g)
        if split:  # weight gradients queued until the W step
            assert ex.w1.grad is None and len(work.closures) == 3
        work.run()
    assert bool(calls) == (dim == D)  # aligned: grouped GEMMs; unaligned: the split fallback
    assert_close(y, want)
    for got, ref, name in zip([p.grad for p in params], want_grads, ("x", "w", "w1", "w2", "w3")):
        assert torch.isfinite(got).all(), name
        assert_close(got, ref, name)


def test_experts_with_counts_read_nothing():
    """Given the handle's host counts the experts read nothing, on either path."""
    for dim, inner in ((D, INNER), (10, 6)):
        ex = GroupedExperts(4, dim, inner)
        init_weights(ex, draw_seed(), 0.3)
        x, idx, w, counts = routed(dim)
        counter = HostReads()
        with counter.counting():
            ex(x.requires_grad_(True), idx, w, counts).sum().backward()
        assert sum(counter.reads.values()) == 0, (dim, counter.reads)


def test_fp8_padded_layout_matches_contiguous_layout():
    """framework.fp8's layout for rows already sorted by expert, built from the handle's host
    counts without a read, equals duet_kernels.fp8.contiguous_layout's (which reads its sizes)."""
    counts = [130, 0, 5, 128]
    expert_M = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    want = contiguous_layout(expert_M, 4)
    counter = HostReads()
    with counter.counting():
        got = PaddedLayout(torch.tensor(counts), counts)
        x = torch.randn(sum(counts), 8)
        padded = got.gather(x)
        back = got.scatter(padded)
    assert sum(counter.reads.values()) == 0, counter.reads
    assert torch.equal(got.m_indices, want.m_indices) and torch.equal(got.dst_rows, want.dst_rows)
    assert torch.equal(padded, want.gather(x)) and torch.equal(back, x)
    assert got.segments == [(0, 0, 256), (2, 256, 384), (3, 384, 512)]
