"""DeepSeekMoE: router, grouped routed experts, the local dispatcher and the MoE layer.

Routing (V3): s = sigmoid(x Wg^T); selection uses s + expert_bias (aux-loss-free balancing),
restricted to the best `n_limited_groups` of `n_expert_groups` groups; the gate weights come from
the *unbiased* s of the chosen experts, optionally renormalised, times route_scale. V2 uses a
softmax and scores a group by its best expert (transformers' "group_limited_greedy").

Experts are reached through a dispatcher so expert parallelism can swap the communication
without touching this file. Contract (DeepEP "normal" semantics):
    recv_x_ND, handle = dispatcher.dispatch(x_TD, topk_idx_TK, topk_weight_TK)
    y_ND = experts(recv_x_ND, handle.topk_idx, handle.topk_weight)   # ids local to this rank, -1 = elsewhere
    out_TD = dispatcher.combine(y_ND, handle)                        # unweighted sum back to the tokens
Each received row is one token; the experts apply the gate weights and sum the local experts.
Both calls also come split in two (dispatch_start/dispatch_wait, combine_start/combine_wait) so
work can run while tokens are in flight; MoE.forward runs the shared expert there.

Node-limited routing (V3): under expert parallelism over several nodes, a token's experts may
be confined to its best `max_nodes` nodes (each rated by the sum of its K/M best biased scores)
before the group limit applies; parallel/expert_parallel.py sets it from the layout.

Legend: B batch, T tokens (or sequence), D model dim, E experts (local ones for GroupedExperts),
K top-k, G groups (or nodes: any contiguous blocks of experts), X experts per group, I expert
inner dim, N received rows, M routed (token, expert) pairs.
"""

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
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
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
        if self.training:
            with torch.no_grad():
                self.expert_load += torch.bincount(idx_TK.flatten(), minlength=self.n_experts).to(
                    self.expert_load.dtype)
        return idx_TK, w_TK, s_TE

    @torch.no_grad()
    def update_bias(self, rate: float) -> None:
        """bias += rate * sign(mean_load - load), then reset the counts (rate 0: reset only)."""
        if rate:
            load_E = self.expert_load.float()
            self.expert_bias += rate * torch.sign(load_E.mean() - load_E)
        self.expert_load.zero_()

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, std=std)
        with torch.no_grad():
            self.expert_bias.zero_()
            self.expert_load.zero_()


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


class GroupedExperts(nn.Module):
    """The routed experts of one layer (or this rank's share), stored stacked for grouped GEMMs."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # gate [E, I, D]
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))  # down [E, D, I]
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # up   [E, I, D]

    def grouped_swiglu(self, x_MD: torch.Tensor, count_E: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert, count_E rows per expert -> expert outputs (same order)."""
        out, start = [], 0
        for e, n in enumerate(count_E.tolist()):
            if n:
                xe = x_MD[start:start + n]
                out.append((F.silu(xe @ self.w1[e].T) * (xe @ self.w3[e].T)) @ self.w2[e].T)
                start += n
        return torch.cat(out) if out else x_MD.new_zeros(0, self.w2.shape[1])

    def forward(self, x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        E, K = self.w1.shape[0], idx_NK.shape[1]
        flat_M = idx_NK.flatten()
        # Sort (token, slot) pairs by expert; pairs for other ranks (-1) go last and are dropped.
        order_M = torch.argsort(torch.where(flat_M >= 0, flat_M, E), stable=True)
        count_E = torch.bincount(flat_M[flat_M >= 0], minlength=E)
        order_M = order_M[: int(count_E.sum())]
        token_M = order_M // K
        y_MD = self.grouped_swiglu(x_ND[token_M], count_E)
        y_MD = y_MD * w_NK.flatten()[order_M, None].to(y_MD.dtype)
        # Under autocast the GEMMs return bf16 while x may be fp32: sum in the output's dtype.
        return y_MD.new_zeros(x_ND.shape).index_add_(0, token_M, y_MD)

    def init_weights(self, std: float) -> None:
        for w in (self.w1, self.w2, self.w3):
            nn.init.normal_(w, std=std)


@dataclass
class LocalHandle:
    topk_idx: torch.Tensor  # [N, K] expert ids local to the receiving rank (-1: not here)
    topk_weight: torch.Tensor  # [N, K]


class LocalDispatcher:
    """Single rank owns every expert: dispatch and combine are identities. The split-phase
    pairs (start, then wait) are the overlap points an all-to-all dispatcher fills."""

    def dispatch_start(self, x_TD, topk_idx_TK, topk_weight_TK):
        return x_TD, LocalHandle(topk_idx_TK, topk_weight_TK)

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

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        idx_TK, w_TK, s_TE = self.router(x_TD)
        self.aux_loss = None
        if self.training and self.seq_aux_alpha > 0:
            self.aux_loss = seq_balance_loss(s_TE.view(B, T, -1), idx_TK.view(B, T, -1), self.seq_aux_alpha)
        # The shared expert runs while the tokens travel to their routed experts.
        pending = self.dispatcher.dispatch_start(x_TD, idx_TK, w_TK)
        shared_TD = self.shared(x_TD) if self.shared is not None else None
        recv_x, handle = self.dispatcher.dispatch_wait(pending)
        y = self.experts(recv_x, handle.topk_idx, handle.topk_weight)
        out_TD = self.dispatcher.combine_wait(self.dispatcher.combine_start(y, handle))
        if shared_TD is not None:
            out_TD = out_TD + shared_TD
        return out_TD.view(B, T, D)

    def init_weights(self, std: float) -> None:
        self.router.init_weights(std)
        self.experts.init_weights(std)
        if self.shared is not None:
            self.shared.init_weights(std)
