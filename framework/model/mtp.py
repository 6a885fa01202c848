"""Multi-token prediction (DeepSeek-V3): depth k predicts the token k+1 places ahead.

Per depth k:  h'_k = eh_proj([enorm(Emb(t_{i+k})); hnorm(h_{k-1})]) -> block -> norm -> shared head.
The embedding comes first in the concatenation, as in DeepSeek's released checkpoints (and the
engines that serve them); the paper writes the two halves the other way round. h_0 is the main
model's final-normed hidden state, and h_k the normed output of depth k -- always the same
representation the shared head reads. Embedding and head belong to the main model and are passed
in, never owned here.

Legend: B batch, T sequence, D model dim.
"""

import torch
from torch import nn

from framework.config import ModelConfig
from framework.model.norm import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, block: nn.Module):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = block  # an MoE transformer block
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def enter(self, h_BTD: torch.Tensor, emb_BTD: torch.Tensor) -> torch.Tensor:
        """The block's input: h, the previous depth's representation at positions i; emb, Emb(t_{i+k})."""
        return self.eh_proj(torch.cat([self.enorm(emb_BTD), self.hnorm(h_BTD)], dim=-1))

    def forward(self, h_BTD: torch.Tensor, emb_BTD: torch.Tensor) -> torch.Tensor:
        """Normed h_k. The training losses run enter, block and norm apart (transformer.py's
        mtp_input; the pipeline's sub-steps run the three as separate units)."""
        return self.norm(self.block(self.enter(h_BTD, emb_BTD)))
