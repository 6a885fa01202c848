"""duet against transformers' DeepseekV3ForCausalLM: a full training step on the same model.

    python -m benchmarks.peers [--shapes 1x2048 4x512] [--rounds 3] [--steps 2] [--threads N] [--quick]

The model is torchtitan's DeepSeek-V3 debug configuration (ANCHORS.md "Peers on this CPU"):
dim 256, 6 layers (layer 0 dense SwiGLU 1024), 16 heads, vocabulary 2048, MLA q_lora 0 /
kv_lora 512 / nope 128 / rope 64 / v 128, YaRN factor 40, 8 routed experts of width 256 (top-3)
and 2 shared, no MTP: 33,014,016 parameters on both sides. A step is forward, cross-entropy,
backward, gradient clipping at 1.0 and AdamW (duet: its own AdamW and the expert-bias update;
transformers: torch.optim.AdamW), on the same random batch.

Contenders: duet in its default precision (precision=auto: bf16 autocast on CPUs with AMX or
AVX512-BF16 and on GPUs, fp32 elsewhere) against transformers in each of {fp32, bf16 autocast}
x {sdpa, eager} attention; the ratio is duet over transformers' best. Rounds alternate the
contenders in one process so machine noise hits them alike; each round times `--steps` steps
(the first round after a warm-up step), and min and median over rounds are reported.

Where duet's time goes, each part against its own ceiling measured in the same run and the same
precision: the attention core (fwd + bwd of the padded-v SDPA, against a score-shaped batched
matmul), the routed experts (fwd + bwd of the grouped SwiGLU at the routed shapes, new random
per-expert counts each call as routing gives, against one
expert's GEMM shape as a plain matmul), and the rest of the step (its FLOPs over the remaining
time, against a 2048x256 @ 256x1024 matmul). FLOPs are framework.metrics.train_flops_per_token's.
Speed is never asserted (DESIGN.md rule 8).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.timing import bench_ms
from framework.config import ModelConfig, OptimConfig
from framework.metrics import attention_flops_per_token, train_flops_per_token

DEBUG = ModelConfig(
    name="titan_debug", vocab_size=2048, dim=256, n_layers=6, n_dense_layers=1, dense_inter_dim=1024,
    max_seq_len=2048, n_heads=16, q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, rope_factor=40.0, original_seq_len=4096, n_routed_experts=8,
    n_shared_experts=2, n_activated_experts=3, moe_inter_dim=256, n_expert_groups=1, n_limited_groups=1,
    score_func="softmax", route_scale=1.0, norm_topk_prob=False, mtp_depth=0)
PARAMS = 33_014_016  # torchtitan's count for this configuration (ANCHORS.md)


def malloc_in_use(maps: str = "/proc/self/maps") -> str:
    """The allocator this process runs on: an LD_PRELOADed tcmalloc, jemalloc or mimalloc, or glibc's.

    It moves the ratio a lot. glibc returns large freed blocks to the kernel and pays page faults to
    get them back; transformers' eager and math attention allocate the whole score matrix anew each
    layer, so its step spends far more time faulting than duet's (4 x 512 bf16 eager on this host:
    about 500,000 faults and 1 s of system time per step against 1,800 and 0.02 s under tcmalloc)."""
    try:
        with open(maps) as f:
            mapped = f.read()
    except OSError:
        return "unknown"
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if f"lib{name}" in mapped:
            return name
    return "glibc malloc"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def duet_contender(cfg: ModelConfig, device: torch.device, compute: str):
    """One training step of duet's model with duet's optimizer, in `compute`."""
    from framework.model import Transformer
    from framework.optim import build_optimizer, clip_grad_norm
    from framework.precision import autocast

    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    n = sum(p.numel() for p in model.parameters())
    opt = build_optimizer(model, OptimConfig(lr=1e-4))

    def step(x, y):
        with autocast(device, compute):
            loss, _ = model.loss(x, y)
        loss.backward()
        clip_grad_norm(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        model.update_expert_bias(cfg.bias_update_rate)
        return loss
    return step, n


def hf_config(cfg: ModelConfig):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.dense_inter_dim,
        moe_intermediate_size=cfg.moe_inter_dim, num_hidden_layers=cfg.n_layers,
        first_k_dense_replace=cfg.n_dense_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads, q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, n_routed_experts=cfg.n_routed_experts,
        n_shared_experts=cfg.n_shared_experts, num_experts_per_tok=cfg.n_activated_experts,
        n_group=1, topk_group=1, routed_scaling_factor=cfg.route_scale, norm_topk_prob=cfg.norm_topk_prob,
        max_position_embeddings=cfg.original_seq_len, rope_interleave=True, tie_word_embeddings=False,
        rope_scaling={"type": "yarn", "factor": cfg.rope_factor,
                      "original_max_position_embeddings": cfg.original_seq_len,
                      "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow,
                      "mscale": cfg.mscale, "mscale_all_dim": cfg.mscale_all_dim})


def hf_contender(cfg: ModelConfig, device: torch.device, bf16: bool, attn: str):
    """One training step of transformers' model (a hand-written loop, as its users write one)."""
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM._from_config(hf_config(cfg), attn_implementation=attn).to(device)
    model.train()
    n = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step(x, y):
        with _autocast(device, bf16):
            logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return loss
    return step, n


def _time_steps(step, batch, steps: int, warmup: bool) -> float:
    """Seconds per step: the mean over `steps`, after one warm-up step when `warmup`."""
    if warmup:
        step(*batch)
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(*batch)
    _sync()
    return (time.perf_counter() - t0) / steps


def _ceiling_tflops(shape_a, shape_b, dtype, device, batched: bool = False) -> float:
    a = torch.randn(*shape_a, device=device, dtype=dtype)
    b = torch.randn(*shape_b, device=device, dtype=dtype)
    flops = 2 * a.numel() * b.shape[-1]
    return flops / (bench_ms((lambda: torch.bmm(a, b)) if batched else (lambda: a @ b), 5) / 1e3) / 1e12


def breakdown(cfg: ModelConfig, device: torch.device, compute: str, B: int, T: int, step_s: float) -> dict:
    """duet's step split into attention core, routed experts and the rest, each with its
    achieved TFLOPS and the ceiling of a plain matmul of its shape (module docstring)."""
    from framework.model.attention import attention_core
    from framework.model.moe import ExpertRows, grouped_swiglu

    dtype = torch.bfloat16 if compute == "bf16" else torch.float32
    H, K, V = cfg.n_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    q, k = (torch.randn(B, H, T, K, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    v = torch.randn(B, H, T, V, device=device, dtype=dtype, requires_grad=True)

    def attn():
        attention_core(q, k, v, K ** -0.5).sum().backward()
    layers = cfg.n_layers + cfg.mtp_depth
    attn_s = layers * bench_ms(attn, 3) / 1e3

    E, D, inter, topk = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim, cfg.n_activated_experts
    M = B * T * topk
    x = torch.randn(M, D, device=device, dtype=dtype, requires_grad=True)
    ws = [torch.randn(*shape, device=device, requires_grad=True)
          for shape in ((E, inter, D), (E, inter, D), (E, D, inter))]
    gen = torch.Generator().manual_seed(0)

    def experts():
        # New per-expert row counts every call, as routing gives a training step (fixed counts
        # would hide per-shape costs such as oneDNN building a kernel for each new row count).
        counts = torch.multinomial(torch.ones(E), M, replacement=True, generator=gen).bincount(minlength=E)
        counts = counts.to(device)
        layout = ExpertRows(counts, M, counts.tolist(), exact=True)
        with _autocast(device, compute == "bf16"):
            grouped_swiglu(x, *ws, layout).float().sum().backward()
    moe_layers = cfg.n_layers - cfg.n_dense_layers + cfg.mtp_depth
    experts_s = moe_layers * bench_ms(experts, 3) / 1e3

    tokens = B * T
    total = train_flops_per_token(cfg, T) * tokens
    attn_flops = attention_flops_per_token(cfg, T) * tokens
    experts_flops = 6 * moe_layers * topk * 3 * D * inter * tokens
    rest_flops = total - attn_flops - experts_flops
    # Measured apart, the two parts can add up past a noisy step: then the rest gets no figure.
    rest_s = step_s - attn_s - experts_s
    ceilings = {"attention": _ceiling_tflops((B * H, T, K), (B * H, K, T), dtype, device, batched=True),
                "experts": _ceiling_tflops((M // E, D), (D, inter), dtype, device),
                "rest": _ceiling_tflops((2048, 256), (256, 1024), dtype, device)}
    parts = {"attention": (attn_s, attn_flops), "experts": (experts_s, experts_flops),
             "rest": (rest_s, rest_flops)}
    out = {}
    for name, (seconds, flops) in parts.items():
        achieved = flops / seconds / 1e12 if seconds > 0 else float("nan")
        out[name] = {"seconds": seconds, "share": seconds / step_s, "tflops": achieved,
                     "ceiling_tflops": ceilings[name], "of_ceiling": achieved / ceilings[name]}
    out["step"] = {"seconds": step_s, "tflops": total / step_s / 1e12,
                   "of_rest_ceiling": total / step_s / 1e12 / ceilings["rest"]}
    return out


def run_shape(B: int, T: int, rounds: int, steps: int, device: torch.device, compute: str,
              variants: list[tuple[str, bool]]) -> dict:
    cfg = dataclasses.replace(DEBUG, max_seq_len=max(DEBUG.max_seq_len, T))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=gen).to(device)
    batch = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    contenders = {f"duet {compute}": duet_contender(cfg, device, compute)}
    for attn, bf16 in variants:
        name = f"transformers {'bf16' if bf16 else 'fp32'} {attn}"
        contenders[name] = hf_contender(cfg, device, bf16, attn)
    params = {name: n for name, (_, n) in contenders.items()}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(rounds):
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for name in order:
            times[name].append(_time_steps(contenders[name][0], batch, steps, warmup=r == 0))
            rate = B * T / times[name][-1]
            print(f"  {B}x{T} round {r + 1}/{rounds} {name}: {rate:,.0f} tok/s", flush=True)
    result = {"shape": f"{B}x{T}", "params": params, "contenders": {}}
    for name, ts in times.items():
        result["contenders"][name] = {"tok_s_min": B * T / max(ts), "tok_s_best": B * T / min(ts),
                                      "tok_s_median": B * T / statistics.median(ts)}
    duet = result["contenders"][f"duet {compute}"]
    peers = {n: c for n, c in result["contenders"].items() if n.startswith("transformers")}
    best = max(peers, key=lambda n: peers[n]["tok_s_median"])
    result["best_peer"] = best
    result["ratio_median"] = duet["tok_s_median"] / peers[best]["tok_s_median"]
    result["ratio_min"] = duet["tok_s_min"] / peers[best]["tok_s_min"]
    del contenders
    result["breakdown"] = breakdown(cfg, device, compute, B, T, statistics.median(times[f"duet {compute}"]))
    return result


def main(argv: list[str] | None = None) -> dict:
    from framework.precision import resolve_compute

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["1x2048", "4x512"], help="rows x sequence")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per contender and round")
    parser.add_argument("--quick", action="store_true", help="1x256, one round, one step, sdpa only")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [(attn, bf16) for bf16 in (False, True) for attn in ("sdpa", "eager")]
    if args.quick:
        args.shapes, args.rounds, args.steps, variants = ["1x256"], 1, 1, [("sdpa", False), ("sdpa", True)]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compute = resolve_compute("auto", device)
    cpu = f"CPU ({torch.get_num_threads()} threads)"
    where = torch.cuda.get_device_name() if device.type == "cuda" else cpu
    malloc = malloc_in_use()
    print(f"duet ({compute}, its default) vs transformers DeepseekV3ForCausalLM on torchtitan's debug model, "
          f"{where}, {malloc}; speed is never asserted.")
    results = []
    for shape in args.shapes:
        B, T = (int(v) for v in shape.split("x"))
        results.append(run_shape(B, T, args.rounds, args.steps, device, compute, variants))
    for r in results:
        print(f"\n{r['shape']} (parameters: " + ", ".join(f"{n} {p:,}" for n, p in r["params"].items()) + ")")
        print(f"{'contender':<28}{'tok/s min':>12}{'tok/s median':>14}")
        for name, c in r["contenders"].items():
            print(f"{name:<28}{c['tok_s_min']:>12,.0f}{c['tok_s_median']:>14,.0f}")
        print(f"duet / best transformers ({r['best_peer']}): median {r['ratio_median']:.2f}x, "
              f"min {r['ratio_min']:.2f}x")
        print(f"{'duet part':<12}{'share':>8}{'TFLOPS':>9}{'ceiling':>9}{'of it':>8}")
        for name in ("attention", "experts", "rest"):
            p = r["breakdown"][name]
            print(f"{name:<12}{100 * p['share']:>7.0f}%{p['tflops']:>9.3f}{p['ceiling_tflops']:>9.3f}"
                  f"{100 * p['of_ceiling']:>7.0f}%")
        s = r["breakdown"]["step"]
        print(f"whole step: {s['tflops']:.3f} TFLOPS, {100 * s['of_rest_ceiling']:.0f}% of the "
              "2048x256 @ 256x1024 matmul")
    return {"device": where, "compute": compute, "malloc": malloc, "results": results}


if __name__ == "__main__":
    main()
