"""DeepSeekMoE: router, grouped routed experts, the local dispatcher and the MoE layer.

Routing (V3): s = sigmoid(x Wg^T); selection uses s + expert_bias (aux-loss-free balancing),
restricted to the best `n_limited_groups` of `n_expert_groups` groups; the gate weights come from
the *unbiased* s of the chosen experts, optionally renormalised, times route_scale. V2 uses a
softmax and scores a group by its best expert (transformers' "group_limited_greedy").

Experts are reached through a dispatcher so expert parallelism can swap the communication
without touching this file. Contract (DeepEP "normal" semantics):
    recv_x_ND, handle = dispatcher.dispatch(x_TD, topk_idx_TK, topk_weight_TK)
    y_ND = experts(recv_x_ND, handle.topk_idx, handle.topk_weight,  # ids local to this rank, -1 = elsewhere
                   handle.expert_counts, handle.local_rows)         # host ints, or None
    out_TD = dispatcher.combine(y_ND, handle)                        # unweighted sum back to the tokens
Each received row is one token; the experts apply the gate weights and sum the local experts.

Sync-free experts (DESIGN.md rule 9): the experts sort their (row, k) pairs by expert on the
device and run the SwiGLU as three grouped GEMMs (torch._grouped_mm, offsets computed on the
device). They read nothing back to the host: the sizes they slice by come from the handle --
per-expert counts an all-to-all dispatch read once with its buffer sizes, or the pair count
N * K the local dispatcher knows from shapes. Only where _grouped_mm cannot run (unsupported
dtype or device, strides not 16-byte aligned) do the experts split one buffer into per-expert
views, which needs host counts: the handle's, else one read here. On CPU in bf16/fp16 the
experts read the counts once to pad each expert's rows to a bucket (_bucketed_swiglu: oneDNN
builds a kernel per row count); a CPU tensor's read waits for nothing.
Both calls also come split in two (dispatch_start/dispatch_wait, combine_start/combine_wait) so
work can run while tokens are in flight; MoE.forward runs the shared expert there.

Node-limited routing (V3): under expert parallelism over several nodes, a token's experts may
be confined to its best `max_nodes` nodes (each rated by the sum of its K/M best biased scores)
before the group limit applies; parallel/expert_parallel.py sets it from the layout.

Legend: B batch, T tokens (or sequence), D model dim, E experts (local ones for GroupedExperts),
K top-k, G groups (or nodes: any contiguous blocks of experts), X experts per group, I expert
inner dim, N received rows, M routed (token, expert) pairs.
"""

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from framework.config import ModelConfig
from framework.model.mlp import MLP


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.topk = cfg.n_activated_experts
        self.n_groups = cfg.n_expert_groups
        self.topk_groups = cfg.n_limited_groups
        self.score_func = cfg.score_func
        self.route_scale = cfg.route_scale
        self.norm_topk_prob = cfg.norm_topk_prob
        # Node-limited routing (V3): each token's experts span at most `max_nodes` of the
        # `n_nodes` nodes its expert-parallel group covers. Set by parallel/expert_parallel.py
        # from the layout; 0 = no limit (a single process, or ep within one node).
        self.n_nodes, self.max_nodes = 1, 0
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        # Balancing bias: used for selection only; fp32 and saved with the model.
        self.register_buffer("expert_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        # Tokens routed to each expert since the last update_bias(); a distributed run all-reduces
        # it first. Not saved: it is transient step state.
        self.register_buffer("expert_load", torch.zeros(cfg.n_routed_experts, dtype=torch.float32),
                             persistent=False)

    def _apply(self, fn, recurse=True):
        # Keep the balancing state fp32 when the model is cast (model.to(torch.bfloat16)):
        # 0.001-sized bias steps vanish in bf16.
        super()._apply(fn, recurse)
        self.expert_bias = self.expert_bias.float()
        self.expert_load = self.expert_load.float()
        return self

    def scores(self, x_TD: torch.Tensor) -> torch.Tensor:
        # The gate stays in fp32, also under autocast (V3's recipe: routing is precision-sensitive).
        # fp64 inputs keep fp64 (exactness checks); everything narrower is raised to fp32.
        gate_dtype = torch.promote_types(x_TD.dtype, torch.float32)
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.to(gate_dtype), self.weight.to(gate_dtype))
        return logits_TE.sigmoid() if self.score_func == "sigmoid" else logits_TE.softmax(-1)

    def select(self, s_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert ids and gate weights from the scores (group limit and bias applied)."""
        E, G, N = self.n_experts, self.n_groups, self.n_nodes
        biased_TE = s_TE + self.expert_bias
        if self.max_nodes and self.max_nodes < N:
            # V3: a node is as good as the sum of its K/M best (biased) experts.
            best = min(-(-self.topk // self.max_nodes), E // N)
            biased_TE = _keep_best_blocks(biased_TE, N, self.max_nodes, best)
        if 1 < G and self.topk_groups < G:
            # V3 (sigmoid): a group is as good as its two best experts; V2 (softmax): its best.
            # Under a node limit the groups nest in nodes (the config checks it), so the groups
            # of dropped nodes score -inf and never displace a kept one.
            best = min(2, E // G) if self.score_func == "sigmoid" else 1
            biased_TE = _keep_best_blocks(biased_TE, G, self.topk_groups, best)
        idx_TK = biased_TE.topk(self.topk, dim=-1).indices
        w_TK = s_TE.gather(1, idx_TK)  # unbiased: the bias steers selection, never the output
        if self.norm_topk_prob:
            w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        return idx_TK, w_TK * self.route_scale

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s_TE = self.scores(x_TD)
        idx_TK, w_TK = self.select(s_TE)
        if self.training and _LoadCounting.on:
            with torch.no_grad():
                # scatter_add, not bincount: bincount reads the largest id on the host.
                self.expert_load.scatter_add_(0, idx_TK.flatten(), torch.ones_like(idx_TK.flatten(),
                                                                                  dtype=self.expert_load.dtype))
        return idx_TK, w_TK, s_TE

    @torch.no_grad()
    def update_bias(self, rate: float) -> None:
        """bias += rate * sign(mean_load - load), then reset the counts (rate 0: reset only)."""
        if rate:
            load_E = self.expert_load.float()
            self.expert_bias += rate * torch.sign(load_E.mean() - load_E)
        self.expert_load.zero_()


class Recomputed:
    """depth > 0 while a GEMM whose output selective recompute does not keep runs (the MLA
    up-projections, the attention's and the experts' output projections: framework/model/
    recompute.py hooks the modules; the routed experts' w2 GEMM marks itself here)."""
    depth = 0


class _LoadCounting:
    on = True  # off while a recompute re-runs a router: each token is counted once


@contextlib.contextmanager
def no_load_counting():
    """Routers count no load inside (activation recompute re-runs them on the same tokens)."""
    previous, _LoadCounting.on = _LoadCounting.on, False
    try:
        yield
    finally:
        _LoadCounting.on = previous


def _keep_best_blocks(scores_TE: torch.Tensor, n_blocks: int, keep: int, best: int) -> torch.Tensor:
    """Cut the experts into n_blocks contiguous blocks, rate each block per token by the sum of
    its `best` highest scores, and set every expert outside the `keep` best blocks to -inf."""
    T, E = scores_TE.shape
    scores_TGX = scores_TE.view(T, n_blocks, E // n_blocks)
    rating_TG = scores_TGX.topk(best, dim=-1).values.sum(-1)
    keep_TG = rating_TG.topk(keep, dim=-1).indices
    drop_TG = torch.ones_like(rating_TG, dtype=torch.bool).scatter_(1, keep_TG, False)
    return scores_TGX.masked_fill(drop_TG[..., None], float("-inf")).view(T, E)


def seq_balance_loss(s_BTE: torch.Tensor, idx_BTK: torch.Tensor, alpha: float) -> torch.Tensor:
    """Sequence-wise balance loss alpha * sum_i f_i P_i, averaged over the sequences.

    f_i = E / (K T) * (tokens of the sequence routed to i); P_i = mean_t s_i / sum_j s_j.
    f is a count (no gradient); the gradient flows through P.
    """
    B, T, E = s_BTE.shape
    K = idx_BTK.shape[-1]
    p_BE = (s_BTE / s_BTE.sum(-1, keepdim=True)).mean(1)
    count_BE = torch.zeros(B, E, device=s_BTE.device, dtype=s_BTE.dtype)
    ones_BX = torch.ones(B, T * K, device=s_BTE.device, dtype=s_BTE.dtype)
    count_BE.scatter_add_(1, idx_BTK.reshape(B, T * K), ones_BX)
    f_BE = count_BE * (E / (K * T))
    return alpha * (f_BE * p_BE).sum(-1).mean()


# --------------------------------------------------------------------------- grouped expert GEMMs


class ExpertRows:
    """Layout of the rows a grouped GEMM sees: sorted by expert, count_E[e] rows for expert e,
    then (when `exact` is False) tail rows that belong to no expert.

    count_E lives on the device and gives the GEMMs' offsets without a host read. Host counts
    are needed only by paths that slice on the host (the split fallback, the FP8 layout); they
    come from the dispatch handle (read once there), or, when no handle gave them, from the one
    read GroupedExperts.forward makes of count_E."""

    def __init__(self, count_E: torch.Tensor, rows: int, host_counts: list[int] | None, exact: bool,
                 block_rows: int = 0) -> None:
        self.count_E, self.rows, self._host, self.exact = count_E, rows, host_counts, exact
        # > 0: every expert owns exactly block_rows rows (the CPU bucketed path), so the grouped
        # GEMMs are batched GEMMs over [E, block_rows, *] views.
        self.block_rows = block_rows
        self._offs: torch.Tensor | None = None
        self._keep: torch.Tensor | None = None

    @property
    def offs_E(self) -> torch.Tensor:
        """Cumulative int32 end offsets, what torch._grouped_mm takes (computed on the device)."""
        if self._offs is None:
            self._offs = torch.cumsum(self.count_E, 0, dtype=torch.int32)
        return self._offs

    @property
    def host_counts(self) -> list[int]:
        if self._host is None:  # GroupedExperts.forward reads them whenever its path needs them
            raise RuntimeError("ExpertRows: host counts were not read; the split-view path needs them")
        return self._host

    def mask_tail(self, t_MX: torch.Tensor) -> torch.Tensor:
        """Zero the rows past the last offset: torch._grouped_mm leaves them uninitialised."""
        if self.exact:
            return t_MX
        if self._keep is None:
            self._keep = (torch.arange(self.rows, device=t_MX.device) < self.offs_E[-1])[:, None]
        return torch.where(self._keep, t_MX, t_MX.new_zeros(()))


def _grouped_mm_ok(x: torch.Tensor, *ws: torch.Tensor) -> bool:
    """Whether torch._grouped_mm runs these operands without a host sync: on CPU for fp32, bf16 and
    fp16, on CUDA only its bf16 sm90+ kernel (the others fall back to a loop that copies the offsets
    to the host); every stride a multiple of 16 bytes (DESIGN.md environment facts)."""
    if x.device.type == "cpu":
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
    elif x.device.type != "cuda" or x.dtype != torch.bfloat16:
        return False
    elif torch.cuda.get_device_capability(x.device) < (9, 0):
        return False
    # Weights [E, O, I] are cast to x's dtype; O and I are the row strides of every GEMM operand.
    size = x.element_size()
    return all(t.shape[-1] * size % 16 == 0 and t.shape[-2] * size % 16 == 0 for t in ws)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous with a 16-byte aligned start (a gradient may be a strided or offset view)."""
    if t.is_contiguous() and t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _gmm(x_MI: torch.Tensor, w_EOI: torch.Tensor, layout: ExpertRows, grouped: bool) -> torch.Tensor:
    """y_MO[m] = x_MI[m] @ w_EOI[e(m)].T, e(m) the expert owning row m; tail rows zero."""
    if layout.block_rows:
        E, P = w_EOI.shape[0], layout.block_rows
        return torch.bmm(x_MI.view(E, P, -1), w_EOI.transpose(1, 2)).view(E * P, -1)
    if grouped:
        return layout.mask_tail(torch._grouped_mm(_aligned(x_MI), w_EOI.transpose(1, 2), offs=layout.offs_E))
    y_MO = x_MI.new_empty(x_MI.shape[0], w_EOI.shape[1])
    start = 0
    for e, n in enumerate(layout.host_counts):  # views of one buffer: no per-expert allocation
        if n:
            torch.mm(x_MI[start:start + n], w_EOI[e].T, out=y_MO[start:start + n])
        start += n
    y_MO[start:].zero_()
    return y_MO


def _gmm_wgrad(g_MO: torch.Tensor, x_MI: torch.Tensor, layout: ExpertRows, grouped: bool) -> torch.Tensor:
    """grad_w_EOI[e] = g_e.T @ x_e over expert e's rows (tail rows excluded); one [E, O, I] buffer."""
    if layout.block_rows:
        E, P = layout.count_E.shape[0], layout.block_rows
        return torch.bmm(g_MO.view(E, P, -1).transpose(1, 2), x_MI.view(E, P, -1))
    if grouped:
        return torch._grouped_mm(g_MO.T, x_MI, offs=layout.offs_E)
    out_EOI = g_MO.new_zeros(len(layout.host_counts), g_MO.shape[1], x_MI.shape[1])
    start = 0
    for e, n in enumerate(layout.host_counts):
        if n:
            torch.mm(g_MO[start:start + n].T, x_MI[start:start + n], out=out_EOI[e])
        start += n
    return out_EOI


class _GroupedLinear(torch.autograd.Function):
    """x_MI @ w_EOI[e].T per row's expert, as one grouped GEMM. The weight gradient goes through
    `weight_grad(weight, compute)` when given (the pipeline's deferred weight gradients:
    duet_kernels.deferred.defer_or_return), else straight back to autograd."""

    @staticmethod
    def forward(ctx, x_MI, w_EOI, layout: ExpertRows, grouped: bool, weight_grad):
        w_c = w_EOI.to(x_MI.dtype)  # the compute dtype (autocast's cast, done by hand)
        ctx.save_for_backward(x_MI, w_c)
        ctx.layout, ctx.grouped, ctx.weight_grad, ctx.weight = layout, grouped, weight_grad, w_EOI
        return _gmm(x_MI, w_c, layout, grouped)

    @staticmethod
    def backward(ctx, g_MO):
        x_MI, w_c = ctx.saved_tensors
        layout, grouped, w = ctx.layout, ctx.grouped, ctx.weight
        g_MO = _aligned(g_MO)
        grad_x = _gmm(g_MO, w_c.transpose(1, 2), layout, grouped) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            def compute() -> torch.Tensor:
                return _gmm_wgrad(g_MO, x_MI, layout, grouped).to(w.dtype)

            grad_w = compute() if ctx.weight_grad is None else ctx.weight_grad(w, compute)
        return grad_x, grad_w, None, None, None


def grouped_swiglu(x_MD: torch.Tensor, w1_EID: torch.Tensor, w3_EID: torch.Tensor, w2_EDI: torch.Tensor,
                   layout: ExpertRows, weight_grad=None) -> torch.Tensor:
    """SwiGLU experts over rows sorted by expert: y = w2_e(silu(w1_e x) * w3_e x), three grouped
    GEMMs (torch._grouped_mm where it runs sync-free, else split views of one buffer). Under
    autocast the GEMMs run in its dtype, as nn.Linear's would. No host read on the grouped path
    (on CPU in bf16/fp16 one read of the counts, see _bucketed_swiglu; a CPU has no device sync)."""
    device = x_MD.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_MD.dtype
    with torch.autocast(device, enabled=False):
        x_MD = x_MD.to(dtype)
        grouped = _grouped_mm_ok(x_MD, w1_EID, w2_EDI)
        if grouped and device == "cpu" and dtype in (torch.bfloat16, torch.float16):
            return _bucketed_swiglu(x_MD, w1_EID, w3_EID, w2_EDI, layout, weight_grad)
        return _swiglu(x_MD, w1_EID, w3_EID, w2_EDI, layout, grouped, weight_grad)


def _swiglu(x_MD, w1_EID, w3_EID, w2_EDI, layout: ExpertRows, grouped: bool, weight_grad) -> torch.Tensor:
    h1_MI = _GroupedLinear.apply(x_MD, w1_EID, layout, grouped, weight_grad)
    h3_MI = _GroupedLinear.apply(x_MD, w3_EID, layout, grouped, weight_grad)
    Recomputed.depth += 1  # the expert outputs: recomputed from the SwiGLU inputs (V3)
    try:
        return _GroupedLinear.apply(F.silu(h1_MI) * h3_MI, w2_EDI, layout, grouped, weight_grad)
    finally:
        Recomputed.depth -= 1


# Smallest padded row count of an expert on the bucketed CPU path (below it, one bucket).
CPU_BUCKET_MIN_ROWS = 16
# Pad every expert to one block (batched GEMMs) while that costs at most this many times the
# per-expert buckets' rows (0: never). Measured break-even at about 1.4x (_bucketed_swiglu).
CPU_UNIFORM_MAX_ROWS = 1.25


def bucket_rows(n: int) -> int:
    """The padded row count of an expert with n rows: the next of 16, 24, 32, 48, 64, 96, ...
    (powers of two and 1.5x them; at most a third of the rows are padding), 0 for 0."""
    if n <= CPU_BUCKET_MIN_ROWS:
        return CPU_BUCKET_MIN_ROWS if n else 0
    p = 1 << (n - 1).bit_length()  # the next power of two >= n
    return p * 3 // 4 if n <= p * 3 // 4 else p


def _bucketed_swiglu(x_MD, w1_EID, w3_EID, w2_EDI, layout: ExpertRows, weight_grad) -> torch.Tensor:
    """grouped_swiglu on CPU in bf16/fp16 with each expert's rows padded to bucket_rows(n).

    Why: the CPU _grouped_mm runs one oneDNN GEMM per expert, and oneDNN builds (JIT-compiles) a
    new kernel for every new row count; routing changes the counts every step, so a bf16 step
    spent most of its expert time compiling (torch 2.13, 8 experts of 6144 x 256 x 256, one
    thread: 45 ms with the same counts every call, 440 ms with new ones; fp32 goes to a GEMM
    without JIT and is unaffected, so it keeps the plain path). With ~two sizes per octave the
    kernels are built once. The padding rows are zero and are dropped again: the kept rows'
    values and the weight gradients are those of the unpadded GEMMs.

    When routing is near balanced every expert is padded to the fullest one's bucket, and the
    GEMMs become torch.bmm over [E, block, *] views: oneDNN's batched GEMM beats the per-expert
    ones (8 x 768 rows of 256 x 256, bf16, 2 threads with AMX: SwiGLU fwd + bwd 1.10-1.22x; the
    weight gradient alone 2.5x), and loses once the padding grows (one expert at twice the
    others' rows: 0.75-0.84x), hence CPU_UNIFORM_MAX_ROWS."""
    counts = layout.count_E.tolist()  # a CPU tensor: no device sync (the CPU _grouped_mm reads it too)
    padded = [bucket_rows(n) for n in counts]
    # One block for every expert (batched GEMMs) while it pads little more than the buckets.
    block = bucket_rows(max(counts))
    if block * len(counts) <= CPU_UNIFORM_MAX_ROWS * sum(padded):
        padded = [block] * len(counts)
    else:
        block = 0
    used, total = sum(counts), sum(padded)
    count_E, padded_E = torch.tensor(counts, dtype=torch.int64), torch.tensor(padded, dtype=torch.int64)
    start_E = torch.cumsum(count_E, 0) - count_E
    pad_start_E = torch.cumsum(padded_E, 0) - padded_E
    # Row r of expert e (r - start_e into its block) goes to pad_start_e + (r - start_e).
    dest_R = torch.arange(used) + torch.repeat_interleave(pad_start_E - start_E, count_E, output_size=used)
    padded_layout = ExpertRows(padded_E.to(layout.count_E.dtype), total, padded, exact=True, block_rows=block)
    x_PD = x_MD.new_zeros(total, x_MD.shape[1]).index_copy(0, dest_R, x_MD[:used])
    y_PD = _swiglu(x_PD, w1_EID, w3_EID, w2_EDI, padded_layout, True, weight_grad)
    y_RD = y_PD.index_select(0, dest_R)
    if layout.rows > used:  # tail rows (pairs for other ranks) stay zero, as mask_tail leaves them
        y_RD = torch.cat([y_RD, y_RD.new_zeros(layout.rows - used, y_RD.shape[1])])
    return y_RD


class GroupedExperts(nn.Module):
    """The routed experts of one layer (or this rank's share), stored stacked for grouped GEMMs."""

    # Hook for the weight gradients of the three GEMMs (None: autograd's usual accumulation);
    # parallel/pipeline/wgrad.py sets duet_kernels.deferred.defer_or_return to defer them.
    weight_grad = None
    # Global id of expert 0 here: expert parallelism keeps a block of a layer's experts, and an
    # expert's initial weights are drawn from its global id (framework/model/init.py).
    first_expert = 0

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # gate [E, I, D]
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))  # down [E, D, I]
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # up   [E, I, D]

    def needs_host_counts(self, x_ND: torch.Tensor) -> bool:
        """Whether grouped_swiglu slices on the host (then the layout must be exact)."""
        return not _grouped_mm_ok(x_ND, self.w1, self.w2)

    def grouped_swiglu(self, x_MD: torch.Tensor, layout: ExpertRows) -> torch.Tensor:
        """Rows sorted by expert (layout) -> expert outputs, same order."""
        return grouped_swiglu(x_MD, self.w1, self.w3, self.w2, layout, self.weight_grad)

    def forward(self, x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor,
                counts_E: list[int] | None = None, rows: int | None = None) -> torch.Tensor:
        """counts_E: rows per local expert as host ints (a dispatch handle's, read once there);
        rows: their sum, when only that is known (every pair local: N * K). Without either the
        experts run on all N * K pairs, those for other ranks (-1) past the last offset."""
        E, K = self.w1.shape[0], idx_NK.shape[1]
        flat_M = idx_NK.flatten()
        # Sort (row, slot) pairs by expert; pairs for other ranks (-1) go last.
        key_M = torch.where(flat_M >= 0, flat_M, E)
        order_M = torch.argsort(key_M, stable=True)
        # Rows per expert on the device (scatter_add: bincount would read its max on the host).
        count_E = torch.zeros(E + 1, dtype=torch.int64, device=flat_M.device).scatter_add_(
            0, key_M, torch.ones_like(key_M))[:E]
        if counts_E is None and self.needs_host_counts(x_ND):
            counts_E = count_E.tolist()  # the one read: no handle gave counts, this path slices on the host
        if counts_E is not None:
            rows = sum(counts_E)
        # Known pair count: keep exactly the local pairs (nothing past the last offset).
        exact = rows is not None
        layout = ExpertRows(count_E, rows if exact else flat_M.numel(), counts_E, exact)
        order_M = order_M[:layout.rows]
        token_M = order_M // K
        if layout.rows:
            # index_select, not x_ND[token_M]: its backward is an index_add_ rather than an
            # accumulating index_put_ (6x faster on CPU at 6144 x 256 rows).
            y_MD = self.grouped_swiglu(x_ND.index_select(0, token_M), layout)
        else:  # nothing routed here (possible under expert parallelism): the weights get no gradient
            y_MD = x_ND.new_zeros(0, self.w2.shape[1])
        y_MD = y_MD * w_NK.flatten()[order_M, None].to(y_MD.dtype)
        # Under autocast the GEMMs return bf16 while x may be fp32: sum in the output's dtype.
        return y_MD.new_zeros(x_ND.shape).index_add_(0, token_M, y_MD)


@dataclass
class LocalHandle:
    topk_idx: torch.Tensor  # [N, K] expert ids local to the receiving rank (-1: not here)
    topk_weight: torch.Tensor  # [N, K]
    expert_counts: list[int] | None = None  # rows per local expert, host ints (None: not read)
    local_rows: int | None = None  # (row, k) pairs with a local expert: N * K here


class LocalDispatcher:
    """Single rank owns every expert: dispatch and combine are identities. The split-phase
    pairs (start, then wait) are the overlap points an all-to-all dispatcher fills. Its handle
    has the same fields as the all-to-all one; the pair count is N * K (every expert is local),
    known without a host read."""

    def dispatch_start(self, x_TD, topk_idx_TK, topk_weight_TK):
        return x_TD, LocalHandle(topk_idx_TK, topk_weight_TK, local_rows=topk_idx_TK.numel())

    def dispatch_wait(self, pending):
        return pending

    def combine_start(self, y_TD, handle):
        return y_TD

    def combine_wait(self, pending):
        return pending

    def dispatch(self, x_TD, topk_idx_TK, topk_weight_TK):
        return self.dispatch_wait(self.dispatch_start(x_TD, topk_idx_TK, topk_weight_TK))

    def combine(self, y_TD, handle):
        return self.combine_wait(self.combine_start(y_TD, handle))

    # Backward halves for the sub-layer steps (framework/model/substeps.py): the gradients of a
    # dispatch (rows, gate weights) and of a combine, outside autograd. Identities here.
    def dispatch_backward_start(self, handle, grad_x_ND, grad_w_NK):
        return grad_x_ND, grad_w_NK

    def dispatch_backward_wait(self, pending):
        return pending

    def combine_backward_start(self, handle, grad_out_TD):
        return grad_out_TD

    def combine_backward_wait(self, pending):
        return pending


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.seq_aux_alpha = cfg.seq_aux_alpha
        self.router = Router(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim)
        self.shared = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None
        self.dispatcher = LocalDispatcher()  # swapped by parallel/expert_parallel.py under EP
        # Balance loss of the latest training forward (a graph-carrying 0-dim tensor), else None.
        self.aux_loss: torch.Tensor | None = None

    def route(self, x_BTD: torch.Tensor):
        """-> (x_TD, ids_TK, gate weights_TK, balance loss or None): the router's part."""
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        idx_TK, w_TK, s_TE = self.router(x_TD)
        aux = None
        if self.training and self.seq_aux_alpha > 0:
            aux = seq_balance_loss(s_TE.view(B, T, -1), idx_TK.view(B, T, -1), self.seq_aux_alpha)
        return x_TD, idx_TK, w_TK, aux

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_TD, idx_TK, w_TK, self.aux_loss = self.route(x_BTD)
        return self.routed_and_shared(x_TD, idx_TK, w_TK).view(B, T, D)

    def routed_and_shared(self, x_TD, idx_TK, w_TK, step=None) -> torch.Tensor:
        """dispatch -> experts and shared expert -> combine; `step` wraps experts_step (the
        block's recompute: framework/model/recompute.py). The shared expert runs while the tokens
        travel to their routed experts."""
        pending = self.dispatcher.dispatch_start(x_TD, idx_TK, w_TK)
        if step is None:
            shared_TD = self.shared(x_TD) if self.shared is not None else None
            recv_x, handle = self.dispatcher.dispatch_wait(pending)
            y = self.experts(recv_x, handle.topk_idx, handle.topk_weight, handle.expert_counts,
                             handle.local_rows)
        else:
            recv_x, handle = self.dispatcher.dispatch_wait(pending)
            experts = step(functools.partial(self.experts_step, handle))
            y, shared_TD = experts(recv_x, handle.topk_weight, x_TD)
        out_TD = self.dispatcher.combine_wait(self.dispatcher.combine_start(y, handle))
        if shared_TD is not None:
            out_TD = out_TD + shared_TD
        return out_TD

    def experts_step(self, handle, recv_x_ND, recv_w_NK, x_TD):
        """The experts sub-step: routed experts on the received rows, shared expert on x."""
        y_ND = self.experts(recv_x_ND, handle.topk_idx, recv_w_NK, handle.expert_counts, handle.local_rows)
        return y_ND, (self.shared(x_TD) if self.shared is not None else None)
