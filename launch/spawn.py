"""Starting the workers of a run, for each `launch.mode`.

- local, one rank: train in this process (no process group, nothing to spawn).
- local / simulated, several ranks: torch's elastic agent (the machinery under torchrun)
  spawns the ranks on this host with a c10d rendezvous on loopback. `simulated` puts every
  rank on one device with gloo, so a cluster layout can be debugged on one GPU or the CPU.
- torchrun: this process already is one worker of a torchrun job (RANK/WORLD_SIZE are set).
- slurm: write an sbatch script that runs torchrun on every node, and say how to submit it.

Rank 0's stdout (the progress bar, the final report) reaches the console with a `[rank0]`
prefix; every rank's full stdout/stderr goes to `<run_dir>/logs/`. When a rank fails, the
launcher prints that rank's traceback once, then one line naming the rank and its log.
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
import sys
from dataclasses import asdict
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from framework.config import TrainConfig, world_size


def in_torchrun_worker() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def config_from_dict(values: dict) -> TrainConfig:
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), values))


@record  # writes the worker's traceback to an error file the agent reports
def worker_entry(values: dict) -> None:
    """What every spawned rank runs. Module-level so the spawn start method can pickle it."""
    from framework.trainer import train

    train(config_from_dict(values))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_local(cfg: TrainConfig) -> int:
    """Run `world_size(cfg)` ranks on this host through the elastic agent; exit status."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    world, port = world_size(cfg), cfg.launch.port or free_port()
    log_dir = Path(cfg.run_dir).expanduser() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    launch_cfg = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=world, run_id=f"duet-{port}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{port}", max_restarts=cfg.launch.max_restarts,
        start_method="spawn", monitor_interval=0.2,
        logs_specs=DefaultLogsSpecs(log_dir=str(log_dir), redirects=Std.ALL, tee={0: Std.OUT}),
        log_line_prefix_template="[rank${rank}] ",
    )
    os.environ["DUET_LAUNCH_MODE"] = cfg.launch.mode  # read by the workers to place themselves
    # CPU ranks share the cores: one intra-op pool per core, not one per rank per core.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    # The agent logs each failure with its traceback; we report the first failure once below.
    for name in ("torch.distributed.elastic", "torch.multiprocessing"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        elastic_launch(launch_cfg, worker_entry)(asdict(cfg))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        message = failure.message  # a dict from a @record-ed worker's error file, else a string
        reason = message.get("message", "") if isinstance(message, dict) else ""
        if reason.startswith("TrainingError: "):  # a stated reason (e.g. too many NaN steps): one line
            print(f"duet-train: error: {reason.removeprefix('TrainingError: ')}", file=sys.stderr)
            return 2
        if isinstance(message, dict):
            message = message.get("extraInfo", {}).get("py_callstack") or message.get("message", message)
        print(str(message).rstrip(), file=sys.stderr)
        print(f"duet-train: rank {rank} failed (exit code {failure.exitcode}); all logs in {log_dir}",
              file=sys.stderr)
        return 1
    return 0


def slurm_script(cfg: TrainConfig, overrides: list[str]) -> str:
    """An sbatch script: one srun task per node, each running torchrun over its GPUs."""
    launch, run_dir = cfg.launch, Path(cfg.run_dir).expanduser().resolve()
    passed = [o for o in overrides if not o.split("=")[0].lstrip("+").startswith("launch")]
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=duet-{cfg.model.name}",
        f"#SBATCH --nodes={launch.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={launch.gpus_per_node}",
        f"#SBATCH --time={launch.slurm_time}",
        f"#SBATCH --output={run_dir}/logs/slurm-%j.out",
    ]
    if launch.slurm_partition:
        lines.append(f"#SBATCH --partition={launch.slurm_partition}")
    lines += [
        "set -euo pipefail",
        "# The first node hosts the c10d rendezvous; torchrun on each node joins it.",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"srun torchrun --nnodes {launch.nodes} --nproc-per-node {launch.gpus_per_node} \\",
        '  --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$head_node:29500" \\',
        f"  --max-restarts {launch.max_restarts} \\",
        "  -m launch.run launch=torchrun " + " ".join(shlex.quote(o) for o in passed),
    ]
    return "\n".join(lines) + "\n"


def write_slurm_script(cfg: TrainConfig, overrides: list[str]) -> int:
    run_dir = Path(cfg.run_dir).expanduser()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    path = run_dir / "job.sbatch"
    path.write_text(slurm_script(cfg, overrides))
    print(f"wrote {path} ({cfg.launch.nodes} nodes x {cfg.launch.gpus_per_node} GPUs)")
    print(f"submit it from this checkout with:  sbatch {path}")
    return 0
