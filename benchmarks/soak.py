"""Soak: a multi-rank run killed again and again must end exactly like an uninterrupted one.

    python -m benchmarks.soak [--world 4] [--steps 200] [--interval 10] [--kills 5]
                              [--save-kills 10] [--seed 0] [overrides ...]

One `duet-train` run (elastic agent, gloo) gets DUET_FAULT with seeded faults: `--kills`
SIGKILLs of a random rank after a random step, and `--save-kills` SIGKILLs at seeded
positions inside checkpoint writes (a random save step, stage of the write and rank; see
framework/faults.py). `launch.max_restarts` covers them all, so after each kill the agent
restarts the group, which resumes from the newest complete checkpoint. A second run of the
same layout goes uninterrupted. The soak passes when:

- every step's logged loss equals the uninterrupted run's (fp32: exactly),
- the final weights are equal (torch.equal, every tensor),
- every resume used a complete checkpoint (none was reported damaged) and lost at most
  `--interval` steps,
- every planned fault fired.

Prints steps, kills, restarts, wall time and the equality verdict; `main()` returns them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SAVE_POINTS = ("save-begin", "save", "publish-meta", "publish-manifest", "publish-done")
RANK0_ONLY = ("publish-meta", "publish-manifest", "publish-done")
TINY = ["data.tokenizer=byte", "model.vocab_size=256", "data.seq_len=32", "data.batch_size=8",
        "eval_interval=0", "eval_batches=1", "logging.progress_bar=false", "logging.wandb_mode=disabled",
        "logging.sample_tokens=0", "logging.log_interval=1", "precision=fp32", "optim.schedule=constant",
        "optim.warmup_steps=2", "model.bias_update_rate=0.01", "model.n_layers=2", "model.dim=64",
        "data.max_corpus_mb=0.5"]


def plan_faults(seed: int, world: int, steps: int, interval: int, kills: int,
                save_kills: int) -> list[tuple[str, int, int]]:
    """Seeded (point, step, rank) triples: kills after distinct steps, then kills inside distinct
    checkpoint writes (never the final save, which has no later resume to check)."""
    rng = random.Random(seed)
    saves = list(range(interval, steps, interval))
    if save_kills > len(saves):
        raise SystemExit(f"--save-kills {save_kills}: only {len(saves)} checkpoint writes before the end")
    plain = [s for s in range(2, steps) if s % interval]  # not a save step: keeps the two kinds apart
    faults = [("step", s, rng.randrange(world)) for s in sorted(rng.sample(plain, kills))]
    for step in sorted(rng.sample(saves, save_kills)):
        point = rng.choice(SAVE_POINTS)
        faults.append((point, step, 0 if point in RANK0_ONLY else rng.randrange(world)))
    return sorted(faults, key=lambda f: f[1])  # the order they fire in


def duet_train(*args: str, env: dict | None = None,
               timeout: float | None = 300) -> subprocess.CompletedProcess:
    """`duet-train args...` in a subprocess (the tests use it too); timeout None waits forever."""
    return subprocess.run([sys.executable, "-m", "launch.run", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def logged_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; after a restart the later record of a step wins."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The newest checkpoint's weights, in a model built from the config saved with it."""
    from framework import checkpoint
    from framework.config import ModelConfig
    from framework.model import Transformer

    path = checkpoint.latest_checkpoint(run_dir)
    model = Transformer(ModelConfig(**checkpoint.read_meta(path)["config"]["model"]))
    checkpoint.load_model(path, model)
    return model.state_dict()


def resumes(run_dir: Path) -> list[int]:
    """The step each restarted attempt resumed at, in attempt order (from rank 0's logs); 0 for
    a restart that found no checkpoint yet (a kill inside the first save)."""
    found = []
    for log in sorted((run_dir / "logs").glob("*/attempt_*/0/stdout.log"),
                      key=lambda p: int(p.parent.parent.name.split("_")[1])):
        if log.parent.parent.name != "attempt_0":
            match = re.search(r"resumed from \S+ at step (\d+)", log.read_text())
            found.append(int(match.group(1)) if match else 0)
    return found


def soak(corpus: str, root: Path, world: int = 4, steps: int = 200, interval: int = 10, kills: int = 5,
         save_kills: int = 10, seed: int = 0, overrides: list[str] = ()) -> dict:
    faults = plan_faults(seed, world, steps, interval, kills, save_kills)
    common = [f"data.source={corpus}", *TINY, f"steps={steps}", f"parallel.dp={world}",
              f"checkpoint.interval={interval}", "checkpoint.keep_last=2", *overrides]
    spec = ",".join(f"kill:{point}:{step}:{rank}" for point, step, rank in faults)
    start = time.perf_counter()
    killed = duet_train(*common, f"run_dir={root / 'soak'}", f"launch.max_restarts={len(faults)}",
                        env={"DUET_FAULT": spec}, timeout=None)
    soak_s = time.perf_counter() - start
    if killed.returncode != 0:
        raise RuntimeError(f"the soak run failed:\n{killed.stderr[-3000:]}")
    start = time.perf_counter()
    straight = duet_train(*common, f"run_dir={root / 'straight'}", timeout=None)
    straight_s = time.perf_counter() - start
    if straight.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed:\n{straight.stderr[-3000:]}")

    got, want = logged_losses(root / "soak"), logged_losses(root / "straight")
    a, b = final_weights(root / "soak"), final_weights(root / "straight")
    fired = [f for f in faults if (root / "soak" / f".fault-{f[0]}-{f[1]}-{f[2]}").exists()]
    resumed_at = resumes(root / "soak")
    # Each kill is followed by one resume; a kill at step s may lose the steps since the checkpoint.
    lost = [step - at for (_, step, _), at in zip(faults, resumed_at, strict=False)]
    logs = "".join(p.read_text() for p in (root / "soak" / "logs").rglob("stdout.log"))
    return {
        "world": world, "steps": steps, "interval": interval, "faults": faults,
        "kills": len(fired), "restarts": len(resumed_at), "resumed_at": resumed_at,
        "max_steps_lost": max(lost, default=0),
        "losses_equal": sorted(got) == list(range(1, steps + 1)) and got == want,
        "weights_equal": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
        "damaged_reported": "is damaged" in logs,
        "soak_wall_s": soak_s, "uninterrupted_wall_s": straight_s,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--save-kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus", default="stdlib")
    args, overrides = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory(prefix="duet-soak-") as tmp:
        r = soak(args.corpus, Path(tmp), args.world, args.steps, args.interval, args.kills, args.save_kills,
                 args.seed, overrides)
    print(f"soak: {r['world']} ranks, {r['steps']} steps, checkpoint every {r['interval']}")
    print(f"faults planned {len(r['faults'])}: " + ", ".join(f"{p}@{s}/r{k}" for p, s, k in r["faults"]))
    print(f"kills fired {r['kills']}, restarts {r['restarts']} (resumed at {r['resumed_at']}), "
          f"at most {r['max_steps_lost']} steps lost per kill")
    print(f"wall time: soak {r['soak_wall_s']:.1f} s, uninterrupted {r['uninterrupted_wall_s']:.1f} s")
    print(f"equal to the uninterrupted run: losses {r['losses_equal']}, final weights {r['weights_equal']}; "
          f"damaged checkpoints reported: {r['damaged_reported']}")
    return r


if __name__ == "__main__":
    result = main()
    ok = result["losses_equal"] and result["weights_equal"] and result["kills"] == len(result["faults"])
    sys.exit(0 if ok else 1)
