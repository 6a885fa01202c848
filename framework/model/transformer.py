"""The DeepSeek-V3-style decoder: embedding -> blocks (dense first, then MoE) -> norm -> head,
plus optional multi-token-prediction modules that share the embedding and head.

Public API (the trainer and the parallel code rely on it):
    Transformer(cfg)(tokens_BT) -> logits_BTV
    Transformer.loss(tokens_BT, targets_BT) -> (loss, metrics)   loss = main + mtp + balance
    .blocks, .moe_layers(), .update_expert_bias(rate), .generate(prompt, n), .split_stages(n)
    count_params(model_or_cfg) -> {"total", "activated", "mtp", "mtp_activated"}

Legend: B batch, T sequence, D model dim, V vocabulary.
"""

import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from framework.config import ModelConfig
from framework.model.attention import MLA
from framework.model.init import draw_seed, init_weights
from framework.model.loss import head_cross_entropy
from framework.model.mlp import MLP
from framework.model.moe import MoE
from framework.model.mtp import MTPModule
from framework.model.norm import RMSNorm
from framework.model.recompute import mark_up_projections, recomputed


class Block(nn.Module):
    """Pre-norm residual block: MLA, then a dense SwiGLU (first n_dense_layers) or an MoE."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        is_moe = layer_id >= cfg.n_dense_layers
        self.ffn = MoE(cfg) if is_moe else MLP(cfg.dim, cfg.dense_inter_dim)
        # Activation recompute per compute sub-step (framework/model/recompute.py).
        self.recompute = cfg.recompute
        if cfg.recompute == "selective":
            mark_up_projections(self)

    def whole(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """The block without recompute: the plain forward (dense or MoE FFN)."""
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD))
        return x_BTD + self.ffn(self.ffn_norm(x_BTD))

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if self.recompute == "none" or not torch.is_grad_enabled():
            return self.whole(x_BTD)
        if not isinstance(self.ffn, MoE):
            return recomputed(self.whole, self.recompute)(x_BTD)
        # Recompute cuts the block like the pipeline's sub-steps: attention and experts are
        # recomputed, dispatch and combine (the all-to-alls) are not.
        a_BTD, n_TD, w_TK, idx_TK, self.ffn.aux_loss = recomputed(self.attention_step, self.recompute)(x_BTD)
        step = functools.partial(recomputed, mode=self.recompute)
        return a_BTD + self.ffn.routed_and_shared(n_TD, idx_TK, w_TK, step).view(a_BTD.shape)

    def attention_step(self, x_BTD: torch.Tensor):
        """An MoE block's first sub-step (framework/model/substeps.py): the same ops as forward up
        to the router. -> (a_BTD residual, n_TD normed FFN input, gate weights_TK, ids_TK,
        balance loss or None)."""
        a_BTD = x_BTD + self.attn(self.attn_norm(x_BTD))
        n_TD, idx_TK, w_TK, aux = self.ffn.route(self.ffn_norm(a_BTD))
        return a_BTD, n_TD, w_TK, idx_TK, aux


def _moes(module: nn.Module) -> list[MoE]:
    return [m for m in module.modules() if isinstance(m, MoE)]


def _balance_loss(moes: list[MoE], like: torch.Tensor) -> torch.Tensor:
    losses = [m.aux_loss for m in moes if m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else like.new_zeros(())


def _head_ce(head: nn.Linear, h_BTD: torch.Tensor, t_BT: torch.Tensor) -> torch.Tensor:
    """CE of the head on normed h through the chunked head cross-entropy (framework/model/loss.py:
    no full logits tensor). A head whose weight DeepSpeed ZeRO-3 partitions (gathered only
    inside head's own forward) takes the plain path."""
    if hasattr(head.weight, "ds_id"):
        return F.cross_entropy(head(h_BTD).flatten(0, 1).float(), t_BT.flatten())
    return head_cross_entropy(h_BTD.flatten(0, 1), head.weight, t_BT.flatten())


def mtp_depths(n_mtp: int, T: int) -> int:
    """How many MTP depths have something to predict in a T-token sequence (depth k reads
    positions up to T - k)."""
    return min(n_mtp, max(T - 1, 0))


def mtp_input(module: MTPModule, embed: nn.Embedding, k: int, n_BTD: torch.Tensor,
              targets_BT: torch.Tensor) -> torch.Tensor:
    """Depth k's block input from the previous depth's normed h. Depth k at position i reads
    Emb(targets[i+k-1]) (= token i+k) and predicts targets[i+k]; positions whose target falls
    past the end are dropped by shortening the sequence."""
    T = targets_BT.shape[1]
    return module.enter(n_BTD[:, : T - k], embed(targets_BT[:, k - 1: T - 1]))


def mtp_weighted(weight: float, ce_k: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The MTP loss weight * sum_k CE_k, weight = lambda/D (D the model's depth count)."""
    return weight * torch.stack(ce_k).sum() if ce_k else like.new_zeros(())


def mtp_hiddens(mtp: nn.ModuleList, embed: nn.Embedding, h_BTD: torch.Tensor,
                targets_BT: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(k, normed h of depth k) for every MTP depth with something to predict, from the main
    model's normed h; depth k's h_BTD[:, i] predicts targets_BT[:, i + k]."""
    for k in range(1, mtp_depths(len(mtp), targets_BT.shape[1]) + 1):
        module = mtp[k - 1]
        h_BTD = module.norm(module.block(mtp_input(module, embed, k, h_BTD, targets_BT)))
        yield k, h_BTD


def _output_losses(cfg: ModelConfig, embed: nn.Embedding, head: nn.Linear, mtp: nn.ModuleList,
                   h_BTD: torch.Tensor, targets_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Main next-token CE and the weighted MTP loss from the normed h."""
    main = _head_ce(head, h_BTD, targets_BT)
    mtp_ce = [_head_ce(head, n_BTD, targets_BT[:, k:])
              for k, n_BTD in mtp_hiddens(mtp, embed, h_BTD, targets_BT)]
    return main, mtp_weighted(cfg.mtp_loss_weight / max(len(mtp), 1), mtp_ce, main)


def _metrics(main, mtp, balance) -> dict[str, torch.Tensor]:
    # The weighted terms, so that main_loss + mtp_loss + balance_loss == loss.
    return {"main_loss": main.detach(), "mtp_loss": mtp.detach(), "balance_loss": balance.detach()}


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, init_seed: int | None = None):
        super().__init__()
        self.cfg = cfg
        # The seed of every initial weight (framework/model/init.py), drawn from torch's global
        # generator so that torch.manual_seed still decides the model, and drawn first: on the
        # CPU the submodules' own default init consumes the generator, on meta it does not.
        self.init_seed = draw_seed() if init_seed is None else init_seed
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # MTP blocks are numbered after the main ones, so they are always MoE blocks.
        self.mtp = nn.ModuleList(MTPModule(cfg, Block(cfg, cfg.n_layers + k)) for k in range(cfg.mtp_depth))
        # Built on meta, the model is initialised when materialised (init_weights after to_empty).
        if not self.embed.weight.is_meta:
            self.init_weights()

    def init_weights(self) -> None:
        """Normal(0, init_std) for every matrix, ones for norms, zero balancing state, each tensor
        (and routed expert) from its own seeded generator: what this module holds gets the same
        values whichever other parts were pruned away or live on other ranks."""
        init_weights(self, self.init_seed, self.cfg.init_std)

    def hidden(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states h_BTD of the main model."""
        h_BTD = self.embed(tokens_BT)
        for block in self.blocks:
            h_BTD = block(h_BTD)
        return self.norm(h_BTD)

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(tokens_BT))

    def loss(self, tokens_BT: torch.Tensor, targets_BT: torch.Tensor):
        """(main CE + MTP loss + balance loss, metrics). The balance loss is non-zero only in
        training mode (the MoE layers record it during forward)."""
        h_BTD = self.hidden(tokens_BT)
        main, mtp = _output_losses(self.cfg, self.embed, self.head, self.mtp, h_BTD, targets_BT)
        balance = _balance_loss(self.moe_layers(), main) if self.training else main.new_zeros(())
        return main + mtp + balance, _metrics(main, mtp, balance)

    def moe_layers(self) -> list[MoE]:
        return _moes(self)

    @torch.no_grad()
    def update_expert_bias(self, rate: float) -> None:
        for moe in self.moe_layers():
            moe.router.update_bias(rate)

    @torch.no_grad()
    def generate(self, prompt_BT: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding on the latent KV cache (framework/generate.py); returns prompt + new
        tokens [B, T + max_new_tokens]. Past max_seq_len is a ValueError, not a sliding window."""
        from framework.generate import SamplingParams, generate  # the generation layer sits above

        gen = generate(self, prompt_BT.tolist(), SamplingParams(max_new_tokens=max_new_tokens, temperature=0))
        new_BN = torch.stack(gen.tokens).to(prompt_BT.device)
        return torch.cat([prompt_BT, new_BN], dim=1)

    def split_stages(self, n: int, layers_per_stage: list[int] | None = None) -> list["Stage"]:
        """Contiguous pipeline stages sharing this model's modules (no copies). Blocks are spread
        as evenly as possible (earlier stages get the extra ones) unless layers_per_stage is given."""
        L = self.cfg.n_layers
        if layers_per_stage is None:
            if not 1 <= n <= L:
                raise ValueError(f"cannot split {L} blocks into {n} stages")
            layers_per_stage = [L // n + (i < L % n) for i in range(n)]
        if len(layers_per_stage) != n or sum(layers_per_stage) != L or min(layers_per_stage) < 0:
            raise ValueError(f"layers_per_stage={layers_per_stage} must be {n} counts summing to {L}")
        stages, lo = [], 0
        for i, count in enumerate(layers_per_stage):
            stages.append(Stage(self, lo, lo + count, first=i == 0, last=i == n - 1))
            lo += count
        return stages


class Stage(nn.Module):
    """One pipeline stage: blocks [lo, hi), plus the embedding (first) and norm, head, MTP and the
    loss (last). Parameter names equal the full model's (blocks keep their global index), so a
    stage's state_dict is a slice of the model's -- except `mtp_embed`, the last stage's tie of
    the embedding when it is not also the first stage and MTP is on.

    forward(x): first stage takes tokens_BT, others h_BTD; the last returns logits_BTV, others h_BTD.
    loss(x, targets) (last stage only): like Transformer.loss, with the balance loss of *this*
        stage's MoE layers; the other stages' share is their balance_loss() after their forward,
        which a schedule backpropagates alongside the activation gradient. Summed over stages it
        equals Transformer.loss.
    """

    def __init__(self, model: Transformer, lo: int, hi: int, first: bool, last: bool):
        super().__init__()
        self.cfg = model.cfg
        self.is_first, self.is_last = first, last
        self.layer_range = (lo, hi)
        if first:
            self.embed = model.embed
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in range(lo, hi)})
        if last:
            self.norm, self.head, self.mtp = model.norm, model.head, model.mtp
            self.mtp_weight = self.cfg.mtp_loss_weight / max(len(model.mtp), 1)  # lambda/D per depth's CE
            if not first and len(model.mtp):
                # MTP reads token embeddings on the last stage: a tie of the first stage's table
                # (DeepSeek shares it). Across ranks the parallel code keeps the two copies equal
                # by summing their gradients, as for any tied embedding.
                self.mtp_embed = model.embed

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        h_BTD = self.embed(x) if self.is_first else x
        for block in self.blocks.values():
            h_BTD = block(h_BTD)
        return self.norm(h_BTD) if self.is_last else h_BTD

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_BTD = self._hidden(x)
        return self.head(h_BTD) if self.is_last else h_BTD

    def balance_loss(self) -> torch.Tensor:
        """The latest training forward's balance loss of this stage's MoE layers."""
        ref = next(self.parameters())
        moes = _moes(self)
        return _balance_loss(moes, ref.new_zeros(())) if self.training and moes else ref.new_zeros(())

    def _mtp_embed(self) -> nn.Embedding | None:
        return self.embed if self.is_first else getattr(self, "mtp_embed", None)

    def head_losses(self, h_BTD: torch.Tensor, targets_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Last stage: (main CE, MTP loss) from the last block's output (final norm applied here)."""
        return _output_losses(self.cfg, self._mtp_embed(), self.head, self.mtp, self.norm(h_BTD), targets_BT)

    # The last stage's tail in pieces, for the pipeline's sub-steps (framework/model/substeps.py):
    # main_loss, then per MTP depth k: mtp_enter, the MTP block, mtp_exit. Same ops as head_losses.
    def main_loss(self, h_BTD: torch.Tensor, targets_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed h, main CE)."""
        n_BTD = self.norm(h_BTD)
        return n_BTD, _head_ce(self.head, n_BTD, targets_BT)

    def mtp_enter(self, k: int, n_BTD: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
        """Depth k's block input from the previous depth's normed h."""
        return mtp_input(self.mtp[k - 1], self._mtp_embed(), k, n_BTD, targets_BT)

    def mtp_exit(self, k: int, y_BTD: torch.Tensor,
                 targets_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(depth k's normed h, its unweighted CE) from its block's output."""
        n_BTD = self.mtp[k - 1].norm(y_BTD)
        return n_BTD, _head_ce(self.head, n_BTD, targets_BT[:, k:])

    def loss(self, x: torch.Tensor, targets_BT: torch.Tensor):
        if not self.is_last:
            raise RuntimeError("only the last stage computes the loss")
        h_BTD = self.embed(x) if self.is_first else x
        for block in self.blocks.values():
            h_BTD = block(h_BTD)
        main, mtp = self.head_losses(h_BTD, targets_BT)
        balance = self.balance_loss().to(main.dtype)
        return main + mtp + balance, _metrics(main, mtp, balance)


def count_params(model_or_cfg) -> dict[str, int]:
    """Parameter counts. total: main model (MTP excluded); activated: what one token touches
    (all but the unselected routed experts); mtp / mtp_activated: the MTP modules' own params
    (the embedding and head they share are not counted again). A config is built on meta."""
    if isinstance(model_or_cfg, ModelConfig):
        with torch.device("meta"):
            model = Transformer(model_or_cfg)
    else:
        model = model_or_cfg
    cfg = model.cfg

    def counts(module: nn.Module, params) -> tuple[int, int]:
        total = sum(p.numel() for p in params)
        idle = sum(m.experts.w1.numel() + m.experts.w2.numel() + m.experts.w3.numel() for m in _moes(module))
        idle = idle * (1 - cfg.n_activated_experts / cfg.n_routed_experts)
        return total, round(total - idle)

    mtp_ids = {id(p) for p in model.mtp.parameters()}
    main_params = [p for p in model.parameters() if id(p) not in mtp_ids]
    main_moes = nn.ModuleList(model.blocks)
    total, activated = counts(main_moes, main_params)
    mtp_total, mtp_act = counts(model.mtp, list(model.mtp.parameters()))
    return {"total": total, "activated": activated, "mtp": mtp_total, "mtp_activated": mtp_act}
