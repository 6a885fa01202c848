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

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from framework.config import OptimConfig
from framework.model.moe import Router
from framework.optim import build_optimizer, clip_grad_norm, grad_sq_sum
from framework.optim import set_lr as set_optimizer_lr
from parallel import comm
from parallel.grad_reducer import (
    GradReducer,
    chunk_range,
    cut_of,
    is_expert,
    narrow_to,
    pack_buckets,
    ring_bytes,
    trainable_params,
)
from parallel.mesh import Mesh


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
        return chunk_range(self.param.shape[self.dim], self.n, i)

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
        for name, p in trainable_params(model):
            expert = is_expert(name)
            cut = cut_of(name, p, mesh, self.zero)
            if cut is None:  # every rank updates all of it (no ZeRO, or a 0-d parameter)
                self.entries.append(_Entry(name, p, expert, 1 if expert else 0, 1, 0, None, p, sharded=False))
                continue
            view = nn.Parameter(narrow_to(p.data, cut, cut.rank), requires_grad=True)
            self.entries.append(_Entry(name, p, expert, cut.dim, cut.n, cut.rank, cut.group, view,
                                       sharded=True))
        # build_optimizer groups by the views' ndim, which equals the parameters'.
        views = nn.ParameterList([e.view for e in self.entries])
        self.inner = build_optimizer(views, optim_cfg, moment_dtype)
        self._gather_buckets = pack_buckets([e for e in self.entries if e.sharded],
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
                    # tells the FP8 weight cache (duet_kernels/fp8/weight_cache.py) the weight changed.
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
