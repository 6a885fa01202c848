"""Rollouts: sampling responses from the current weights, and per-token log-probabilities.

    tokens, logprobs = sample(model, prompt_ids, max_new_tokens, temperature, seed)
    logp_BT = token_logprobs(model, tokens_BT, targets_BT, temperature)

`sample` is the one place rollouts come from, with the interface the generation issue's sampler
(framework/generate.py, not committed when this was written) is to take over: a list of prompts
in, for each prompt its new tokens (up to and including END, at most max_new_tokens) and their
log-probabilities under the sampling distribution out. Until then it recomputes the whole
sequence each step (no KV cache; the micro model's sequences are ~30 tokens). temperature 0 is
greedy. Prompts are grouped by length, so no prompt is padded (the model has no padding mask);
every group runs exactly max_new_tokens steps when `same_steps`, which expert parallelism needs
(every forward is a collective of the ep group).

Legend: B sequences, T positions, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from framework.posttrain.sft import END


@torch.no_grad()
def sample(model, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float, seed: int,
           same_steps: bool = False) -> tuple[list[list[int]], list[list[float]]]:
    was_training = model.training
    model.eval()  # no expert-load counting, no balance loss while sampling
    device = next(model.parameters()).device
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(prompt_ids):
        by_length.setdefault(len(ids), []).append(i)
    tokens: list[list[int]] = [[] for _ in prompt_ids]
    logprobs: list[list[float]] = [[] for _ in prompt_ids]
    for n, (length, rows) in enumerate(sorted(by_length.items())):
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + n)
        out_BT = torch.tensor([prompt_ids[i] for i in rows], device=device)
        done_B = torch.zeros(len(rows), dtype=torch.bool, device=device)
        new, lps = [], []
        for _ in range(max_new_tokens):
            logits_BV = model(out_BT)[:, -1].float()
            if temperature > 0:
                logp_BV = F.log_softmax(logits_BV / temperature, -1)
                tok_B = torch.multinomial(logp_BV.exp(), 1, generator=gen).squeeze(1)
            else:
                logp_BV = F.log_softmax(logits_BV, -1)
                tok_B = logits_BV.argmax(-1)
            tok_B = torch.where(done_B, END, tok_B)  # finished rows only repeat END (dropped below)
            new.append(tok_B)
            lps.append(logp_BV.gather(1, tok_B[:, None]).squeeze(1))
            done_B |= tok_B == END
            out_BT = torch.cat([out_BT, tok_B[:, None]], 1)
            if not same_steps and bool(done_B.all()):
                break
        new_BR, lp_BR = torch.stack(new, 1).tolist(), torch.stack(lps, 1).tolist()
        for b, i in enumerate(rows):
            cut = new_BR[b].index(END) + 1 if END in new_BR[b] else len(new_BR[b])
            tokens[i], logprobs[i] = new_BR[b][:cut], lp_BR[b][:cut]
    model.train(was_training)
    return tokens, logprobs


def token_logprobs(model, tokens_BT: torch.Tensor, targets_BT: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """log pi(targets[t] | tokens[:t+1]) for every position, fp32 [B, T] (sampling temperature
    applied, as the sampler's distribution was; 0 means 1, the greedy case)."""
    logits_BTV = model(tokens_BT).float()
    if temperature > 0:
        logits_BTV = logits_BTV / temperature
    return F.log_softmax(logits_BTV, -1).gather(2, targets_BT[..., None]).squeeze(2)
