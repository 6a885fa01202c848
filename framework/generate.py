"""Batched generation on duet's own model: latent KV cache, sampling, MTP speculative decoding.

The API (stable; framework/posttrain calls it for rollouts):

    out = generate(model, prompts, SamplingParams(max_new_tokens=64, temperature=1.0, top_k=0,
                   top_p=1.0, stop_tokens=(eos,), seed=0), return_experts=False, speculative=False)

Inputs
    model     a Transformer (any dtype; run under autocast if you want bf16 compute); its
              training flag is restored afterwards. Under expert parallelism every rank of the
              ep group calls generate with `all_done` and its own prompts and params (prompt
              lengths, max_new_tokens, stop tokens, temperature and seeds may differ;
              speculative and return_experts may not: they decide which forwards run). The
              ranks step in lock-step, a finished rank keeps answering the others' all-to-alls,
              and each rank's output equals one process decoding its prompts.
    prompts   list of B token-id lists (lengths may differ, each >= 1).
    params    SamplingParams: temperature 0 = greedy; top_k 0 = off; top_p in (0, 1];
              stop_tokens end a sequence (the stop token is kept in its output); seed: sequence b
              draws from its own torch.Generator seeded `seed + b` (or `seeds[b]`), so a
              sequence's sample does not depend on what else is in the batch.
    return_experts  also return the routed experts every token chose in each main MoE layer.
    speculative     draft one token ahead with the MTP module, verify with the main model.
    all_done  callable(local_done: bool) -> bool, the global "all done" reduction under ep > 1
              (ep_all_done(group) builds it); None = this process alone.

Output: Generation with, per sequence b (CPU tensors):
    tokens[b]             LongTensor [n_b]  new tokens (n_b <= max_new_tokens)
    logprobs[b]           FloatTensor [n_b] log-prob of each under the model's distribution at
                          temperature 1 (no top-k / top-p); fp32, fp64 for an fp64 model
    sampling_logprobs[b]  FloatTensor [n_b] log-prob under the distribution it was drawn from
                          (temperature, top-k, top-p applied; 0 for greedy)
    experts[b]            LongTensor [n_moe_layers, len(prompt_b) + n_b, K] (return_experts),
                          the experts each prompt and new token was routed to, in model order
    drafted, accepted     speculative statistics (drafts verified, drafts accepted)

A prompt plus max_new_tokens beyond model.max_seq_len is a ValueError, never a sliding window.

Speculative decoding (MTP depth 1): each round the main model runs on [last token, draft] at
two positions; the draft d ~ q (MTP's distribution) is kept with probability min(1, p(d)/q(d)),
else a token is drawn from normalise(max(0, p - q)); after a kept draft the main model's
second position gives one more token for free. The result is distributed exactly as plain
sampling from p (Leviathan et al. 2023, Chen et al. 2023); rejected positions are rolled back by
moving the sequence's position (the caches are indexed by position).

Legend: B batch, T tokens, V vocabulary, D model dim.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from framework.model.decode import Decoder

NEG_INF = float("-inf")


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # nucleus mass in (0, 1]
    stop_tokens: tuple[int, ...] = ()
    seed: int = 0

    def problems(self) -> list[str]:
        out = []
        if self.max_new_tokens < 1:
            out.append(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            out.append(f"temperature={self.temperature}: must be >= 0 (0 means greedy)")
        if self.top_k < 0:
            out.append(f"top_k={self.top_k}: must be >= 0 (0 means no top-k cut)")
        if not 0 < self.top_p <= 1:
            out.append(f"top_p={self.top_p}: must be in (0, 1]")
        return out


@dataclass
class Generation:
    tokens: list[torch.Tensor]
    logprobs: list[torch.Tensor]
    sampling_logprobs: list[torch.Tensor]
    experts: list[torch.Tensor] | None = None
    drafted: int = 0
    accepted: int = 0
    steps: int = 0  # main-model forward calls after the prefill
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- distributions


def _wide(x: torch.Tensor) -> torch.Tensor:
    """fp32 at least: bf16 logits are normalised in fp32, fp64 ones stay fp64 (so an fp64 model's
    log-probs compare to 1e-10)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def sampling_logprobs(logits_BV: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Log-probabilities [B, V] (fp32 or wider, -inf outside the support) of the distribution tokens are
    drawn from: greedy = all mass on the argmax; else softmax(logits / T) cut to the top_k
    tokens (ties at the k-th value kept) and to the smallest prefix of the sorted tokens whose
    mass reaches top_p, renormalised."""
    z_BV = _wide(logits_BV)
    if p.temperature == 0:
        out = torch.full_like(z_BV, NEG_INF)
        return out.scatter_(1, z_BV.argmax(-1, keepdim=True), 0.0)
    z_BV = z_BV / p.temperature
    if 0 < p.top_k < z_BV.shape[-1]:
        kth_B1 = z_BV.topk(p.top_k, dim=-1).values[:, -1:]
        z_BV = z_BV.masked_fill(z_BV < kth_B1, NEG_INF)
    if p.top_p < 1:
        sorted_BV, order_BV = z_BV.sort(-1, descending=True)
        prob_BV = sorted_BV.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop_BV = (prob_BV.cumsum(-1) - prob_BV) >= p.top_p
        z_BV = z_BV.scatter(1, order_BV, sorted_BV.masked_fill(drop_BV, NEG_INF))
    return z_BV.log_softmax(-1)


def accept_distribution(p_V: torch.Tensor, q_V: torch.Tensor) -> torch.Tensor:
    """The output distribution of one speculative step for target p and draft q (probabilities):
    min(p, q) (draft kept) + (1 - sum min(p, q)) * normalise(max(0, p - q)) (redrawn). Equals p;
    tests check that against p, the sampler uses the same pieces."""
    keep_V = torch.minimum(p_V, q_V)
    return keep_V + (1 - keep_V.sum()) * residual(p_V, q_V)


def residual(p_V: torch.Tensor, q_V: torch.Tensor) -> torch.Tensor:
    """normalise(max(0, p - q)); p itself where p == q (then no draft is ever rejected)."""
    r_V = (p_V - q_V).clamp_min(0)
    total = r_V.sum()
    return r_V / total if total > 0 else p_V


def speculative_choice(p_V: torch.Tensor, q_V: torch.Tensor, draft: int, gen: torch.Generator,
                       greedy: bool) -> tuple[int, bool]:
    """(token, draft kept) by the rejection rule: keep d with probability min(1, p(d) / q(d)),
    else draw from residual(p, q). Greedy (one-hot p and q): keep d iff it is p's argmax."""
    if greedy:
        best = int(p_V.argmax())
        return best, best == draft
    u = torch.rand((), generator=gen, device=p_V.device)
    if u * q_V[draft] < p_V[draft]:  # u < p/q without dividing by a zero q
        return draft, True
    return int(torch.multinomial(residual(p_V, q_V), 1, generator=gen)), False


def _draw(logp_BV: torch.Tensor, gens: list[torch.Generator], rows: Sequence[int]) -> dict[int, int]:
    return {b: int(torch.multinomial(logp_BV[b].exp(), 1, generator=gens[b])) for b in rows}


# --------------------------------------------------------------------------- the loop


def ep_all_done(group) -> Callable[[bool], bool]:
    """The global "all done" of ranks decoding in lock-step (ep > 1): a rank that has finished
    keeps stepping, answering the others' all-to-alls, until every rank is done."""
    from parallel import comm

    def all_done(local_done: bool) -> bool:
        flag = torch.tensor([0 if local_done else 1], device=comm.collective_device(group))
        comm.all_reduce(flag, "max", group=group)
        return int(flag.item()) == 0

    return all_done


def check_inputs(cfg, prompts: list[list[int]], p: SamplingParams, speculative: bool = False) -> None:
    """ValueError naming every problem of these inputs for a model of `cfg` (a ModelConfig);
    needs no model, so a launcher checks before it spawns ranks."""
    problems = p.problems()
    if not prompts:
        problems.append("no prompts")
    for b, prompt in enumerate(prompts):
        if len(prompt) < 1:
            problems.append(f"prompt {b} is empty")
        elif len(prompt) + p.max_new_tokens > cfg.max_seq_len:
            problems.append(f"prompt {b} has {len(prompt)} tokens; with max_new_tokens={p.max_new_tokens} "
                            f"that exceeds model.max_seq_len={cfg.max_seq_len}: shorten it or ask for fewer")
        elif min(prompt) < 0 or max(prompt) >= cfg.vocab_size:
            problems.append(f"prompt {b} has token ids outside [0, {cfg.vocab_size})")
    if speculative and cfg.mtp_depth < 1:
        problems.append("speculative decoding needs an MTP module (model.mtp_depth >= 1)")
    if problems:
        raise ValueError("; ".join(problems))


class _Outputs:
    """Per-sequence accumulation of tokens and their two log-probs, and the finish rule."""

    def __init__(self, B: int, p: SamplingParams, lens: list[int]):
        self.p, self.lens = p, lens
        self.tokens = [[] for _ in range(B)]
        self.lp = [[] for _ in range(B)]
        self.slp = [[] for _ in range(B)]
        self.done = [False] * B
        self.stops = set(p.stop_tokens)

    def emit(self, b: int, tok: int, logp_V: torch.Tensor, samp_V: torch.Tensor) -> None:
        """logp_V: the model's log-probs at temperature 1 (the caller's batched log-softmax)."""
        self._append(b, tok, float(logp_V[tok]), float(samp_V[tok]))

    def emit_rows(self, rows: list[int], tok_B: torch.Tensor, logp_BV: torch.Tensor,
                  samp_BV: torch.Tensor) -> None:
        """emit() for the given rows at once: one gather and one host read for each of the
        tokens, their log-probs and their sampling log-probs."""
        idx_B1 = tok_B[:, None]
        lp, slp = logp_BV.gather(1, idx_B1)[:, 0].tolist(), samp_BV.gather(1, idx_B1)[:, 0].tolist()
        toks = tok_B.tolist()
        for b in rows:
            self._append(b, toks[b], lp[b], slp[b])

    def _append(self, b: int, tok: int, lp: float, slp: float) -> None:
        self.tokens[b].append(tok)
        self.lp[b].append(lp)
        self.slp[b].append(slp)
        if tok in self.stops or len(self.tokens[b]) >= self.p.max_new_tokens:
            self.done[b] = True

    def active(self) -> list[int]:
        return [b for b, d in enumerate(self.done) if not d]

    def last_pos(self, b: int) -> int:
        return self.lens[b] + len(self.tokens[b]) - 1


@torch.no_grad()
def generate(model, prompts: list[list[int]], params: SamplingParams | None = None, *,
             seeds: list[int] | None = None, return_experts: bool = False, speculative: bool = False,
             all_done: Callable[[bool], bool] | None = None) -> Generation:
    """Sample continuations of `prompts` (see the module docstring for inputs and outputs)."""
    p = params or SamplingParams()
    prompts = [list(map(int, x)) for x in prompts]
    check_inputs(model.cfg, prompts, p, speculative)
    was_training = model.training
    model.eval()  # no load counting or balance loss while sampling
    try:
        # Inference mode: no version counters or autograd bookkeeping on the per-step tensors.
        with torch.inference_mode():
            gen = _generate(model, prompts, p, seeds, return_experts, speculative, all_done)
        # Inference tensors may not be saved for backward: hand out normal copies (the caller's
        # loss may use the log-probs and experts, e.g. post-training's old log-probs).
        for name in ("tokens", "logprobs", "sampling_logprobs", "experts"):
            if getattr(gen, name) is not None:
                setattr(gen, name, [t.clone() for t in getattr(gen, name)])
        return gen
    finally:
        model.train(was_training)


def _generate(model, prompts, p: SamplingParams, seeds, return_experts, speculative, all_done) -> Generation:
    dev = model.embed.weight.device
    lockstep, all_done = all_done is not None, all_done or (lambda d: d)
    B, lens = len(prompts), [len(x) for x in prompts]
    seeds = list(seeds) if seeds is not None else [p.seed + b for b in range(B)]
    gens = [torch.Generator(device=dev).manual_seed(int(s)) for s in seeds]
    slots = max(n + p.max_new_tokens for n in lens)
    dec = Decoder(model, B, slots, record_experts=return_experts)
    out = _Outputs(B, p, lens)
    T = max(lens)
    prompt_BT = torch.tensor([x + [0] * (T - len(x)) for x in prompts], device=dev)
    pos_BT = torch.arange(T, device=dev).expand(B, T)
    try:
        logits_BTV, h_BTD = dec.step(prompt_BT, pos_BT)
        last_B = torch.tensor(lens, device=dev) - 1
        logits_BV = logits_BTV[torch.arange(B, device=dev), last_B]
        loop = _speculative_loop if speculative else _plain_loop
        stats = loop(dec, out, p, gens, logits_BV, (prompt_BT, h_BTD), all_done, lockstep)
        experts = None
        if dec.experts is not None:
            # Route each sequence's last token too, so every token has its experts (replay needs them).
            last_BT = torch.tensor([[out.tokens[b][-1]] for b in range(B)], device=dev)
            dec.step(last_BT, torch.tensor([[out.last_pos(b)] for b in range(B)], device=dev))
            ids = dec.experts.ids_BLSK.cpu()
            experts = [ids[b, :, : lens[b] + len(out.tokens[b])] for b in range(B)]
    finally:
        dec.close()
    lp_dtype = _wide(logits_BV[:0]).dtype  # fp32, or fp64 for an fp64 model
    return Generation(tokens=[torch.tensor(t, dtype=torch.long) for t in out.tokens],
                      logprobs=[torch.tensor(x, dtype=lp_dtype) for x in out.lp],
                      sampling_logprobs=[torch.tensor(x, dtype=lp_dtype) for x in out.slp],
                      experts=experts, **stats)


def _plain_loop(dec: Decoder, out: _Outputs, p, gens, logits_BV, _prefill, all_done, _lockstep) -> dict:
    B, dev, steps = len(gens), logits_BV.device, 0
    greedy = p.temperature == 0
    last_B1 = torch.zeros(B, 1, dtype=torch.long, device=dev)
    pos_B1 = torch.tensor([[n - 1] for n in out.lens], device=dev)
    while True:
        # Batched per step: the distributions, the picks, both log-probs; one host read (the
        # tokens, for the stop rule). Draws stay per row: each sequence has its own generator.
        samp_BV = sampling_logprobs(logits_BV, p)
        rows = out.active()
        if greedy:
            tok_B = logits_BV.argmax(-1)  # the argmax sampling_logprobs put all mass on
        else:
            drawn = _draw(samp_BV, gens, rows)
            tok_B = torch.tensor([drawn.get(b, 0) for b in range(B)], device=dev)
        out.emit_rows(rows, tok_B, _wide(logits_BV).log_softmax(-1), samp_BV)
        if all_done(all(out.done)):
            return {"steps": steps}
        # A finished sequence keeps stepping on its last slot (its results are final; under ep > 1
        # its rank still answers the all-to-alls); only active ones write expert ids.
        live_B1 = torch.zeros(B, 1, dtype=torch.bool)
        live_B1[rows] = True
        live_B1 = live_B1.to(dev)
        last_B1 = torch.where(live_B1, tok_B[:, None], last_B1)
        pos_B1 = pos_B1 + live_B1
        write_B = torch.tensor([not d for d in out.done], device=dev)
        logits_BV = dec.step(last_B1, pos_B1, write_B)[0][:, 0]
        steps += 1


def _speculative_loop(dec: Decoder, out: _Outputs, p, gens, logits_BV, prefill, all_done, lockstep) -> dict:
    """Round: main on [x, d] at (n, n+1) -> keep or redraw d, then a free token after a kept d;
    MTP on (h_n, x_{n+1}), (h_{n+1}, x_{n+2}) at (n, n+1) -> the next draft from the last valid."""
    prompt_BT, h_BTD = prefill
    B, dev, greedy = len(gens), logits_BV.device, p.temperature == 0
    lens = out.lens
    # The first new token comes from the prefill's logits, as in plain decoding.
    samp_BV, logp_BV = sampling_logprobs(logits_BV, p), _wide(logits_BV).log_softmax(-1)
    for b, tok in _pick(samp_BV, gens, range(B), greedy).items():
        out.emit(b, tok, logp_BV[b], samp_BV[b])
    # MTP prefill: position i reads h_i and token i+1 (the new token after the prompt's last).
    next_BT = torch.roll(prompt_BT, -1, dims=1)
    next_BT[torch.arange(B, device=dev), torch.tensor(lens, device=dev) - 1] = torch.tensor(
        [out.tokens[b][0] for b in range(B)], device=dev)
    pos_BT = torch.arange(prompt_BT.shape[1], device=dev).expand_as(prompt_BT)
    mtp_BTV = dec.mtp_step(h_BTD, next_BT, pos_BT)
    q_BV = sampling_logprobs(mtp_BTV[torch.arange(B, device=dev), torch.tensor(lens, device=dev) - 1], p)
    drafts = _pick(q_BV, gens, out.active(), greedy)
    drafted = accepted = steps = 0
    while not all_done(all(out.done)):
        n_B = [out.last_pos(b) for b in range(B)]
        # Finished sequences step on their last slot twice (results final, all-to-alls answered).
        pos_B2 = torch.tensor([[n, n + int(not out.done[b])] for b, n in enumerate(n_B)], device=dev)
        tok_B2 = torch.tensor([[out.tokens[b][-1], drafts.get(b, 0)] for b in range(B)], device=dev)
        write_B = torch.tensor([not d for d in out.done], device=dev)
        logits_B2V, h_B2D = dec.step(tok_B2, pos_B2, write_B)
        steps += 1
        # Batched over sequences and both positions: the distributions, their exps, greedy picks.
        samp_B2V = sampling_logprobs(logits_B2V.flatten(0, 1), p).view_as(logits_B2V)
        samp0_BV, samp1_BV = samp_B2V[:, 0], samp_B2V[:, 1]
        logp_B2V = _wide(logits_B2V).log_softmax(-1)
        p0_BV, qp_BV = samp0_BV.exp(), q_BV.exp()  # probabilities
        best1 = samp1_BV.argmax(-1).tolist() if greedy else None
        mtp_next, use_second = [[0, 0] for _ in range(B)], [False] * B
        for b in out.active():
            drafted += 1
            tok, kept = speculative_choice(p0_BV[b], qp_BV[b], drafts[b], gens[b], greedy)
            out.emit(b, tok, logp_B2V[b, 0], samp0_BV[b])
            mtp_next[b][0] = tok
            if kept:
                accepted += 1
                use_second[b] = True
                if not out.done[b]:  # the main model's second position gives one more token
                    bonus = best1[b] if greedy else _draw(samp1_BV, gens, [b])[b]
                    out.emit(b, bonus, logp_B2V[b, 1], samp1_BV[b])
                    mtp_next[b][1] = bonus
        if all(out.done) and not lockstep:
            continue  # no draft needed; in lock-step the MTP block's MoE still answers the others
        mtp_B2V = dec.mtp_step(h_B2D, torch.tensor(mtp_next, device=dev), pos_B2)
        pick_B = torch.tensor([1 if s else 0 for s in use_second], device=dev)
        q_BV = sampling_logprobs(mtp_B2V[torch.arange(B, device=dev), pick_B], p)
        drafts = _pick(q_BV, gens, out.active(), greedy)
    return {"drafted": drafted, "accepted": accepted, "steps": steps}


def _pick(logp_BV: torch.Tensor, gens, rows, greedy: bool) -> dict[int, int]:
    if not greedy:
        return _draw(logp_BV, gens, rows)
    best = logp_BV.argmax(-1).tolist()  # one host read for the batch
    return {b: best[b] for b in rows}


def generate_text(model, tokenizer, prompts: list[str], params: SamplingParams | None = None,
                  **kw) -> list[str]:
    """Text in, text out: each prompt followed by its continuation."""
    ids = [tokenizer.encode(x) for x in prompts]
    gen = generate(model, ids, params, **kw)
    return [tokenizer.decode(x + t.tolist()) for x, t in zip(ids, gen.tokens)]


__all__ = ["Generation", "SamplingParams", "accept_distribution", "check_inputs", "ep_all_done", "generate",
           "generate_text", "residual", "sampling_logprobs", "speculative_choice"]
