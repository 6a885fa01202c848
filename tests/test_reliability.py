"""Surviving faults: NaN/Inf steps are skipped on every rank exactly like a discarded batch, too
many in a row stop the run with one line, a stalled rank is reported by the hang watchdog,
and a run killed many times (after steps and inside checkpoint writes) ends exactly like an
uninterrupted one (benchmarks/soak.py at a test's size; the full soak is that script)."""

import json
import re
import time
from pathlib import Path

import pytest
import torch
from test_distributed_train import args_for, assert_losses_match

from benchmarks import soak
from benchmarks.soak import duet_train, logged_losses
from framework import checkpoint, integrity
from framework.trainer import Trainer
from launch.ranks import run_ranks
from launch.run import compose

STEPS, K = 6, 3  # the bad step


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """DESIGN.md rule 6: 1 - 2*sum(x*y)/sum(x*x+y*y) in float64 (0 when equal)."""
    x, y = a.double().flatten(), b.double().flatten()
    den = float((x * x + y * y).sum())
    return 0.0 if den == 0 else 1 - 2 * float((x * y).sum()) / den


def train_discarding_batch(run_dir: Path, argv: list[str], skip: int) -> Trainer:
    """The reference a skipped step must equal: batch `skip` is drawn and thrown away unseen,
    the step counter moves on, and nothing else happens (no NaN, no guard involved)."""
    trainer = Trainer(compose(argv))
    trainer.losses = {}
    while trainer.step < STEPS:
        inputs, targets = trainer.data.train.next()
        if trainer.step + 1 == skip:
            trainer.step += 1
            continue
        step = trainer.step + 1
        trainer.losses[step] = trainer.train_step(inputs, targets)["loss"]
    return trainer


@pytest.fixture(scope="module")
def discarded(corpus, tmp_path_factory) -> Trainer:
    run_dir = tmp_path_factory.mktemp("discarded") / "run"
    argv = args_for(corpus, run_dir, f"steps={STEPS}", "checkpoint.interval=0")
    return train_discarding_batch(run_dir, argv, K)


@pytest.mark.parametrize("fault", [f"nan:loss:{K}", f"inf:grad:{K}"])
def test_non_finite_step_k_equals_a_run_that_discarded_batch_k(corpus, discarded, tmp_path, monkeypatch,
                                                              fault):
    monkeypatch.setenv("DUET_FAULT", fault)
    run_dir = tmp_path / "run"
    trainer = Trainer(compose(args_for(corpus, run_dir, f"steps={STEPS}", "checkpoint.interval=0")))
    result = trainer.run()
    for (name, a), b in zip(trainer.model.state_dict().items(), discarded.model.state_dict().values()):
        assert torch.equal(a, b), name  # weights and expert biases
    for key, a in trainer.optimizer.state_dict().items():
        assert torch.equal(a, discarded.optimizer.state_dict()[key]), key  # moments and update count
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if "skipped" in r]
    assert [r["step"] for r in skipped] == [K]
    assert skipped[0]["skipped"] == ("loss+grad_norm" if "loss" in fault else "grad_norm")
    assert len(result.losses) == STEPS and all(v == v for i, v in enumerate(result.losses) if i != K - 1)


def skipping_worker(rank: int, world: int, argv: list[str]) -> dict:
    trainer = Trainer(compose(argv))
    result = trainer.run()
    return {"losses": result.losses, "state": trainer.model.state_dict()}


def test_inf_gradient_on_one_rank_skips_the_step_on_every_rank(corpus, discarded, tmp_path, monkeypatch):
    # Without ZeRO the gradient norm is computed locally; the injected inf lands after the
    # gradient all-reduce on rank 1 only, so only the reduced flag can tell rank 0.
    monkeypatch.setenv("DUET_FAULT", f"inf:grad:{K}:1")
    argv = args_for(corpus, tmp_path / "run", f"steps={STEPS}", "parallel.dp=2", "parallel.zero1=false",
                    "checkpoint.interval=0")
    ranks = run_ranks(skipping_worker, 2, argv, timeout_s=300)
    for name, a in ranks[0]["state"].items():
        assert torch.equal(a, ranks[1]["state"][name]), name  # both ranks skipped
        assert rel_diff(a, discarded.model.state_dict()[name]) < 1e-10, name
    assert ranks[0]["losses"] == ranks[1]["losses"]
    got = {step: loss for step, loss in logged_losses(tmp_path / "run").items() if step != K}
    assert got == {step: ranks[0]["losses"][step - 1] for step in got}
    assert_losses_match(got, discarded.losses, got, 1e-5)  # the layout equals one process


def test_too_many_non_finite_steps_stop_with_one_line_and_an_intact_checkpoint(corpus, tmp_path):
    run_dir = tmp_path / "run"
    proc = duet_train(*args_for(corpus, run_dir, "steps=8", "parallel.dp=2", "checkpoint.interval=2",
                                "optim.max_consecutive_skips=1"), env={"DUET_FAULT": "nan:loss:3-8:1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        "duet-train: error: non-finite loss and grad_norm at 2 steps in a row (steps 3-4, more than "
        "optim.max_consecutive_skips=1); stopped without saving, so the last checkpoint is intact: lower "
        "optim.lr or use precision=fp32, then resume"]
    latest = checkpoint.latest_checkpoint(run_dir)
    assert latest.name == "step_00000002" and integrity.verify(latest) is None
    assert "step 3: non-finite loss+grad_norm; optimizer step skipped on every rank (1 in a row)" \
        in proc.stdout


def test_stalled_rank_is_reported_with_rank_collective_and_step(corpus, tmp_path):
    run_dir = tmp_path / "run"
    start = time.monotonic()
    proc = duet_train(*args_for(corpus, run_dir, "steps=5", "parallel.dp=2", "checkpoint.interval=0",
                                "launch.collective_timeout_s=3"),
                      env={"DUET_FAULT": "stall:collective:3:1", "DUET_FAULT_STALL_S": "600"})
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert (run_dir / ".fault-collective-3-1").exists()
    report = re.search(r"duet: rank (\d) hung: (\w+) waited ([\d.]+) s at step 3 "
                       r"\(launch.collective_timeout_s=3\); a peer rank stalled or died", proc.stderr)
    assert report, proc.stderr[-3000:]
    rank, kind, waited = int(report.group(1)), report.group(2), float(report.group(3))
    assert rank in (0, 1) and kind in ("all_reduce", "reduce_scatter", "all_gather", "barrier", "broadcast")
    assert 3 <= waited < 4.5  # within one watchdog poll of the timeout (printed to 0.1 s)
    assert f"duet-train: rank {rank} failed (exit code 3)" in proc.stderr
    assert elapsed < 120  # not gloo's own timeout, and not the 600 s stall
    # (Which rank reports first is a race: the stalled rank's own watchdog fires too, unless the
    # launcher has already stopped it after its peer's report.)


def test_killed_after_steps_and_inside_ten_checkpoint_writes_ends_like_an_uninterrupted_run(corpus, tmp_path,
                                                                                            monkeypatch):
    """The soak at a test's size: 2 ranks, 22 steps, one kill after a step and ten kills at
    seeded stages of ten different checkpoint writes; 11 restarts, each from a complete
    checkpoint, and every loss and weight equal to the uninterrupted run. The launcher says
    which rank died, how, after which step and from which step the group restarts."""
    runs = []  # the soak's two duet-train processes (killed, uninterrupted), kept for their output

    def recorded(*args, **kwargs):
        runs.append(duet_train(*args, **kwargs))
        return runs[-1]

    monkeypatch.setattr(soak, "duet_train", recorded)
    r = soak.soak(str(corpus), tmp_path, world=2, steps=22, interval=2, kills=1, save_kills=10, seed=0)
    print(r)
    assert len(r["faults"]) == 11 and r["kills"] == 11 and r["restarts"] == 11
    assert {p for p, _, _ in r["faults"]} == {"step", *soak.SAVE_POINTS}  # every stage of a write
    assert r["losses_equal"] and r["weights_equal"]
    assert not r["damaged_reported"] and r["max_steps_lost"] <= 2
    lines = [line for line in runs[0].stderr.splitlines() if line.startswith("duet: rank")]
    said = [re.fullmatch(r"duet: rank (\d) exited \(SIGKILL\) (after|before finishing) step (\d+); "
                         r"restarting from step (\d+) \(restart (\d+) of 11\)", line) for line in lines]
    assert len(said) == 11 and all(said), lines
    assert [int(m.group(5)) for m in said] == list(range(1, 12))
    assert [int(m.group(1)) for m in said] == [rank for _, _, rank in r["faults"]]
    assert [int(m.group(4)) for m in said] == r["resumed_at"]  # rank 0's own "resumed from" lines
    for (point, step, _), m in zip(r["faults"], said):
        logged = int(m.group(3)) - (m.group(2) == "before finishing")  # the last step rank 0 logged
        # a save begins after rank 0 logged its step; a kill after step s may beat rank 0's record of s
        allowed = (step - 1, step) if point == "step" else (step,)
        assert logged in allowed, (point, step, m.group(0))
    assert runs[1].stderr.count("duet: rank") == 0  # the uninterrupted run restarts nothing
