"""Generation: duet's latent-cache decoding against transformers' `generate` on the same model.

    python -m benchmarks.generate [--batch 4] [--prompt-len 32] [--new 64] [--rounds 5]
                                  [--train-steps 200] [--threads 1] [--quick]

Figures, all from this run (DESIGN.md rule 8: measured, never asserted):
- decode tokens/s, greedy, same prompts: duet `framework.generate.generate` against
  transformers' `generate` (DynamicCache, sdpa) on the model `duet-hf export` wrote, each in fp32
  and in bf16 (model cast), in alternated rounds, on the same number of threads (--threads);
  best and median over the rounds, ratio duet / transformers in the dtype where transformers'
  median is fastest (named in the output), the other dtype's ratio beside it. fp32 tokens are
  checked equal; in bf16 the share of agreeing tokens is reported (the two round differently).
- cache bytes per token per layer: duet's latent cache as allocated against the keys and values
  transformers' cache holds after its generate, and the same two figures for the DeepSeek-V3
  shapes on paper (576 against 40,960 values).
- speculative decoding on a briefly trained model (the tiny preset, byte tokens of the standard
  library, model.loss with its MTP term): the MTP draft's acceptance rate and the tokens/s of
  speculative over plain decoding, greedy and at temperature 1.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import tempfile
import time

import torch

from framework.config import DataConfig, ModelConfig
from framework.generate import SamplingParams, generate
from framework.model import Transformer

# The tiny preset's shapes (configs/model/tiny.yaml), byte vocabulary for the trained model.
TINY = ModelConfig(vocab_size=2048, max_seq_len=256)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def vs_transformers(cfg: ModelConfig, batch: int, prompt_len: int, new: int, rounds: int) -> dict:
    """duet against transformers' generate, each in fp32 and bf16 (the whole model cast), in
    alternated rounds; the headline ratio is taken in the dtype where transformers is fastest
    (by median: like with like), the other dtype's ratio is reported beside it."""
    import transformers

    from framework.hf import export_hf

    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, cfg.vocab_size, (batch, prompt_len), generator=g)
    params = SamplingParams(max_new_tokens=new, temperature=0)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, cfg, tmp)
        load = transformers.AutoModelForCausalLM.from_pretrained
        hf = {d: load(tmp, dtype=dt).eval() for d, dt in DTYPES.items()}
    duet = {"fp32": model, "bf16": copy.deepcopy(model).to(torch.bfloat16)}
    mask = torch.ones_like(prompts)

    def run_hf(dtype: str):
        with torch.no_grad():
            return hf[dtype].generate(prompts, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                      do_sample=False, pad_token_id=0, eos_token_id=None,
                                      return_dict_in_generate=True)

    def run_duet(dtype: str):
        return generate(duet[dtype], prompts.tolist(), params)

    out = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new}
    for d in DTYPES:  # also the warm-up; fp32 must agree exactly, bf16 rounds differently
        same = run_hf(d).sequences[:, prompt_len:] == torch.stack(run_duet(d).tokens)
        out[f"tokens_equal_{d}"] = bool(same.all())
        out[f"tokens_agreeing_{d}"] = float(same.float().mean())
    times = {f"{who}_{d}": [] for d in DTYPES for who in ("duet", "transformers")}
    for _ in range(rounds):  # alternate the contenders
        for d in DTYPES:
            times[f"duet_{d}"].append(_timed(lambda d=d: run_duet(d)))
            times[f"transformers_{d}"].append(_timed(lambda d=d: run_hf(d)))
    tok = batch * new
    for name, ts in times.items():
        out[name] = {"tok_s_max": tok / min(ts), "tok_s_median": tok / statistics.median(ts)}
    for d in DTYPES:
        out[f"ratio_{d}"] = {k: out[f"duet_{d}"][f"tok_s_{k}"] / out[f"transformers_{d}"][f"tok_s_{k}"]
                             for k in ("max", "median")}
    # Transformers' fastest dtype by its median (a single best round is the noisier figure here).
    best = max(DTYPES, key=lambda d: out[f"transformers_{d}"]["tok_s_median"])
    out["dtype_compared"] = f"{best} (transformers' fastest by median)"
    out["duet_over_transformers_best"] = out[f"ratio_{best}"]["max"]
    out["duet_over_transformers_median"] = out[f"ratio_{best}"]["median"]
    out["cache_bytes_per_token_per_layer"] = cache_bytes(model, hf["fp32"], prompts, new)
    return out


def cache_bytes(model: Transformer, hf, prompts: torch.Tensor, new: int) -> dict:
    from framework.model.decode import Decoder

    B, T = prompts.shape
    dec = Decoder(model, B, T + new)
    with torch.no_grad():
        dec.step(prompts, torch.arange(T).expand(B, T))
        cache = hf(prompts, use_cache=True).past_key_values
    # transformers' cache: every tensor it holds, per token and layer.
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    hf_bytes = sum(t.numel() * t.element_size() for t in tensors) / (B * T * len(cache.layers))
    v3 = dict(C=512, R=64, H=128, N=128, V=128)
    return {"duet": dec.cache.bytes_per_token_per_layer(), "transformers": hf_bytes,
            "transformers_over_duet": hf_bytes / dec.cache.bytes_per_token_per_layer(),
            "deepseek_v3_values_duet": v3["C"] + v3["R"],
            "deepseek_v3_values_expanded": v3["H"] * (v3["N"] + v3["R"] + v3["V"]),
            "deepseek_v3_ratio": v3["H"] * (v3["N"] + v3["R"] + v3["V"]) / (v3["C"] + v3["R"])}


def train_tiny(steps: int, seq_len: int = 128, batch: int = 16) -> Transformer:
    from framework.data import read_corpus

    text = read_corpus(DataConfig(max_corpus_mb=1.0)).encode("utf-8")
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(TINY, vocab_size=256)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        lr = 3e-3 * min(1.0, (step + 1) / 20)
        for group in opt.param_groups:
            group["lr"] = lr
        start = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=g)
        x = torch.stack([data[s: s + seq_len + 1] for s in start.tolist()])
        loss, _ = model.loss(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.update_expert_bias(TINY.bias_update_rate)
    model.final_loss = float(loss.detach())
    return model.eval()


def speculative(model: Transformer, batch: int, new: int, rounds: int) -> dict:
    text = "import os\nimport sys\n\n\ndef main(argv):\n    "
    prompts = [list((text * (b + 1))[-48:].encode()) for b in range(batch)]
    out = {"final_train_loss": model.final_loss}
    for label, temp in (("greedy", 0.0), ("temperature_1", 1.0)):
        params = SamplingParams(max_new_tokens=new, temperature=temp, seed=1)
        times: dict[str, list[float]] = {"plain": [], "speculative": []}
        for _ in range(rounds):
            times["plain"].append(_timed(lambda p=params: generate(model, prompts, p)))
            t0 = time.perf_counter()
            g = generate(model, prompts, params, speculative=True)
            times["speculative"].append(time.perf_counter() - t0)
        n_tokens = sum(t.numel() for t in g.tokens)
        plain_t, spec_t = times["plain"], times["speculative"]
        out[label] = {"acceptance": g.accepted / max(1, g.drafted),
                      "tokens_per_main_forward": n_tokens / max(1, g.steps + 1) / batch,
                      "speedup_best": min(plain_t) / min(spec_t),
                      "speedup_median": statistics.median(plain_t) / statistics.median(spec_t)}
        if temp == 0:
            plain = generate(model, prompts, params)
            out[label]["tokens_equal_plain"] = all(torch.equal(a, b) for a, b in zip(plain.tokens, g.tokens))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads for every contender (default 1: at these sizes a second "
                         "thread only adds synchronisation, and spins badly on a shared machine)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error(f"--threads {args.threads}: must be >= 1")
    torch.set_num_threads(args.threads)
    if args.quick:
        args.new, args.rounds, args.train_steps = 16, 2, 20
    result = {"threads": torch.get_num_threads(),
              "vs_transformers": vs_transformers(TINY, args.batch, args.prompt_len, args.new, args.rounds)}
    result["speculative"] = speculative(train_tiny(args.train_steps), args.batch, args.new, args.rounds)
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(main(), indent=2))
