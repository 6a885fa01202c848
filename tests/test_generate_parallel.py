"""Parallel equals sequential for generation (DESIGN.md rule 6): under expert parallelism (ep=2
on 2 gloo ranks) the ranks decode in lock-step, each with its own prompts, and each rank's
tokens, log-probs and experts equal those of one process decoding that rank's prompts alone.

The ranks get prompts of different lengths and counts, different max_new_tokens and stop
tokens, so one rank finishes first and must keep answering the other's all-to-alls (generate's
all_done). fp64, so log-probs agree to 1e-10 (the expert outputs are summed in another order
under ep). Cases: greedy, seeded temperature / top-k sampling, and MTP speculative decoding
(greedy and sampled; the MTP block is an MoE layer too). Then `duet-generate` on a checkpoint:
with the run's parallel.ep = 2 it runs as two ranks and prints what one process prints.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from framework.config import ModelConfig, ParallelConfig, TrainConfig
from framework.generate import SamplingParams, generate
from framework.model import Transformer
from launch.ranks import run_ranks

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = 11


def model_cfg() -> ModelConfig:
    """One dense and two MoE blocks, 8 experts (4 per rank), an MTP block (MoE as well), YaRN."""
    return ModelConfig(name="generate-ep-test", vocab_size=64, dim=32, n_layers=3, n_dense_layers=1,
                       dense_inter_dim=48, max_seq_len=32, n_heads=2, q_lora_rank=16, kv_lora_rank=16,
                       qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8,
                       n_shared_experts=1, n_activated_experts=2, moe_inter_dim=24, n_expert_groups=2,
                       n_limited_groups=1, init_std=0.08, mtp_depth=1, rope_factor=4.0, original_seq_len=16)


def set_biases(model) -> None:
    """A non-zero expert bias, the same global values everywhere (routers stay whole under ep)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.router.expert_bias.copy_(torch.randn(moe.router.expert_bias.shape, generator=g) * 0.1)


def one_process_model() -> Transformer:
    torch.manual_seed(SEED)
    m = Transformer(model_cfg()).double().eval()
    set_biases(m)
    return m


def seq(n: int, seed: int) -> list[int]:
    return torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# Per case and rank: (prompts, params, generate keywords). Rank 1 always decodes longer; the
# keywords (speculative, return_experts) are the same on both ranks: they decide the forwards run.
PROMPTS = {0: [seq(3, 1), seq(8, 2)], 1: [seq(11, 3), seq(5, 4), seq(2, 5)]}


def cases(stop: int) -> dict[str, dict[int, tuple]]:
    greedy, sampled = SamplingParams(temperature=0), SamplingParams(temperature=0.9, top_k=12)
    r = dataclasses.replace
    ex, spec = {"return_experts": True}, {"speculative": True}
    spec_ex = {**spec, **ex}
    return {
        "greedy": {0: (PROMPTS[0], r(greedy, max_new_tokens=3), ex),
                   1: (PROMPTS[1], r(greedy, max_new_tokens=10, stop_tokens=(stop,)), ex)},
        "sampled": {0: (PROMPTS[0], r(sampled, max_new_tokens=4, seed=5), ex),
                    1: (PROMPTS[1], r(sampled, max_new_tokens=9, seed=8), ex)},
        "speculative": {0: (PROMPTS[0], r(greedy, max_new_tokens=2), spec_ex),
                        1: (PROMPTS[1], r(greedy, max_new_tokens=9), spec_ex)},
        "speculative_sampled": {0: (PROMPTS[0], r(sampled, max_new_tokens=3, seed=2), spec),
                                1: (PROMPTS[1], r(sampled, max_new_tokens=8, seed=4), spec)},
    }


def ep_worker(rank: int, world: int, stop: int, ckpt: str) -> dict:
    from framework.generate import ep_all_done
    from parallel.mesh import Layout, build_mesh
    from parallel.parallelize import parallelize

    cfg = TrainConfig(seed=SEED, device="cpu")
    cfg.model = model_cfg()
    cfg.parallel = dataclasses.replace(ParallelConfig(), dp=world, ep=world)
    mesh = build_mesh(Layout.from_config(cfg.parallel))
    torch.manual_seed(SEED)  # parallelize draws the same global weights as Transformer(cfg) would
    model = parallelize(cfg.model, cfg, mesh, torch.device("cpu"), "fp32", trainable=False).model
    model = model.double().eval()
    set_biases(model)
    all_done = ep_all_done(mesh.ep_group)
    out = {"held_experts": model.moe_layers()[0].experts.w1.shape[0]}
    for name, per_rank in cases(stop).items():
        prompts, params, kw = per_rank[rank]
        out[name] = generate(model, prompts, params, all_done=all_done, **kw)
    # duet-generate's rank body on a checkpoint, with one prompt for two ranks: rank 1 has none
    # of its own, decodes a stand-in and must still serve rank 0's all-to-alls.
    from launch.generate import _rank_generate

    out["cli_rank"] = _rank_generate(rank, world, ckpt, model_cfg(), [PROMPTS[1][0]], [[0], []],
                                     SamplingParams(max_new_tokens=7, temperature=0), False)
    return out


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    """(one-process model, stop token, each rank's results, the checkpoint's model) from one
    spawn of 2 ranks."""
    single = one_process_model()
    # Rank 1's first sequence stops on a token it emits mid-way (one process's greedy output).
    free = generate(single, PROMPTS[1][:1], SamplingParams(max_new_tokens=10, temperature=0)).tokens[0]
    stop = int(free[4])
    run, saved = tiny_run(tmp_path_factory.mktemp("ckpt"), ep=2)
    return single, stop, run_ranks(ep_worker, 2, stop, str(run / "checkpoints" / "step_00000002")), saved


@pytest.mark.parametrize("case", ["greedy", "sampled", "speculative", "speculative_sampled"])
def test_ep2_lockstep_decode_equals_one_process(decoded, case):
    single, stop, ranks, _ = decoded
    assert [r["held_experts"] for r in ranks] == [4, 4]  # each rank holds only its half
    lengths = {}
    for rank, res in enumerate(ranks):
        prompts, params, kw = cases(stop)[case][rank]
        want = generate(single, prompts, params, **kw)
        got = res[case]
        assert len(got.tokens) == len(prompts)
        for b in range(len(prompts)):
            assert got.tokens[b].tolist() == want.tokens[b].tolist(), (case, rank, b)
            assert got.logprobs[b].dtype == torch.float64
            assert (got.logprobs[b] - want.logprobs[b]).abs().max().item() <= 1e-10, (case, rank, b)
            assert (got.sampling_logprobs[b] - want.sampling_logprobs[b]).abs().max().item() <= 1e-10
            if kw.get("return_experts"):
                assert torch.equal(got.experts[b], want.experts[b]), (case, rank, b)
        assert (got.drafted, got.accepted) == (want.drafted, want.accepted)
        lengths[rank] = max(t.numel() for t in got.tokens)
    # Rank 0 finished first and kept stepping for rank 1: the lock-step this test is about.
    assert lengths[0] < lengths[1]
    if case == "greedy":
        first = ranks[1]["greedy"].tokens[0].tolist()
        assert first[-1] == stop and len(first) < 10  # the stop token ended it early
    if case.startswith("speculative"):
        assert all(r[case].drafted > 0 for r in ranks)


# ----------------------------------------------------------------------------- duet-generate as ranks


def test_rank_body_loads_its_experts_from_a_checkpoint_and_serves_with_no_prompt(decoded):
    _, _, ranks, saved = decoded
    want = generate(saved, [PROMPTS[1][0]], SamplingParams(max_new_tokens=7, temperature=0)).tokens[0]
    assert ranks[0]["cli_rank"]["tokens"] == [want.tolist()]
    assert ranks[1]["cli_rank"]["tokens"] == []  # its stand-in's output is dropped


def tiny_run(tmp_path, ep: int):
    """A run folder with one checkpoint of a freshly built model (fp32), saved as a run trained
    with parallel.ep = `ep` records it."""
    from framework import checkpoint

    torch.manual_seed(SEED)
    m = Transformer(model_cfg()).eval()
    set_biases(m)
    run = tmp_path / "run"
    parallel = dataclasses.asdict(dataclasses.replace(ParallelConfig(), dp=ep, ep=ep))
    checkpoint.save_weights(run / "checkpoints" / "step_00000002", m,
                            {"model": dataclasses.asdict(model_cfg()), "parallel": parallel})
    return run, m


def test_duet_generate_runs_as_ranks_under_the_runs_ep_and_prints_what_one_process_prints(tmp_path, capsys):
    from launch.generate import main as gen_main

    run, m = tiny_run(tmp_path, ep=2)
    prompts = [seq(4, 6), seq(9, 7), seq(2, 8)]  # 3 prompts on 2 ranks: blocks of 1 and 2
    file = tmp_path / "prompts.txt"
    file.write_text("".join(" ".join(map(str, p)) + "\n" for p in prompts))
    argv = [str(run), "--prompts-file", str(file), "--temperature", "0", "--max-new-tokens", "6"]
    capsys.readouterr()
    assert gen_main(argv) == 0  # parallel.ep = 2 from the run's config
    ranks = capsys.readouterr()
    assert "on 2 ranks (ep 2)" in ranks.err, ranks.err
    assert gen_main(argv + ["--ep", "1"]) == 0
    alone = capsys.readouterr()
    assert "ranks" not in alone.err
    assert ranks.out == alone.out
    # ... and both are one process's greedy continuations, in prompt order.
    want = generate(m, prompts, SamplingParams(max_new_tokens=6, temperature=0)).tokens
    expected = "".join(f"--- {i}\n" + " ".join(map(str, p + w.tolist())) + "\n"
                       for i, (p, w) in enumerate(zip(prompts, want)))
    assert alone.out == expected


def test_duet_generate_bad_ep_is_one_line_before_any_rank_starts(tmp_path, capsys, monkeypatch):
    import launch.ranks
    from launch.generate import main as gen_main

    def no_spawn(*_a, **_k):
        raise AssertionError("a rank was spawned")

    monkeypatch.setattr(launch.ranks, "run_ranks", no_spawn)
    run, _ = tiny_run(tmp_path, ep=3)  # 8 experts do not split over 3 ranks
    for extra, phrase in [([], "the run's parallel.ep (override with --ep)=3 does not divide"),
                          (["--ep", "0"], "--ep=0: must be >= 1"),
                          (["--ep", "2", "--max-new-tokens", "40"], "exceeds the context")]:
        capsys.readouterr()
        assert gen_main([str(run), "1 2 3", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("duet-generate: error:") and phrase in err and err.count("\n") == 1, err
