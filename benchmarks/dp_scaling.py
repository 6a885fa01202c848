"""Data-parallel scaling on this host: tokens/s at dp=1 vs dp=N for the same per-rank batch.

    python -m benchmarks.dp_scaling [--dp 2] [--steps 30] [--per-rank-batch 8] [overrides ...]

Each layout trains the tiny preset through `duet-train` itself (dp>1 spawns gloo workers
through the elastic agent). Throughput is the median of the per-step tokens/s that the run
logged after a warm-up; the collective share is the time parallel/comm.py counted from
issue to wait() over wall time (overlapped all-reduces count in full, so this is traffic in
flight, not necessarily exposed). On a 2-core machine dp=2 can at best match the cores:
expect a ratio near or below 1 per core added.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WARMUP = 5


def run_layout(dp: int, steps: int, per_rank_batch: int, overrides: list[str],
               root: Path) -> dict[str, float]:
    run_dir = root / f"dp{dp}"
    cmd = [sys.executable, "-m", "launch.run", f"parallel.dp={dp}", f"data.batch_size={per_rank_batch * dp}",
           f"steps={steps}", f"run_dir={run_dir}", "eval_interval=0", "eval_batches=1",
           "checkpoint.interval=0", "logging.log_interval=1", "logging.progress_bar=false",
           "logging.wandb_mode=disabled", "logging.sample_tokens=0", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"dp={dp} failed:\n{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in records if "tokens_per_s" in r and r["step"] > WARMUP]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps_),
            "comm_share": statistics.median(r.get("comm_time_share", 0.0) for r in steps_)}


def main(argv: list[str] | None = None) -> dict[int, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--per-rank-batch", type=int, default=8)
    parser.add_argument("overrides", nargs="*", help="duet-train overrides, e.g. data.seq_len=64")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = {dp: run_layout(dp, args.steps, args.per_rank_batch, args.overrides, Path(tmp))
                   for dp in (1, args.dp)}
    base = results[1]["tokens_per_s"]
    print(f"tiny preset, {args.per_rank_batch} sequences per rank, "
          f"median of steps {WARMUP + 1}..{args.steps}")
    print(f"{'dp':>4}{'tokens/s':>12}{'vs dp=1':>10}{'collectives':>14}")
    for dp, r in results.items():
        print(f"{dp:>4}{r['tokens_per_s']:>12,.0f}{r['tokens_per_s'] / base:>10.2f}x"
              f"{100 * r['comm_share']:>13.1f}%")
    return results


if __name__ == "__main__":
    main()
