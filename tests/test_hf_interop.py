"""duet <-> Hugging Face DeepSeek-V3 / V2: logits parity with transformers, MTP parity with
transformers' MtpModel, bit-exact import round trips, the CLI, and parameter counts of the
published configurations against transformers' own models built on the meta device."""

import dataclasses
import json
import re

import pytest
import torch
import transformers  # a dev dependency (pyproject [dev])

from framework.config import ModelConfig
from framework.hf import export_hf, import_hf, main
from framework.model import Transformer, count_params

BASE = {"vocab_size": 96, "dim": 64, "n_layers": 3, "n_dense_layers": 1, "dense_inter_dim": 96,
        "max_seq_len": 64, "n_heads": 4, "kv_lora_rank": 24, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
        "v_head_dim": 12, "n_routed_experts": 8, "moe_inter_dim": 32, "n_activated_experts": 3,
        "init_std": 0.05, "mtp_depth": 1}
CASES = {
    # V3: q LoRA, sigmoid gate, 4 groups keep 2, random expert bias, YaRN with mscale != mscale_all_dim
    # (exercises both the softmax and the cos/sin correction), context 40 > original 16.
    "v3_yarn": ModelConfig(**BASE, q_lora_rank=32, n_shared_experts=1, n_expert_groups=4, n_limited_groups=2,
                           rope_factor=4.0, original_seq_len=16, mscale=1.0, mscale_all_dim=0.8),
    "v3_plain": ModelConfig(**BASE, q_lora_rank=32, n_shared_experts=1, n_expert_groups=2, n_limited_groups=1,
                            route_scale=2.5, mtp_loss_weight=0.1),
    # V2: softmax gate, no q compression, group-limited greedy, no renormalisation, DeepSeek-V2's YaRN.
    "v2_yarn": ModelConfig(**BASE, q_lora_rank=0, n_shared_experts=2, n_expert_groups=4, n_limited_groups=2,
                           score_func="softmax", norm_topk_prob=False, route_scale=1.5, rope_factor=4.0,
                           original_seq_len=16, mscale=0.707, mscale_all_dim=0.707),
    # V2-Lite-like: greedy top-k over all experts, plain RoPE.
    "v2_greedy": ModelConfig(**BASE, q_lora_rank=0, n_shared_experts=2, n_expert_groups=1, n_limited_groups=1,
                             score_func="softmax", norm_topk_prob=False, route_scale=1.0),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def build(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    if cfg.score_func == "sigmoid":
        with torch.no_grad():  # a trained bias changes which experts are picked
            for moe in m.moe_layers():
                moe.router.expert_bias.normal_(0, 0.1)
    return m


def load_hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_and_import_is_exact(case, tmp_path):
    cfg = CASES[case]
    m = build(cfg)
    export_hf(m, cfg, tmp_path)
    hf = load_hf(tmp_path)
    expected_cls = "DeepseekV3ForCausalLM" if cfg.score_func == "sigmoid" else "DeepseekV2ForCausalLM"
    assert type(hf).__name__ == expected_cls
    x = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (m(x) - hf(x).logits).abs().max().item()
    assert diff <= 1e-4, f"{case}: max |logit diff| {diff}"

    m2, cfg2 = import_hf(tmp_path)
    assert cfg2 == cfg
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys() and any(k.startswith("mtp.0.") for k in sd)
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k


def test_mtp_layer_matches_transformers_mtp_model(tmp_path):
    """The exported MTP layer, read by transformers' own MTP implementation, predicts what duet's
    MTP module predicts (embedding-first concat, shared_head.norm, shared embed/head)."""
    from transformers.modeling_layers import MtpModel

    cfg = CASES["v3_yarn"]
    m = build(cfg)
    export_hf(m, cfg, tmp_path)
    hf = load_hf(tmp_path)
    # transformers finds MTP weights through this pattern, hard-wired to layer 61 for V3.
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{cfg.n_layers}\..*"]
    mtp = MtpModel.from_pretrained(hf).eval()
    x = torch.randint(0, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
    T = x.shape[1]
    with torch.no_grad():
        h = hf(x, output_hidden_states=True).hidden_states[-1]
        # transformers numbers the MTP positions from the shifted tokens; rope is relative, so the
        # offset against duet's 0-based positions does not change attention.
        hf_h = mtp.forward_layer(0, h[:, :-1], torch.arange(1, T)[None], None, input_ids=x[:, 1:])
        hf_logits = mtp._project_to_logits(hf_h)
        duet_logits = m.head(m.mtp[0](m.hidden(x)[:, :-1], m.embed(x[:, 1:])))
    assert (hf_logits - duet_logits).abs().max().item() <= 1e-4


def test_import_folder_resaved_by_transformers(tmp_path):
    cfg = CASES["v3_yarn"]
    m = build(cfg)
    export_hf(m, cfg, tmp_path / "duet")
    load_hf(tmp_path / "duet").save_pretrained(tmp_path / "hf")  # drops the MTP layer
    m2, cfg2 = import_hf(tmp_path / "hf")
    assert cfg2 == dataclasses.replace(cfg, mtp_depth=0)
    sd2 = m2.state_dict()
    for k, v in m.state_dict().items():
        if not k.startswith("mtp."):
            assert torch.equal(v, sd2[k]), k


def test_cli_round_trip_through_duet_checkpoints_and_errors(tmp_path, capsys):
    from framework import checkpoint
    from framework.hf import _load_duet_checkpoint, _write_duet_checkpoint

    cfg = CASES["v3_plain"]
    m = build(cfg)
    _write_duet_checkpoint(m, cfg, tmp_path / "a")
    assert main(["export", str(tmp_path / "a"), str(tmp_path / "hf")]) == 0
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "b")]) == 0
    a_model, a_cfg = _load_duet_checkpoint(tmp_path / "a")
    b_model, b_cfg = _load_duet_checkpoint(tmp_path / "b")
    assert a_cfg == b_cfg == cfg and checkpoint.read_meta(tmp_path / "b")["weights_only"]
    b_state = b_model.state_dict()
    assert all(torch.equal(v, b_state[k]) for k, v in m.state_dict().items())
    assert (tmp_path / "b" / "model.yaml").read_text().count("n_routed_experts") == 1
    capsys.readouterr()
    assert main(["import", str(tmp_path / "missing"), str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("duet-hf import: error:") and err.count("\n") == 1
    assert not (tmp_path / "c").exists()


def test_export_refuses_what_deepseek_v2_cannot_express(tmp_path):
    v2 = CASES["v2_greedy"]
    with pytest.raises(ValueError, match="norm_topk_prob"):
        export_hf(build(v2), dataclasses.replace(v2, norm_topk_prob=True), tmp_path)
    m = build(v2)
    m.moe_layers()[0].router.expert_bias[0] = 0.5
    with pytest.raises(ValueError, match="expert bias"):
        export_hf(m, v2, tmp_path)


# ----------------------------------------------------------------------------- parameter counts
# Published hyper-parameters (shared/ANCHORS.md), given to each side independently.

V3 = ModelConfig(name="deepseek_v3", vocab_size=129280, dim=7168, n_layers=61, n_dense_layers=3,
                 dense_inter_dim=18432, n_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                 qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1,
                 n_activated_experts=8, moe_inter_dim=2048, n_expert_groups=8, n_limited_groups=4,
                 mtp_depth=1)
V2_LITE = ModelConfig(name="deepseek_v2_lite", vocab_size=102400, dim=2048, n_layers=27, n_dense_layers=1,
                      dense_inter_dim=10944, n_heads=16, q_lora_rank=0, kv_lora_rank=512,
                      qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
                      n_shared_experts=2, n_activated_experts=6, moe_inter_dim=1408, n_expert_groups=1,
                      n_limited_groups=1, score_func="softmax", norm_topk_prob=False, route_scale=1.0,
                      mtp_depth=0)


def hf_meta_count(config) -> int:
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def test_deepseek_v3_param_count():
    hf = transformers.DeepseekV3Config(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128, num_key_value_heads=128,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4)
    counts = count_params(V3)
    print(f"\ndeepseek_v3: {counts}")
    assert counts["total"] == hf_meta_count(hf) == 671_026_404_352
    assert 37.0e9 < counts["activated"] < 38.0e9  # "37B activated" (embedding and head included)
    assert 11.4e9 < counts["mtp"] < 11.7e9  # "MTP module 11.5B unique"


def test_deepseek_v2_lite_param_count():
    hf = transformers.DeepseekV2Config(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16, num_key_value_heads=16,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6)
    counts = count_params(V2_LITE)
    print(f"\ndeepseek_v2_lite: {counts}")
    assert counts["total"] == hf_meta_count(hf) == 15_706_484_224
    assert counts["mtp"] == 0


# ----------------------------------------------------------------------------- generation, tokenizers, FP8


def small_bpe(tmp_path):
    """A byte-level BPE of at most 300 tokens trained here, saved as tokenizer.json."""
    from framework.data import _train_bpe

    tok = _train_bpe("def f(x):\n    return x + 1\n" * 40 + "class A:\n    pass\n" * 40, 300)
    tok.save(str(tmp_path / "tokenizer.json"))
    return tok


def test_exported_model_greedy_tokens_equal_transformers_generate(tmp_path):
    from framework.generate import SamplingParams, generate

    cfg = CASES["v3_yarn"]
    m = build(cfg)
    export_hf(m, cfg, tmp_path)
    hf = load_hf(tmp_path)
    prompt = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        # The mask given: inferred from pad_token_id, it would hide the prompt's token 0.
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                           do_sample=False, eos_token_id=None, pad_token_id=0)[0, 9:].tolist()
    m2, _ = import_hf(tmp_path)
    got = generate(m2, prompt.tolist(), SamplingParams(max_new_tokens=16, temperature=0))
    spec = generate(m2, prompt.tolist(), SamplingParams(max_new_tokens=16, temperature=0), speculative=True)
    assert got.tokens[0].tolist() == want == spec.tokens[0].tolist()


def test_duet_generate_cli_on_a_run_folder_and_on_import_output(tmp_path, capsys):
    from framework import checkpoint
    from framework.data import BPETokenizer
    from framework.generate import SamplingParams, generate
    from launch.generate import main as gen_main

    cfg = dataclasses.replace(CASES["v3_plain"], vocab_size=300)
    m = build(cfg)
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    tok = BPETokenizer(small_bpe(run / "data"))
    checkpoint.save_weights(run / "checkpoints" / "step_00000003", m,
                            {"model": dataclasses.asdict(cfg), "data": {"tokenizer": "bpe"}})
    capsys.readouterr()
    assert gen_main([str(run), "def f", "--temperature", "0", "--max-new-tokens", "6"]) == 0
    ids = tok.encode("def f")
    want = generate(m, [ids], SamplingParams(max_new_tokens=6, temperature=0)).tokens[0].tolist()
    assert capsys.readouterr().out == tok.decode(ids + want) + "\n"

    # The same model through Hugging Face with a tokenizer and chat template, imported back.
    export_hf(m, cfg, tmp_path / "hf")
    small_bpe(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": "{{ messages }}"}')
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "imp")]) == 0
    imported = (tmp_path / "imp" / "tokenizer.json").read_text()
    assert imported == (tmp_path / "hf" / "tokenizer.json").read_text()
    capsys.readouterr()
    assert gen_main([str(tmp_path / "imp"), "def f", "--temperature", "0", "--max-new-tokens", "6",
                     "--speculative"]) == 0
    assert capsys.readouterr().out == tok.decode(ids + want) + "\n"
    # Export of the run writes its tokenizer; transformers reads it and tokenizes alike.
    assert main(["export", str(run), str(tmp_path / "hf2")]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf2")
    assert hf_tok("def f(x): pass")["input_ids"] == tok.encode("def f(x): pass")
    assert main(["export", str(tmp_path / "imp"), str(tmp_path / "hf3")]) == 0
    assert "chat_template" in (tmp_path / "hf3" / "tokenizer_config.json").read_text()

    long = " ".join(["def f(x): return x"] * 30)
    for argv, phrase in [([str(tmp_path / "none"), "x"], "no such checkpoint"),
                         ([str(run), "x", "--top-p", "1.5"], "--top-p=1.5"),
                         ([str(run), long], "exceeds the context"),
                         ([str(tmp_path), "x"], "neither a duet checkpoint")]:
        capsys.readouterr()
        assert gen_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("duet-generate: error:") and phrase in err and err.count("\n") == 1, err


def test_import_reads_deepseek_fp8_layout(tmp_path):
    """A synthetic checkpoint in DeepSeek's FP8 release layout: linear weights e4m3 with one fp32
    `weight_scale_inv` per 128x128 block (dims not multiples of 128, so edge blocks are partial);
    embedding, head, norms and gates stay high precision. Import gives the dequantised weights."""
    from safetensors.torch import load_file, save_file

    cfg = dataclasses.replace(CASES["v3_plain"], dim=160, dense_inter_dim=200, moe_inter_dim=136,
                              n_layers=2, mtp_depth=0)
    m = build(cfg)
    export_hf(m, cfg, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    fp8, expected = {}, {}
    for name, w in tensors.items():
        if w.ndim != 2 or "embed" in name or "lm_head" in name or "mlp.gate.weight" in name:
            fp8[name] = w
            continue
        rows, cols = w.shape
        nb_r, nb_c = -(-rows // 128), -(-cols // 128)
        scale = torch.empty(nb_r, nb_c)
        q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
        deq = torch.empty(rows, cols)
        for i in range(nb_r):
            for j in range(nb_c):
                blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
                s = blk.abs().max().clamp_min(1e-4) / 448
                scale[i, j] = s
                qb = (blk / s).to(torch.float8_e4m3fn)
                q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = qb
                deq[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = qb.float() * s
        fp8[name], fp8[name + "_scale_inv"], expected[name] = q, scale, deq
    assert any(t.shape[0] % 128 and t.shape[0] > 128 for t in expected.values())
    (tmp_path / "model.safetensors").unlink()
    save_file(fp8, str(tmp_path / "model.safetensors"))
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                   "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(conf))
    m2, cfg2 = import_hf(tmp_path)
    assert cfg2 == cfg
    hf_names = to_hf_names(m2, cfg)
    for name, t in m2.state_dict().items():
        for hf_name, part in hf_names.get(name, []):
            if hf_name in expected:
                assert torch.equal(part(t), expected[hf_name]), hf_name
    for name, deq in expected.items():  # e4m3 keeps 3 mantissa bits: within ~2^-4 of the original
        assert ((deq - tensors[name]).norm() / tensors[name].norm()).item() < 0.05, name


def to_hf_names(model, cfg) -> dict[str, list]:
    """duet name -> [(hf name, function picking that tensor's part)] via the exporter itself."""
    from framework.hf import to_hf_state_dict

    out: dict[str, list] = {}
    for name, t in model.state_dict().items():
        for hf_name in to_hf_state_dict({name: t}, cfg, mtp_shared_copies=False):
            m = re.search(r"experts\.(\d+)\.", hf_name)
            pick = (lambda j: lambda x: x[j])(int(m[1])) if m else (lambda x: x)
            out.setdefault(name, []).append((hf_name, pick))
    return out
