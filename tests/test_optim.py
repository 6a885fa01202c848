"""AdamW (master weights, bf16 moments, checkpointing), LR schedules and clipping."""

from __future__ import annotations

import io
import itertools
import math
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from framework.config import OptimConfig
from framework.optim import AdamW, build_optimizer, clip_grad_norm, lr_at, set_lr


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16),
                                torch.nn.GELU(), torch.nn.Linear(16, 4))
    return model.to(dtype)


def loss_of(model: torch.nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    dtype = next(model.parameters()).dtype
    x = torch.randn(32, 8, generator=g).to(dtype)
    y = torch.randn(32, 4, generator=g).to(dtype)
    return ((model(x) - y) ** 2).float().mean()


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    for s in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        loss_of(model, s).backward()
        opt.step()


CFG = OptimConfig(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def torch_adamw(model: torch.nn.Module, **kwargs) -> torch.optim.AdamW:
    """torch's AdamW with CFG and build_optimizer's grouping written out: decay only on matrices."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1},
                              {"params": vectors, "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.95), eps=1e-8, **kwargs)


def train_side_by_side(models, opts, steps: int = 4) -> None:
    """Each model its own optimizer on the same batches; at step 2 one bias gets no gradient, so
    its step count falls behind the others'."""
    for s in range(steps):
        for model, opt in zip(models, opts, strict=True):
            opt.zero_grad(set_to_none=True)
            loss_of(model, s).backward()
            if s == 2:
                model[1].bias.grad = None
            opt.step()


# --------------------------------------------------------------------------- AdamW


def test_matches_torch_adamw_in_fp32():
    ours_model, ref_model = tiny_model(), tiny_model()
    ours = build_optimizer(ours_model, CFG)
    ref = torch_adamw(ref_model, foreach=False)
    for s in range(8):
        lr = 1e-2 * (s + 1) / 8  # a changing lr exercises set_lr
        set_lr(ours, lr)
        for group in ref.param_groups:
            group["lr"] = lr
        train(ours_model, ours, 1, start=s)
        train(ref_model, ref, 1, start=s)
    for a, b in zip(ours_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # And the model really moved (a no-op optimizer would also "match" a no-op reference).
    assert not torch.equal(ours_model[0].weight, tiny_model()[0].weight)


def test_no_weight_decay_on_vectors():
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, OptimConfig(lr=0.5, weight_decay=0.2))
    # Zero gradients: Adam's step is 0/(0+eps) = 0, so only weight decay can move anything.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        expected = before[name] * (1 - 0.5 * 0.2) if p.ndim >= 2 else before[name]
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)
    shapes = [sorted(p.ndim for p in g["params"]) for g in opt.param_groups]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    assert shapes == [[2, 2], [1, 1, 1, 1]]  # two Linear biases, LayerNorm weight and bias


def test_bf16_master_weights_keep_small_steps():
    w = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16))
    opt = AdamW([w], lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    # A pure-bf16 update of the same size is lost: 1 - 1e-4 rounds back to 1.
    assert torch.equal(torch.ones(4, 4, dtype=torch.bfloat16) - 1e-4,
                       torch.ones(4, 4, dtype=torch.bfloat16))
    seen_difference = False
    for _ in range(100):
        w.grad = torch.full_like(w, 0.5)
        opt.step()
        master = opt.state[w]["master"]
        assert master.dtype == torch.float32 and w.dtype == torch.bfloat16
        seen_difference |= not torch.equal(master, w.detach().float())
    assert seen_difference
    # With a constant gradient Adam's bias-corrected step is lr * g/|g| = lr each time
    # (fp32 rounding near 1 adds up to ~100 ulps = 6e-6 over the 100 steps).
    torch.testing.assert_close(master, torch.full((4, 4), 1 - 100 * 1e-4), rtol=0, atol=1e-5)
    # The bf16 parameter is the master rounded to nearest, and it has moved off 1.
    assert torch.equal(w.detach(), master.to(torch.bfloat16))
    assert float(w.detach()[0, 0]) < 1.0


def test_bf16_moments_stay_close_to_fp32():
    fp32_model, bf16_model = tiny_model(), tiny_model()
    fp32_opt = build_optimizer(fp32_model, CFG, moment_dtype="fp32")
    bf16_opt = build_optimizer(bf16_model, CFG, moment_dtype="bf16")
    train(fp32_model, fp32_opt, 10)
    train(bf16_model, bf16_opt, 10)
    state = bf16_opt.state[bf16_model[0].weight]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    assert "master" not in state  # fp32 parameters are their own master
    for a, b in zip(fp32_model.parameters(), bf16_model.parameters()):
        # Each step moves a weight by at most ~lr; bf16 moments perturb that by ~1%.
        assert (a - b).abs().max() < 10 * CFG.lr * 0.05
    assert any(not torch.equal(a, b) for a, b in zip(fp32_model.parameters(),
                                                     bf16_model.parameters()))


@pytest.mark.parametrize("param_dtype, moments", [(torch.float32, "bf16"), (torch.bfloat16, "bf16"),
                                                   (torch.bfloat16, "fp32"), (torch.float32, "fp32")])
def test_foreach_update_equals_per_parameter_update(param_dtype, moments):
    """The foreach ops against the one-parameter-at-a-time path, bit for bit, over steps with
    clipping-free training, two groups and a parameter without a gradient."""
    models = [tiny_model(dtype=param_dtype) for _ in range(2)]
    opts = [build_optimizer(m, CFG, moment_dtype=moments) for m in models]
    opts[0].fused, opts[1].foreach = False, False
    assert opts[0].foreach
    train_side_by_side(models, opts)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        for key, value in opts[0].state[p].items():
            other = opts[1].state[q][key]
            assert value.dtype == other.dtype and torch.equal(value, other), key
    assert float(opts[0].state[models[0][1].bias]["step"]) == 3  # the bias sat out one step
    assert float(opts[0].state[models[0][0].weight]["step"]) == 4
    assert any(not torch.equal(a, b) for a, b in zip(models[0].parameters(), tiny_model(dtype=param_dtype)
                                                     .parameters()))  # it trained


def test_fused_update_matches_torch_fused_adamw_bit_for_bit():
    """The default (fused) path against torch.optim.AdamW(fused=True): the same kernel asked the
    same thing (lr, decay per group, step counts), so the same bits."""
    ours_model, ref_model = tiny_model(), tiny_model()
    ours = build_optimizer(ours_model, CFG)
    assert ours.fused
    ref = torch_adamw(ref_model, fused=True)
    versions = [p._version for p in ours_model.parameters()]
    for s in range(6):
        train(ours_model, ours, 1, start=s)
        train(ref_model, ref, 1, start=s)
    for a, b in zip(ours_model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(a, b)
    # Each step moves the version counters, which caches of derived tensors key on.
    assert all(p._version >= v + 6 for p, v in zip(ours_model.parameters(), versions, strict=True))
    assert not torch.equal(ours_model[0].weight, tiny_model()[0].weight)


@pytest.mark.parametrize("param_dtype, moments", [(torch.float32, "bf16"), (torch.bfloat16, "bf16"),
                                                   (torch.bfloat16, "fp32"), (torch.float32, "fp32")])
def test_fused_update_equals_per_parameter_update_to_rounding(param_dtype, moments):
    """The fused kernel against the one-parameter-at-a-time path: the same arithmetic in another
    order, so equal to a few fp32 ulps of the update (weights near 1, steps of lr = 1e-2 each)."""
    models = [tiny_model(dtype=param_dtype) for _ in range(2)]
    opts = [build_optimizer(m, CFG, moment_dtype=moments) for m in models]
    opts[1].foreach = False
    train_side_by_side(models, opts)
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        for key, value in opts[0].state[p].items():
            other = opts[1].state[q][key]
            assert value.dtype == other.dtype, key
            # bf16 storage: the fp32 results may round to neighbouring bf16 values.
            ulps = 2.0 ** -7 if value.dtype == torch.bfloat16 else 1e-6
            torch.testing.assert_close(value, other, rtol=ulps, atol=ulps * 1e-3, msg=key)
        master = opts[0].state[p].get("master", p)
        other = opts[1].state[q].get("master", q)
        torch.testing.assert_close(master, other, rtol=0, atol=1e-6)
    assert float(opts[0].state[models[0][1].bias]["step"]) == 3


def test_bad_moment_dtype():
    with pytest.raises(ValueError, match="precision.moment_dtype"):
        build_optimizer(tiny_model(), CFG, moment_dtype="fp8")


def test_deterministic():
    runs = []
    for _ in range(2):
        model = tiny_model(dtype=torch.bfloat16)
        train(model, build_optimizer(model, CFG, moment_dtype="bf16"), 5)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_state_dict_round_trip_keeps_master_and_moment_dtypes():
    model = tiny_model(dtype=torch.bfloat16)
    opt = build_optimizer(model, CFG, moment_dtype="bf16")
    train(model, opt, 3)
    master = opt.state[model[0].weight]["master"]
    assert not torch.equal(master, model[0].weight.detach().float())  # else the test is moot
    # Through torch.save with weights_only: only tensors and plain values inside.
    blob = {"model": model.state_dict(), "optim": opt.state_dict()}
    buf = io.BytesIO()
    torch.save(blob, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    clone = tiny_model(seed=5, dtype=torch.bfloat16)
    clone.load_state_dict(loaded["model"])
    clone_opt = build_optimizer(clone, CFG, moment_dtype="bf16")
    clone_opt.load_state_dict(loaded["optim"])
    state = clone_opt.state[clone[0].weight]
    assert torch.equal(state["master"], master) and state["master"].dtype == torch.float32
    assert state["exp_avg"].dtype == torch.bfloat16
    # Continuing from the copy is the same as continuing the original.
    train(model, opt, 2, start=3)
    train(clone, clone_opt, 2, start=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), clone.parameters()))


def test_distributed_checkpoint_save_and_load(tmp_path):
    model = tiny_model(dtype=torch.bfloat16)
    opt = build_optimizer(model, CFG, moment_dtype="bf16")
    train(model, opt, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: assuming a single process"
        dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=tmp_path)
        clone = tiny_model(dtype=torch.bfloat16)
        clone.load_state_dict(model.state_dict())
        clone_opt = build_optimizer(clone, CFG, moment_dtype="bf16")
        # DCP initialises empty state with a zero-lr step; that must not move parameters.
        target = {"optim": get_optimizer_state_dict(clone, clone_opt)}
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), clone.parameters()))
        dcp.load(target, checkpoint_id=tmp_path)
        set_optimizer_state_dict(clone, clone_opt, target["optim"])
    for p, q in zip(model.parameters(), clone.parameters()):
        a, b = opt.state[p], clone_opt.state[q]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


# --------------------------------------------------------------------------- schedules


def test_cosine_schedule():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="cosine")
    total = 110  # 100 decay steps after warm-up
    assert lr_at(0, total, cfg) == pytest.approx(1e-4)       # first update: lr/10
    assert lr_at(4, total, cfg) == pytest.approx(0.5e-3)     # 5th of 10 warm-up updates
    assert lr_at(9, total, cfg) == pytest.approx(1e-3)
    assert lr_at(10, total, cfg) == pytest.approx(1e-3)
    assert lr_at(60, total, cfg) == pytest.approx(0.55e-3)   # halfway: the mean
    quarter = 1e-4 + 0.9e-3 * (1 + math.cos(math.pi / 4)) / 2
    assert lr_at(35, total, cfg) == pytest.approx(quarter)
    assert lr_at(110, total, cfg) == pytest.approx(1e-4)
    assert lr_at(500, total, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(s, total, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_constant_schedule():
    cfg = OptimConfig(lr=2e-3, warmup_steps=4, schedule="constant")
    assert [lr_at(s, 100, cfg) for s in range(5)] == pytest.approx([5e-4, 1e-3, 1.5e-3,
                                                                   2e-3, 2e-3])
    assert lr_at(99, 100, cfg) == 2e-3
    no_warmup = OptimConfig(lr=2e-3, warmup_steps=0, schedule="constant")
    assert lr_at(0, 100, no_warmup) == 2e-3


def test_deepseek_schedule():
    # V3's shape: constant, cosine 2.2e-4 -> 2.2e-5, then 2.2e-5 and finally 7.3e-6.
    cfg = OptimConfig(lr=2.2e-4, min_lr=2.2e-5, warmup_steps=20, schedule="deepseek",
                      decay_start=0.5, decay_end=0.9, step_lrs=[2.2e-5, 7.3e-6],
                      step_at=[0.9, 0.95])
    total = 1000
    assert lr_at(9, total, cfg) == pytest.approx(1.1e-4)
    assert lr_at(19, total, cfg) == pytest.approx(2.2e-4)
    assert lr_at(300, total, cfg) == pytest.approx(2.2e-4)
    assert lr_at(499, total, cfg) == pytest.approx(2.2e-4)
    assert lr_at(500, total, cfg) == pytest.approx(2.2e-4)
    assert lr_at(700, total, cfg) == pytest.approx((2.2e-4 + 2.2e-5) / 2)
    assert lr_at(899, total, cfg) == pytest.approx(2.2e-5, rel=1e-3)
    assert lr_at(900, total, cfg) == pytest.approx(2.2e-5)
    assert lr_at(949, total, cfg) == pytest.approx(2.2e-5)
    assert lr_at(950, total, cfg) == pytest.approx(7.3e-6)
    assert lr_at(999, total, cfg) == pytest.approx(7.3e-6)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="optim.schedule"):
        lr_at(50, 100, OptimConfig(schedule="linear", warmup_steps=0))


def test_set_lr_sets_every_group():
    opt = build_optimizer(tiny_model(), CFG)
    set_lr(opt, 0.123)
    assert len(opt.param_groups) == 2
    assert all(g["lr"] == 0.123 for g in opt.param_groups)


# --------------------------------------------------------------------------- clipping


def grads_3_4_12() -> list[torch.nn.Parameter]:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1, 1))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([[12.0]])
    return [a, b, torch.nn.Parameter(torch.zeros(3))]  # the last has no grad


def test_clip_grad_norm():
    params = grads_3_4_12()
    assert float(clip_grad_norm(params, 0.0)) == pytest.approx(13.0)  # sqrt(9+16+144)
    assert params[0].grad.tolist() == [3.0, 4.0]                        # 0: measure only
    assert float(clip_grad_norm(params, 100.0)) == pytest.approx(13.0)
    assert params[0].grad.tolist() == [3.0, 4.0]                        # under the cap
    assert float(clip_grad_norm(params, 6.5)) == pytest.approx(13.0)    # returns pre-clip
    assert params[0].grad.tolist() == pytest.approx([1.5, 2.0], rel=1e-5)
    assert float(params[1].grad) == pytest.approx(6.0, rel=1e-5)
    # Matches torch's own clipping.
    reference = grads_3_4_12()
    torch.nn.utils.clip_grad_norm_(reference, 6.5)
    torch.testing.assert_close(params[0].grad, reference[0].grad)


def test_clip_leaves_non_finite_gradients_alone():
    params = grads_3_4_12()
    params[1].grad = torch.tensor([[float("inf")]])
    assert math.isinf(float(clip_grad_norm(params, 1.0)))
    assert params[0].grad.tolist() == [3.0, 4.0]
