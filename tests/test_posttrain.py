"""Post-training pieces against hand-computed values: tasks and verifiers, rewards, SFT rows and
masks (gradients on response targets only), the GRPO objective, routing replay, rejection
sampling, bad input."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from framework.errors import DataError, TrainingError
from framework.model import Transformer
from framework.posttrain import distill, grpo, replay
from framework.posttrain.config import PosttrainConfig, posttrain_problems
from framework.posttrain.rewards import accuracy_reward, check_rewards, format_reward, parse, total_rewards
from framework.posttrain.sft import END, Row, collate, decode, encode, load_rows, response_ce
from framework.posttrain.tasks import Addition, Countdown, Problem, Sorting


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def nan_reward(task, problem, completion) -> float:  # a user reward gone wrong (by import path)
    return math.nan


# --------------------------------------------------------------------------- tasks and rewards


def test_verifiers_accept_right_and_reject_wrong_answers():
    add = Problem("57+68=", "125", "125", (57, 68))
    assert Addition().verify(add, "125") and Addition().verify(add, " 125")
    assert not Addition().verify(add, "124") and not Addition().verify(add, "")
    srt = Problem("s:3912=", "1239", "9321", (3, 9, 1, 2))
    assert Sorting().verify(srt, "1239") and not Sorting().verify(srt, "1293")
    cd = Problem("3 5 7>22=", "3*5+7", "15,22", ((3, 5, 7), 22))
    assert Countdown().verify(cd, "3*5+7") and Countdown().verify(cd, "7+5*3")
    assert not Countdown().verify(cd, "3*5*7")  # 105
    assert not Countdown().verify(cd, "3*5+7+0")  # a number not given
    assert not Countdown().verify(cd, "15+7")  # numbers not the given ones
    assert not Countdown().verify(cd, "__import__('os')") and not Countdown().verify(cd, "3*5+7)")
    one = Problem("", "", "", ((4, 2, 2), 1))
    assert Countdown().verify(one, "4/2/2") and Countdown().verify(one, "4/(2*2)")
    assert not Countdown().verify(one, "4/2*2") and not Countdown().verify(one, "2/(4-2-2)")  # 4; 1/0


@pytest.mark.parametrize("task", [Addition(2), Sorting(4), Countdown(3)])
def test_generated_problems_are_solved_by_their_own_answer(task):
    problems = task.problems(200, seed=3)
    assert all(task.verify(p, p.answer) for p in problems)
    assert len({p.prompt for p in problems}) > 100  # not one problem repeated
    assert task.problems(5, seed=3) == problems[:5]  # a fixed seed gives fixed problems


def test_rewards_parse_the_template():
    p, task = Problem("57+68=", "125", "125", (57, 68)), Addition()
    assert parse("<think>x</think>125") == ("x", "125")
    for bad in ("125", "<think>125", "<think>1</think>", "<think>1</think>2</think>", "x<think>1</think>2"):
        assert parse(bad) is None and format_reward(task, p, bad) == 0.0
    assert accuracy_reward(task, p, "<think></think>125") == 1.0
    assert accuracy_reward(task, p, "<think>125</think>124") == 0.0
    assert accuracy_reward(task, p, "125") == 0.0  # right number, no template
    totals, means = total_rewards({"accuracy": 1.0, "format": 0.5}, task, [p, p],
                                  ["<think></think>125", "<think></think>7"])
    assert totals == [1.5, 0.5] and means == {"accuracy": 0.5, "format": 1.0}


def test_non_finite_reward_names_the_function_and_the_sample():
    p = Problem("57+68=", "125", "125", (57, 68))
    user = "tests.test_posttrain:nan_reward"
    with pytest.raises(TrainingError) as err:
        total_rewards({"accuracy": 1.0, user: 1.0}, Addition(), [p, p], ["a", "b"])
    line = str(err.value)
    assert "\n" not in line and user in line and "sample 0" in line and "57+68=" in line
    lines = check_rewards({"accuracy": 1.0, user: 1.0, "nope": 1.0}, Addition(), p)
    assert len(lines) == 2 and "nan_reward" in lines[0] and "unknown reward 'nope'" in lines[1]


# --------------------------------------------------------------------------- SFT


def test_sft_rows_from_jsonl_and_malformed_rows(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "1+1=", "completion": "<think></think>2"}) + "\n\n"
                    + json.dumps({"messages": [{"role": "system", "content": "S:"},
                                               {"role": "user", "content": "2+2="},
                                               {"role": "assistant", "content": "<think></think>4"}]}) + "\n")
    assert load_rows(good) == [Row("1+1=", "<think></think>2"), Row("S:2+2=", "<think></think>4")]
    flipped = '{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}'
    cases = [("{not json", "not valid JSON"), ('["a"]', "JSON object"), ('{"prompt": "a"}', "no string"),
             ('{"prompt": "", "completion": "b"}', "empty"), (flipped, "end with the one assistant turn"),
             ('{"messages": [{"role": "user"}]}', "list of >= 2")]
    for text, says in cases:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + text + "\n")
        with pytest.raises(DataError) as err:
            load_rows(bad)
        assert f"{bad}:2:" in str(err.value) and says in str(err.value) and "\n" not in str(err.value)


def test_collate_targets_the_response_only():
    batch = collate([Row("ab", "c"), Row("x", "yz")])
    assert batch.tokens_BT.tolist() == [[97, 98, 99], [120, 121, 122]]
    assert batch.targets_BT.tolist() == [[98, 99, END], [121, 122, END]]
    assert batch.mask_BT.tolist() == [[False, True, True], [True, True, True]]
    short = collate([Row("ab", "c"), Row("x", "y")])  # the second row is padded at the end
    assert short.tokens_BT[1].tolist() == [120, 121, 0] and short.mask_BT[1].tolist() == [True, True, False]
    assert collate([Row("ab", "c")], whole=True).mask_BT.tolist() == [[True, True, True]]
    assert decode(encode("héllo") + [END, 65]) == "héllo"


def micro_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(PosttrainConfig().policy)


def test_sft_gradients_are_those_of_the_response_targets_only():
    model = micro_model()
    rows = [Row("12+34=", "<think>46</think>46"), Row("5+5=", "<think></think>10"), Row("99+1=", "x")]
    batch = collate(rows)
    n = float(batch.mask_BT.sum())

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    ours = grads(response_ce(model(batch.tokens_BT), batch, n))
    # The reference: cross-entropy of the response positions only, picked out by hand.
    logits = model(batch.tokens_BT)
    picked, wanted = [], []
    for b, row in enumerate(rows):
        p, r = len(encode(row.prompt)), len(encode(row.completion)) + 1
        picked.append(logits[b, p - 1:p - 1 + r])
        wanted.append(batch.targets_BT[b, p - 1:p - 1 + r])
    reference = grads(F.cross_entropy(torch.cat(picked), torch.cat(wanted)))
    assert calc_diff(ours, reference) < 1e-10
    # Prompt targets (mask false) are any tokens at all: the gradients do not move a bit.
    changed = collate(rows)
    noise = torch.randint(0, 256, changed.mask_BT.shape)
    changed.targets_BT = torch.where(changed.mask_BT, changed.targets_BT, noise)
    assert not torch.equal(changed.targets_BT, batch.targets_BT)
    assert torch.equal(grads(response_ce(model(changed.tokens_BT), changed, n)), ours)


# --------------------------------------------------------------------------- the GRPO objective


def test_group_advantages_by_hand():
    adv = grpo.group_advantages(torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1]), 4)
    s1, s2 = math.sqrt(1 / 3), 0.5  # unbiased stds of the two groups
    want = [0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), 0.5 / (s1 + 1e-4),
            -0.25 / (s2 + 1e-4), -0.25 / (s2 + 1e-4), -0.25 / (s2 + 1e-4), 0.75 / (s2 + 1e-4)]
    assert adv.tolist() == pytest.approx(want, rel=1e-12)
    raw = grpo.group_advantages(torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1]), 4, std_norm=False)
    assert raw.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, -0.25, -0.25, -0.25, 0.75])
    assert grpo.group_advantages(torch.tensor([2.0, 2.0]), 2).tolist() == [0.0, 0.0]
    assert grpo.informative_groups(torch.tensor([1.0, 1, 1, 1, 0, 1, 0, 0]), 4).tolist() == [False, True]


def test_clipped_surrogate_and_k3_by_hand():
    ratios = torch.tensor([[1.3, 1.3, 0.5, 0.5]], dtype=torch.float64)
    logp, old = ratios.log(), torch.zeros(1, 4, dtype=torch.float64)
    adv = torch.tensor([1.0])
    for a, want, clipped in [(1.0, [-1.28, -1.28, -0.5, -0.5], [True, True, False, False]),
                             (-1.0, [1.3, 1.3, 0.8, 0.8], [False, False, True, True])]:
        loss, parts = grpo.token_loss(logp, old, None, adv * a, eps=0.2, eps_high=0.28, beta=0.0)
        assert loss[0].tolist() == pytest.approx(want, rel=1e-12)
        assert parts["clipped"][0].tolist() == clipped
    # eps_high = eps: the symmetric PPO clip.
    loss, _ = grpo.token_loss(logp, old, None, adv, eps=0.2, eps_high=0.2, beta=0.0)
    assert loss[0].tolist() == pytest.approx([-1.2, -1.2, -0.5, -0.5], rel=1e-12)
    # k3 with ref/pi = 1/2: 1/2 - log(1/2) - 1.
    p = torch.tensor([[math.log(0.5)]], dtype=torch.float64)
    ref = torch.tensor([[math.log(0.25)]], dtype=torch.float64)
    assert grpo.k3(p, ref).item() == pytest.approx(0.5 + math.log(2) - 1, rel=1e-12)
    loss, parts = grpo.token_loss(p, p.clone(), ref, torch.tensor([2.0]), 0.2, 0.2, beta=0.1)
    assert loss.item() == pytest.approx(-2.0 + 0.1 * (0.5 + math.log(2) - 1), rel=1e-12)


def test_aggregations_by_hand_and_micro_batches_sum_to_the_batch():
    loss = torch.tensor([[1.0, 2, 3], [4, 5, 6]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    norm = grpo.Normaliser(sequences=2, tokens=3, max_len=3)
    assert grpo.aggregate(loss, mask, "grpo", norm).item() == pytest.approx((1.5 + 4) / 2)
    assert grpo.aggregate(loss, mask, "dapo", norm).item() == pytest.approx(7 / 3)
    assert grpo.aggregate(loss, mask, "dr_grpo", norm).item() == pytest.approx(7 / 6)
    for agg in ("grpo", "dapo", "dr_grpo"):  # global normaliser: pieces add up, no mean of means
        parts = grpo.aggregate(loss[:1], mask[:1], agg, norm) + grpo.aggregate(loss[1:], mask[1:], agg, norm)
        assert parts.item() == pytest.approx(grpo.aggregate(loss, mask, agg, norm).item(), rel=1e-6)


def test_pack_rollouts_pads_to_one_length():
    r = grpo.pack_rollouts([[1, 2], [3]], [[4, END], [5, 6, END]], [[-0.5, -0.25], [-1.0, -2.0, -3.0]],
                           torch.tensor([1.0, -1.0]), length=5)
    assert r.tokens_BT.tolist() == [[1, 2, 4, 0, 0], [3, 5, 6, 0, 0]]
    assert r.targets_BT.tolist() == [[2, 4, END, 0, 0], [5, 6, END, 0, 0]]
    assert r.mask_BT.tolist() == [[False, True, True, False, False], [True, True, True, False, False]]
    assert r.sampler_BT.tolist() == [[0, -0.5, -0.25, 0, 0], [-1, -2, -3, 0, 0]]


# --------------------------------------------------------------------------- routing replay


def test_routing_replay_forces_the_recorded_experts_with_current_gate_weights():
    model = micro_model()
    model.train()
    tokens = torch.randint(0, 256, (4, 12))
    moe = model.moe_layers()[0]
    at_experts = []  # what the experts receive: (ids, gate weights) of every forward
    hook = moe.experts.register_forward_pre_hook(lambda module, args: at_experts.append((args[1], args[2])))
    scores = []
    score_hook = moe.router.register_forward_hook(lambda module, args, out: scores.append(out[2]))
    with replay.record(model) as routes:
        model(tokens)
    rollout_w = at_experts[-1][1]
    with torch.no_grad():  # the weights change, as after an update
        moe.router.weight.add_(torch.randn_like(moe.router.weight))
    with replay.record(model) as fresh:
        model(tokens)
    same, total = replay.agreement(routes, fresh)
    assert same < total  # replay off: the routes moved, and the agreement says by how much
    assert not torch.equal(at_experts[-1][0], routes[0])
    with replay.replay(model, routes) as used:
        model(tokens)
    hook.remove()
    score_hook.remove()
    ids, w = at_experts[-1]
    assert len(used) == 1 and torch.equal(ids, routes[0])  # exactly the rollout's experts
    assert not torch.equal(w, rollout_w)  # gate weights from the current scores
    picked = scores[-1].gather(1, routes[0])  # by hand: sigmoid scores, renormalised, x route_scale
    assert torch.allclose(w, picked / picked.sum(-1, keepdim=True) * moe.router.route_scale, rtol=1e-6)
    assert replay.agreement(routes, routes) == (routes[0].numel(), routes[0].numel())


def test_mtp_response_loss_is_the_models_mtp_loss_on_response_targets():
    """posttrain.mtp=train's term: on a batch whose every target is a response token it is the
    model's own MTP loss (weight/D x mean CE) x (T-1)/T: depth 1 predicts T-1 of the T targets,
    and the sum is divided by the T response targets; masking targets lowers it."""
    cfg = dataclasses.replace(PosttrainConfig().policy, mtp_depth=1, mtp_loss_weight=0.3)
    torch.manual_seed(0)
    model = Transformer(cfg)
    B, T = 3, 10
    tokens, targets = torch.randint(0, 256, (B, T)), torch.randint(0, 256, (B, T))
    mb = grpo.Rollouts(tokens, targets, torch.ones(B, T, dtype=torch.bool), torch.zeros(B, T), torch.zeros(B),
                       torch.full((B,), T))
    _, metrics = model.loss(tokens, targets)
    ours = grpo.mtp_response_loss(model, model.hidden(tokens), mb, n_tokens=B * T)
    assert metrics["mtp_loss"] > 0
    assert torch.allclose(ours, metrics["mtp_loss"] * (T - 1) / T, rtol=1e-5)
    mb.mask_BT[:, : T // 2] = False  # the first half's targets become prompt: only the rest counts
    half = grpo.mtp_response_loss(model, model.hidden(tokens), mb, n_tokens=B * T)
    assert 0 < half < ours


def test_mtp_during_rl_moves_only_when_trained():
    """One GRPO update of a policy with an MTP module: mtp=drop and freeze leave its weights as
    they were (and the reduction does not wait for them), mtp=train changes them and the loss."""
    from framework.posttrain.config import train_config
    from framework.posttrain.learner import Learner
    from parallel.mesh import Mesh

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (4,), generator=g).tolist() for _ in range(4)]
    responses = [torch.randint(0, 256, (5,), generator=g).tolist() + [END] for _ in range(4)]
    batch = grpo.pack_rollouts(prompts, responses, [[-1.0] * 6] * 4, torch.tensor([1.0, -1.0, 0.5, -0.5]), 9)
    out = {}
    for mtp in ("drop", "freeze", "train"):
        c = PosttrainConfig(mtp=mtp, max_new_tokens=6)
        c.policy = dataclasses.replace(c.policy, mtp_depth=1)
        policy = Learner.build(c.policy, train_config(c), Mesh.single(), torch.device("cpu"), seed=0)
        before = {n: p.detach().clone() for n, p in policy.model.mtp.named_parameters()}
        record = grpo.update_on(policy, None, batch, c, 1e-3)
        moved = [n for n, p in policy.model.mtp.named_parameters() if not torch.equal(p, before[n])]
        out[mtp] = record["loss"], moved
    assert out["drop"][1] == [] and out["freeze"][1] == [] and out["drop"][0] == out["freeze"][0]
    assert out["train"][1] and out["train"][0] > out["drop"][0]  # the MTP cross-entropy is added


# --------------------------------------------------------------------------- distillation


def test_rejection_sample_keeps_only_verified_correct_answers(monkeypatch):
    """A stub policy whose samples are known: per problem, the first sample that is both in the
    template and verified correct is kept, nothing else; a problem never solved adds no row."""
    task = Addition(2)
    problems = [Problem("57+68=", "125", "125", (57, 68)), Problem("10+10=", "20", "20", (10, 10)),
                Problem("99+99=", "198", "198", (99, 99))]
    answers = {  # G = 4 samples each, in sampling order
        "57+68=": ["<think>125</think>124", "125", "<think>1</think>125", "<think>125</think>125"],
        "10+10=": ["<think>20</think>21", "<think>20</think>20</think>", "20", "<think></think>19"],
        "99+99=": ["<think></think>198", "<think>198</think>198", "x", "<think>0</think>198"],
    }
    seen = {}

    def stub_sample(model, prompts, max_new_tokens, temperature, seed, ep_group=None):
        seen.update(n=len(prompts), temperature=temperature)
        texts = [answers[decode(p)][i % 4] for i, p in enumerate(prompts)]
        return [encode(t) + [END] for t in texts], [[0.0] * (len(t) + 1) for t in texts], None

    monkeypatch.setattr(distill, "sample", stub_sample)
    c = PosttrainConfig(group_size=4, temperature=1.0)
    policy = SimpleNamespace(sampling_model=lambda: None, ep_group=None)
    rows = distill.rejection_sample(policy, task, problems, c, seed=0)
    assert seen == {"n": 12, "temperature": 1.0}  # G samples per problem at the RL temperature
    assert rows == [Row("57+68=", "<think>1</think>125"), Row("99+99=", "<think></think>198")]
    assert all(accuracy_reward(task, p, r.completion) for p, r in zip([problems[0], problems[2]], rows))


# --------------------------------------------------------------------------- bad input


def test_posttrain_config_problems_are_one_line_each():
    assert posttrain_problems(PosttrainConfig()) == []
    lines = posttrain_problems(PosttrainConfig(group_size=1, loss_agg="ppo", task="chess"))
    assert len(lines) == 3 and all("\n" not in line for line in lines)
    assert any("posttrain.group_size=1" in line for line in lines)
    layout = PosttrainConfig()
    layout.parallel.pp, layout.parallel.dp, layout.parallel.ep = 2, 2, 2
    layout.parallel.micro_batches = layout.micro_batches = 2
    assert posttrain_problems(layout) == [
        "posttrain.parallel.ep=2 with parallel.pp=2: sampling under a pipeline gathers a whole model per "
        "rank, without expert parallelism; use parallel.ep=1 with pp > 1"]
    layout.parallel.ep, layout.mtp = 1, "train"
    assert posttrain_problems(layout) == [
        "posttrain.mtp=train with parallel.pp > 1: the MTP term runs in one process only; use "
        "posttrain.mtp=drop or parallel.pp=1"]
    replay_recompute = PosttrainConfig(routing_replay=True)
    replay_recompute.policy.recompute = "selective"
    assert posttrain_problems(replay_recompute) == [
        "posttrain.routing_replay=true with posttrain.policy.recompute=selective: a recompute re-runs the "
        "router outside the replay; set posttrain.policy.recompute=none"]


def test_duet_r1_bad_input_is_one_line_and_exit_2_before_training(tmp_path, capsys):
    from launch.r1 import main

    bad_rows = tmp_path / "rows.jsonl"
    bad_rows.write_text('{"prompt": "1+1=", "completion": "<think></think>2"}\n{"prompt": 3}\n')
    long_row = tmp_path / "long.jsonl"
    long_row.write_text(json.dumps({"prompt": "9" * 70, "completion": "x"}) + "\n")
    run_dir = tmp_path / "run"
    cases = [(["group_size=1"], "posttrain.group_size=1"),
             ([f"sft_data={bad_rows}"], f"{bad_rows}:2:"),
             ([f"sft_data={long_row}"], "longer than model.max_seq_len=64"),
             (["max_new_tokens=60"], "exceed posttrain.policy.max_seq_len=64"),
             (["+rewards.nope=1.0"], "unknown reward 'nope'"),
             (["grpo_stepz=3"], "grpo_stepz"),
             (["posttrain=nope"], "unknown posttrain preset 'nope'")]
    for args, says in cases:
        assert main(args + [f"run_dir={run_dir}"]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0] and err[0].startswith("duet-r1: error: "), (args, err)
    assert not run_dir.exists()  # nothing trained, nothing written
