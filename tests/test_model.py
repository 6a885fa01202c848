"""Behaviour of duet's model: routing, balancing, MoE, MTP, stages, meta init, generation.

Expected values come from hand-built inputs or direct re-statements of the formulas in
shared/ANCHORS.md, never from the code under test.
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from framework.config import ModelConfig
from framework.model import (
    GroupedExperts,
    LocalDispatcher,
    MoE,
    Router,
    Transformer,
    count_params,
    seq_balance_loss,
)
from framework.model.init import draw_seed, init_weights
from framework.model.mlp import MLP

TINY = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_dense_layers=1, dense_inter_dim=48, max_seq_len=32,
                   n_heads=2, q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
                   v_head_dim=8, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                   moe_inter_dim=16, n_expert_groups=4, n_limited_groups=2, init_std=0.05,
                   seq_aux_alpha=0.01, mtp_depth=1)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> ModelConfig:
    return dataclasses.replace(TINY, **kw)


def tokens(b=2, t=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY.vocab_size, (b, t), generator=g)


# ----------------------------------------------------------------------------- router


def router(**kw) -> Router:
    cfg = tiny(**kw)
    r = Router(cfg)
    init_weights(r, draw_seed(), 0.05)
    return r


def test_router_group_limit_sigmoid():
    r = router(n_activated_experts=2, route_scale=2.5, norm_topk_prob=True)
    # Groups of 2: g0=(.90,.10) sum .95... top-2 sums: g0 1.00, g1 1.00, g2 1.50, g3 1.15 -> keep g2, g3.
    s = torch.tensor([[0.90, 0.10, 0.50, 0.50, 0.80, 0.70, 0.20, 0.95]])
    idx, w = r.select(s)
    assert set(idx[0].tolist()) == {7, 4}  # expert 0 (0.90) is excluded by its group
    got = dict(zip(idx[0].tolist(), w[0].tolist(), strict=True))
    assert got[7] == pytest.approx(2.5 * 0.95 / 1.75)
    assert got[4] == pytest.approx(2.5 * 0.80 / 1.75)
    # Without a group limit the global top-2 wins.
    r_all = router(n_activated_experts=2, n_limited_groups=4)
    assert set(r_all.select(s)[0][0].tolist()) == {7, 0}


def test_router_softmax_groups_by_best_expert_without_renorm():
    r = router(score_func="softmax", norm_topk_prob=False, route_scale=1.5)
    # Group maxima: .30 .14 .20 .19 -> g0, g2 (top-2 sums would pick g0, g1 instead).
    s = torch.tensor([[0.30, 0.01, 0.14, 0.12, 0.20, 0.01, 0.19, 0.02]])
    idx, w = r.select(s)
    got = dict(zip(idx[0].tolist(), w[0].tolist(), strict=True))
    assert set(got) == {0, 4}
    assert got[0] == pytest.approx(1.5 * 0.30) and got[4] == pytest.approx(1.5 * 0.20)


def test_bias_changes_selection_not_weights():
    r = router(n_activated_experts=2, route_scale=1.0)
    s = torch.tensor([[0.90, 0.10, 0.50, 0.50, 0.80, 0.70, 0.20, 0.95]])
    r.expert_bias[5] = 0.5  # expert 5: 0.70 + 0.5 beats 0.80 in the same group
    idx, w = r.select(s)
    got = dict(zip(idx[0].tolist(), w[0].tolist(), strict=True))
    assert set(got) == {5, 7}
    # Weights from the unbiased scores 0.70 and 0.95, normalised.
    assert got[5] == pytest.approx(0.70 / 1.65) and got[7] == pytest.approx(0.95 / 1.65)


def test_bias_update_moves_toward_balance():
    torch.manual_seed(0)
    r = router(n_expert_groups=1, n_limited_groups=1, n_activated_experts=2)
    r.train()
    v = torch.randn(TINY.dim)
    v = v / v.norm()
    with torch.no_grad():
        r.weight.normal_(0, 0.3)
        r.weight[0] += 1.5 * v  # skew: every token leans toward experts 0 and 1
        r.weight[1] += 1.0 * v
    x = 2 * v + torch.randn(512, TINY.dim) / math.sqrt(TINY.dim) * 3

    def load_std():
        r(x)
        load = r.expert_load.clone()
        return load, load.std().item()

    load0, std0 = load_std()
    assert load0.sum() == 512 * 2  # counts exactly the routed (token, slot) pairs
    assert load0[0] > 2 * load0.mean()  # the batch really is skewed
    r.update_bias(0.0)  # rate 0: counts reset, bias untouched
    assert torch.count_nonzero(r.expert_bias) == 0 and r.expert_load.sum() == 0
    stds = []
    for _ in range(40):
        stds.append(load_std()[1])
        r.update_bias(0.01)
    assert sum(stds[-5:]) / 5 < std0 / 2  # load spread shrinks as the bias adapts
    assert r.expert_bias[0] < 0 and r.expert_bias[0] == r.expert_bias.min()


# ----------------------------------------------------------------------------- balance loss


def loop_balance_loss(s_BTE, idx_BTK, alpha):
    B, T, E = s_BTE.shape
    K = idx_BTK.shape[-1]
    total = 0.0
    for b in range(B):
        seq = 0.0
        for i in range(E):
            count = sum(int(idx_BTK[b, t, k]) == i for t in range(T) for k in range(K))
            f = E / (K * T) * count
            p = sum(float(s_BTE[b, t, i].detach()) / float(s_BTE[b, t].detach().sum()) for t in range(T)) / T
            seq += f * p
        total += alpha * seq
    return total / B


def test_seq_balance_loss_matches_formula_loop():
    g = torch.Generator().manual_seed(1)
    s = torch.rand(3, 5, 8, generator=g)
    idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(15)]).view(3, 5, 2)
    assert seq_balance_loss(s, idx, 0.01).item() == pytest.approx(loop_balance_loss(s, idx, 0.01), rel=1e-5)


def test_moe_records_balance_loss_in_training_only():
    torch.manual_seed(0)
    cfg = tiny(seq_aux_alpha=0.1)
    moe = MoE(cfg)
    init_weights(moe, draw_seed(), 0.3)
    x = torch.randn(2, 6, cfg.dim)
    moe.train()
    moe(x)
    s = moe.router.scores(x.view(12, -1)).view(2, 6, -1)
    idx, _ = moe.router.select(s.view(12, -1))
    assert moe.aux_loss.item() == pytest.approx(loop_balance_loss(s, idx.view(2, 6, -1), 0.1), rel=1e-5)
    moe.aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0  # gradient reaches the gate through P_i
    moe.eval()
    moe(x)
    assert moe.aux_loss is None


# ----------------------------------------------------------------------------- experts


def test_grouped_experts_equal_per_token_loop_and_skip_foreign_ids():
    torch.manual_seed(0)
    ex = GroupedExperts(4, 8, 6)
    init_weights(ex, draw_seed(), 0.5)
    x = torch.randn(5, 8)
    idx = torch.tensor([[0, 3], [2, -1], [1, 1], [-1, -1], [3, 0]])  # -1: expert on another rank
    w = torch.rand(5, 2)
    y = ex(x, idx, w)
    for t in range(5):
        ref = torch.zeros(8)
        for k in range(2):
            e = int(idx[t, k])
            if e >= 0:
                ref += w[t, k] * (F.silu(ex.w1[e] @ x[t]) * (ex.w3[e] @ x[t])) @ ex.w2[e].T
        torch.testing.assert_close(y[t], ref, rtol=1e-5, atol=1e-6)


def test_moe_output_is_routed_plus_shared():
    torch.manual_seed(0)
    cfg = tiny()
    moe = MoE(cfg).eval()
    init_weights(moe, draw_seed(), 0.3)
    assert isinstance(moe.dispatcher, LocalDispatcher)
    x = torch.randn(1, 4, cfg.dim)
    idx, w, _ = moe.router(x.view(4, -1))
    routed = moe.experts(x.view(4, -1), idx, w)
    torch.testing.assert_close(moe(x).view(4, -1), routed + moe.shared(x.view(4, -1)))


# ----------------------------------------------------------------------------- whole model


def test_forward_loss_shapes_and_metrics():
    torch.manual_seed(0)
    m = Transformer(TINY).train()
    x, y = tokens(), tokens(seed=1)
    assert m(x).shape == (2, 10, TINY.vocab_size)
    loss, metrics = m.loss(x, y)
    assert set(metrics) == {"main_loss", "mtp_loss", "balance_loss"}
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())
    assert metrics["mtp_loss"] > 0 and metrics["balance_loss"] > 0
    torch.testing.assert_close(loss.detach(), sum(metrics.values()))
    # An untrained model is close to uniform: CE about ln(V).
    assert abs(metrics["main_loss"].item() - math.log(TINY.vocab_size)) < 0.5
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name


def test_mtp_loss_predicts_k_ahead():
    """Depth 1 at position i reads token i+1 (= targets[i]) and predicts targets[i+1]. Recomputed
    position by position on prefixes, which causal attention makes equivalent."""
    torch.manual_seed(0)
    m = Transformer(tiny(mtp_loss_weight=0.3)).eval()
    x, y = tokens(1, 7), tokens(1, 7, seed=2)
    _, metrics = m.loss(x, y)
    ces = []
    with torch.no_grad():
        for i in range(6):
            h = m.hidden(x[:, : i + 1])
            out = m.mtp[0](h, m.embed(y[:, : i + 1]))
            ces.append(F.cross_entropy(m.head(out[:, -1]), y[:, i + 1]))
    assert metrics["mtp_loss"].item() == pytest.approx(0.3 * torch.stack(ces).mean().item(), rel=1e-4)


def test_mtp_off_and_dense_layers():
    m = Transformer(tiny(mtp_depth=0)).train()
    loss, metrics = m.loss(tokens(), tokens(seed=1))
    assert metrics["mtp_loss"] == 0 and len(m.mtp) == 0 and count_params(m)["mtp"] == 0
    torch.testing.assert_close(loss.detach(), metrics["main_loss"] + metrics["balance_loss"])
    assert isinstance(m.blocks[0].ffn, MLP) and all(isinstance(b.ffn, MoE) for b in m.blocks[1:])
    # All-dense main model: the MTP block is still an MoE block.
    m2 = Transformer(tiny(n_dense_layers=3, mtp_depth=1))
    assert len(m2.moe_layers()) == 1 and m2.moe_layers()[0] is m2.mtp[0].block.ffn


def test_expert_load_counts_only_in_training_and_bias_update():
    m = Transformer(TINY)
    x = tokens(2, 10)
    m.eval()
    m(x)
    assert all(moe.router.expert_load.sum() == 0 for moe in m.moe_layers())
    m.train()
    m.loss(x, tokens(2, 10, seed=1))
    main_moes, mtp_moe = m.moe_layers()[:-1], m.moe_layers()[-1]
    assert all(moe.router.expert_load.sum() == 2 * 10 * 2 for moe in main_moes)
    assert mtp_moe.router.expert_load.sum() == 2 * 9 * 2  # the last position has no MTP target
    loads = [moe.router.expert_load.clone() for moe in m.moe_layers()]
    m.update_expert_bias(0.01)
    for moe, load in zip(m.moe_layers(), loads, strict=True):
        torch.testing.assert_close(moe.router.expert_bias, 0.01 * torch.sign(load.mean() - load))
        assert moe.router.expert_load.sum() == 0
    assert "blocks.1.ffn.router.expert_bias" in m.state_dict()
    assert "blocks.1.ffn.router.expert_load" not in m.state_dict()


def test_generate_length_greedy_and_context_crop():
    torch.manual_seed(0)
    m = Transformer(tiny(max_seq_len=12)).train()
    prompt = tokens(2, 5)
    out = m.generate(prompt, 4)
    assert out.shape == (2, 9) and torch.equal(out[:, :5], prompt)
    assert m.training  # mode restored
    with torch.no_grad():
        m.eval()
        assert torch.equal(out[:, 5], m(prompt)[:, -1].argmax(-1))
    with pytest.raises(ValueError, match="max_seq_len"):  # no silent sliding window
        m.generate(tokens(1, 12), 3)
    assert all(moe.router.expert_load.sum() == 0 for moe in m.moe_layers())


def test_split_stages_compose_to_full_model():
    torch.manual_seed(0)
    m = Transformer(tiny(n_layers=4)).train()
    x, y = tokens(), tokens(seed=1)
    s0, s1 = m.split_stages(2)
    assert list(s0.blocks) == ["0", "1"] and list(s1.blocks) == ["2", "3"]
    assert hasattr(s0, "embed") and not hasattr(s0, "head") and hasattr(s1, "head")
    assert set(s1.state_dict()) <= set(m.state_dict()) | {"mtp_embed.weight"}
    assert torch.equal(s1(s0(x)), m(x))
    loss_stages, _ = s1.loss(s0(x), y)
    loss_stages = loss_stages + s0.balance_loss()
    loss_full, _ = m.loss(x, y)
    torch.testing.assert_close(loss_stages, loss_full)
    assert len(m.split_stages(3)) == 3 and [len(s.blocks) for s in m.split_stages(3)] == [2, 1, 1]


def test_meta_build_to_empty_init_weights():
    cfg = tiny()
    with torch.device("meta"):
        m = Transformer(cfg)
    assert all(p.is_meta for p in m.parameters())
    m.to_empty(device="cpu")
    m.init_weights()
    assert torch.equal(m.norm.weight, torch.ones(cfg.dim))
    moe = m.moe_layers()[0]
    assert torch.count_nonzero(moe.router.expert_bias) == 0 and moe.router.expert_load.sum() == 0
    assert abs(moe.experts.w1.std().item() - cfg.init_std) < 0.2 * cfg.init_std
    loss, _ = m.loss(tokens(), tokens(seed=1))
    assert torch.isfinite(loss)


def test_count_params_activated():
    cfg = tiny()
    c = count_params(cfg)
    m = Transformer(cfg)
    mtp_ids = {id(p) for p in m.mtp.parameters()}
    assert c["total"] == sum(p.numel() for p in m.parameters() if id(p) not in mtp_ids)
    assert c["mtp"] == sum(p.numel() for p in m.mtp.parameters())
    per_expert = 3 * cfg.dim * cfg.moe_inter_dim
    idle = (cfg.n_routed_experts - cfg.n_activated_experts) * per_expert
    assert c["activated"] == c["total"] - (cfg.n_layers - cfg.n_dense_layers) * idle
    assert c["mtp_activated"] == c["mtp"] - idle
