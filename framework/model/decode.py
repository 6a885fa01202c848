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
import torch.nn.functional as F
from torch import nn

from framework.model.attention import MLA
from framework.model.moe import LocalDispatcher, MoE
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


class RopeTable:
    """The rope of every slot of one decode, computed once: the training forward's fp32 cos/sin
    rows [S, F] and, when small enough, the same rotations as block-diagonal matrices [S, R, R]
    (x_R @ rot_RR turns each adjacent pair by its angle): then every layer's rope at a decode
    step is one batched product instead of a dozen elementwise passes."""

    def __init__(self, cfg, slots: int, device):
        self.cos_SF, self.sin_SF = rope_tables(cfg, min(slots, cfg.max_seq_len), device)
        self._rot: dict[torch.dtype, torch.Tensor] = {}

    def rotations(self, dtype: torch.dtype) -> torch.Tensor | None:
        S, F = self.cos_SF.shape
        if S * 4 * F * F > ROPE_AS_GEMM_ELEMENTS:
            return None
        if dtype not in self._rot:
            c_SF, s_SF = self.cos_SF.to(dtype), self.sin_SF.to(dtype)
            # Pair (x0, x1) -> (x0 c - x1 s, x0 s + x1 c): rows are inputs, columns outputs.
            pair_SF22 = torch.stack([torch.stack([c_SF, s_SF], -1), torch.stack([-s_SF, c_SF], -1)], -2)
            eye_FF = torch.eye(F, dtype=dtype, device=c_SF.device)
            self._rot[dtype] = torch.einsum("sfab,fg->sfagb", pair_SF22, eye_FF).reshape(S, 2 * F, 2 * F)
        return self._rot[dtype]


class Positions:
    """What every layer of one decode call shares: positions, rope rows and the hidden slots.

    The rope rows at the per-sequence positions, flattened to [B*T, ...], are rows of the
    decode's table. `slots` is read to the host once per call, not once per layer; a position
    past max_seq_len is refused as rope_tables refuses it."""

    def __init__(self, cfg, pos_BT: torch.Tensor, table: RopeTable):
        self.pos_BT, self.table = pos_BT, table
        self.slots = int(pos_BT.max()) + 1
        if self.slots > table.cos_SF.shape[0]:
            rope_tables(cfg, self.slots)  # raises past max_seq_len
            raise ValueError(f"position {self.slots - 1} is past the decoder's {table.cos_SF.shape[0]} slots")
        self.flat_M = pos_BT.flatten()
        # Causal per sequence: slot s holds position s, hidden from queries at positions < s.
        slots_S = torch.arange(self.slots, device=pos_BT.device)
        self.hidden_BTS = slots_S[None, None, :] > pos_BT[:, :, None]
        self._rows: dict = {}

    def score_bias(self, heads: int, dtype: torch.dtype) -> torch.Tensor:
        """[B, T * heads, S]: 0 where a query (per head) sees the slot, -inf where it is hidden;
        the mask as the additive input of the score GEMM, built once per call for all layers."""
        key = ("bias", heads, dtype)
        if key not in self._rows:
            B, T, S = self.hidden_BTS.shape
            bias_BTS = torch.zeros(B, T, S, dtype=dtype, device=self.hidden_BTS.device)
            bias_BTS.masked_fill_(self.hidden_BTS, float("-inf"))
            self._rows[key] = bias_BTS[:, :, None].expand(B, T, heads, S).reshape(B, T * heads, S)
        return self._rows[key]

    def rotation(self, dtype: torch.dtype) -> torch.Tensor | None:
        """[B*T, R, R] rotations at the positions, when the rows are few (decode steps)."""
        key = ("rot", dtype)
        if key not in self._rows:
            rot_SRR = self.table.rotations(dtype)
            M, R = self.flat_M.numel(), 2 * self.table.cos_SF.shape[1]
            few = rot_SRR is not None and M * R * R <= ROPE_AS_GEMM_ELEMENTS
            self._rows[key] = rot_SRR[self.flat_M] if few else None
        return self._rows[key]

    def cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        if "cos" not in self._rows:
            self._rows["cos"] = (self.table.cos_SF[self.flat_M], self.table.sin_SF[self.flat_M])
        return self._rows["cos"]


# Rope as a GEMM only while the per-row rotation matrices stay small (elements over all rows).
ROPE_AS_GEMM_ELEMENTS = 1 << 22


def _rope(x_BTHR: torch.Tensor, at: Positions) -> torch.Tensor:
    B, T, H, R = x_BTHR.shape
    wide = torch.promote_types(x_BTHR.dtype, torch.float32)  # apply_rope's compute dtype
    rot_MRR = at.rotation(wide)
    if rot_MRR is not None:
        return torch.bmm(x_BTHR.reshape(B * T, H, R).to(wide), rot_MRR).view(B, T, H, R).to(x_BTHR.dtype)
    # apply_rope takes one table row per sequence position; fold B into T so each row has its own.
    return apply_rope(x_BTHR.reshape(1, B * T, H, R), *at.cos_sin()).view(B, T, H, R)


def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm.forward's arithmetic through torch's rms_norm (fewer calls): normalise in fp32 at
    least, cast back to the input dtype, then scale by the weight in the weight's dtype
    promotion; with input and weight already in the wide dtype the scale joins the call."""
    wide = torch.promote_types(x.dtype, torch.float32)
    shape = (x.shape[-1],)
    if x.dtype == wide and norm.weight.dtype == wide:
        return F.rms_norm(x, shape, norm.weight, norm.eps)
    return norm.weight * F.rms_norm(x.to(wide), shape, eps=norm.eps).to(x.dtype)


# Stack wq_a and wkv_a into one weight only up to this many elements (a per-decode copy).
STACK_INPUT_ELEMENTS = 1 << 22


class Absorbed:
    """Per MLA, what a decode computes once: wkv_b split into the two ends of the absorbed form, as
    views in the layouts the batched GEMMs read, W_uk [H, N, C] (query side) and W_uv^T [H, C, V]
    (output side), cast to the compute dtype once (under autocast that would otherwise be a copy
    per step); and, for small models, the two down-projections that read the same input, wq_a
    (or wq) and wkv_a, stacked into one weight [Q + C + R, D] (one GEMM instead of two, for a
    copy of STACK_INPUT_ELEMENTS at most)."""

    def __init__(self, attn: MLA):
        self.attn = attn
        self._by_dtype: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        self.first = attn.wq_a if attn.cfg.q_lora_rank > 0 else attn.wq
        self.split = [self.first.weight.shape[0], attn.wkv_a.weight.shape[0]]
        small = self.first.weight.numel() + attn.wkv_a.weight.numel() <= STACK_INPUT_ELEMENTS
        self.w_in_XD = torch.cat([self.first.weight, attn.wkv_a.weight]) if small else None

    def project(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q or its LoRA latent, [c_kv | k_rope]) of the block's input."""
        if self.w_in_XD is None:
            return self.first(x_BTD), self.attn.wkv_a(x_BTD)
        return F.linear(x_BTD, self.w_in_XD).split(self.split, dim=-1)

    def get(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if dtype not in self._by_dtype:
            a = self.attn
            w_HXC = a.wkv_b.weight.view(a.n_heads, a.nope_dim + a.v_dim, a.cfg.kv_lora_rank).to(dtype)
            self._by_dtype[dtype] = (w_HXC[:, :a.nope_dim], w_HXC[:, a.nope_dim:].transpose(1, 2))
        return self._by_dtype[dtype]


def mla_decode(attn: MLA, x_BTD: torch.Tensor, at: Positions, cache: LatentCache, layer: int,
               absorbed: Absorbed | None = None) -> torch.Tensor:
    """MLA over the cached latent plus the T new tokens at positions at.pos_BT (written first)."""
    cfg = attn.cfg
    B, T, _ = x_BTD.shape
    H, N, R, C = attn.n_heads, attn.nope_dim, attn.rope_dim, cfg.kv_lora_rank
    absorbed = absorbed or Absorbed(attn)
    q_BTX, kv_BTX = absorbed.project(x_BTD)
    if cfg.q_lora_rank > 0:
        q_BTX = attn.wq_b(_norm(attn.q_norm, q_BTX))
    dtype = q_BTX.dtype
    q_nope_BTHN, q_rope_BTHR = q_BTX.reshape(B, T, H, N + R).split([N, R], dim=-1)
    c_kv_BTC, k_rope_BTR = kv_BTX.split([C, R], dim=-1)
    # The query heads and the shared key rotate in one call (rope is per row).
    roped_BTGR = _rope(torch.cat([q_rope_BTHR, k_rope_BTR[:, :, None].to(dtype)], dim=2), at)
    new_BTX = torch.cat([_norm(attn.kv_norm, c_kv_BTC), roped_BTGR[:, :, H]], dim=-1)
    S = at.slots  # the slots any query of this call can see
    kv_BSX = cache.write(layer, at.pos_BT, new_BTX)[:, :S].to(dtype)  # [c | k_rope] per slot

    w_uk_HNC, w_uv_HCV = absorbed.get(dtype)
    # q_lat = W_uk^T q_nope per head; with q_rope it scores [c | k_rope] in one product:
    # q_nope . (W_uk c) + q_rope . k_rope = [q_lat | q_rope] . [c | k_rope].
    q_lat_HMC = torch.bmm(q_nope_BTHN.reshape(B * T, H, N).transpose(0, 1), w_uk_HNC)
    q_BQX = torch.cat([q_lat_HMC.transpose(0, 1), roped_BTGR[:, :, :H].reshape(B * T, H, R)], dim=-1)
    # Causal per sequence (slot s holds position s): the mask enters as the GEMM's additive input.
    score_BQS = torch.baddbmm(at.score_bias(H, dtype), q_BQX.view(B, T * H, C + R), kv_BSX.transpose(1, 2),
                              alpha=attn.scale)
    # Softmax in fp32 at least (SDPA's math path accumulates it in fp32 too for low-precision inputs).
    p_BQS = score_BQS.to(torch.promote_types(dtype, torch.float32)).softmax(-1).to(dtype)
    o_lat_BQC = torch.bmm(p_BQS, kv_BSX[..., :C])
    o_HMV = torch.bmm(o_lat_BQC.view(B * T, H, C).transpose(0, 1), w_uv_HCV)
    return attn.wo(o_HMV.transpose(0, 1).reshape(B, T, H * attn.v_dim))


# One MoE at few tokens (decode steps): below this many multiply-adds for running every expert on
# every token, one dense SwiGLU over all experts with the unchosen gates at zero beats sorting
# (token, expert) pairs for grouped GEMMs; same router call, same experts, same weights.
DENSE_EXPERTS_MACS = 1 << 23


class DenseExperts:
    """The routed experts of one MoE and its shared expert as two plain GEMMs. The shared expert's
    n_shared * I inner rows are n_shared more experts of inner dim I with gate 1, so
        [w1; w1_shared; w3; w3_shared]  [2 * (E + S) * I, D]   (gate and up of every expert)
        [w2 | w2_shared]                [D, (E + S) * I]       (down, summed over all of them)
    (copies made once per decode, when a step first takes this path). Only for a single-process
    MoE (LocalDispatcher): under expert parallelism the tokens must travel."""

    def __init__(self, moe: MoE):
        self.moe = moe
        self.w13_XD: torch.Tensor | None = None
        self.w2_DX: torch.Tensor | None = None
        self.gate_1G: torch.Tensor | None = None

    def applies(self, n_tokens: int) -> bool:
        if type(self.moe.dispatcher) is not LocalDispatcher:
            return False
        E, inner, D = self.moe.experts.w1.shape
        return n_tokens * E * inner * D * 3 <= DENSE_EXPERTS_MACS

    def _weights(self) -> None:
        ex, sh = self.moe.experts, self.moe.shared
        E, inner, D = ex.w1.shape
        w1, w3 = [ex.w1.reshape(E * inner, D)], [ex.w3.reshape(E * inner, D)]
        w2 = [ex.w2.permute(1, 0, 2).reshape(D, E * inner)]
        if sh is not None:
            w1.append(sh.w1.weight)
            w3.append(sh.w3.weight)
            w2.append(sh.w2.weight)
        self.w13_XD, self.w2_DX = torch.cat(w1 + w3), torch.cat(w2, dim=1)

    def __call__(self, x_TD: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        if self.w13_XD is None:
            self._weights()
        E, inner, _ = self.moe.experts.w1.shape
        S = self.w2_DX.shape[1] // inner - E  # shared-expert blocks
        h_TX = F.linear(x_TD, self.w13_XD)
        h1_TGI, h3_TGI = h_TX.view(-1, 2, E + S, inner).unbind(1)
        if self.gate_1G is None or self.gate_1G.dtype != w_TK.dtype:
            self.gate_1G = torch.cat([w_TK.new_zeros(1, E), w_TK.new_ones(1, S)], dim=1)  # shared: 1
        gate_TG = self.gate_1G.expand(x_TD.shape[0], -1).scatter(1, idx_TK, w_TK)
        a_TGI = F.silu(h1_TGI) * h3_TGI * gate_TG[..., None].to(h_TX.dtype)
        return F.linear(a_TGI.reshape(-1, (E + S) * inner), self.w2_DX)


def moe_decode(moe: MoE, dense: DenseExperts | None, x_BTD: torch.Tensor) -> torch.Tensor:
    B, T, D = x_BTD.shape
    if dense is None or not dense.applies(B * T):
        return moe(x_BTD)
    x_TD, idx_TK, w_TK, _ = moe.route(x_BTD)  # the router module: its hooks (ExpertLog) fire
    return dense(x_TD, idx_TK, w_TK).view(B, T, D)  # routed and shared experts


class _BlockFast:
    """Per block, what decoding computes once instead of every step."""

    def __init__(self, block: nn.Module):
        self.absorbed = Absorbed(block.attn)
        self.dense = DenseExperts(block.ffn) if isinstance(block.ffn, MoE) else None


def block_decode(block: nn.Module, x_BTD: torch.Tensor, at: Positions, cache: LatentCache,
                 layer: int, fast: _BlockFast | None = None) -> torch.Tensor:
    fast = fast or _BlockFast(block)
    x_BTD = x_BTD + mla_decode(block.attn, _norm(block.attn_norm, x_BTD), at, cache, layer, fast.absorbed)
    h_BTD = _norm(block.ffn_norm, x_BTD)
    return x_BTD + (moe_decode(block.ffn, fast.dense, h_BTD) if fast.dense is not None else block.ffn(h_BTD))


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
        # Constant over the decode: the rope of every slot, each block's absorbed weights.
        self.rope = RopeTable(self.cfg, slots, dev)
        self.fast = [_BlockFast(blk) for blk in model.blocks]
        self.mtp_fast = _BlockFast(model.mtp[0].block) if len(model.mtp) else None
        main_moes = [m for blk in model.blocks for m in blk.modules() if isinstance(m, MoE)]
        self.experts = (ExpertLog(main_moes, batch, slots, self.cfg.n_activated_experts, dev)
                        if record_experts and main_moes else None)

    def step(self, tokens_BT: torch.Tensor, pos_BT: torch.Tensor,
             write_B: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        at = Positions(self.cfg, pos_BT, self.rope)
        if self.experts is not None:
            self.experts.expect(pos_BT, write_B)
        h_BTD = m.embed(tokens_BT)
        for i, block in enumerate(m.blocks):
            h_BTD = block_decode(block, h_BTD, at, self.cache, i, self.fast[i])
        if self.experts is not None:
            self.experts.expect(None)
        h_BTD = _norm(m.norm, h_BTD)
        return m.head(h_BTD), h_BTD

    def mtp_step(self, h_BTD: torch.Tensor, next_BT: torch.Tensor, pos_BT: torch.Tensor) -> torch.Tensor:
        m = self.model
        mtp = m.mtp[0]
        at = Positions(self.cfg, pos_BT, self.rope)
        x_BTD = mtp.eh_proj(torch.cat([_norm(mtp.enorm, m.embed(next_BT)), _norm(mtp.hnorm, h_BTD)], dim=-1))
        x_BTD = block_decode(mtp.block, x_BTD, at, self.mtp_cache, 0, self.mtp_fast)
        return m.head(_norm(mtp.norm, x_BTD))

    def close(self) -> None:
        if self.experts is not None:
            self.experts.close()


def moe_layer_count(model: nn.Module) -> int:
    return sum(isinstance(m, MoE) for blk in model.blocks for m in blk.modules())
