"""Training throughput: tokens/s and MFU of a preset, beside the device's own matmul peak.

    python -m benchmarks.throughput [--model small] [--precision bf16 fp8] [--steps 20]
                                    [--warmup 3] [--seq-len N] [--batch-size N] [--quick]

Builds duet's Trainer (one process, no parallelism) and times `train_step` alone: forward,
backward, gradient clipping, AdamW and the expert-bias update, after warm-up steps that absorb
autotuning and allocator growth. Data loading is excluded (it overlaps training in practice).

Figures per precision, all from this run:
- tokens/s and ms/step (median over the timed steps);
- achieved model TFLOPS = tokens/s x training FLOPs per token (framework.metrics'
  train_flops_per_token: 6 per matmul weight a token multiplies, embedding gather excluded, MTP
  included, plus the causal attention core -- the count the trainer and duet-plan use);
- that figure over a square matmul's measured throughput on the same device in the same run
  (bf16 8192^3 on a GPU, fp32 2048^3 on CPU), the attainable ceiling for this host;
- MFU against the datasheet dense BF16 peak where the GPU is known (H800/H100/H200: 989
  TFLOPS), duet's one convention, FP8 runs included (framework.metrics.mfu).

Defaults: on CUDA the small preset (~0.5B parameters, 100M activated) at 8 x 2048 tokens per
step, bf16 and fp8; on CPU the tiny preset at the data config's 16 x 128 in fp32 and, where the
CPU has a bf16 unit (AMX or AVX512-BF16), bf16, since the small preset takes over a minute per
step on two cores. Speed is never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from benchmarks.timing import bench_ms
from framework.metrics import gpu_peak_tflops, mfu, train_flops_per_token


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_tflops(device: str, reps: int = 10, dtype: torch.dtype | None = None) -> tuple[str, float]:
    """Measured dense matmul throughput: the ceiling a training step could reach on this host
    (default: bf16 8192^3 on a GPU, fp32 2048^3 on CPU; `dtype` picks the precision)."""
    n = 8192 if device == "cuda" else 2048
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    return f"{name} {n}^3", 2 * n**3 / bench_ms(lambda: a @ b, reps) / 1e9


def measure(model: str, precision: str, steps: int, warmup: int, overrides: list[str]) -> dict:
    """Median step time of `steps` train_steps of a fresh Trainer, after `warmup` steps."""
    from framework.trainer import Trainer
    from launch.run import compose

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose([f"run_dir={run_dir}", f"model={model}", f"precision={precision}",
                       f"steps={steps + warmup}", "checkpoint.interval=0", "eval_interval=0",
                       "logging.progress_bar=false", "logging.wandb_mode=disabled", *overrides])
        trainer = Trainer(cfg)
        times = []
        for i in range(warmup + steps):
            inputs, targets = trainer.data.train.next()
            _sync()
            t0 = time.perf_counter()
            trainer.train_step(inputs, targets)
            _sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            print(f"  {precision} step {i + 1}/{warmup + steps}: {1000 * (time.perf_counter() - t0):.1f} ms"
                  f"{' (warm-up)' if i < warmup else ''}", flush=True)
        step_s = statistics.median(times)
        return {"model": model, "precision": precision, "compute": trainer.compute,
                "tokens_per_step": trainer.tokens_per_step,
                "flops_per_token": train_flops_per_token(cfg.model, cfg.data.seq_len),
                "activated_params": trainer.counts["activated"], "step_ms": 1000 * step_s,
                "tokens_per_s": trainer.tokens_per_step / step_s}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--model", default="small" if cuda else "tiny")
    parser.add_argument("--precision", nargs="+", default=None,
                        help="default: bf16 fp8 on CUDA; fp32 (and bf16 with a CPU bf16 unit) on CPU")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=2048 if cuda else 0, help="0: the data config's")
    parser.add_argument("--batch-size", type=int, default=8 if cuda else 0, help="0: the data config's")
    parser.add_argument("--quick", action="store_true", help="tiny preset, 3 timed steps after 1 warm-up")
    args = parser.parse_args(argv)
    if args.precision is None:
        from framework.precision import cpu_has_fast_bf16

        args.precision = ["bf16", "fp8"] if cuda else ["fp32"] + ["bf16"] * cpu_has_fast_bf16()
    if args.quick:
        args.model, args.steps, args.warmup = "tiny", 3, 1
        args.precision = args.precision[:1]
    overrides = [f"data.seq_len={args.seq_len}"] * bool(args.seq_len)
    overrides += [f"data.batch_size={args.batch_size}"] * bool(args.batch_size)

    device = "cuda" if cuda else "cpu"
    where = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"Training throughput of the {args.model} preset on {where}; speed is never asserted.")
    ceiling_name, ceiling = matmul_tflops(device)
    # On CPU each run is held against a matmul of its own precision (fp8's companion is fp32 there).
    ceilings = {"fp32": ceiling, "fp8": ceiling}
    if not cuda and any(p in ("bf16", "auto") for p in args.precision):
        ceilings["bf16"] = matmul_tflops(device, dtype=torch.bfloat16)[1]
        print(f"measured matmul ceiling (bf16 2048^3): {ceilings['bf16']:.2f} TFLOPS")
    datasheet = gpu_peak_tflops("bf16")
    print(f"measured matmul ceiling ({ceiling_name}): {ceiling:.2f} TFLOPS; datasheet BF16 peak: "
          f"{f'{datasheet:g} TFLOPS' if datasheet else 'unknown (no MFU)'}")
    runs = []
    for precision in args.precision:
        r = measure(args.model, precision, args.steps, args.warmup, overrides)
        r["model_tflops"] = r["tokens_per_s"] * r["flops_per_token"] / 1e12
        own = ceiling if cuda else ceilings.get(r["compute"], ceiling)
        r["of_matmul_ceiling"] = r["model_tflops"] / own
        r["mfu"] = mfu(r["tokens_per_s"], r["flops_per_token"], 1, datasheet)
        runs.append(r)
    print(f"\n{'precision':<10}{'tokens/step':>12}{'ms/step':>10}{'tokens/s':>12}{'model TFLOPS':>14}"
          f"{'of matmul':>11}{'MFU (bf16 peak)':>17}")
    for r in runs:
        mfu_text = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{r['precision']:<10}{r['tokens_per_step']:>12}{r['step_ms']:>10.1f}{r['tokens_per_s']:>12,.0f}"
              f"{r['model_tflops']:>14.3f}{100 * r['of_matmul_ceiling']:>10.1f}%{mfu_text:>17}")
    return {"device": where, "matmul_ceiling": ceiling_name, "matmul_tflops": ceiling,
            "datasheet_bf16_tflops": datasheet, "runs": runs}


if __name__ == "__main__":
    main()
