"""GRPO (DeepSeekMath) with the switches of its successors (DAPO, Dr. GRPO).

The objective, as pure functions of tensors (tests hold them to hand-computed values):

    adv_B = group_advantages(rewards_B, G, std_norm)        (r - mean_group) / (std_group + 1e-4)
    loss_BT = token_loss(logp, old, ref, adv_B, eps, eps_high, beta)
        ratio = exp(logp - old);  pg = -min(ratio A, clip(ratio, 1 - eps, 1 + eps_high) A)
        k3 = exp(ref - logp) - (ref - logp) - 1  (KL to the frozen reference);  loss = pg + beta k3
    loss = aggregate(loss_BT, mask_BT, agg, norm)
        grpo     mean over each response's tokens, then over every response (N of the global batch)
        dapo     sum over every response token / the global token count (token-level)
        dr_grpo  sum over every response token / (N * max_new_tokens) (no length normalisation;
                 the advantages also drop the std: std_norm=False)

std is the unbiased (Bessel) sample std of a group, as TRL's GRPOTrainer computes it. Every
normaliser (N, the token count) is global: summed over micro-batches and all-reduced over dp,
so micro-batching and data parallelism give exactly the loss of one batch.

One step (grpo_step): sample G responses for each prompt from the current weights, score them,
compute advantages (dynamic sampling drops the groups whose rewards are all equal), pad the
rollouts to one fixed length, take old-policy and reference log-probabilities from a
forward-only pass on the same layout, then `updates_per_batch` optimizer steps over
`micro_batches` pieces. MoE: the sampler returns the experts every rollout position was routed
to (framework/generate.py on its KV cache); with routing_replay the training forwards use
exactly those (replay.py), otherwise each update reports the share of routing decisions that
agree with them. Every step reports the agreement of the old-policy pass with the rollout, the
k3 mismatch between the sampler's log-probabilities and the training engine's, and the
expert loads.

Legend: B rollouts (prompts x G), T positions, G group size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from framework.model.transformer import mtp_hiddens
from framework.posttrain import replay
from framework.posttrain.config import PosttrainConfig
from framework.posttrain.learner import Learner
from framework.posttrain.rewards import total_rewards
from framework.posttrain.rollout import sample, target_logprobs
from framework.posttrain.sft import decode, encode, masked_ce
from framework.posttrain.tasks import Problem, Task

STD_EPS = 1e-4


# --------------------------------------------------------------------------- the objective


def group_advantages(rewards_B: torch.Tensor, group_size: int, std_norm: bool = True) -> torch.Tensor:
    """Per-rollout advantage; rollouts of one prompt are consecutive (B = prompts x G)."""
    r_PG = rewards_B.double().view(-1, group_size)
    adv_PG = r_PG - r_PG.mean(1, keepdim=True)
    if std_norm:
        adv_PG = adv_PG / (r_PG.std(1, keepdim=True) + STD_EPS)
    return adv_PG.reshape(-1)


def informative_groups(rewards_B: torch.Tensor, group_size: int) -> torch.Tensor:
    """[prompts] bool: the group's rewards are not all equal (DAPO's dynamic sampling keeps these)."""
    r_PG = rewards_B.view(-1, group_size)
    return (r_PG != r_PG[:, :1]).any(1)


def k3(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) from samples of pi: e^(ref-logp) - (ref-logp) - 1."""
    d = ref - logp
    return d.exp() - d - 1


def token_loss(logp_BT: torch.Tensor, old_BT: torch.Tensor, ref_BT: torch.Tensor | None, adv_B: torch.Tensor,
               eps: float, eps_high: float, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss (to minimise) and its parts: the clipped surrogate, the KL term, and
    whether the ratio was clipped (the surrogate took the clipped branch)."""
    ratio_BT = (logp_BT - old_BT).exp()
    adv_BT = adv_B[:, None].to(logp_BT.dtype)
    plain, clipped = ratio_BT * adv_BT, ratio_BT.clamp(1 - eps, 1 + eps_high) * adv_BT
    pg_BT = -torch.minimum(plain, clipped)
    parts = {"ratio": ratio_BT.detach(), "clipped": (clipped < plain).detach()}
    if beta and ref_BT is not None:
        kl_BT = k3(logp_BT, ref_BT)
        parts["kl"] = kl_BT.detach()
        return pg_BT + beta * kl_BT, parts
    return pg_BT, parts


@dataclass(frozen=True)
class Normaliser:
    """Global counts of one rollout batch (all micro-batches, all dp ranks)."""

    sequences: float
    tokens: float
    max_len: int  # max_new_tokens: Dr. GRPO's constant length


def aggregate(loss_BT: torch.Tensor, mask_BT: torch.Tensor, agg: str, norm: Normaliser) -> torch.Tensor:
    """This micro-batch's share of the global loss (shares sum to the batch's loss)."""
    masked_BT = loss_BT * mask_BT
    if agg == "grpo":
        per_seq_B = masked_BT.sum(1) / mask_BT.sum(1).clamp_min(1)
        return per_seq_B.sum() / norm.sequences
    if agg == "dapo":
        return masked_BT.sum() / norm.tokens
    if agg == "dr_grpo":
        return masked_BT.sum() / (norm.sequences * norm.max_len)
    raise ValueError(f"unknown loss aggregation {agg!r}")


# --------------------------------------------------------------------------- rollout batches


@dataclass
class Rollouts:
    tokens_BT: torch.Tensor  # prompt + response, right-padded to one fixed length
    targets_BT: torch.Tensor
    mask_BT: torch.Tensor  # bool: the target is a response token (through END)
    sampler_BT: torch.Tensor  # the sampler's log-probabilities at the response targets (0 elsewhere)
    adv_B: torch.Tensor
    length_B: torch.Tensor  # input positions that hold a real token (prompt + response - 1)
    old_BT: torch.Tensor | None = None
    ref_BT: torch.Tensor | None = None
    experts: list[torch.Tensor] | None = None  # per row, the sampler's [MoE layers, positions, K] routes

    FIELDS = ("tokens_BT", "targets_BT", "mask_BT", "sampler_BT", "adv_B", "length_B", "old_BT", "ref_BT")

    def rows(self, lo: int, hi: int) -> Rollouts:
        def pick(t):
            return None if t is None else t[lo:hi]

        return Rollouts(*(pick(getattr(self, f)) for f in self.FIELDS), experts=pick(self.experts))

    def to(self, device) -> Rollouts:
        def move(t):
            return None if t is None else t.to(device)

        return Rollouts(*(move(getattr(self, f)) for f in self.FIELDS), experts=self.experts)


def pack_rollouts(prompts: list[list[int]], responses: list[list[int]], sampler_logps: list[list[float]],
                  adv_B: torch.Tensor, length: int, experts: list[torch.Tensor] | None = None) -> Rollouts:
    """Rows of prompt + response, padded with 0 to `length` positions (fixed per step)."""
    B = len(prompts)
    tokens = torch.zeros(B, length, dtype=torch.int64)
    targets = torch.zeros(B, length, dtype=torch.int64)
    mask = torch.zeros(B, length, dtype=torch.bool)
    sampler = torch.zeros(B, length, dtype=torch.float32)
    for b, (p, r, lp) in enumerate(zip(prompts, responses, sampler_logps)):
        ids = torch.tensor(p + r)
        n = len(ids) - 1
        tokens[b, :n], targets[b, :n] = ids[:-1], ids[1:]
        mask[b, len(p) - 1:n] = True
        sampler[b, len(p) - 1:n] = torch.tensor(lp, dtype=torch.float32)
    length_B = torch.tensor([len(p) + len(r) - 1 for p, r in zip(prompts, responses)])
    return Rollouts(tokens, targets, mask, sampler, adv_B.float(), length_B, experts=experts)


def rollout_routes(recorded: replay.Routes, mb: Rollouts) -> replay.Routes:
    """The sampler's routes of a micro-batch in the training forward's layout ([B*T, K] for each
    MoE layer this rank recorded); padding positions, which no sampler saw, keep the training
    pass's own ids."""
    if mb.experts is None:
        return recorded
    B, T = mb.tokens_BT.shape
    out = {}
    for layer, ids in recorded.items():
        ids_BTK = ids.view(B, T, -1).clone()
        for b in range(B):
            n = int(mb.length_B[b])
            ids_BTK[b, :n] = mb.experts[b][layer, :n].to(ids.device)
        out[layer] = ids_BTK.view(B * T, -1)
    return out


def micro_slices(B: int, n: int) -> list[tuple[int, int]]:
    """n contiguous, nearly equal pieces of B rows (torch.chunk's sizes)."""
    size = -(-B // n)
    return [(lo, min(lo + size, B)) for lo in range(0, B, size)]


def grpo_loss(model, mb: Rollouts, c: PosttrainConfig, norm: Normaliser) -> tuple[torch.Tensor, dict]:
    return logits_loss(model(mb.tokens_BT), mb, c, norm)


def logits_loss(logits_BTV: torch.Tensor, mb: Rollouts, c: PosttrainConfig,
                norm: Normaliser) -> tuple[torch.Tensor, dict]:
    """The micro-batch's share of the loss from its logits (where a pipeline's last stage runs it)."""
    logp_BT = target_logprobs(logits_BTV, mb.targets_BT, c.temperature)
    loss_BT, parts = token_loss(logp_BT, mb.old_BT, mb.ref_BT, mb.adv_B, c.epsilon, c.epsilon_high, c.kl_coef)
    return aggregate(loss_BT, mb.mask_BT, c.loss_agg, norm), parts


# --------------------------------------------------------------------------- one step


@torch.no_grad()
def score_pass(learner: Learner, batch: Rollouts, pieces: list[tuple[int, int]], temperature: float,
               record: bool) -> tuple[torch.Tensor, list]:
    """Forward-only log-probabilities of the batch's targets on `learner`'s current weights, micro-
    batch by micro-batch (the same pieces as training, so recorded routes line up); with record,
    each micro-batch's routes on the MoE layers this rank holds (under pp > 1 the pipeline runs
    its forwards in the training schedule's order and stages)."""
    mbs = [batch.rows(lo, hi).to(learner.device) for lo, hi in pieces]
    heads = [functools.partial(target_logprobs, targets_BT=mb.targets_BT, temperature=temperature)
             for mb in mbs]
    routes: list[replay.Routes] = [{} for _ in pieces]
    scope = (lambda i: replay.record(learner.model, routes[i])) if record else None
    out = learner.forward_heads([mb.tokens_BT for mb in mbs], heads, scope)
    return torch.cat([o.cpu() for o in out]), routes


def sample_group(learner: Learner, task: Task, problems: list[Problem], c: PosttrainConfig, seed: int):
    """G responses per problem from the current weights; their rewards and texts."""
    prompts = [encode(p.prompt) for p in problems for _ in range(c.group_size)]
    responses, logps, experts = sample(learner.sampling_model(), prompts, c.max_new_tokens, c.temperature,
                                       seed, learner.ep_group)
    texts = [decode(r) for r in responses]
    rewards, parts = total_rewards(c.rewards, task, [p for p in problems for _ in range(c.group_size)], texts)
    return prompts, responses, logps, experts, torch.tensor(rewards, dtype=torch.float64), parts


def grpo_step(learner: Learner, reference: Learner | None, task: Task, problems: list[Problem],
              c: PosttrainConfig, step: int, lr: float) -> dict:
    """One GRPO step on this rank's problems (see the module docstring); returns its record."""
    seed = (c.seed * 100_003 + step * 1_009 + learner.mesh.dp_rank) * 4096  # + b per sequence: no overlap
    prompts, responses, logps, experts, rewards_B, parts = sample_group(learner, task, problems, c, seed)
    n = learner.global_sum(len(rewards_B))
    record = {"step": step, "reward": learner.global_sum(rewards_B.sum()) / n,
              **{f"reward_{k}": v for k, v in parts.items()},
              "response_len": learner.global_sum(sum(map(len, responses))) / n}
    if c.control == "shuffle":  # the control run: rewards no longer belong to their samples
        rewards_B = rewards_B[torch.randperm(len(rewards_B), generator=torch.Generator().manual_seed(step))]
    adv_B = group_advantages(rewards_B, c.group_size, std_norm=c.loss_agg != "dr_grpo")
    if c.dynamic_sampling:
        keep_P = informative_groups(rewards_B, c.group_size)
        keep_B = keep_P.repeat_interleave(c.group_size)
        record["kept_groups"] = learner.global_sum(keep_P.sum()) / learner.global_sum(len(keep_P))
        rows = keep_B.nonzero().flatten().tolist()
        prompts, responses, logps = ([x[i] for i in rows] for x in (prompts, responses, logps))
        experts = None if experts is None else [experts[i] for i in rows]
        adv_B = adv_B[keep_B]
    if learner.global_sum(len(prompts)) == 0:
        return {**record, "skipped": "no group with differing rewards"}
    length = max(len(p) for p in prompts) + c.max_new_tokens - 1
    batch = pack_rollouts(prompts, responses, logps, adv_B, length, experts)
    return {**record, **update_on(learner, reference, batch, c, lr)}


def update_on(learner: Learner, reference: Learner | None, batch: Rollouts, c: PosttrainConfig,
              lr: float) -> dict:
    """updates_per_batch optimizer steps on one rollout batch (old and reference log-probs first)."""
    B = len(batch.adv_B)
    pieces = micro_slices(B, c.micro_batches) if B else [(0, 0)] * c.micro_batches
    batch.old_BT, recorded = score_pass(learner, batch, pieces, c.temperature, record=True)
    routes = [rollout_routes(rec, batch.rows(lo, hi)) for rec, (lo, hi) in zip(recorded, pieces)]
    rollout_agree = [replay.agreement(a, b) for a, b in zip(routes, recorded)]
    if c.kl_coef and reference is not None:
        batch.ref_BT, _ = score_pass(reference, batch, pieces, c.temperature, record=False)
    norm = Normaliser(learner.global_sum(B), learner.global_sum(batch.mask_BT.sum()), c.max_new_tokens)
    mask = batch.mask_BT
    n_tokens = max(norm.tokens, 1.0)
    out = {"mismatch_k3": learner.global_sum((k3(batch.old_BT, batch.sampler_BT) * mask).sum()) / n_tokens}
    moe = learner.model.cfg.n_layers > learner.model.cfg.n_dense_layers  # on every rank alike
    if moe:
        out["route_agreement_rollout"] = _mean_agreement(learner, rollout_agree)
    for u in range(c.updates_per_batch):
        stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        seen: list[replay.Routes] = [{} for _ in pieces]  # the training forward's routes
        mbs = [batch.rows(lo, hi).to(learner.device) for lo, hi in pieces]
        heads = [_head(mb, c, norm, stats) for mb in mbs]
        train_mtp = c.mtp == "train" and len(learner.model.mtp) > 0
        if train_mtp:  # the heads take the hidden states: the head's logits, then the MTP term
            heads = [functools.partial(_with_mtp, head, learner.model, mb, norm.tokens)
                     for head, mb in zip(heads, mbs)]
        rec = learner.update_heads([mb.tokens_BT for mb in mbs], heads, lr,
                                   scope=functools.partial(_routing, learner.model, c, routes, seen),
                                   hidden=train_mtp)
        clipped = learner.head_sum(sum(s[0] for s in stats)) / n_tokens
        kl = learner.head_sum(sum(s[1] for s in stats)) / n_tokens
        out.update({"loss": rec["loss"], "grad_norm": rec["grad_norm"], "clip_frac": clipped, "kl": kl,
                    "expert_load": rec["expert_load"]})
        if moe and not c.routing_replay:
            out[f"route_agreement_{u}"] = _mean_agreement(learner, [replay.agreement(a, b)
                                                                      for a, b in zip(routes, seen)])
    return out


def _head(mb: Rollouts, c: PosttrainConfig, norm: Normaliser, stats: list):
    """The loss of one micro-batch from its logits, for Learner.update_heads; appends its clip and
    KL sums to stats (where it runs: under pp > 1 on the last stage)."""
    def loss_of(logits_BTV: torch.Tensor) -> torch.Tensor:
        loss, parts = logits_loss(logits_BTV, mb, c, norm)
        m = mb.mask_BT
        kl = (parts["kl"] * m).sum() if "kl" in parts else torch.zeros(())
        stats.append(((parts["clipped"] & m).sum(), kl))
        return loss

    return loss_of


def mtp_response_loss(model, h_BTD: torch.Tensor, mb: Rollouts, n_tokens: float) -> torch.Tensor:
    """posttrain.mtp=train: the MTP modules' cross-entropy on the rollout's response tokens (depth
    k at position i predicts token i+k+1, counted where that target is a response token), summed
    and divided by the global response-token count, times mtp_loss_weight / depth: MTP keeps
    predicting the policy's own tokens as it moves."""
    mask_BT, targets_BT = mb.mask_BT, mb.targets_BT
    total = sum((masked_ce(model.head(n_BTD), targets_BT[:, k:], mask_BT[:, k:], max(n_tokens, 1.0))
                 for k, n_BTD in mtp_hiddens(model.mtp, model.embed, h_BTD, targets_BT)),
                h_BTD.new_zeros((), dtype=torch.float32))
    return model.cfg.mtp_loss_weight / len(model.mtp) * total


def _with_mtp(head, model, mb: Rollouts, n_tokens: float, h_BTD: torch.Tensor) -> torch.Tensor:
    return head(model.head(h_BTD)) + mtp_response_loss(model, h_BTD, mb, n_tokens)


def _routing(model, c: PosttrainConfig, routes: list[replay.Routes], seen: list[replay.Routes], i: int):
    """Around micro-batch i's training forward (or each sub-step of it): replay the rollout's
    routes, or record the forward's into seen[i] to compare with them."""
    return replay.replay(model, routes[i], seen[i]) if c.routing_replay else replay.record(model, seen[i])


def _mean_agreement(learner: Learner, agree: list[tuple[float, float]]) -> float:
    """Over every rank of the layout: each pipeline rank counts the MoE layers it holds."""
    same = learner.head_sum(sum(a for a, _ in agree))
    total = learner.head_sum(sum(n for _, n in agree))
    return same / total if total else 1.0


def train_problems(task: Task, n: int, seed: int, step: int, rank: int) -> list[Problem]:
    """The problems of one step on one rank: a stream no held-out set draws from."""
    return task.problems(n, seed=(seed * 1_000_003 + step * 1009 + rank) % 2**31 + 7)
