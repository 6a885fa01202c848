"""The launcher's side of a run: layouts are checked before anything starts, --dry-run
describes a 2048-rank layout on one CPU, and the Slurm script is what torchrun needs."""

import time

import pytest

from launch.run import compose, main

V3_LAYOUT = ["model=deepseek_v3", "parallel=deepseek_v3", "data.batch_size=15360", "data.seq_len=4096"]


@pytest.mark.parametrize("overrides, named", [
    (["parallel.dp=3", "parallel.ep=2", "data.batch_size=12"], "parallel.ep=2: must divide parallel.dp=3"),
    (["parallel.dp=6", "parallel.ep=4", "data.batch_size=12"], "parallel.ep=4: must divide parallel.dp=6"),
    (["parallel.dp=6", "parallel.ep=6", "data.batch_size=12"], "model.n_routed_experts=8"),
    (["parallel.dp=3"], "data.batch_size=16: must be divisible by parallel.dp=3"),
    (["parallel.dp=2", "parallel.micro_batches=3"], "parallel.micro_batches=3"),
    (["parallel.pp=0"], "parallel.pp"),
    (["parallel.ep=0"], "parallel.ep"),
    (["parallel.pp=3", "parallel.schedule=dualpipe", "parallel.micro_batches=8"], "even pp"),
    (["parallel.pp=2", "parallel.schedule=dualpipe", "parallel.micro_batches=3",
      "data.batch_size=15"], "DualPipe needs an even count"),
    (["parallel.pp=2", "parallel.schedule=dualpipe", "parallel.micro_batches=2"], ">= 2 * pp = 4"),
    (["parallel.pp=2", "parallel.schedule=dualpipev", "parallel.micro_batches=2", "model.n_layers=4"],
     "DualPipeV needs >= 2 * pp = 4"),
    (["parallel.pp=4"], "pipeline stages need at least as many blocks"),
    (["parallel.pp=2", "parallel.schedule=dualpipev", "parallel.micro_batches=4"],
     "4 pipeline stages need"),
    (["parallel.schedule=zigzag"], "parallel.schedule='zigzag'"),
    (["parallel.dp=2", "launch.nproc=4"], "launch.nproc=4"),
    (["launch.mode=cluster"], "launch.mode='cluster'"),
    (["launch=slurm", "launch.nodes=2"], "launch.nodes * launch.gpus_per_node = 16"),
    (["launch.port=70000"], "launch.port=70000"),
    (["parallel.bucket_mb=0"], "parallel.bucket_mb"),
    (["launch=torchrun"], "RANK/WORLD_SIZE are not set"),
    (["parallel.dispatch_dtype=int4"], "parallel.dispatch_dtype='int4'"),
    (["parallel.max_nodes_per_token=-1"], "parallel.max_nodes_per_token=-1"),
    (["parallel.dp=4", "parallel.ep=4", "launch.gpus_per_node=3", "parallel.max_nodes_per_token=1"],
     "node-limited routing needs whole nodes"),
    (["parallel.dp=4", "parallel.ep=4", "launch.gpus_per_node=1", "parallel.max_nodes_per_token=1",
      "model.n_activated_experts=3"], "fewer than the 3 each token picks"),
    (["parallel.dp=8", "parallel.ep=8", "launch.gpus_per_node=1", "parallel.max_nodes_per_token=2"],
     "groups must nest in nodes"),
])
def test_invalid_layouts_exit_2_with_one_line_and_start_nothing(capsys, tmp_path, overrides, named):
    run_dir = tmp_path / "run"
    code = main([*overrides, f"run_dir={run_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and named in err[0], err
    assert not run_dir.exists(), "nothing may be written for a rejected layout"


def test_dry_run_of_v3_on_2048_ranks_is_fast_and_per_rank(capsys):
    start = time.perf_counter()
    code = main(["--dry-run", *V3_LAYOUT])
    out = capsys.readouterr().out
    elapsed = time.perf_counter() - start
    assert code == 0 and elapsed < 60, elapsed
    assert "world 2048 = pp 16 x dp 128; ep 64" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:2].strip().isdigit()]
    rows = [r for r in rows if len(r) == 7]
    assert [int(r[0]) for r in rows] == list(range(16))
    # DualPipe: rank r holds stages r and 15 - r, so ranks r and 15 - r hold the same weights.
    assert rows[0][3:] == rows[15][3:] and rows[3][3:] == rows[12][3:]
    assert rows[0][1] == "0,15" and rows[7][1] == "7,8"
    # Every block is held by exactly two ranks (the mirror copies), experts split 64 ways.
    experts_per_rank = [int(r[4].replace(",", "")) for r in rows]
    cfg = compose(V3_LAYOUT)
    moe_layers = cfg.model.n_layers - cfg.model.n_dense_layers + cfg.model.mtp_depth
    expert_params = moe_layers * cfg.model.n_routed_experts * 3 * cfg.model.dim * cfg.model.moe_inter_dim
    assert sum(experts_per_rank) == 2 * expert_params // 64


def test_slurm_mode_writes_a_torchrun_sbatch_script(capsys, tmp_path):
    run_dir = tmp_path / "run"
    code = main(["launch=slurm", "launch.nodes=2", "launch.gpus_per_node=4", "parallel.dp=8",
                 "optim.lr=1e-3", f"run_dir={run_dir}"])
    out = capsys.readouterr().out
    script = (run_dir / "job.sbatch").read_text()
    assert code == 0 and "sbatch" in out
    assert "#SBATCH --nodes=2" in script and "--nproc-per-node 4" in script
    assert "--rdzv-backend c10d" in script and "launch=torchrun" in script
    assert "optim.lr=1e-3" in script and "parallel.dp=8" in script
    assert "launch.nodes" not in script.split("launch.run")[1]  # launch keys are the script's own
