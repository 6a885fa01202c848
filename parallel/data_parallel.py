"""Data parallelism: gradient reduction during backward, ZeRO-1 sharded AdamW, and the small
reductions a step needs (expert loads for the bias update, the logged loss).

One step on every rank (the trainer's order; all of it is a no-op under Mesh.single()):

    reducer = GradReducer(model, mesh, zero=True)      # once; zero: reduce-scatter for ZeRO-1
    opt = DataParallelOptimizer(model, cfg.optim, mesh, cfg.precision.moment_dtype, zero=True,
                                reducer=reducer)
    loss.backward(); reducer.finish()                  # grads = those of the global mean loss
    norm = opt.clip_grad_norm(max_norm); opt.step(); opt.zero_grad()
    all_reduce_expert_load(model, mesh); model.update_expert_bias(rate)
    logged = reduce_mean_loss(loss, mesh)

Gradient scaling. Each rank's loss is the mean over its own micro-batch, so the gradient of the
global mean loss is the dp-average of the ranks' gradients. Dense gradients: sum over the dp
group, divide by dp. Expert gradients: under expert parallelism a rank's expert gradients
already hold the contributions of every rank in its ep group (the all-to-all backward brings
them home), so they are summed over the edp group (the ranks holding the same experts) and
also divided by dp -- Megatron-LM's expert gradient scaling. With ep == 1 that is the plain
dp-average; with ep > 1 and experts replicated (no EP dispatcher) it is *not* the full-batch
gradient, which is why ep > 1 needs the EP dispatcher.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from framework.config import OptimConfig
from framework.model.moe import Router
from framework.optim import build_optimizer, clip_grad_norm, grad_sq_sum
from framework.optim import set_lr as set_optimizer_lr
from parallel import comm
from parallel.mesh import Mesh

EXPERT_MARK = ".experts."  # parameter names of routed experts (reduced over edp, not dp)


def is_expert(name: str) -> bool:
    return EXPERT_MARK in name


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _buckets(items: list, nbytes, key, cap_bytes: float) -> list[list]:
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


def _chunk(size: int, n: int, i: int) -> tuple[int, int]:
    """(start, length) of piece i when `size` is cut into n pieces the way torch.chunk and
    DTensor's Shard do: ceil(size / n) each, the last ones shorter or empty."""
    per = -(-size // n)
    start = min(per * i, size)
    return start, min(size, start + per) - start


@dataclass(frozen=True)
class _Cut:
    """How ZeRO-1 cuts one parameter: along `dim` into n torch.chunk pieces, piece `rank` here.
    One function (`_cut_of`) decides it for the reducer and the optimizer, so the gradient
    piece the reduce-scatter delivers is the piece the optimizer updates."""
    dim: int  # 0 dense, 1 expert (dim 0 belongs to EP)
    n: int
    rank: int
    group: comm.Group

    def piece(self, shape, i: int) -> tuple[int, int]:
        return _chunk(shape[self.dim], self.n, i)


def _cut_of(name: str, p: nn.Parameter, mesh: Mesh, zero: bool) -> _Cut | None:
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
    for name, p in _trainable(model):
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


def _narrow(t: torch.Tensor, cut: _Cut, i: int) -> torch.Tensor:
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
        named = list(reversed(_trainable(model)))
        expert_of = {id(p): is_expert(n) for n, p in named}
        cut_of = {id(p): _cut_of(n, p, mesh, self.zero) for n, p in named}
        low = _REDUCE_DTYPES[reduce_dtype]
        wire = {id(p): low if p.dtype == torch.float32 else p.dtype for _, p in named}
        runs = _buckets([p for _, p in named], lambda p: p.numel() * p.element_size(),
                        lambda p: (expert_of[id(p)], cut_of[id(p)] is None, p.dtype, p.device),
                        bucket_mb * 2**20)
        self._bucket_of: dict[int, _GradBucket] = {}
        for params in runs:
            p0 = params[0]
            group = mesh.edp_group if expert_of[id(p0)] else mesh.dp_group
            if cut_of[id(p0)] is None:
                buffer = torch.zeros(sum(p.numel() for p in params), dtype=wire[id(p0)], device=p0.device)
                bucket = _GradBucket(params, group, 1.0 / mesh.dp, buffer)
            else:
                cuts = [cut_of[id(p)] for p in params]
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
                        dst.copy_(_narrow(p.grad, cut, j))
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
            mine = _narrow(p.grad, cut, cut.rank)
            mine.copy_(reduced)
            if not exact:
                mine.mul_(bucket.scale)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


# --------------------------------------------------------------------------- optimizer


@dataclass(eq=False)
class _Entry:
    """One parameter and the part of it this rank's optimizer updates (all of it without ZeRO)."""
    name: str
    param: nn.Parameter
    expert: bool
    dim: int  # dimension cut across the shard group (0 dense, 1 expert: dim 0 belongs to EP)
    n: int  # shard group size (1 without ZeRO)
    rank: int  # this rank's index in the shard group
    group: comm.Group
    view: nn.Parameter  # this rank's slice, sharing the parameter's storage
    sharded: bool  # False: this rank updates the whole parameter (view is the parameter)

    def piece(self, i: int) -> tuple[int, int]:
        return _chunk(self.param.shape[self.dim], self.n, i)

    def row_numel(self) -> int:  # elements per index of the cut dimension
        return self.param.numel() // max(self.param.shape[self.dim], 1)


class DataParallelOptimizer:
    """framework.optim.AdamW for a data-parallel rank, with optional ZeRO-1 state sharding.

    zero=True: every parameter is cut along one dimension into dp (edp for experts) pieces,
    torch.chunk style; this rank keeps AdamW state (fp32 master where the parameter is low
    precision, moments in `moment_dtype`) for its piece only, updates that piece, and the
    pieces are then all-gathered so every rank holds the full updated parameters. The update is
    framework.optim.AdamW itself, run on parameters that are views of this rank's pieces, so
    the semantics (no decay on ndim < 2, hyper-parameters, op order) are identical.
    zero=False (or dp == 1): plain AdamW over the whole model; same interface.

    Why per-parameter pieces rather than one flat buffer cut into equal ranges: each piece is a
    rectangle of its parameter, so the state checkpoints as a DTensor of the parameter's full
    shape (Shard placements) under the same keys as the unsharded optimizer
    ("<param name>/exp_avg", ...). DCP then reshards freely: dp=4 -> dp=2, ZeRO on -> off, or
    into a single process. The price is a little imbalance (ceil-sized pieces).
    """

    def __init__(self, model: nn.Module, optim_cfg: OptimConfig, mesh: Mesh, moment_dtype: str = "fp32",
                 zero: bool = True, bucket_mb: float = 25.0, pp_copies: dict[str, int] | None = None,
                 reducer: GradReducer | None = None) -> None:
        self.mesh = mesh
        # Parameters held by several pipeline ranks (DualPipe's mirrors, a tied embedding) count
        # once in the global gradient norm: each holder adds 1/copies of its square sum.
        self.pp_copies = pp_copies or {}
        self.zero = zero and mesh.dp > 1
        if reducer is not None and reducer.zero and not self.zero:
            # A reduce-scattering reducer leaves full gradients unreduced: only ZeRO may read them.
            raise ValueError("GradReducer(zero=True) needs DataParallelOptimizer(zero=True): "
                             "set both from parallel.zero1")
        self.sent_bytes = 0.0  # ring bytes of the parameter all-gathers (see ring_bytes)
        self.entries: list[_Entry] = []
        for name, p in _trainable(model):
            expert = is_expert(name)
            cut = _cut_of(name, p, mesh, self.zero)
            if cut is None:  # every rank updates all of it (no ZeRO, or a 0-d parameter)
                self.entries.append(_Entry(name, p, expert, 1 if expert else 0, 1, 0, None, p, sharded=False))
                continue
            view = nn.Parameter(_narrow(p.data, cut, cut.rank), requires_grad=True)
            self.entries.append(_Entry(name, p, expert, cut.dim, cut.n, cut.rank, cut.group, view,
                                       sharded=True))
        # build_optimizer groups by the views' ndim, which equals the parameters'.
        views = nn.ParameterList([e.view for e in self.entries])
        self.inner = build_optimizer(views, optim_cfg, moment_dtype)
        self._gather_buckets = _buckets([e for e in self.entries if e.sharded],
                                        lambda e: e.param.numel() * e.param.element_size(),
                                        lambda e: (e.expert, e.param.dtype), bucket_mb * 2**20)

    # --- hyper-parameters and grads -----------------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups  # so framework.optim.set_lr(opt, lr) works too

    def set_lr(self, lr: float) -> None:
        set_optimizer_lr(self.inner, lr)

    def zero_grad(self) -> None:
        for e in self.entries:
            e.param.grad = None
            e.view.grad = None

    def _attach_grads(self) -> None:
        for e in self.entries:
            if e.sharded:
                g = e.param.grad
                e.view.grad = None if g is None else g.narrow(e.dim, *e.piece(e.rank))

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the gradients (every distinct parameter counted once), fp32 0-d."""
        self._attach_grads()
        device = comm.collective_device(self.mesh.dp_group)
        if self.zero:  # pieces partition dense params over dp and experts over edp x ep
            sq = self._sq([e for e in self.entries if e.sharded], views=True).to(device)
            comm.all_reduce(sq, "sum", self.mesh.dp_group)
            sq = sq + self._sq([e for e in self.entries if not e.sharded]).to(device)
        elif self.mesh.ep == 1:  # every rank holds every gradient: no communication
            sq = self._sq(self.entries).to(device)
        else:  # dense grads are equal on every dp rank; experts differ across the ep group
            sq = self._sq([e for e in self.entries if not e.expert]).to(device)
            expert_sq = self._sq([e for e in self.entries if e.expert]).to(device)
            comm.all_reduce(expert_sq, "sum", self.mesh.ep_group)
            sq = sq + expert_sq
        comm.all_reduce(sq, "sum", self.mesh.pp_group)  # stages hold different parameters
        return sq.sqrt()

    def _sq(self, entries: list[_Entry], views: bool = False) -> torch.Tensor:
        """Square sum of the entries' gradients (their pieces with views=True), each weighted by
        1 / the number of pipeline ranks holding it."""
        by_copies: dict[int, list[torch.Tensor]] = {}
        for e in entries:
            by_copies.setdefault(self.pp_copies.get(e.name, 1), []).append(e.view if views else e.param)
        total = torch.zeros((), dtype=torch.float32)
        for copies, tensors in sorted(by_copies.items()):
            sq = grad_sq_sum(tensors)
            total = total.to(sq.device) + (sq if copies == 1 else sq / copies)
        return total

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Scale grads to global norm <= max_norm (0: only measure); returns the norm before,
        equal on every rank and to the single-process clip on the same global batch."""
        norm = self.grad_norm()
        clip_grad_norm([e.view for e in self.entries], max_norm, total_norm=norm)
        return norm

    # --- update ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        self._attach_grads()
        self.inner.step()
        if self.zero:
            self._all_gather_params()

    @torch.no_grad()
    def _all_gather_params(self) -> None:
        """Every rank's updated pieces -> full parameters everywhere (padded to equal slots)."""
        pending = []
        for entries in self._gather_buckets:
            slots, total = [], 0
            for e in entries:
                slots.append(total)
                total += e.piece(0)[1] * e.row_numel()  # piece 0 is the largest
            send = entries[0].param.new_zeros(total)
            for e, slot in zip(entries, slots, strict=True):
                send[slot:slot + e.view.numel()].copy_(e.view.reshape(-1))
            out = send.new_empty(entries[0].n * total)
            handle = comm.all_gather_into_tensor(out, send, entries[0].group, async_op=True)
            self.sent_bytes += ring_bytes("all_gather", send.nbytes, entries[0].n)
            pending.append((entries, slots, total, out, handle))
        for entries, slots, total, out, handle in pending:
            handle.wait()
            for j in range(entries[0].n):
                for e, slot in zip(entries, slots, strict=True):
                    start, length = e.piece(j)
                    shape = list(e.param.shape)
                    shape[e.dim] = length
                    piece = out[j * total + slot:][:length * e.row_numel()].view(shape)
                    # Through the parameter, not .data: the write moves its version counter, which
                    # tells the FP8 weight cache (kernels/fp8/weight_cache.py) the weight changed.
                    e.param.narrow(e.dim, start, length).copy_(piece)

    # --- checkpoint state ------------------------------------------------------------------
    def _state(self, e: _Entry) -> dict[str, torch.Tensor]:
        if not self.inner.state[e.view]:
            self.inner._init_state(e.view)  # zero state, as before the first step
        return self.inner.state[e.view]

    def _global_shape(self, e: _Entry) -> list[int]:
        shape = list(e.param.shape)
        if e.expert:
            shape[0] *= self.mesh.ep  # dim 0 holds this ep rank's block of experts
        return shape

    def _wrap(self, e: _Entry, local: torch.Tensor) -> torch.Tensor:
        """The DTensor (or, where nothing is sharded, plain tensor) DCP saves for local state."""
        mesh = self.mesh
        if mesh.is_single or (not e.sharded and (not e.expert or mesh.ep == 1)):
            return local  # replicated on every rank that has it: DCP writes one copy
        if e.expert:
            device_mesh = mesh.expert_mesh
            placements = [Shard(1) if e.sharded else Replicate(), Shard(0)]
        else:
            device_mesh, placements = mesh.dp_mesh, [Shard(0)]
        return global_dtensor(local, device_mesh, placements, self._global_shape(e))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only, keyed "<param name>/<key>" like framework.checkpoint's optimizer state:
        step (0-d, replicated), exp_avg, exp_avg_sq and master (low-precision params only) as
        full-shape DTensors over this rank's pieces. Hand it to torch.distributed.checkpoint."""
        out: dict[str, torch.Tensor] = {}
        for e in self.entries:
            for key, value in self._state(e).items():
                out[f"{e.name}/{key}"] = value if key == "step" else self._wrap(e, value)
        return out

    def _local_part(self, e: _Entry, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full-shape (global) tensor."""
        if e.expert and self.mesh.ep > 1:
            block = e.param.shape[0]
            full = full.narrow(0, self.mesh.ep_rank * block, block)
        return full.narrow(e.dim, *e.piece(e.rank)) if e.sharded else full

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Accepts what state_dict() returns (after dcp.load filled it) or plain full-shape
        tensors. Load the model first: a missing fp32 master is rebuilt from the parameter."""
        for e in self.entries:
            st = self._state(e)
            for key, dst in st.items():
                src = state.get(f"{e.name}/{key}")
                if src is None:
                    if key == "master":
                        dst.copy_(e.view)
                        continue
                    raise KeyError(f"optimizer state has no {e.name}/{key}")
                local = src.to_local() if isinstance(src, DTensor) else src
                if key != "step" and local.shape != dst.shape:
                    local = self._local_part(e, local)
                dst.copy_(local)


def global_dtensor(local: torch.Tensor, device_mesh, placements, shape) -> DTensor:
    """This rank's piece as a DTensor of the full (contiguous) `shape`, for DCP checkpoints."""
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return DTensor.from_local(local, device_mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=stride)


# --------------------------------------------------------------------------- small reductions


@torch.no_grad()
def all_reduce_expert_load(model: nn.Module, mesh: Mesh) -> None:
    """Sum every router's expert_load over the dp group (one collective), so every rank sees the
    global batch's loads and applies the same aux-loss-free bias update."""
    loads = [m.expert_load for m in model.modules() if isinstance(m, Router)]
    if not loads or mesh.dp == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in loads])
    comm.all_reduce(flat, "sum", mesh.dp_group)
    offset = 0
    for t in loads:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def reduce_mean(values: dict[str, float | torch.Tensor], mesh: Mesh) -> dict[str, float]:
    """Average scalars (losses, metrics) over the dp group in one collective, for logging."""
    keys = list(values)
    device = comm.collective_device(mesh.dp_group)
    # One copy to the collective's device rather than a host read per value.
    t = torch.stack([v.detach().to(device, torch.float64).reshape(()) if torch.is_tensor(v)
                     else torch.tensor(float(v), dtype=torch.float64, device=device)
                     for v in values.values()])
    comm.all_reduce(t, "avg", mesh.dp_group)
    return dict(zip(keys, t.tolist(), strict=True))


def reduce_mean_loss(value: float | torch.Tensor, mesh: Mesh) -> float:
    """The global-batch mean of a per-rank mean loss (equal micro-batch sizes on every rank)."""
    return reduce_mean({"loss": value}, mesh)["loss"]
