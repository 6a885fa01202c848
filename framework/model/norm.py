"""RMSNorm, computed in fp32 whatever the activation dtype.

Legend: B batch, T sequence, D feature dim (any trailing size).
"""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (bf16 sums of squares lose too much), then scale in the input dtype,
        # the order DeepSeek's and transformers' reference code use, so logits match bit for bit-ish.
        # fp64 stays fp64: an fp32 round trip would cap fp64 reference checks at ~1e-7.
        x32_BTD = x_BTD.to(torch.promote_types(x_BTD.dtype, torch.float32))
        x32_BTD = x32_BTD * torch.rsqrt(x32_BTD.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32_BTD.to(x_BTD.dtype)
