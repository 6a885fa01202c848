"""Rollouts: responses sampled from the current weights (framework/generate.py), and per-token
log-probabilities from a training-engine forward.

    tokens, logprobs, experts = sample(model, prompt_ids, max_new_tokens, temperature, seed)
    logp_BT = token_logprobs(model, tokens_BT, targets_BT, temperature)

`sample` is the one place rollouts come from: framework.generate.generate on the latent KV
cache, stopping at END (kept). logprobs are those of the distribution each token was drawn from
(temperature applied; 0 for greedy). experts[b] ([MoE layers, prompt + new tokens, K]) are the
experts every position was routed to during sampling -- the rollout's routes, which routing
replay forces in training and against which the training forward's agreement is measured
(None for a dense model). Under expert parallelism every rank of the ep group samples in lock
step until all are done (generate's all_done).

Legend: B sequences, T positions, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from framework.generate import SamplingParams, ep_all_done, generate
from framework.posttrain.sft import END


def sample(model, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float, seed: int,
           ep_group=None) -> tuple[list[list[int]], list[list[float]], list[torch.Tensor] | None]:
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, stop_tokens=(END,),
                            seed=seed)
    moe = bool(model.moe_layers())
    out = generate(model, prompt_ids, params, return_experts=moe,
                   all_done=ep_all_done(ep_group) if ep_group is not None else None)
    return [t.tolist() for t in out.tokens], [lp.tolist() for lp in out.sampling_logprobs], out.experts


def token_logprobs(model, tokens_BT: torch.Tensor, targets_BT: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """log pi(targets[t] | tokens[:t+1]) for every position, fp32 [B, T] (sampling temperature
    applied, as the sampler's distribution was; 0 means 1, the greedy case)."""
    return target_logprobs(model(tokens_BT), targets_BT, temperature)


def target_logprobs(logits_BTV: torch.Tensor, targets_BT: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """token_logprobs from given logits (a pipeline's last stage computes them)."""
    logits_BTV = logits_BTV.float()
    if temperature > 0:
        logits_BTV = logits_BTV / temperature
    return F.log_softmax(logits_BTV, -1).gather(2, targets_BT[..., None]).squeeze(2)
