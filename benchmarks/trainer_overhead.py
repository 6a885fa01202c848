"""Tokens/s of duet's training step against a bare PyTorch loop, same model, same batches.

    python -m benchmarks.trainer_overhead [--steps 20] [--rounds 5] [overrides ...]

The bare loop is what a user would write by hand: forward + loss, backward, gradient
clipping, optimizer step (the same AdamW).
duet's step adds the LR schedule, gradient clipping, the non-finite-loss check, expert-load
statistics and the aux-loss-free bias update, and draws its batch from the data sampler.
Rounds alternate between the two so that machine noise hits both alike; the median round
of each is reported, and the ratio is the overhead (goal: <= 5%).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def time_rounds(fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="duet-train overrides, e.g. model=small")
    args = parser.parse_args(argv)

    from framework.precision import autocast
    from framework.trainer import Trainer
    from launch.run import compose

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose([f"run_dir={run_dir}", "logging.progress_bar=false", "logging.wandb_mode=disabled",
                       "checkpoint.interval=0", f"steps={10**9}", *args.overrides])
        trainer = Trainer(cfg)
        model, optimizer, device = trainer.model, trainer.optimizer, trainer.device
        batches = [tuple(t.to(device) for t in trainer.data.train.batch(i)) for i in range(args.steps)]

        def duet_round():
            for _ in range(args.steps):
                trainer.train_step(*trainer.data.train.next())

        def bare_round():
            for inputs, targets in batches:
                with autocast(device, trainer.compute):
                    loss, _ = model.loss(inputs, targets)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad()

        duet_round(), bare_round()  # warm-up: allocator, autograd graph caches
        duet_times, bare_times = [], []
        for _ in range(args.rounds):
            duet_times.append(time_rounds(duet_round, 1))
            bare_times.append(time_rounds(bare_round, 1))

    tokens = args.steps * cfg.data.batch_size * cfg.data.seq_len
    duet_tps, bare_tps = tokens / statistics.median(duet_times), tokens / statistics.median(bare_times)
    ratio = duet_tps / bare_tps
    print(f"model {cfg.model.name}, {trainer.compute}, {device}, threads {torch.get_num_threads()}, "
          f"{args.rounds} rounds x {args.steps} steps x {cfg.data.batch_size * cfg.data.seq_len} tokens")
    print(f"{'loop':<12}{'tokens/s':>12}")
    print(f"{'bare torch':<12}{bare_tps:>12,.0f}")
    print(f"{'duet':<12}{duet_tps:>12,.0f}")
    print(f"ratio duet/bare = {ratio:.3f}  (overhead {100 * (1 - ratio):.1f}%)")
    return {"duet_tokens_per_s": duet_tps, "bare_tokens_per_s": bare_tps, "ratio": ratio}


if __name__ == "__main__":
    main()
