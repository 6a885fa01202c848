"""Multi-head latent attention (MLA, DeepSeek-V2/V3), training form.

Queries optionally go through a low-rank bottleneck (q_lora_rank > 0: wq_a -> RMSNorm -> wq_b;
0: a plain wq, as in V2-Lite). Keys and values share one compressed latent c_kv (wkv_a ->
RMSNorm) that wkv_b expands per head into the no-position key part and the value. Position
enters only through a small decoupled rope key, computed once from the input and shared by all
heads (wkv_a emits it beside the latent). Training does not need the absorbed inference form;
the expanded keys/values go through a causal scaled-dot-product attention.

The attention core pads v with zeros to the q/k head dim and slices the output back
(`attention_core`): scaled_dot_product_attention's fused kernels (CPU flash, FlashAttention)
need one head dim for q, k and v, and MLA's differ (V3: 192 vs 128), which would send it to
the math path that materialises the whole score matrix. The zero columns contribute nothing
to the kept ones, so the result is the same up to summation order.

Legend: B batch, T sequence, D model dim, H heads, N no-rope head dim, R rope head dim,
V value head dim, Q q_lora_rank, C kv_lora_rank.
"""

import torch
import torch.nn.functional as F
from torch import nn

from duet_kernels.cpu_attention import causal_attention
from framework.config import ModelConfig
from framework.model.norm import RMSNorm
from framework.model.rope import apply_rope, rope_tables, rope_tail, softmax_scale

# DeepSeek's reference and transformers both build the two latent norms with eps 1e-6 regardless
# of the model's norm eps; keep that so imported checkpoints behave identically.
LATENT_NORM_EPS = 1e-6
# PyTorch's CPU flash-attention kernel is slower in bf16 than in fp32 on short sequences (fwd + bwd,
# one thread, AVX512-BF16: 2.0x slower at 128 tokens, 1.2x at 256, 0.8-0.9x from 512 on), so
# shorter bf16 sequences run the core in fp32 there and cast the output back. From 512 tokens on,
# bf16 runs flash's forward with duet_kernels/cpu_attention.py's blocked backward, which is faster than
# flash's own backward (fwd + bwd at MLA's shapes, 2 threads with AMX: 1.4x at 4 x 512, 1.1-1.2x
# at 1 x 2048).
CPU_BF16_ATTENTION_MIN_SEQ = 512  # (torch 2.13)


def attention_core(q_BHTK: torch.Tensor, k_BHTK: torch.Tensor, v_BHTV: torch.Tensor, scale: float,
                   pad_v: bool = True) -> torch.Tensor:
    """Causal softmax(q k^T * scale) v -> o_BHTV; pad_v=False is the plain call (the reference)."""
    K, V = q_BHTK.shape[-1], v_BHTV.shape[-1]
    dtype, T = v_BHTV.dtype, q_BHTK.shape[-2]
    if q_BHTK.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        if T < CPU_BF16_ATTENTION_MIN_SEQ:
            with torch.autocast("cpu", enabled=False):  # autocast would send SDPA back to bf16
                o_BHTV = attention_core(q_BHTK.float(), k_BHTK.float(), v_BHTV.float(), scale, pad_v)
            return o_BHTV.to(dtype)
        if pad_v and V <= K and dtype == torch.bfloat16:
            return causal_attention(q_BHTK, k_BHTK, v_BHTV, scale)
    if not pad_v or V >= K:  # (V > K never occurs in DeepSeek's configs)
        return F.scaled_dot_product_attention(q_BHTK, k_BHTK, v_BHTV, is_causal=True, scale=scale)
    o_BHTK = F.scaled_dot_product_attention(q_BHTK, k_BHTK, F.pad(v_BHTV, (0, K - V)), is_causal=True,
                                            scale=scale)
    return o_BHTK[..., :V]


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, N, R, V = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.n_heads, self.nope_dim, self.rope_dim, self.v_dim = H, N, R, V
        if cfg.q_lora_rank > 0:
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.wq_b = nn.Linear(cfg.q_lora_rank, H * (N + R), bias=False)
        else:
            self.wq = nn.Linear(cfg.dim, H * (N + R), bias=False)
        self.wkv_a = nn.Linear(cfg.dim, cfg.kv_lora_rank + R, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, H * (N + V), bias=False)
        self.wo = nn.Linear(H * V, cfg.dim, bias=False)
        self.scale = softmax_scale(cfg)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H, N, R, V = self.n_heads, self.nope_dim, self.rope_dim, self.v_dim
        cos_TF, sin_TF = rope_tables(self.cfg, T, x_BTD.device)

        if self.cfg.q_lora_rank > 0:
            q_BTX = self.wq_b(self.q_norm(self.wq_a(x_BTD)))
        else:
            q_BTX = self.wq(x_BTD)
        q_BTHK = rope_tail(q_BTX.view(B, T, H, N + R), cos_TF, sin_TF)  # [no-rope | rotated rope] part

        kv_BTX = self.wkv_a(x_BTD)
        c_kv_BTC, k_rope_BTR = kv_BTX.split([self.cfg.kv_lora_rank, R], dim=-1)
        k_rope_BT1R = apply_rope(k_rope_BTR.unsqueeze(2), cos_TF, sin_TF)
        kv_BTHX = self.wkv_b(self.kv_norm(c_kv_BTC)).view(B, T, H, N + V)
        k_nope_BTHN, v_BTHV = kv_BTHX.split([N, V], dim=-1)

        # The rope key is shared by all heads: broadcast it instead of learning it per head.
        k_BTHK = torch.cat([k_nope_BTHN, k_rope_BT1R.expand(B, T, H, R)], dim=-1)
        o_BHTV = attention_core(q_BTHK.transpose(1, 2), k_BTHK.transpose(1, 2), v_BTHV.transpose(1, 2),
                                self.scale)
        return self.wo(o_BHTV.transpose(1, 2).reshape(B, T, H * V))
