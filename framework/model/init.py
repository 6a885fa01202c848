"""Initial weights as a function of (seed, global parameter name, global expert id).

A rank builds the model on the meta device and materialises only what it holds (DESIGN.md
rule 11), so no global random stream can be consumed in module order: a rank holding stage 3
would otherwise draw stage 0's numbers. Instead every tensor gets its own generator, seeded by
a stable hash (BLAKE2b, not Python's salted `hash()`) of the run seed and the tensor's global
name, and every routed expert by the hash of (seed, name, global expert id). Any layout then
starts from the global weights one process would, on the same device type (CPU and CUDA
generators draw different numbers from one seed).

Rules (DeepSeek-V3's): normal(0, init_std) for every matrix (embedding, projections, gate,
experts), ones for RMSNorm weights, zeros for the balancing state (expert_bias, expert_load).

    init_weights(model, seed, std)      # in place, on whatever device the tensors are
    init_weights(moe, draw_seed(), std)  # a module on its own, seeded by torch.manual_seed
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from framework.model.moe import GroupedExperts
from framework.model.norm import RMSNorm


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from the parts' text, the same in every process and Python version."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def draw_seed() -> int:
    """A seed from torch's global CPU generator, so torch.manual_seed still decides a model."""
    return int(torch.randint(0, 2**62, (1,), device="cpu").item())


def _normal_(t: torch.Tensor, std: float, seed: int) -> None:
    gen = torch.Generator(device=t.device).manual_seed(seed)
    t.normal_(0.0, std, generator=gen)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, std: float) -> None:
    """Initialise every parameter and buffer of `model` in place. Names are the module's own
    (a pruned pipeline rank keeps the full model's names); a GroupedExperts holding experts
    [first_expert, first_expert + E) of its layer draws each one from its global id."""
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, p in module.named_parameters(recurse=False):
            full = prefix + name
            if isinstance(module, RMSNorm):
                p.fill_(1.0)
            elif isinstance(module, GroupedExperts):
                for e in range(p.shape[0]):  # one generator per expert: any ep shards alike
                    _normal_(p[e], std, stable_seed(seed, full, module.first_expert + e))
            else:
                _normal_(p, std, stable_seed(seed, full))
        for _, b in module.named_buffers(recurse=False):
            b.zero_()  # balancing state: expert_bias, expert_load
