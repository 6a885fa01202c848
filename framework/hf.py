"""Hugging Face interoperability: duet <-> DeepSeek-V3 / V2 checkpoint layout.

export_hf(model, cfg, out_dir) writes config.json + model.safetensors as DeepSeek publishes them:
per-expert `mlp.experts.{j}.gate_proj/up_proj/down_proj`, the gate as `mlp.gate.weight` (+
`e_score_correction_bias` for V3), and the MTP modules as extra layers
`model.layers.{n_layers + k}` with enorm / hnorm / eh_proj / shared_head.norm (+ copies of the
shared embedding and head, as DeepSeek's files carry them). transformers loads the main model
and ignores the extra layers. Sigmoid-gated configs export as deepseek_v3, softmax-gated ones as
deepseek_v2. import_hf(path) reads such a folder back (also transformers-5-saved folders with
fused experts). Rope weights need no permutation: duet rotates adjacent pairs like DeepSeek, which
transformers reads with rope_interleave=True (V3) or its complex-pair rotation (V2).

Tokenizers travel both ways: import copies the folder's tokenizer.json and tokenizer_config.json
(chat template included) into the duet checkpoint; export writes the run's tokenizer
(checkpoint_tokenizer finds it) with a tokenizer_config.json transformers' AutoTokenizer reads.
Import also reads DeepSeek's FP8 release layout: e4m3 weights beside `weight_scale_inv` scales,
one per 128x128 block (config.json quantization_config.weight_block_size), dequantised to fp32.

CLI (console script duet-hf):
    duet-hf export CHECKPOINT.pt OUT_DIR     # CHECKPOINT: torch.save({"model": state_dict, "config": dict})
    duet-hf import HF_DIR CHECKPOINT.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

import torch

from framework.config import ModelConfig, _model_problems
from framework.model import Transformer

# duet block-relative name -> HF layer-relative name (experts handled separately).
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
    "ffn.router.weight": "mlp.gate.weight",
    "ffn.router.expert_bias": "mlp.gate.e_score_correction_bias",
    "ffn.shared.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared.w2.weight": "mlp.shared_experts.down_proj.weight",
}
_EXPERTS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_MTP = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
        "norm.weight": "shared_head.norm.weight"}
_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "head.weight": "lm_head.weight"}
# Training-only settings HF has no field for; kept under "duet" in config.json for a faithful round trip.
_DUET_ONLY = ("name", "bias_update_rate", "seq_aux_alpha", "mtp_loss_weight")


def _is_v3(cfg: ModelConfig) -> bool:
    return cfg.score_func == "sigmoid"


def hf_config(cfg: ModelConfig) -> dict:
    """config.json contents for `cfg` (DeepSeek's own key names, which transformers reads)."""
    v3 = _is_v3(cfg)
    limited = 1 < cfg.n_expert_groups and cfg.n_limited_groups < cfg.n_expert_groups
    out = {
        "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "intermediate_size": cfg.dense_inter_dim, "moe_intermediate_size": cfg.moe_inter_dim,
        "num_hidden_layers": cfg.n_layers, "first_k_dense_replace": cfg.n_dense_layers, "moe_layer_freq": 1,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
        "q_lora_rank": cfg.q_lora_rank or None, "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.n_activated_experts, "routed_scaling_factor": cfg.route_scale,
        "n_group": cfg.n_expert_groups, "topk_group": cfg.n_limited_groups,
        "norm_topk_prob": cfg.norm_topk_prob, "scoring_func": cfg.score_func,
        "topk_method": "noaux_tc" if v3 else ("group_limited_greedy" if limited else "greedy"),
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "attention_bias": False, "tie_word_embeddings": False, "torch_dtype": "float32",
        "duet": {k: getattr(cfg, k) for k in _DUET_ONLY},
    }
    if v3:
        out["rope_interleave"] = True  # DeepSeek's adjacent-pair rope layout
    out["num_nextn_predict_layers"] = cfg.mtp_depth
    if cfg.rope_factor > 1:
        out["rope_scaling"] = {
            "type": "yarn", "factor": cfg.rope_factor,
            "original_max_position_embeddings": cfg.original_seq_len,
            "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow,
            "mscale": cfg.mscale, "mscale_all_dim": cfg.mscale_all_dim,
        }
    return out


def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from a DeepSeek-V2/V3 config.json dict."""
    mt = hf.get("model_type")
    if mt not in ("deepseek_v3", "deepseek_v2"):
        raise ValueError(f"config.json model_type={mt!r}: only deepseek_v3 and deepseek_v2 are supported")
    v3 = mt == "deepseek_v3"
    greedy = hf.get("topk_method") == "greedy" or not hf.get("n_group")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta") or rope.get("rope_theta") or 10000.0
    kw = {
        "vocab_size": hf["vocab_size"], "dim": hf["hidden_size"], "n_layers": hf["num_hidden_layers"],
        "n_dense_layers": hf.get("first_k_dense_replace") or 0, "dense_inter_dim": hf["intermediate_size"],
        "max_seq_len": hf.get("max_position_embeddings", 4096), "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "init_std": hf.get("initializer_range", 0.006), "n_heads": hf["num_attention_heads"],
        "q_lora_rank": hf.get("q_lora_rank") or 0, "kv_lora_rank": hf["kv_lora_rank"],
        "qk_nope_head_dim": hf["qk_nope_head_dim"], "qk_rope_head_dim": hf["qk_rope_head_dim"],
        "v_head_dim": hf["v_head_dim"], "rope_theta": float(theta),
        "n_routed_experts": hf["n_routed_experts"], "n_shared_experts": hf.get("n_shared_experts") or 0,
        "n_activated_experts": hf["num_experts_per_tok"], "moe_inter_dim": hf["moe_intermediate_size"],
        "n_expert_groups": 1 if greedy else hf["n_group"],
        "n_limited_groups": 1 if greedy else hf["topk_group"],
        "score_func": hf.get("scoring_func") or ("sigmoid" if v3 else "softmax"),
        "route_scale": float(hf.get("routed_scaling_factor", 1.0)),
        "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
        "mtp_depth": hf.get("num_nextn_predict_layers") or 0,
    }
    if rope.get("type", rope.get("rope_type", "default")) == "yarn":
        kw.update(rope_factor=float(rope["factor"]),
                  original_seq_len=rope["original_max_position_embeddings"],
                  beta_fast=float(rope.get("beta_fast", 32)), beta_slow=float(rope.get("beta_slow", 1)),
                  mscale=float(rope.get("mscale", 1.0)),
                  mscale_all_dim=float(rope.get("mscale_all_dim", 0.0)))
    elif rope.get("type", rope.get("rope_type", "default")) != "default":
        raise ValueError(f"rope_scaling type {rope.get('type', rope.get('rope_type'))!r} is not supported")
    kw.update({k: v for k, v in (hf.get("duet") or {}).items() if k in _DUET_ONLY})
    cfg = ModelConfig(**kw)
    problems = _model_problems(cfg)
    if problems:
        raise ValueError("; ".join(problems))
    return cfg


def _hf_layer_name(name: str, n_layers: int) -> tuple[str, str] | None:
    """(hf layer prefix, duet block-relative rest) for block / MTP-block names, else None."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if m:
        return f"model.layers.{m[1]}.", m[2]
    m = re.fullmatch(r"mtp\.(\d+)\.block\.(.+)", name)
    if m:
        return f"model.layers.{n_layers + int(m[1])}.", m[2]
    return None


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig,
                     mtp_shared_copies: bool = True) -> dict[str, torch.Tensor]:
    """duet state_dict -> HF tensor dict (new contiguous tensors, safe to save)."""
    v3, L = _is_v3(cfg), cfg.n_layers
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name in _TOP:
            out[_TOP[name]] = t
            continue
        m = re.fullmatch(r"mtp\.(\d+)\.(enorm\.weight|hnorm\.weight|eh_proj\.weight|norm\.weight)", name)
        if m:
            out[f"model.layers.{L + int(m[1])}.{_MTP[m[2]]}"] = t
            continue
        layer = _hf_layer_name(name, L)
        if layer is None:
            raise ValueError(f"no Hugging Face name for duet tensor {name!r}")
        prefix, rest = layer
        em = re.fullmatch(r"ffn\.experts\.(w[123])", rest)
        if em:
            for j in range(t.shape[0]):
                out[f"{prefix}mlp.experts.{j}.{_EXPERTS[em[1]]}.weight"] = t[j]
        elif rest == "ffn.router.expert_bias" and not v3:
            if torch.count_nonzero(t):
                raise ValueError("deepseek_v2 has no expert bias, but the model's is non-zero; "
                                 "export a sigmoid-gated (V3) model or zero the bias")
        else:
            out[prefix + _BLOCK[rest]] = t
    if mtp_shared_copies:
        for k in range(cfg.mtp_depth):  # DeepSeek's files repeat the shared tables in each MTP layer
            out[f"model.layers.{L + k}.embed_tokens.weight"] = state["embed.weight"]
            out[f"model.layers.{L + k}.shared_head.head.weight"] = state["head.weight"]
    # safetensors refuses shared storage: give every entry its own contiguous copy.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def export_hf(model: Transformer, cfg: ModelConfig, out_dir, mtp_shared_copies: bool = True) -> Path:
    """Write config.json + model.safetensors for `model` into out_dir (created)."""
    from safetensors.torch import save_file

    if not _is_v3(cfg) and cfg.norm_topk_prob:
        # transformers' DeepseekV2 never renormalises the top-k weights; refuse a silent mismatch.
        raise ValueError("model.norm_topk_prob=True with the softmax gate has no deepseek_v2 equivalent; "
                         "set it to False")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(model.state_dict(), cfg, mtp_shared_copies)
    hf = hf_config(cfg)
    hf["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return out


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def dequantize_fp8(tensors: dict[str, torch.Tensor],
                   block: tuple[int, int] = (128, 128)) -> dict[str, torch.Tensor]:
    """DeepSeek's FP8 layout -> fp32: each e4m3 `X.weight` [O, I] times its `X.weight_scale_inv`
    [ceil(O/bo), ceil(I/bi)] (one scale per block, "inv" because quantising divided by it)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            if name.removesuffix("_scale_inv") not in tensors:
                raise ValueError(f"{name}: a scale without its weight")
            continue
        scale = tensors.get(name + "_scale_inv")
        if scale is None:
            if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                raise ValueError(f"{name} is FP8 but has no {name}_scale_inv beside it")
            out[name] = t
            continue
        rows, cols = t.shape
        bo, bi = block
        if tuple(scale.shape) != (-(-rows // bo), -(-cols // bi)):
            raise ValueError(f"{name}_scale_inv has shape {tuple(scale.shape)}, expected one scale per "
                             f"{bo}x{bi} block of {tuple(t.shape)}")
        full = scale.float().repeat_interleave(bo, 0)[:rows].repeat_interleave(bi, 1)[:, :cols]
        out[name] = t.float() * full
    return out


def from_hf_state_dict(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensor dict -> duet state_dict (inverse of to_hf_state_dict)."""
    L = cfg.n_layers
    inv_top = {v: k for k, v in _TOP.items()}
    inv_block = {v: k for k, v in _BLOCK.items()}
    inv_mtp = {v: k for k, v in _MTP.items()}
    inv_exp = {v: k for k, v in _EXPERTS.items()}
    state: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name in inv_top:
            state[inv_top[name]] = t
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if not m:
            raise ValueError(f"unexpected tensor {name!r} in the Hugging Face checkpoint")
        i, rest = int(m[1]), m[2]
        if i >= L + cfg.mtp_depth:
            continue  # MTP layers the config does not ask for
        prefix = f"blocks.{i}." if i < L else f"mtp.{i - L}.block."
        if i >= L and rest in ("embed_tokens.weight", "shared_head.head.weight"):
            continue  # copies of the shared embedding / head
        if i >= L and rest in inv_mtp:
            state[f"mtp.{i - L}.{inv_mtp[rest]}"] = t
            continue
        em = re.fullmatch(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", rest)
        if em:
            experts.setdefault(f"{prefix}ffn.experts.{inv_exp[em[2]]}", {})[int(em[1])] = t
        elif rest == "mlp.experts.gate_up_proj":  # transformers-5 fused layout [E, 2I, D]
            w1, w3 = t.chunk(2, dim=1)
            experts.setdefault(f"{prefix}ffn.experts.w1", {}).update(enumerate(w1))
            experts.setdefault(f"{prefix}ffn.experts.w3", {}).update(enumerate(w3))
        elif rest == "mlp.experts.down_proj":
            experts.setdefault(f"{prefix}ffn.experts.w2", {}).update(enumerate(t))
        elif rest in inv_block:
            state[prefix + inv_block[rest]] = t
        else:
            raise ValueError(f"unexpected tensor {name!r} in the Hugging Face checkpoint")
    for name, parts in experts.items():
        if sorted(parts) != list(range(cfg.n_routed_experts)):
            raise ValueError(f"{name}: found experts {sorted(parts)[:4]}..., expected {cfg.n_routed_experts}")
        state[name] = torch.stack([parts[j] for j in range(cfg.n_routed_experts)])
    return state


def import_hf(path) -> tuple[Transformer, ModelConfig]:
    """Load a DeepSeek-V2/V3 Hugging Face folder into a duet Transformer (fp32 parameters)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json")
    hf = json.loads(cfg_file.read_text())
    cfg = config_from_hf(hf)
    tensors = _read_tensors(path)
    if any(k.endswith("_scale_inv") for k in tensors):
        block = (hf.get("quantization_config") or {}).get("weight_block_size") or (128, 128)
        tensors = dequantize_fp8(tensors, tuple(block))
    # Folders re-saved by transformers keep num_nextn_predict_layers but drop the MTP layers:
    # import the depth that is actually there.
    present = 0
    while present < cfg.mtp_depth and any(k.startswith(f"model.layers.{cfg.n_layers + present}.")
                                          for k in tensors):
        present += 1
    if present < cfg.mtp_depth:
        cfg = dataclasses.replace(cfg, mtp_depth=present)
    state = from_hf_state_dict(tensors, cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    expected = model.state_dict()
    for moe in model.moe_layers():
        moe.router.expert_load.zero_()  # transient state, not in the checkpoint
    # V2 checkpoints have no expert bias: start it at zero.
    for name in expected:
        if name.endswith("router.expert_bias") and name not in state:
            state[name] = torch.zeros_like(expected[name])
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensors, e.g. {missing[0]!r}")
    model.load_state_dict(state, strict=True)
    return model, cfg


# ---------------------------------------------------------------------------- CLI


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def resolve_checkpoint(path: Path) -> Path:
    """A duet DCP checkpoint folder as given, or a run folder's newest checkpoint."""
    from framework import checkpoint

    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    latest = checkpoint.latest_checkpoint(path)
    if latest is None:
        raise ValueError(f"{path} is neither a duet checkpoint folder nor a run folder with checkpoints")
    return latest


def checkpoint_tokenizer(path: Path):
    """The tokenizer of a duet checkpoint (framework.data's Tokenizer), or None when it has none:
    tokenizer.json in the folder (duet-hf import), the byte tokenizer when the run used it, else
    the run's trained BPE (<run_dir>/data/tokenizer.json beside checkpoints/)."""
    from framework import checkpoint
    from framework.data import BPETokenizer, ByteTokenizer

    path = resolve_checkpoint(path)
    data = (checkpoint.read_meta(path)["config"].get("data") or {})
    candidates = [path / "tokenizer.json"]
    if data.get("tokenizer") == "byte":
        return ByteTokenizer()
    candidates.append(path.parent.parent / "data" / "tokenizer.json")
    for file in candidates:
        if file.is_file():
            from tokenizers import Tokenizer as HFTokenizer

            return BPETokenizer(HFTokenizer.from_file(str(file)))
    return None


def write_tokenizer(tokenizer, out_dir: Path, chat_template: str | None = None) -> bool:
    """tokenizer.json + tokenizer_config.json (AutoTokenizer-readable) for a BPE tokenizer;
    False (nothing written) for tokenizers that have no tokenizer.json form."""
    inner = getattr(tokenizer, "_tok", None)
    if inner is None:
        return False
    inner.save(str(Path(out_dir) / "tokenizer.json"))
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": None}
    if chat_template:
        conf["chat_template"] = chat_template
    (Path(out_dir) / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in conf.items()
                                                                    if v is not None}, indent=2) + "\n")
    return True


def load_duet_checkpoint(path: Path) -> tuple[Transformer, ModelConfig]:
    """A duet DCP checkpoint folder, or a run folder (its newest checkpoint), of any layout,
    into one process's full model (fp32, CPU)."""
    from framework import checkpoint

    path = resolve_checkpoint(path)
    cfg = ModelConfig(**checkpoint.read_meta(path)["config"]["model"])
    with torch.device("meta"):  # shapes only: every weight comes from the checkpoint
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    for moe in model.moe_layers():
        moe.router.expert_load.zero_()  # not saved (transient counts), so set it here
    checkpoint.load_model(path, model, alone=True)  # one process's read, also inside a process group
    return model, cfg


_load_duet_checkpoint = load_duet_checkpoint  # the name earlier callers use


def _copy_tokenizer(hf_dir: Path, out: Path) -> list[str]:
    import shutil

    copied = []
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, out / name)
            copied.append(name)
    return copied


def _write_duet_checkpoint(model: Transformer, cfg: ModelConfig, out: Path) -> None:
    from omegaconf import OmegaConf

    from framework import checkpoint

    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save_weights(out, model, {"model": dataclasses.asdict(cfg)})
    (out / "model.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="duet-hf", description="Convert between duet and Hugging Face DeepSeek checkpoints.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="duet checkpoint (or run folder) -> Hugging Face folder")
    ex.add_argument("checkpoint", type=Path, help="a checkpoints/step_* folder, or a run folder")
    ex.add_argument("out_dir", type=Path)
    ex.add_argument("--no-mtp-copies", action="store_true", help="do not repeat embed/head in MTP layers")
    im = sub.add_parser("import", help="Hugging Face folder -> duet weights-only checkpoint folder")
    im.add_argument("hf_dir", type=Path)
    im.add_argument("checkpoint", type=Path, help="folder to create; train from it with "
                    "checkpoint.load_from=FOLDER and its model.yaml as the model preset")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "export":
            model, cfg = load_duet_checkpoint(args.checkpoint)
            export_hf(model, cfg, args.out_dir, mtp_shared_copies=not args.no_mtp_copies)
            src = resolve_checkpoint(args.checkpoint)
            # An imported checkpoint keeps the original files (chat template included); a run's
            # trained BPE is written out.
            copied = _copy_tokenizer(src, args.out_dir)
            if not copied and not write_tokenizer(checkpoint_tokenizer(src), args.out_dir):
                print("duet-hf export: note: the run has no tokenizer.json form (byte or id tokens); "
                      "none written", file=sys.stderr)
            print(f"wrote {args.out_dir}")
        else:
            model, cfg = import_hf(args.hf_dir)
            _write_duet_checkpoint(model, cfg, args.checkpoint)
            _copy_tokenizer(args.hf_dir, args.checkpoint)
            print(f"wrote {args.checkpoint}; to train from it, copy {args.checkpoint / 'model.yaml'} "
                  "to configs/model/ and run duet-train model=<that name> "
                  f"checkpoint.load_from={args.checkpoint}")
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        print(f"duet-hf {args.cmd}: error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
