"""duet's model: a plain nn.Module built from a ModelConfig; knows nothing about process groups."""

from framework.model.attention import MLA
from framework.model.mlp import MLP
from framework.model.moe import GroupedExperts, LocalDispatcher, MoE, Router, seq_balance_loss
from framework.model.mtp import MTPModule
from framework.model.norm import RMSNorm
from framework.model.transformer import Block, Stage, Transformer, count_params

__all__ = [
           "MLA",
           "MLP",
           "Block",
           "GroupedExperts",
           "LocalDispatcher",
           "MTPModule",
           "MoE",
           "RMSNorm",
           "Router",
           "Stage",
           "Transformer",
           "count_params",
           "seq_balance_loss",
]
