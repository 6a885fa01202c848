"""Generation: the latent-cache decode path equals the training forward, sampling and its
log-probs, the experts each token chose, and MTP speculative decoding (exact greedy, the
acceptance rule exactly, and a statistical test that a wrong rule fails)."""

import dataclasses
import math

import pytest
import torch

import framework.generate as G
from framework.config import ModelConfig
from framework.generate import SamplingParams, accept_distribution, generate, sampling_logprobs
from framework.model import Transformer
from framework.model.decode import Decoder

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = {"vocab_size": 96, "dim": 64, "n_layers": 3, "n_dense_layers": 1, "dense_inter_dim": 96,
        "max_seq_len": 48, "n_heads": 4, "kv_lora_rank": 24, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
        "v_head_dim": 12, "n_routed_experts": 8, "moe_inter_dim": 32, "n_activated_experts": 3,
        "init_std": 0.05, "mtp_depth": 1, "rope_factor": 4.0, "original_seq_len": 16}
CASES = {
    # V3-like: q LoRA, sigmoid gate with groups and a bias, YaRN with mscale != mscale_all_dim.
    "v3": ModelConfig(**BASE, q_lora_rank=32, n_shared_experts=1, n_expert_groups=4, n_limited_groups=2,
                      mscale=1.0, mscale_all_dim=0.8),
    # V2-like: no q LoRA, softmax gate, group-limited greedy, DeepSeek-V2's YaRN.
    "v2": ModelConfig(**BASE, q_lora_rank=0, n_shared_experts=2, n_expert_groups=4, n_limited_groups=2,
                      score_func="softmax", norm_topk_prob=False, route_scale=1.5, mscale=0.707,
                      mscale_all_dim=0.707),
}


def build(cfg: ModelConfig, dtype=torch.float32) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(cfg).eval().to(dtype)
    with torch.no_grad():  # a trained bias changes which experts are picked
        for moe in m.moe_layers():
            moe.router.expert_bias.normal_(0, 0.1)
    return m


def seq(n: int, seed: int, vocab: int = 96) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class RouterTap:
    """The top-k ids each main MoE router returns during a forward: ids[layer] [T, K]."""

    def __init__(self, model: Transformer):
        self.ids: list[torch.Tensor] = []
        routers = [blk.ffn.router for blk in model.blocks if hasattr(blk.ffn, "router")]
        self.hooks = [r.register_forward_hook(lambda _m, _i, out: self.ids.append(out[0])) for r in routers]

    def close(self):
        for h in self.hooks:
            h.remove()


def full_forward(model: Transformer, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-path logits [T, V], MTP logits [T-1, V] and routed experts [L, T, K]."""
    tap = RouterTap(model)
    x = torch.tensor([tokens])
    with torch.no_grad():
        h = model.hidden(x)
        tap.close()
        mtp = model.head(model.mtp[0](h[:, :-1], model.embed(x[:, 1:])))
        return model.head(h)[0], mtp[0], torch.stack(tap.ids)


def decode_logits(model: Transformer, prompts: list[list[int]], steps: int):
    """Prefill right-padded prompts, then `steps` one-token steps feeding each sequence's own
    continuation; returns per sequence the logits at every real position [len+steps, V], the MTP
    logits at the prompt positions, the recorded experts and the decoder."""
    B, lens = len(prompts), [len(p) - steps for p in prompts]
    T = max(lens)
    dec = Decoder(model, B, max(len(p) for p in prompts), record_experts=True)
    x_BT = torch.tensor([p[:n] + [0] * (T - n) for p, n in zip(prompts, lens)])
    with torch.no_grad():
        logits, h = dec.step(x_BT, torch.arange(T).expand(B, T))
        nxt = torch.tensor([p[1:n + 1] + [0] * (T - n) for p, n in zip(prompts, lens)])
        mtp = dec.mtp_step(h, nxt, torch.arange(T).expand(B, T)) if len(model.mtp) else logits
        out = [[logits[b, :n]] for b, n in enumerate(lens)]
        for s in range(steps):
            tok = torch.tensor([[p[n + s]] for p, n in zip(prompts, lens)])
            lg, _ = dec.step(tok, torch.tensor([[n + s] for n in lens]))
            for b in range(B):
                out[b].append(lg[b])
    dec.close()
    return [torch.cat(o) for o in out], [mtp[b, :n] for b, n in enumerate(lens)], dec


def bound(ref: torch.Tensor, rel: float) -> float:
    return rel * max(1.0, ref.abs().max().item())


# ----------------------------------------------------------------------------- decode == training


@pytest.mark.parametrize("case", list(CASES))
def test_cached_decode_equals_training_forward_and_mixed_lengths_equal_alone(case):
    cfg = CASES[case]
    m = build(cfg)
    steps = 6
    prompts = [seq(9 + steps, 1), seq(4 + steps, 2), seq(14 + steps, 3)]
    got, got_mtp, dec = decode_logits(m, prompts, steps)
    for b, p in enumerate(prompts):
        ref, ref_mtp, ref_ids = full_forward(m, p)
        n = len(p) - steps
        assert (got[b] - ref).abs().max().item() <= bound(ref, 1e-5), (case, b)
        assert (got_mtp[b][: n - 1] - ref_mtp[: n - 1]).abs().max().item() <= bound(ref_mtp, 1e-5)
        assert torch.equal(dec.experts.ids_BLSK[b, :, : len(p)], ref_ids), (case, b)
        alone, _, _ = decode_logits(m, [p], steps)  # the same sequence in a batch of one
        assert (got[b] - alone[0]).abs().max().item() <= bound(alone[0], 1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_decode_without_its_few_token_fast_paths_equals_training_forward(case, monkeypatch):
    """The small-size fast paths (rope as per-row rotation GEMMs, the MoE as one dense SwiGLU over
    all experts, wq_a and wkv_a stacked) cover every call of the tiny configs above; with their
    thresholds at 0 the general paths (apply_rope, grouped experts, two projections) run at every
    step and must give the same logits and experts."""
    import framework.model.decode as D

    monkeypatch.setattr(D, "DENSE_EXPERTS_MACS", 0)
    monkeypatch.setattr(D, "ROPE_AS_GEMM_ELEMENTS", 0)
    monkeypatch.setattr(D, "STACK_INPUT_ELEMENTS", 0)
    m = build(CASES[case])
    steps = 4
    prompts = [seq(6 + steps, 16), seq(11 + steps, 17)]
    got, _, dec = decode_logits(m, prompts, steps)
    for b, p in enumerate(prompts):
        ref, _, ref_ids = full_forward(m, p)
        assert (got[b] - ref).abs().max().item() <= bound(ref, 1e-5), (case, b)
        assert torch.equal(dec.experts.ids_BLSK[b, :, : len(p)], ref_ids), (case, b)


def test_fp64_decode_equals_training_forward_to_1e_10():
    # All-dense blocks: the MoE gate computes in fp32 by design (moe.py), which would cap an fp64
    # comparison at ~1e-8; attention, norms, rope and YaRN are all here.
    cfg = dataclasses.replace(CASES["v3"], n_dense_layers=3, mtp_depth=0)
    m = build(cfg, torch.float64)
    steps = 5
    prompts = [seq(7 + steps, 4), seq(12 + steps, 5)]
    got, _, _ = decode_logits(m, prompts, steps)
    for b, p in enumerate(prompts):
        ref = m(torch.tensor([p]))[0].detach()
        assert (got[b] - ref).abs().max().item() <= bound(ref, 1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_holds_latent_and_rope_key_only(dtype):
    cfg = CASES["v3"]
    m = build(cfg, dtype)
    dec = Decoder(m, 2, 20)
    with torch.no_grad():
        dec.step(torch.tensor([seq(5, 6), seq(5, 7)]), torch.arange(5).expand(2, 5))
    elem = torch.finfo(dtype).bits // 8
    assert dec.cache.bytes_per_token_per_layer() == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * elem
    assert dec.cache.nbytes() == cfg.n_layers * 2 * 20 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * elem


# ----------------------------------------------------------------------------- sampling


def test_sampling_distribution_temperature_top_k_top_p():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    logits = probs.log() + 3.0  # any shift
    p = lambda **kw: sampling_logprobs(logits, SamplingParams(**kw)).exp()[0]  # noqa: E731
    torch.testing.assert_close(p(), probs[0])
    torch.testing.assert_close(p(top_k=2), torch.tensor([5 / 7, 2 / 7, 0, 0, 0]))
    # top_p 0.8: the mass before the 4th token is 0.85 >= 0.8, so three tokens stay.
    torch.testing.assert_close(p(top_p=0.8), torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    torch.testing.assert_close(p(top_p=0.5), torch.tensor([1.0, 0, 0, 0, 0]))
    root = probs[0].sqrt()
    torch.testing.assert_close(p(temperature=2.0), root / root.sum())
    torch.testing.assert_close(p(temperature=0), torch.tensor([1.0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="top_p"):
        generate(build(CASES["v3"]), [[1, 2]], SamplingParams(top_p=1.5))


def test_generate_logprobs_experts_stops_seeds_and_length_limit():
    cfg = CASES["v3"]
    m = build(cfg).train()  # generate switches to eval and back
    prompts = [seq(5, 8), seq(11, 9), seq(2, 10)]
    params = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=20, seed=5)
    g = generate(m, prompts, params, return_experts=True)
    assert m.training and all(moe.router.expert_load.sum() == 0 for moe in m.moe_layers())
    m.eval()
    for b, p in enumerate(prompts):
        toks = g.tokens[b].tolist()
        assert len(toks) == 8
        ref, _, ref_ids = full_forward(m, p + toks)
        at = ref[len(p) - 1: len(p) + 7]  # the logits each new token was drawn from
        rows = torch.arange(8)
        torch.testing.assert_close(g.logprobs[b], at.log_softmax(-1)[rows, toks], atol=1e-5, rtol=0)
        z = at / 0.8
        z = z.masked_fill(z < z.topk(20, dim=-1).values[:, -1:], float("-inf"))
        torch.testing.assert_close(g.sampling_logprobs[b], z.log_softmax(-1)[rows, toks], atol=1e-5, rtol=0)
        assert torch.equal(g.experts[b], ref_ids)
        # Sequence b's sample depends on its seed only, not on the rest of the batch.
        alone = generate(m, [p], params, seeds=[params.seed + b])
        assert alone.tokens[0].tolist() == toks
    other = generate(m, prompts, dataclasses.replace(params, seed=6))
    assert any(a.tolist() != c.tolist() for a, c in zip(g.tokens, other.tokens))

    greedy = generate(m, prompts, SamplingParams(max_new_tokens=8, temperature=0))
    assert all(torch.equal(x, torch.zeros(8)) for x in greedy.sampling_logprobs)
    stop = greedy.tokens[0][2].item()
    first = greedy.tokens[0].tolist().index(stop)
    cut = generate(m, prompts, SamplingParams(max_new_tokens=8, temperature=0, stop_tokens=(stop,)))
    assert cut.tokens[0].tolist() == greedy.tokens[0][: first + 1].tolist()
    for b in (1, 2):
        toks = greedy.tokens[b].tolist()
        want = toks[: toks.index(stop) + 1] if stop in toks else toks
        assert cut.tokens[b].tolist() == want
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(m, [seq(cfg.max_seq_len - 3, 1)], SamplingParams(max_new_tokens=4))
    assert generate(m, [seq(cfg.max_seq_len - 4, 1)], SamplingParams(max_new_tokens=4)).tokens[0].numel() == 4


# ----------------------------------------------------------------------------- speculative decoding


def draft_friendly(noise: float, head_scale: float) -> Transformer:
    """A one-block model whose MTP module is a noisy copy of it: it drafts well but not always.
    The MTP block copies the main block and reads only the (unit-rms) embedding of the next
    token, so it predicts the token after next as the main model would one step later, up to
    the noise and to what attention adds."""
    cfg = dataclasses.replace(CASES["v3"], vocab_size=32, n_layers=1, n_dense_layers=0)
    m = build(cfg)
    with torch.no_grad():
        e = m.embed.weight
        e.div_(e.pow(2).mean(-1, keepdim=True).sqrt())
        mtp = m.mtp[0]
        mtp.block.load_state_dict(m.blocks[0].state_dict())
        mtp.eh_proj.weight.zero_()
        mtp.eh_proj.weight[:, : cfg.dim] = torch.eye(cfg.dim)
        for blk in (m.blocks[0], mtp.block):
            blk.attn.wo.weight.mul_(3.0)
        m.head.weight.mul_(head_scale)
        g = torch.Generator().manual_seed(1)
        for prm in mtp.block.parameters():
            prm.add_(torch.randn(prm.shape, generator=g) * noise)
    return m


def test_greedy_speculative_equals_greedy_with_accepts_and_rejections():
    m = draft_friendly(noise=0.1, head_scale=20.0)
    prompts = [seq(5, 11, 32), seq(3, 12, 32), seq(12, 13, 32), seq(1, 14, 32)]
    params = SamplingParams(max_new_tokens=30, temperature=0)
    plain = generate(m, prompts, params, return_experts=True)
    spec = generate(m, prompts, params, speculative=True, return_experts=True)
    for b in range(len(prompts)):
        assert spec.tokens[b].tolist() == plain.tokens[b].tolist()
        torch.testing.assert_close(spec.logprobs[b], plain.logprobs[b], atol=1e-5, rtol=0)
        assert torch.equal(spec.experts[b], plain.experts[b])
    assert 0.2 * spec.drafted < spec.accepted < 0.9 * spec.drafted  # both branches ran often
    assert spec.steps < plain.steps


def test_acceptance_rule_gives_exactly_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        p = torch.rand(16, generator=g, dtype=torch.float64) ** 3
        q = torch.rand(16, generator=g, dtype=torch.float64) ** 3
        if trial % 3 == 0:
            q[:5] = 0  # draft never proposes tokens p likes
        if trial % 3 == 1:
            p[-4:] = 0  # draft proposes tokens p never emits
        p, q = p / p.sum(), q / q.sum()
        assert (accept_distribution(p, q) - p).abs().max().item() <= 1e-6
    p = torch.tensor([0.25, 0.75], dtype=torch.float64)
    assert torch.equal(accept_distribution(p, p), p)


def chi2_stat(counts: torch.Tensor, expected: torch.Tensor) -> tuple[float, int]:
    keep = expected >= 5  # pool the sparse cells
    c = torch.cat([counts[keep], counts[~keep].sum()[None]])
    e = torch.cat([expected[keep], expected[~keep].sum()[None]])
    live = e > 0
    return float(((c[live] - e[live]) ** 2 / e[live]).sum()), int(live.sum()) - 1


def chi2_critical(df: int, z: float = 3.719) -> float:
    # Wilson-Hilferty: the chi-square quantile at the normal quantile z (3.719: p = 1e-4).
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_speculative_sampling_matches_the_model_and_always_accept_fails(monkeypatch):
    """N sequences from one prompt, 2 new tokens, temperature 1, top-k 8: the first comes from
    plain sampling, the second from a verified draft. Their joint frequencies must fit the
    model's own distribution p(x1) p(x2 | x1) (chi-square at p = 1e-4); the same test must
    reject a sampler that always keeps the draft."""
    m = draft_friendly(noise=0.3, head_scale=3.0)
    prompt, N = seq(6, 15, 32), 1500
    params = SamplingParams(max_new_tokens=2, temperature=1.0, top_k=8)

    def joint(gen) -> torch.Tensor:
        counts = torch.zeros(32, 32)
        for t in gen.tokens:
            counts[t[0], t[1]] += 1
        return counts

    with torch.no_grad():
        logp1 = sampling_logprobs(m(torch.tensor([prompt]))[:, -1], params)[0]
        p_joint = torch.zeros(32, 32)
        tv = []
        for x1 in torch.nonzero(logp1.exp() > 0).flatten().tolist():
            x = torch.tensor([prompt + [x1]])
            p2 = sampling_logprobs(m(x)[:, -1], params)[0].exp()
            h = m.hidden(torch.tensor([prompt]))
            q2 = sampling_logprobs(m.head(m.mtp[0](h[:, -1:], m.embed(torch.tensor([[x1]]))))[:, 0],
                                   params)[0].exp()
            tv.append(0.5 * (p2 - q2).abs().sum().item() * logp1[x1].exp().item())
            p_joint[x1] = logp1[x1].exp() * p2
    assert sum(tv) >= 0.2  # the draft is deliberately unlike the model (mean total variation)

    spec = generate(m, [prompt] * N, params, speculative=True)
    assert 0 < spec.accepted < spec.drafted
    stat, df = chi2_stat(joint(spec).flatten(), N * p_joint.flatten())
    assert stat < chi2_critical(df), (stat, df)

    monkeypatch.setattr(G, "speculative_choice", lambda p, q, d, gen, greedy: (d, True))
    wrong = generate(m, [prompt] * N, params, speculative=True)
    stat_wrong, df_wrong = chi2_stat(joint(wrong).flatten(), N * p_joint.flatten())
    assert stat_wrong > chi2_critical(df_wrong), (stat_wrong, df_wrong)
