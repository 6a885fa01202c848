"""duet-train with several ranks, end to end through the launcher (elastic agent, gloo):
data parallel equals one process, a killed rank restarts and resumes exactly, a checkpoint
reshards from dp=4 to dp=2, an interrupted save leaves the previous checkpoint usable, and
a simulated 8-rank layout runs on the CPU. Expert parallelism (ep = 2, 4) trains exactly like
one process, and its checkpoint resumes in one process."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.soak import duet_train, logged_losses
from framework import checkpoint
from framework.data import ByteTokenizer
from framework.hf import load_duet_checkpoint
from framework.trainer import Trainer
from launch.ranks import run_ranks
from launch.run import compose
from launch.spawn import failure_marker, first_failed_rank, read_failure_markers

STEPS = 20
# A small, fast run; constant lr after warm-up so runs of different lengths share a schedule.
COMMON = ["data.tokenizer=byte", "model.vocab_size=256", "data.seq_len=32", "data.batch_size=8",
          "eval_interval=0", "eval_batches=2", "logging.progress_bar=false", "logging.wandb_mode=disabled",
          "logging.sample_tokens=0", "logging.log_interval=1", "precision=fp32", "optim.schedule=constant",
          "optim.warmup_steps=2", "model.bias_update_rate=0.01"]


def args_for(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.source={corpus}", f"run_dir={run_dir}", *COMMON, *extra]


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory) -> Path:
    """The single-process run every layout must reproduce (its run folder)."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    Trainer(compose(args_for(corpus, run_dir, f"steps={STEPS}", "checkpoint.interval=0"))).run()
    return run_dir


@pytest.fixture(scope="module")
def reference(reference_run) -> dict[int, float]:
    """Per-step losses of the single-process run."""
    return logged_losses(reference_run)


def logged_loads(run_dir: Path) -> dict[int, list]:
    """step -> tokens routed to each expert of each MoE layer (logged every step here)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["expert_load"] for r in records if "loss" in r}


def routing_flip_step(got: Path, want: Path) -> int | None:
    """The first step at which the two runs routed differently, if they did, after checking that
    the difference is a near-tie flip: per layer at most one (token, expert) choice moved.
    Reduction order differs between layouts (about 1e-7 relative in the router's scores), so a
    token whose two best experts score within that margin may pick either; from that step on
    the runs legitimately separate. Anything larger than one flip is a real routing difference."""
    a, b = logged_loads(got), logged_loads(want)
    for step in sorted(b):
        if a[step] != b[step]:
            moved = [sum(abs(x - y) for x, y in zip(la, lb)) for la, lb in zip(a[step], b[step])]
            assert max(moved) <= 2, (step, moved)  # one token changing expert moves 2 counts
            return step
    return None


def assert_losses_match(got: dict[int, float], want: dict[int, float], steps, rel: float) -> None:
    for step in steps:
        assert abs(got[step] - want[step]) <= rel * abs(want[step]), (step, got[step], want[step])


@pytest.mark.parametrize("zero1", ["true", "false"])
def test_dp4_equals_single_process(corpus, reference, reference_run, tmp_path, zero1):
    run_dir = tmp_path / "run"
    proc = duet_train(*args_for(corpus, run_dir, f"steps={STEPS}", "parallel.dp=4", "launch.nproc=4",
                                f"parallel.zero1={zero1}", "checkpoint.interval=0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[rank0] duet: tiny model" in proc.stdout and "4 ranks (dp 4, ep 1)" in proc.stdout
    assert "[rank1]" not in proc.stdout  # other ranks write only to their log files
    flip = routing_flip_step(run_dir, reference_run)  # the steps before a near-tie flip must agree
    assert_losses_match(logged_losses(run_dir), reference, range(1, flip or STEPS + 1), 1e-5)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Per-collective counters from parallel/comm.py: gradients all-reduced every step.
    assert all(r["comm_all_reduce_mb"] > 0 and r["comm_time_share"] > 0 for r in records if "loss" in r)
    logs = list((run_dir / "logs").rglob("stdout.log"))
    assert len(logs) == 4 and all(p.stat().st_size > 0 for p in logs)


def test_killed_rank_restarts_and_resumes_exactly(corpus, reference, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    proc = duet_train(*args_for(corpus, run_dir, f"steps={STEPS}", "parallel.dp=2", "checkpoint.interval=4",
                                "launch.max_restarts=1"), env={"DUET_FAULT": "kill:step:6:1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / ".fault-step-6-1").exists(), "the fault must actually have fired"
    assert "resumed from" in proc.stdout and "step_00000004" in proc.stdout
    flip = routing_flip_step(run_dir, reference_run)
    assert_losses_match(logged_losses(run_dir), reference, range(5, flip or STEPS + 1), 1e-5)


def test_checkpoint_reshards_from_dp4_to_dp2(corpus, reference, tmp_path):
    run_dir = tmp_path / "run"
    first = duet_train(*args_for(corpus, run_dir, "steps=6", "parallel.dp=4", "checkpoint.interval=3",
                                 "checkpoint.async_save=true"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = duet_train(*args_for(corpus, run_dir, "steps=7", "parallel.dp=2"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    assert_losses_match(logged_losses(run_dir), reference, [7], 1e-6)


def test_save_killed_half_way_keeps_previous_checkpoint(corpus, reference, tmp_path):
    run_dir = tmp_path / "run"
    killed = duet_train(*args_for(corpus, run_dir, "steps=6", "checkpoint.interval=2"),
                        env={"DUET_FAULT": "kill:save:4"})
    assert killed.returncode != 0
    assert checkpoint.latest_checkpoint(run_dir).name == "step_00000002"
    assert (run_dir / "checkpoints" / ".tmp-step_00000004").is_dir()  # the torn write, ignored
    resumed = duet_train(*args_for(corpus, run_dir, "steps=6", "checkpoint.interval=2"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step_00000002" in resumed.stdout
    assert_losses_match(logged_losses(run_dir), reference, range(3, 7), 1e-6)


def test_torchrun_mode_joins_the_job_torchrun_started(corpus, reference, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "launch.run", "launch=torchrun",
           *args_for(corpus, run_dir, "steps=3", "parallel.dp=2", "checkpoint.interval=0")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_losses_match(logged_losses(run_dir), reference, range(1, 4), 1e-5)


def test_simulated_eight_ranks_run_to_completion(corpus, tmp_path):
    run_dir = tmp_path / "run"
    proc = duet_train(*args_for(corpus, run_dir, "steps=2", "launch=simulated", "parallel.dp=8",
                                "checkpoint.interval=0"), timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 ranks (dp 8, ep 1)" in proc.stdout
    assert checkpoint.latest_checkpoint(run_dir).name == "step_00000002"


def test_bad_run_folder_is_refused_before_spawning(corpus, tmp_path):
    run_dir = tmp_path / "run"
    bad = run_dir / "checkpoints" / "step_00000001"
    bad.mkdir(parents=True)
    (bad / "meta.json").write_text("{not json")
    proc = duet_train(*args_for(corpus, run_dir, "steps=2", "parallel.dp=2"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "unreadable checkpoint metadata" in proc.stderr and not (run_dir / "logs").exists()


def test_failing_rank_traceback_is_shown_once(corpus, tmp_path):
    run_dir = tmp_path / "run"
    proc = duet_train(*args_for(corpus, run_dir, "steps=2", "parallel.dp=2"),
                      env={"DUET_FAULT": "raise:step:1:1"})
    assert proc.returncode == 1
    assert proc.stderr.count("Traceback") == 1 and "injected fault" in proc.stderr
    assert "duet-train: rank 1 failed" in proc.stderr


def test_first_failed_rank_goes_by_the_failure_markers_not_the_rank_order(tmp_path):
    # rank 1 raised, and rank 0 failed on the broken connection 30 ms later, in the same second
    # of torch's error files (whose tie torch gives to rank 0, the fallback here)
    for rank, when in ((1, 1000.25), (0, 1000.28)):
        failure_marker(tmp_path, rank).write_text(json.dumps({"time": when, "error": f"E{rank}"}))
    failure_marker(tmp_path, 3).write_text("{cut short")  # a rank killed mid-write
    markers = read_failure_markers(tmp_path, 4)
    assert sorted(markers) == [0, 1] and markers[1]["error"] == "E1"
    assert first_failed_rank({0: 1, 1: 1}, 0, markers) == 1
    assert first_failed_rank({0: 1}, 0, markers) == 1  # rank 1 still exiting at the agent's poll
    assert first_failed_rank({0: 1, 1: 1, 2: -9}, 0, markers) == 2  # SIGKILLed: left no marker
    assert first_failed_rank({0: 1, 1: 1, 2: -15}, 0, markers) == 1  # the launcher's SIGTERM
    assert first_failed_rank({0: 1, 2: 3}, 0, markers) == 2  # the hang watchdog's exit, no marker
    assert first_failed_rank({0: 1, 2: 3, 3: -11}, 0, markers) == 3  # a crash before an exit
    assert first_failed_rank({4: 1, 5: 1}, 5, {}) == 5  # no markers: torch's pick


def ep_train_worker(rank: int, world: int, argv: list[str]) -> dict:
    trainer = Trainer(compose(argv))
    result = trainer.run()
    losses = result.losses
    moes = trainer.model.moe_layers()  # this rank's (its pipeline stages' under pp)
    return {"losses": losses, "sample": result.sample, "biases": [m.router.expert_bias.clone() for m in moes],
            "expert_rows": moes[0].experts.w1.shape[0] if moes else 0}


@pytest.mark.parametrize("ep", [2, 4])
def test_expert_parallel_training_equals_single_process(corpus, reference, reference_run, tmp_path, ep):
    run_dir = tmp_path / "run"
    argv = args_for(corpus, run_dir, f"steps={STEPS}", f"parallel.dp={ep}", f"parallel.ep={ep}",
                    "checkpoint.interval=10", "checkpoint.keep_last=2")
    per_rank = run_ranks(ep_train_worker, ep, argv, timeout_s=400)
    assert [r["expert_rows"] for r in per_rank] == [8 // ep] * ep  # experts really sharded
    flip = routing_flip_step(run_dir, reference_run)  # the steps before a near-tie flip must agree
    for r in per_rank:
        assert_losses_match(dict(enumerate(r["losses"], start=1)), reference, range(1, flip or STEPS + 1),
                            1e-5)
        assert all(torch.equal(a, b) for a, b in zip(r["biases"], per_rank[0]["biases"], strict=True))
    assert any(b.abs().sum() > 0 for b in per_rank[0]["biases"])  # the bias update really ran
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    tokens_k = 8 * 32 * 2  # global batch tokens x top-2: every routed pair counted once
    for r in steps:
        assert sum(r["expert_load"][0]) == tokens_k and len(r["expert_load"][0]) == 8
        assert 1.0 <= max(r["expert_imbalance_per_layer"])
        assert 0 < r["ep_rows_per_pair"] <= 1 and r["ep_bytes_per_token"] > 0
        assert r["ep_dispatch_wait_ms"] >= 0 and r["comm_all_to_all_mb"] > 0
    if ep == 2:  # the checkpoint holds global expert ids: resume it in one process
        shutil.rmtree(run_dir / "checkpoints" / "step_00000020")
        resumed = Trainer(compose(args_for(corpus, run_dir, f"steps={STEPS}"))).run()
        assert resumed.start_step == 10
        # The resumed steps' loads replace the sharded run's in metrics.jsonl; its state differs from
        # the reference's by reduction order, so it may meet a near-tie flip of its own.
        flip = routing_flip_step(run_dir, reference_run)
        assert_losses_match(dict(enumerate(resumed.losses, start=11)), reference,
                            range(11, flip or STEPS + 1), 1e-5)


@pytest.mark.parametrize("layout", [
    ("parallel.pp=2", "parallel.dp=1", "parallel.schedule=1f1b", "parallel.micro_batches=4"),
    ("parallel.pp=2", "parallel.dp=2", "parallel.ep=2", "parallel.schedule=dualpipe",
     "parallel.micro_batches=4"),
], ids=["pp2_1f1b", "pp2_dp2_ep2_dualpipe"])
def test_pipeline_training_equals_single_process(corpus, reference, tmp_path, layout):
    steps = 10
    run_dir = tmp_path / "run"
    argv = args_for(corpus, run_dir, f"steps={steps}", *layout, "checkpoint.interval=5",
                    "logging.timeline_step=3")
    argv = [a for a in argv if a != "logging.sample_tokens=0"] + ["logging.sample_tokens=6"]
    world = 2 * (2 if "parallel.dp=2" in layout else 1)
    per_rank = run_ranks(ep_train_worker, world, argv, timeout_s=400)
    for r in per_rank:
        assert_losses_match(dict(enumerate(r["losses"], start=1)), reference, range(1, steps + 1), 1e-5)
    # the end-of-run sample (rank 0, from the final checkpoint read whole): greedy by full forwards
    model, _ = load_duet_checkpoint(run_dir / "checkpoints" / "step_00000010")
    ids = ByteTokenizer().encode("def ")
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert per_rank[0]["sample"] == ByteTokenizer().decode(ids)
    assert all(r["sample"] == "" for r in per_rank[1:])
    # step 3's timeline: every pipeline rank's forwards and backwards of all 4 micro-batches
    assert (run_dir / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = json.loads((run_dir / "timeline.trace.json").read_text())["traceEvents"]
    for rank in (0, 1):
        names = [e["name"] for e in events if e.get("ph") == "X" and e["tid"] == rank]
        assert sum(n.startswith("F") for n in names) == 4 and sum(n.startswith("B") for n in names) == 4
    # the pipeline checkpoint (each rank saved its stages) resumes in one process
    shutil.rmtree(run_dir / "checkpoints" / "step_00000010")
    resumed = Trainer(compose(args_for(corpus, run_dir, f"steps={steps}"))).run()
    assert resumed.start_step == 5
    assert_losses_match(dict(enumerate(resumed.losses, start=6)), reference, range(6, steps + 1), 1e-5)
