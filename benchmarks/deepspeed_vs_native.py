"""Step time of engine=deepspeed (ZeRO 1, 2, 3) against the native engine, same layout, same run.

    python -m benchmarks.deepspeed_vs_native [--dp 2] [--ep 1] [--steps 20] [--rounds 2] [overrides ...]

One spawn of dp gloo ranks builds every engine in turn on the tiny preset (byte tokenizer, fp32)
and times train_step after a warm-up; rounds alternate the engines so a slow phase of the machine
hits all of them. The figure is the median step time per engine and its ratio to the native one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

WARMUP = 3
ENGINES = ("native", "zero1", "zero2", "zero3")


def _argv(engine: str, root: str, corpus: str, dp: int, ep: int, steps: int,
          overrides: list[str]) -> list[str]:
    base = [f"data.source={corpus}", f"run_dir={root}/{engine}", "data.tokenizer=byte",
            "model.vocab_size=256", "data.seq_len=64", f"data.batch_size={8 * dp}", "precision=fp32",
            f"steps={steps}", f"parallel.dp={dp}", f"parallel.ep={ep}", "checkpoint.interval=0",
            "eval_interval=0", "logging.progress_bar=false", "logging.wandb_mode=disabled",
            "logging.sample_tokens=0", *overrides]
    return base if engine == "native" else [*base, "engine=deepspeed", f"engine.zero_stage={engine[-1]}"]


def worker(rank: int, world: int, root: str, corpus: str, ep: int, steps: int, rounds: int,
           overrides: list[str]) -> dict[str, list[float]]:
    from framework.trainer import build_trainer
    from launch.run import compose

    total = steps * rounds + WARMUP
    trainers = {e: build_trainer(compose(_argv(e, root, corpus, world, ep, total, overrides)))
                for e in ENGINES}
    times: dict[str, list[float]] = {e: [] for e in ENGINES}
    for r in range(rounds):
        for e, trainer in trainers.items():
            for i in range(steps + (WARMUP if r == 0 else 0)):
                inputs, targets = trainer.data.train.next()
                start = time.perf_counter()
                trainer.train_step(inputs, targets)
                if r or i >= WARMUP:
                    times[e].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict[str, float]:
    from launch.ranks import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="duet-train overrides, e.g. data.seq_len=128")
    args = parser.parse_args(argv)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        sources = sorted(stdlib.glob("[a-f]*.py"))[:40]
        corpus.write_text("".join(p.read_text(errors="ignore") for p in sources))
        per_rank = run_ranks(worker, args.dp, tmp, str(corpus), args.ep, args.steps, args.rounds,
                             args.overrides, timeout_s=1800)
    # A step ends with collectives, so every rank's time is about the same; take rank 0's.
    median = {e: statistics.median(per_rank[0][e]) for e in ENGINES}
    print(f"tiny preset, fp32, dp={args.dp}, ep={args.ep}, 8 sequences of 64 tokens per rank, "
          f"median of {args.steps * args.rounds} steps per engine")
    print(f"{'engine':>10}{'ms/step':>10}{'vs native':>11}")
    for e in ENGINES:
        print(f"{e:>10}{1000 * median[e]:>10.1f}{median[e] / median['native']:>10.2f}x")
    return {e: median[e] / median["native"] for e in ENGINES}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
