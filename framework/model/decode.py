"""Inference path of the Transformer: MLA on a latent KV cache in the absorbed form.

The training forward (attention.py) expands the latent c_kv through wkv_b into per-head keys and
values. Here only the normed latent c_kv [C] and the roped shared key k_rope [R] are cached per
token and layer, (C + R) values instead of H * (N + R + V), and wkv_b is folded into the two ends:

    score_h(t, s) = q_nope_h(t) . (W_uk_h c(s)) + q_rope_h(t) . k_rope(s)
                  = (W_uk_h^T q_nope_h(t)) . c(s) + q_rope_h(t) . k_rope(s)
    out_h(t)      = sum_s p_h(t, s) W_uv_h c(s) = W_uv_h (sum_s p_h(t, s) c(s))

so attention runs on the latent (DeepSeek-V2 report, section 2.1.2). The weights are the modules'
own (read, never copied), so one model serves training and decoding.

Positions are per sequence: cache slot s of sequence b holds position s, a query at position p
sees slots 0..p. Prompts of different lengths are prefilled right-padded; a padded slot is
overwritten by the decode step that reaches its position before any query can see it, and
rolling a sequence back (a rejected speculative draft) is only moving its position back.

The MoE layers run their own forward (Router, dispatcher, experts): under expert parallelism the
same all-to-all serves decoding. The experts each token chose are read by a forward hook on the
router, recorded at the token's slot.

Legend: B batch, T new tokens this call, S cache slots (positions), D model dim, H heads,
N no-rope head dim, R rope head dim, V value head dim, C kv_lora_rank, F = R/2, K top-k,
L main MoE layers.
"""

from __future__ import annotations

import torch
from torch import nn

from framework.model.attention import MLA
from framework.model.moe import MoE
from framework.model.rope import apply_rope, rope_tables

# Blocks and the Transformer are typed as nn.Module: importing transformer.py here would close an
# import cycle (its generate method calls framework.generate, which uses this module).


class LatentCache:
    """Per layer one [B, S, C + R] tensor: the normed latent c_kv, then the roped shared key.
    Allocated at the first write, in the dtype the latent is computed in."""

    def __init__(self, n_layers: int, batch: int, slots: int):
        self.n_layers, self.batch, self.slots = n_layers, batch, slots
        self.kv: list[torch.Tensor | None] = [None] * n_layers

    def write(self, layer: int, slot_BT: torch.Tensor, kv_BTX: torch.Tensor) -> torch.Tensor:
        """Store kv at each sequence's slots; returns the layer's whole cache [B, S, C + R]."""
        if self.kv[layer] is None:
            self.kv[layer] = kv_BTX.new_zeros(self.batch, self.slots, kv_BTX.shape[-1])
        cache_BSX = self.kv[layer]
        cache_BSX.scatter_(1, slot_BT[..., None].expand_as(kv_BTX), kv_BTX.to(cache_BSX.dtype))
        return cache_BSX

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv if t is not None)

    def bytes_per_token_per_layer(self) -> float:
        layers = sum(t is not None for t in self.kv)
        return self.nbytes() / (layers * self.batch * self.slots)


class Positions:
    """What every layer of one decode call shares: positions, rope rows and the visible slots.

    cos/sin at the per-sequence positions, flattened to [B*T, F], are the same fp32 values the
    training forward's table holds there (rope_tables also refuses a position past
    max_seq_len). `slots` is read to the host once per call, not once per layer."""

    def __init__(self, cfg, pos_BT: torch.Tensor):
        self.pos_BT = pos_BT
        self.slots = int(pos_BT.max()) + 1
        cos_SF, sin_SF = rope_tables(cfg, self.slots, pos_BT.device)
        flat = pos_BT.flatten()
        self.cos_MF, self.sin_MF = cos_SF[flat], sin_SF[flat]


def _rope(x_BTHR: torch.Tensor, cos_MF: torch.Tensor, sin_MF: torch.Tensor) -> torch.Tensor:
    # apply_rope takes one table row per sequence position; fold B into T so each row has its own.
    B, T, H, R = x_BTHR.shape
    return apply_rope(x_BTHR.reshape(1, B * T, H, R), cos_MF, sin_MF).view(B, T, H, R)


def mla_decode(attn: MLA, x_BTD: torch.Tensor, at: Positions, cache: LatentCache, layer: int) -> torch.Tensor:
    """MLA over the cached latent plus the T new tokens at positions at.pos_BT (written first)."""
    cfg = attn.cfg
    B, T, _ = x_BTD.shape
    H, N, R, V, C = attn.n_heads, attn.nope_dim, attn.rope_dim, attn.v_dim, cfg.kv_lora_rank
    if cfg.q_lora_rank > 0:
        q_BTX = attn.wq_b(attn.q_norm(attn.wq_a(x_BTD)))
    else:
        q_BTX = attn.wq(x_BTD)
    q_nope_BTHN, q_rope_BTHR = q_BTX.view(B, T, H, N + R).split([N, R], dim=-1)
    q_rope_BTHR = _rope(q_rope_BTHR, at.cos_MF, at.sin_MF)

    c_kv_BTC, k_rope_BTR = attn.wkv_a(x_BTD).split([C, R], dim=-1)
    k_rope_BTR = _rope(k_rope_BTR.unsqueeze(2), at.cos_MF, at.sin_MF).squeeze(2)
    new_BTX = torch.cat([attn.kv_norm(c_kv_BTC), k_rope_BTR], dim=-1)
    pos_BT, S = at.pos_BT, at.slots  # S: the slots any query of this call can see
    cache_BSX = cache.write(layer, pos_BT, new_BTX)
    c_BSC, k_rope_BSR = cache_BSX[:, :S].split([C, R], dim=-1)

    w_HXC = attn.wkv_b.weight.view(H, N + V, C)
    w_uk_HNC, w_uv_HVC = w_HXC[:, :N].to(q_BTX.dtype), w_HXC[:, N:].to(q_BTX.dtype)
    q_lat_BTHC = torch.einsum("bthn,hnc->bthc", q_nope_BTHN, w_uk_HNC)
    c_BSC, k_rope_BSR = c_BSC.to(q_BTX.dtype), k_rope_BSR.to(q_BTX.dtype)
    score_BHTS = (torch.einsum("bthc,bsc->bhts", q_lat_BTHC, c_BSC)
                  + torch.einsum("bthr,bsr->bhts", q_rope_BTHR, k_rope_BSR)) * attn.scale
    # Causal per sequence: slot s holds position s, visible to queries at positions >= s.
    slots_S = torch.arange(S, device=x_BTD.device)
    visible_BTS = slots_S[None, None, :] <= pos_BT[:, :, None]
    score_BHTS = score_BHTS.masked_fill(~visible_BTS[:, None], float("-inf"))
    # Softmax in fp32 at least (SDPA's math path accumulates it in fp32 too for low-precision inputs).
    p_BHTS = score_BHTS.to(torch.promote_types(score_BHTS.dtype, torch.float32)).softmax(-1).to(q_BTX.dtype)
    o_lat_BTHC = torch.einsum("bhts,bsc->bthc", p_BHTS, c_BSC)
    o_BTHV = torch.einsum("bthc,hvc->bthv", o_lat_BTHC, w_uv_HVC)
    return attn.wo(o_BTHV.reshape(B, T, H * V))


def block_decode(block: nn.Module, x_BTD: torch.Tensor, at: Positions, cache: LatentCache,
                 layer: int) -> torch.Tensor:
    x_BTD = x_BTD + mla_decode(block.attn, block.attn_norm(x_BTD), at, cache, layer)
    return x_BTD + block.ffn(block.ffn_norm(x_BTD))


class ExpertLog:
    """Records, per main MoE layer, the experts each token chose, at the token's slot:
    ids_BLSK. Hooks the routers' forward (whose first output is the top-k ids)."""

    def __init__(self, moes: list[MoE], batch: int, slots: int, topk: int, device):
        self.ids_BLSK = torch.full((batch, len(moes), slots, topk), -1, dtype=torch.long, device=device)
        self._slot_BT: torch.Tensor | None = None
        self._write_B: torch.Tensor | None = None
        self._hooks = [m.router.register_forward_hook(self._hook(i)) for i, m in enumerate(moes)]

    def expect(self, slot_BT: torch.Tensor | None, write_B: torch.Tensor | None = None) -> None:
        """Where the next forward's tokens go (None: do not record); write_B masks sequences."""
        self._slot_BT, self._write_B = slot_BT, write_B

    def _hook(self, layer: int):
        def hook(_module, _inputs, outputs):
            if self._slot_BT is None:
                return
            B, T = self._slot_BT.shape
            idx_BTK = outputs[0].view(B, T, -1)
            dst_BTK = self.ids_BLSK[:, layer]
            if self._write_B is not None:
                old_BTK = dst_BTK.gather(1, self._slot_BT[..., None].expand_as(idx_BTK))
                idx_BTK = torch.where(self._write_B[:, None, None], idx_BTK, old_BTK)
            dst_BTK.scatter_(1, self._slot_BT[..., None].expand_as(idx_BTK), idx_BTK)
        return hook

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


class Decoder:
    """Incremental forward of `model` for a batch: the main blocks' cache and, with MTP, the
    first MTP module's own block and cache (depth 1 drafts one token ahead).

        step(tokens_BT, pos_BT) -> (logits_BTV, h_BTD)   main model at those positions
        mtp_step(h_BTD, next_BT, pos_BT) -> logits_BTV   MTP at positions pos: h of the main model
                                                          there and the token one place ahead
    Both write their caches at pos (slot = position); call in eval mode, under no_grad.
    """

    def __init__(self, model: nn.Module, batch: int, slots: int, record_experts: bool = False):
        self.model, self.cfg = model, model.cfg
        self.cache = LatentCache(len(model.blocks), batch, slots)
        self.mtp_cache = LatentCache(1, batch, slots) if len(model.mtp) else None
        dev = model.embed.weight.device
        main_moes = [m for blk in model.blocks for m in blk.modules() if isinstance(m, MoE)]
        self.experts = (ExpertLog(main_moes, batch, slots, self.cfg.n_activated_experts, dev)
                        if record_experts and main_moes else None)

    def step(self, tokens_BT: torch.Tensor, pos_BT: torch.Tensor,
             write_B: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        at = Positions(self.cfg, pos_BT)
        if self.experts is not None:
            self.experts.expect(pos_BT, write_B)
        h_BTD = m.embed(tokens_BT)
        for i, block in enumerate(m.blocks):
            h_BTD = block_decode(block, h_BTD, at, self.cache, i)
        if self.experts is not None:
            self.experts.expect(None)
        h_BTD = m.norm(h_BTD)
        return m.head(h_BTD), h_BTD

    def mtp_step(self, h_BTD: torch.Tensor, next_BT: torch.Tensor, pos_BT: torch.Tensor) -> torch.Tensor:
        m = self.model
        mtp = m.mtp[0]
        at = Positions(self.cfg, pos_BT)
        x_BTD = mtp.eh_proj(torch.cat([mtp.enorm(m.embed(next_BT)), mtp.hnorm(h_BTD)], dim=-1))
        x_BTD = block_decode(mtp.block, x_BTD, at, self.mtp_cache, 0)
        return m.head(mtp.norm(x_BTD))

    def close(self) -> None:
        if self.experts is not None:
            self.experts.close()


def moe_layer_count(model: nn.Module) -> int:
    return sum(isinstance(m, MoE) for blk in model.blocks for m in blk.modules())
