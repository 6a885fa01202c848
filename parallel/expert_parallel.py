"""Expert parallelism: dispatch / combine with DeepEP "normal" semantics on all_to_all_single.

Experts are sharded contiguously over the ep group: rank r owns global experts
[r*E/ep, (r+1)*E/ep). The router stays replicated (every rank scores all E experts for its own
tokens); only the routed experts' weights are split.

    dispatch(x_TD, topk_idx_TK, topk_weight_TK) -> (recv_x_ND, handle)
        Each token goes ONCE to every rank that owns at least one of its top-k experts (dedup:
        a token choosing two experts on the same rank is sent once). Order of the send buffer:
        by destination rank, then by token. First the counts are exchanged: an int32 [ep, 1 + L]
        tensor (L = E/ep) whose row r holds the rows this rank sends to rank r and, for each of
        rank r's L experts, the (token, k) pairs routed to it -- so a receiver learns both its
        buffer sizes and how many of its received (row, k) pairs each local expert computes.
        Then three payload all-to-alls with the same splits: the rows of x, their top-k ids
        made local to the receiver (-1 where the expert lives elsewhere; int32 on the wire) and
        their top-k weights. handle.topk_idx [N, K] (local ids, long), handle.topk_weight [N, K]
        and handle.expert_counts (host ints) feed GroupedExperts, which applies the weights and
        sums the local experts per row.

    One host read per dispatch (DESIGN.md rule 9). Counts, layout and payload are built on the
    tokens' device (no CPU tensor reaches a collective): the destination flags by scatter, the
    send order by a stable argsort of them (no nonzero), local ids and weights for every
    candidate (rank, token) pair. That work is queued while the count all-to-all is in flight;
    then ONE `.tolist()` of one concatenated tensor brings back the send counts, the receive
    counts and the per-local-expert counts, which size the buffers, the payload splits and the
    experts' slices. The experts, combine and every backward read nothing: they run on those
    host ints and on device tensors. (The x rows are gathered after the read: before it only
    the ep * T candidates would bound their buffer.)
    combine(y_ND, handle) -> out_TD
        Sends each received row back to its source rank (the reverse splits) and index-adds it
        into the source token order: an unweighted sum over the ranks a token visited.

Autograd: every all-to-all is a differentiable op whose backward is the reverse all-to-all on
the cached splits, so the backward of dispatch is a combine of the gradient (gather rows ->
reverse all-to-all -> index_add back to the tokens) and the backward of combine is a dispatch
of the gradient. The weights travel with the payload, so their gradient comes home the same
way and reaches the router.

Split phase (overlap): dispatch_start / dispatch_wait and combine_start / combine_wait issue the
payload all-to-alls asynchronously and wrap the result in autograd at wait time. dispatch_start
waits for the count exchange (the payload sizes depend on it). Several
dispatches/combines may be in flight at once as long as every rank starts them in the same
order. Backward communication is synchronous.

After `shard_experts`, dim 0 of every routed-expert parameter (`.experts.w1/w2/w3`) is this
rank's block of E/ep experts -- parallel/data_parallel.py relies on that (it reduces expert
gradients over the edp group and never cuts dim 0). Under EP a rank's expert gradients already
hold the contributions of every rank of its ep group (they come home through the backward
all-to-all). A rank whose experts received no token at all leaves their .grad None.

FP8 payload (fp8_payload=True, DeepSeek-V3's recipe): the x rows travel as 1x128-scaled e4m3
bytes plus fp32 scales and are dequantised on arrival; combine and all gradients stay in the
activations' dtype.

All communication goes through parallel.comm (DESIGN.md rule 4); its "all_to_all" counters
hold the bytes. `layout_stats(handle)` reports (token, rank) versus (token, expert) pairs;
each dispatcher's DispatchStats count tokens, rows, bytes and the seconds blocked on
communication, which `ep_record` turns into metrics.

For the trainer: `enable_expert_parallel` shards the experts and sets node-limited routing
from the layout; `expert_state_dict` / `local_state_dict` map local experts to global ids for
checkpoints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from duet_kernels.fp8.quantize import dequantize_act, quantize_act
from framework.model.moe import MoE, Router
from parallel import comm
from parallel.data_parallel import global_dtensor
from parallel.grad_reducer import is_expert

# --------------------------------------------------------------------------- differentiable all-to-all


def _a2a(t: torch.Tensor, out_splits: list[int], in_splits: list[int], group, async_op: bool
         ) -> comm.Handle:
    out = t.new_empty((sum(out_splits),) + tuple(t.shape[1:]))
    return comm.all_to_all_single(out, t.contiguous(), out_splits, in_splits, group=group, async_op=async_op)


class _Pending:
    """An all-to-all in flight; `wait()` returns the received tensor and reports the seconds it
    was blocked to `on_wait` (the dispatcher's exposed-communication counter)."""

    def __init__(self, t: torch.Tensor, out_splits: list[int], in_splits: list[int], group,
                 on_wait=None) -> None:
        self.out_splits, self.in_splits, self.group, self.on_wait = out_splits, in_splits, group, on_wait
        self.handle = _a2a(t.detach(), out_splits, in_splits, group, async_op=True)

    def wait(self) -> torch.Tensor:
        """The received tensor, handed over once. The handle is dropped: the comm Functions keep
        this object in their ctx for the reverse all-to-all's splits, and a kept handle would hold
        the received tensor, whose grad_fn holds that ctx: a cycle through autograd's C++ graph
        that Python's gc cannot see, leaking every step's received rows and graph."""
        if self.handle is None:
            raise RuntimeError("an all-to-all's result was taken twice (it is handed over once)")
        began = time.perf_counter()
        out, self.handle = self.handle.wait(), None
        if self.on_wait is not None:
            self.on_wait(time.perf_counter() - began)
        return out


class _FP8Pending:
    """Rows of x in flight as e4m3 bytes plus their fp32 1x128 scales (DeepSeek-V3's FP8
    dispatch: about half the bytes of bf16); `wait()` dequantises to x's dtype. Quantisation
    is treated as the identity in backward: the gradient returns in x's dtype (a BF16 combine)."""

    def __init__(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group,
                 on_wait=None) -> None:
        self.out_splits, self.in_splits, self.group, self.dtype = out_splits, in_splits, group, x.dtype
        q, scale = quantize_act(x.detach())
        self.nbytes = q.nbytes + scale.nbytes
        splits = (out_splits, in_splits, group, on_wait)
        self.q = _Pending(q.view(torch.uint8), *splits)  # gloo has no fp8 type
        self.scale = _Pending(scale, *splits)

    def wait(self) -> torch.Tensor:
        q = self.q.wait().view(torch.float8_e4m3fn)
        return dequantize_act(q, self.scale.wait(), out_dtype=self.dtype)


def _reverse(grad: torch.Tensor | None, p: _Pending, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """The gradient of a finished all-to-all sent back the reverse way (same splits, swapped)."""
    if grad is None:
        grad = like.new_zeros((sum(p.out_splits),) + shape)
    return _a2a(grad.contiguous(), p.in_splits, p.out_splits, p.group, async_op=False).result


def _link(device: torch.device) -> torch.Tensor:
    """An empty tensor that requires grad. Fed to the comm Functions so that their nodes exist and
    run in backward on EVERY rank whatever this rank's data: a rank receiving zero rows would
    otherwise drop out of the graph (its experts never touch recv_x) and the backward
    all-to-alls of the ranks would no longer match."""
    return torch.empty(0, device=device, requires_grad=True)


class _DispatchFn(torch.autograd.Function):
    """Forward: the received x rows and weights of a finished dispatch, and a link tensor that
    ties the matching combine to this node. Backward: one combine of both gradients (x, then w)."""

    @staticmethod
    def forward(ctx, x_send, w_send, link, px: _Pending, pw: _Pending):
        ctx.px, ctx.pw = px, pw
        ctx.x_meta = (tuple(x_send.shape[1:]), x_send.new_empty(0))
        ctx.w_meta = (tuple(w_send.shape[1:]), w_send.new_empty(0))
        ctx.set_materialize_grads(False)
        return px.wait(), pw.wait(), link.new_empty(0)

    @staticmethod
    def backward(ctx, grad_x, grad_w, _grad_link):
        gx = _reverse(grad_x, ctx.px, *ctx.x_meta)
        gw = _reverse(grad_w, ctx.pw, *ctx.w_meta)
        return gx, gw, None, None, None


class _CombineFn(torch.autograd.Function):
    """Forward: the rows sent back by a finished combine. Backward: a dispatch of the gradient
    (reverse all-to-all on the cached layout); the link routes backward to the dispatch node."""

    @staticmethod
    def forward(ctx, y, link, py: _Pending):
        ctx.py = py
        ctx.y_meta = (tuple(y.shape[1:]), y.new_empty(0))
        ctx.link_grad = link.new_zeros(0)  # on the link's device
        ctx.set_materialize_grads(False)
        return py.wait()

    @staticmethod
    def backward(ctx, grad):
        return _reverse(grad, ctx.py, *ctx.y_meta), ctx.link_grad, None


# --------------------------------------------------------------------------- layout and handle


@dataclass
class EPHandle:
    """What combine (and the backward) needs; also the experts' view of the received rows."""

    topk_idx: torch.Tensor  # [N, K] expert ids local to this rank (-1: not here), long
    topk_weight: torch.Tensor  # [N, K] gate weights (carry autograd back to the router)
    send_token: torch.Tensor  # [S] source token of each sent row (rows ordered by destination rank)
    send_counts: list[int]  # rows sent to each ep rank
    recv_counts: list[int]  # rows received from each ep rank
    expert_counts: list[int]  # received (row, k) pairs per local expert (sizes the experts' slices)
    local_rows: int  # their sum: the (row, k) pairs the local experts compute
    n_tokens: int  # T, tokens of this rank
    token_expert_pairs: int  # T * K routed (token, expert) pairs of this rank
    payload_bytes: int = 0  # bytes of the x payload this rank sent in dispatch
    link: torch.Tensor | None = None  # ties combine's backward node to dispatch's (see _link)


@dataclass
class DispatchCounting:
    """A dispatch between its count exchange and its host read (dispatch_counts)."""
    counts_pending: object
    counts_RC: torch.Tensor
    recv_RC: torch.Tensor
    token_C: torch.Tensor
    local_CK: torch.Tensor
    w_CK: torch.Tensor
    x_TD: torch.Tensor
    T: int
    K: int


@dataclass
class DispatchPending:
    x: _Pending | _FP8Pending
    idx: _Pending
    w: _Pending
    x_send: torch.Tensor
    w_send: torch.Tensor
    handle: EPHandle


@dataclass
class CombinePending:
    y: _Pending
    y_in: torch.Tensor
    handle: EPHandle


def layout_stats(handle: EPHandle) -> dict[str, int | list[int]]:
    """(token, rank) pairs actually sent versus the (token, expert) pairs routed (dedup gain)."""
    return {"token_rank_pairs": int(handle.send_token.numel()),
            "token_expert_pairs": handle.token_expert_pairs,
            "recv_rows": int(sum(handle.recv_counts)),
            "send_counts": list(handle.send_counts), "recv_counts": list(handle.recv_counts),
            "payload_bytes": handle.payload_bytes}


@dataclass
class DispatchStats:
    """Forward-pass totals of one dispatcher since its last reset (read by `ep_record`)."""

    calls: int = 0
    tokens: int = 0  # tokens of this rank dispatched
    token_rank_pairs: int = 0  # rows sent (one per token and destination rank)
    token_expert_pairs: int = 0  # what per-expert sending would have sent
    payload_bytes: int = 0  # bytes of x rows sent (fp8 data + scales under an FP8 payload)
    # Seconds blocked on communication (not the buffer work around it): in dispatch, the count
    # exchange and waiting for rows still in flight; in combine, waiting for the rows to return.
    dispatch_wait_s: float = 0.0
    combine_wait_s: float = 0.0
    backward_wait_s: float = 0.0  # the sub-layer steps' reverse all-to-alls (dispatch and combine)

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, type(getattr(self, f.name))())


class AllToAllDispatcher:
    """Drop-in for framework.model.moe.LocalDispatcher under expert parallelism.
    fp8_payload: dispatch x as 1x128-scaled e4m3 (combine stays in the activations' dtype)."""

    def __init__(self, ep_group, ep_rank: int, ep: int, n_experts: int, fp8_payload: bool = False) -> None:
        if n_experts % ep:
            raise ValueError(f"AllToAllDispatcher: n_experts={n_experts} is not divisible by ep={ep}")
        self.group, self.ep_rank, self.ep, self.n_experts = ep_group, ep_rank, ep, n_experts
        self.n_local = n_experts // ep
        self.fp8_payload = fp8_payload
        self.stats = DispatchStats()

    def _waited_dispatch(self, seconds: float) -> None:
        self.stats.dispatch_wait_s += seconds

    def _waited_combine(self, seconds: float) -> None:
        self.stats.combine_wait_s += seconds

    # ---- dispatch
    def dispatch_start(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor,
                       topk_weight_TK: torch.Tensor) -> DispatchPending:
        return self.dispatch_sized(self.dispatch_counts(x_TD, topk_idx_TK, topk_weight_TK))

    def dispatch_counts(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor,
                        topk_weight_TK: torch.Tensor) -> DispatchCounting:
        """dispatch_start's first half: the count exchange issued and the send layout queued, no
        host read yet; dispatch_sized(result) does the read and issues the payload. Split so a
        caller can queue independent work in between (the sub-step interleave queues experts(B)),
        and the read's wait is spent behind it."""
        T, K = topk_idx_TK.shape
        ep, L = self.ep, self.n_local
        device = topk_idx_TK.device
        idx_TK = topk_idx_TK.long()
        dest_TK = idx_TK // L
        # Everything up to the count exchange stays on the tokens' device (NCCL takes no CPU
        # tensor; DESIGN.md rule 9). hit_RT[r, t]: token t has an expert on rank r (dedup over k).
        hit_RT = torch.zeros(ep, T, dtype=torch.bool, device=device).scatter_(
            0, dest_TK.T, torch.ones_like(dest_TK.T, dtype=torch.bool))
        # counts_RC[r] = [rows sent to r, (token, k) pairs for each of r's L experts]: the
        # receiver learns its row count and its per-expert pair count in one exchange.
        pairs_RL = torch.zeros(ep * L, dtype=torch.int32, device=device).scatter_add_(
            0, idx_TK.flatten(), torch.ones(T * K, dtype=torch.int32, device=device)).view(ep, L)
        counts_RC = torch.cat([hit_RT.sum(1, dtype=torch.int32)[:, None], pairs_RL], 1)
        recv_RC = torch.empty_like(counts_RC)
        counts_pending = comm.all_to_all_single(recv_RC, counts_RC, group=self.group, async_op=True)

        # While the counts travel, queue the send layout for every candidate (rank, token) pair:
        # a stable sort of the hit flags puts the hits first, by rank then token (what nonzero
        # would give, without its host read). Ids made local to the receiver and the weights
        # ride along; the first S entries are the send buffer once S is known.
        order_C = torch.argsort((~hit_RT).flatten().to(torch.int8), stable=True)
        rank_C, token_C = order_C // T, order_C % T
        idx_CK = idx_TK[token_C]
        local_CK = torch.where(dest_TK[token_C] == rank_C[:, None], idx_CK - rank_C[:, None] * L,
                               torch.full_like(idx_CK, -1)).to(torch.int32)
        w_CK = topk_weight_TK[token_C]
        return DispatchCounting(counts_pending, counts_RC, recv_RC, token_C, local_CK, w_CK, x_TD, T, K)

    def dispatch_sized(self, c: DispatchCounting) -> DispatchPending:
        """dispatch_start's second half (see dispatch_counts)."""
        ep, T, K = self.ep, c.T, c.K
        counts_RC, recv_RC, token_C, local_CK, w_CK, x_TD = (c.counts_RC, c.recv_RC, c.token_C, c.local_CK,
                                                             c.w_CK, c.x_TD)
        counts_pending = c.counts_pending

        # The one host read of a dispatch: rows to send and receive per rank (the buffer sizes)
        # and received (row, k) pairs per local expert (the experts' slices), in one tensor.
        began = time.perf_counter()
        counts_pending.wait()
        sizes = torch.cat([counts_RC[:, 0], recv_RC[:, 0], recv_RC[:, 1:].sum(0, dtype=torch.int32)]).tolist()
        self._waited_dispatch(time.perf_counter() - began)
        send_counts, recv_counts, expert_counts = sizes[:ep], sizes[ep:2 * ep], sizes[2 * ep:]
        S = sum(send_counts)

        send_token_S = token_C[:S]
        # x is gathered after the read: before it, only the ep * T candidate rows would bound
        # the buffer (ep times the rows of x), while the small id and weight rows can afford it.
        x_send = x_TD[send_token_S]
        w_send = w_CK[:S]
        splits = (recv_counts, send_counts, self.group, self._waited_dispatch)
        px = _FP8Pending(x_send, *splits) if self.fp8_payload else _Pending(x_send, *splits)
        handle = EPHandle(topk_idx=None, topk_weight=None, send_token=send_token_S, send_counts=send_counts,
                          recv_counts=recv_counts, expert_counts=expert_counts, local_rows=sum(expert_counts),
                          n_tokens=T, token_expert_pairs=T * K,
                          payload_bytes=px.nbytes if self.fp8_payload else x_send.nbytes)
        pending = DispatchPending(x=px, idx=_Pending(local_CK[:S], *splits),
                                  w=_Pending(w_send, *splits), x_send=x_send, w_send=w_send, handle=handle)
        st = self.stats
        st.calls += 1
        st.tokens += T
        st.token_rank_pairs += S
        st.token_expert_pairs += T * K
        st.payload_bytes += handle.payload_bytes
        return pending

    def dispatch_wait(self, pending: DispatchPending) -> tuple[torch.Tensor, EPHandle]:
        handle = pending.handle
        if torch.is_grad_enabled():
            link = _link(pending.x_send.device)
            recv_x, recv_w, handle.link = _DispatchFn.apply(pending.x_send, pending.w_send, link,
                                                            pending.x, pending.w)
        else:
            recv_x, recv_w, handle.link = pending.x.wait(), pending.w.wait(), None
        handle.topk_idx = pending.idx.wait().long()
        handle.topk_weight = recv_w
        return recv_x, handle

    def dispatch(self, x_TD, topk_idx_TK, topk_weight_TK):
        return self.dispatch_wait(self.dispatch_start(x_TD, topk_idx_TK, topk_weight_TK))

    # ---- combine
    def combine_start(self, y_ND: torch.Tensor, handle: EPHandle) -> CombinePending:
        return CombinePending(y=_Pending(y_ND, handle.send_counts, handle.recv_counts, self.group,
                                         self._waited_combine), y_in=y_ND, handle=handle)

    def combine_wait(self, pending: CombinePending) -> torch.Tensor:
        h = pending.handle
        if torch.is_grad_enabled():
            link = h.link if h.link is not None else _link(pending.y_in.device)
            back_SD = _CombineFn.apply(pending.y_in, link, pending.y)
        else:
            back_SD = pending.y.wait()
        out = back_SD.new_zeros((h.n_tokens,) + tuple(back_SD.shape[1:]))
        return out.index_add(0, h.send_token, back_SD)

    def combine(self, y_ND, handle):
        return self.combine_wait(self.combine_start(y_ND, handle))

    # ---- backward halves, outside autograd (the sub-layer steps, framework/model/substeps.py):
    # each issues its reverse all-to-all asynchronously and returns; the wait comes where the
    # gradient is used, so a computation of the other micro-batch can run while it travels.
    def dispatch_backward_start(self, handle: EPHandle, grad_x_ND: torch.Tensor,
                                grad_w_NK: torch.Tensor) -> tuple[_Pending, _Pending, EPHandle]:
        """Gradients of the received rows and gate weights go back to the ranks they came from."""
        splits = (handle.send_counts, handle.recv_counts, self.group, self._waited_backward)
        return _Pending(grad_x_ND, *splits), _Pending(grad_w_NK, *splits), handle

    def dispatch_backward_wait(self, pending) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (grad x_TD, grad w_TK): the returned rows summed into their source tokens (the
        gradient of the gather x_TD[send_token])."""
        px, pw, h = pending
        gx_SD, gw_SK = px.wait(), pw.wait()
        gx_TD = gx_SD.new_zeros((h.n_tokens,) + tuple(gx_SD.shape[1:])).index_add_(0, h.send_token, gx_SD)
        gw_TK = gw_SK.new_zeros((h.n_tokens,) + tuple(gw_SK.shape[1:])).index_add_(0, h.send_token, gw_SK)
        return gx_TD, gw_TK

    def combine_backward_start(self, handle: EPHandle, grad_out_TD: torch.Tensor) -> _Pending:
        """The gradient of combine's index_add (a gather by send_token) travels the dispatch way."""
        return _Pending(grad_out_TD[handle.send_token], handle.recv_counts, handle.send_counts, self.group,
                        self._waited_backward)

    def combine_backward_wait(self, pending: _Pending) -> torch.Tensor:
        return pending.wait()

    def _waited_backward(self, seconds: float) -> None:
        self.stats.backward_wait_s += seconds


# --------------------------------------------------------------------------- model surgery


def shard_experts(model: nn.Module, mesh_or_rank, fp8_payload: bool = False) -> nn.Module:
    """Keep only this rank's contiguous block of routed experts in every MoE layer and install an
    AllToAllDispatcher. `mesh_or_rank` is a parallel.mesh.Mesh or a tuple (ep_rank, ep[, ep_group])
    (group None = the default world group). Routers stay full. Afterwards dim 0 of each
    `.experts.w1/w2/w3` is the local block of E/ep experts (global id = ep_rank*E/ep + local id).
    ep == 1 leaves the model unchanged. Returns the model."""
    if isinstance(mesh_or_rank, tuple):
        ep_rank, ep, group = (tuple(mesh_or_rank) + (None,))[:3]
    else:
        ep_rank, ep, group = mesh_or_rank.ep_rank, mesh_or_rank.ep, mesh_or_rank.ep_group
    if ep == 1:
        return model
    for module in model.modules():
        if not isinstance(module, MoE):
            continue
        experts = module.experts
        E = experts.w1.shape[0]
        if E % ep:
            raise ValueError(f"shard_experts: {E} routed experts are not divisible by ep={ep}")
        if E != module.router.n_experts:
            raise ValueError("shard_experts: experts already sharded (dim 0 != router's expert count)")
        L = E // ep
        for name in ("w1", "w2", "w3"):
            full = getattr(experts, name)
            setattr(experts, name, nn.Parameter(full.detach()[ep_rank * L:(ep_rank + 1) * L].clone(),
                                                requires_grad=full.requires_grad))
        experts.first_expert = ep_rank * L  # its initial weights are drawn by global expert id
        module.dispatcher = AllToAllDispatcher(group, ep_rank, ep, E, fp8_payload)
    return model


def nodes_spanned(ep: int, ranks_per_node: int) -> int:
    """Nodes one expert-parallel group covers (its ranks are contiguous, numbered node by node)."""
    return max(1, ep // ranks_per_node)


def limit_nodes(model: nn.Module, n_nodes: int, max_nodes: int) -> None:
    """Node-limited routing: every router confines a token's experts to its best `max_nodes` of
    the `n_nodes` nodes (experts split into n_nodes contiguous blocks). max_nodes 0 or >=
    n_nodes: no limit, plain group-limited routing."""
    for module in model.modules():
        if isinstance(module, Router):
            if module.n_experts % n_nodes:
                raise ValueError(f"limit_nodes: {module.n_experts} experts do not split over {n_nodes} nodes")
            module.n_nodes, module.max_nodes = n_nodes, max_nodes


def enable_expert_parallel(model: nn.Module, mesh, ranks_per_node: int = 8, max_nodes_per_token: int = 0,
                           fp8_payload: bool = False) -> nn.Module:
    """What the trainer does for ep > 1: shard the experts over the mesh's ep group, install the
    all-to-all dispatchers and set node-limited routing from the layout. Forward and backward
    all-to-alls share the ep group: one thread issues them all, in the same order on every rank
    (DESIGN.md rule 10)."""
    if mesh.ep == 1:
        return model
    shard_experts(model, mesh, fp8_payload)
    limit_nodes(model, nodes_spanned(mesh.ep, ranks_per_node), max_nodes_per_token)
    return model


# --------------------------------------------------------------------------- checkpoints and metrics


def expert_state_dict(state: dict[str, torch.Tensor], mesh) -> dict[str, torch.Tensor]:
    """A model state dict with every routed-expert tensor (this rank's block of experts) wrapped
    as a DTensor of the full expert count -- sharded over ep, replicated over edp -- so DCP saves
    global expert ids and a checkpoint reloads under any ep (or in one process)."""
    if mesh.ep == 1 or mesh.is_single:
        return state
    out = {}
    for name, t in state.items():
        if is_expert(name):
            shape = (t.shape[0] * mesh.ep,) + tuple(t.shape[1:])
            t = global_dtensor(t, mesh.expert_mesh, [Replicate(), Shard(0)], shape)
        out[name] = t
    return out


def local_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo expert_state_dict after a DCP load: each rank's own blocks as plain tensors."""
    return {k: v.to_local() if isinstance(v, DTensor) else v for k, v in state.items()}


def dispatchers(model: nn.Module) -> list[AllToAllDispatcher]:
    return [m.dispatcher for m in model.modules()
            if isinstance(m, MoE) and isinstance(m.dispatcher, AllToAllDispatcher)]


def ep_record(model: nn.Module, steps: int) -> dict[str, float]:
    """Expert-parallel metrics since the last call, for the metrics log: bytes sent per token
    per MoE layer, rows sent per (token, expert) pair (the dedup gain; 1.0 = none), and the
    milliseconds per step this rank sat blocked in dispatch and in combine. Resets the counters.
    Empty without expert parallelism."""
    found = dispatchers(model)
    if not found:
        return {}
    total = DispatchStats()
    for d in found:
        for f in fields(total):
            setattr(total, f.name, getattr(total, f.name) + getattr(d.stats, f.name))
        d.stats.reset()
    steps = max(steps, 1)
    return {"ep_bytes_per_token": total.payload_bytes / max(total.tokens, 1),
            "ep_rows_per_pair": total.token_rank_pairs / max(total.token_expert_pairs, 1),
            "ep_dispatch_wait_ms": 1e3 * total.dispatch_wait_s / steps,
            "ep_combine_wait_ms": 1e3 * total.combine_wait_s / steps}
