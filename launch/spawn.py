"""Starting the workers of a run, for each `launch.mode`.

- local, one rank: train in this process (no process group, nothing to spawn).
- local / simulated, several ranks: torch's elastic agent (the machinery under torchrun)
  spawns the ranks on this host with a c10d rendezvous on loopback. `simulated` puts every
  rank on one device with gloo, so a cluster layout can be debugged on one GPU or the CPU.
- torchrun: this process already is one worker of a torchrun job (RANK/WORLD_SIZE are set).
- slurm: write an sbatch script that runs torchrun on every node, and say how to submit it.

Rank 0's stdout (the progress bar, the final report) reaches the console with a `[rank0]`
prefix; every rank's full stdout/stderr goes to `<run_dir>/logs/`. When a rank fails, the
launcher prints, once, the traceback of the rank that failed first (a rank that raises records
when in `logs/failed-at.rank<N>`, so a peer failing on the broken connection is not taken for
it), then one line naming the rank and its log. When `launch.max_restarts` lets the group
restart instead, one line names the rank that died, how, the last step logged and the
checkpoint step the group restarts from.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import sys
import time
import traceback
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

    cfg = config_from_dict(values)
    marker = failure_marker(Path(cfg.run_dir).expanduser() / "logs", int(os.environ["RANK"]))
    marker.unlink(missing_ok=True)  # a previous attempt's, when launch.max_restarts restarted the group
    train(cfg, on_failure=lambda: write_failure_marker(marker))


def failure_marker(log_dir: Path, rank: int) -> Path:
    """Where a rank that raised records when (to the microsecond) and what. The launcher needs
    both: torch's error files keep whole seconds, so a peer that fails on the broken connection
    within the same second ties with the rank that caused it, and torch names the lower rank;
    and the rank that caused it may still be exiting when the agent's poll sees that peer, so
    torch's failure list can lack it altogether."""
    return log_dir / f"failed-at.rank{rank}"


def write_failure_marker(marker: Path) -> None:
    """Inside an `except` block: the exception being handled, with the time. A marker that
    cannot be written (a full disk) must not replace that exception: torch's pick stands."""
    error = sys.exc_info()[1]
    with contextlib.suppress(OSError):
        marker.write_text(json.dumps({"time": time.time(), "error": f"{type(error).__name__}: {error}",
                                      "traceback": traceback.format_exc()}))


def read_failure_markers(log_dir: Path, world: int) -> dict[int, dict]:
    markers = {}
    for rank in range(world):
        with contextlib.suppress(OSError, ValueError):
            markers[rank] = json.loads(failure_marker(log_dir, rank).read_text())
    return markers


def first_failed_rank(exit_codes: dict[int, int], fallback: int, markers: dict[int, dict]) -> int:
    """The rank whose failure caused the others'. One that ended without raising, so without a
    marker, is taken first: a rank killed by a signal other than the launcher's SIGTERM, then one
    that exited with a status other than Python's 1 for an exception (the hang watchdog's 3).
    Then the earliest marker; else `fallback` (torch's pick)."""
    unraised = sorted((code >= 0, rank) for rank, code in exit_codes.items()
                      if rank not in markers and code not in (0, 1, -signal.SIGTERM))
    if unraised:
        return unraised[0][1]
    return min(markers, key=lambda rank: markers[rank]["time"]) if markers else fallback


def first_failure(failures: dict, exit_codes: dict[int, int], fallback: int, log_dir: Path,
                  world: int) -> tuple[int, int, str, str]:
    """(rank, exit code, 'Type: message', traceback) of the rank `first_failed_rank` names, from
    its marker, else from torch's record of it in `failures` (rank -> ProcessFailure)."""
    markers = read_failure_markers(log_dir, world)
    rank = first_failed_rank(exit_codes, fallback, markers)
    code = exit_codes.get(rank, 1)  # a rank that raised exits 1, though it may still be exiting
    if rank in markers:
        return rank, code, markers[rank]["error"], markers[rank]["traceback"]
    message = getattr(failures.get(rank), "message", "")  # a @record-ed rank's error file (dict), or a str
    if not isinstance(message, dict):
        return rank, code, str(message), str(message)
    callstack = message.get("extraInfo", {}).get("py_callstack")
    return rank, code, message.get("message", ""), callstack or message.get("message", message)


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
        with _reporting_restarts(Path(cfg.run_dir).expanduser()):
            elastic_launch(launch_cfg, worker_entry)(asdict(cfg))
    except ChildFailedError as err:
        codes = {r: f.exitcode for r, f in err.failures.items()}
        rank, code, reason, trace = first_failure(err.failures, codes, err.get_first_failure()[0],
                                                  log_dir, world)
        if reason.startswith("TrainingError: "):  # a stated reason (e.g. too many NaN steps): one line
            print(f"duet-train: error: {reason.removeprefix('TrainingError: ')}", file=sys.stderr)
            return 2
        print(str(trace).rstrip(), file=sys.stderr)
        print(f"duet-train: rank {rank} failed (exit code {code}); all logs in {log_dir}", file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def _reporting_restarts(run_dir: Path):
    """Within: the elastic agent that elastic_launch builds prints one line per group restart
    (`RestartReporter`). torch offers no hook there, so its agent class is swapped for the
    subclass while the launch runs; if torch renames it, restarts just go unreported."""
    import torch.distributed.launcher.api as launcher_api

    original = getattr(launcher_api, "LocalElasticAgent", None)
    if original is None:
        yield
        return
    agent = type("RestartReporter", (RestartReporter, original), {"run_dir": run_dir})
    launcher_api.LocalElasticAgent = agent
    try:
        yield
    finally:
        launcher_api.LocalElasticAgent = original


class RestartReporter:
    """Mixin over torch's LocalElasticAgent: when a rank dies and launch.max_restarts lets the
    group restart, print before the new start

        duet: rank 1 exited (SIGKILL) after step 6; restarting from step 4 (restart 1 of 2)

    The rank is the one that died first: one killed by a signal is taken over a peer that then
    failed on the broken connection. Its step is the last one logged to metrics.jsonl since
    this attempt started; the restart step is the newest checkpoint's, read once every rank
    has stopped."""

    run_dir: Path
    _pending: tuple[int, str, str] | None = None
    _attempt_started = 0.0
    _attempt_start_step = 0

    def _restart_workers(self, worker_group) -> None:
        from torch.distributed.elastic.agent.server.api import WorkerState

        if worker_group.state in (WorkerState.FAILED, WorkerState.UNHEALTHY):
            try:
                rank, how = self._first_death(worker_group)  # before the stop ends the other ranks
                self._pending = (rank, how, self._logged_step_text())
            except Exception:  # a report must never stop the restart itself
                self._pending = None
        super()._restart_workers(worker_group)

    def _initialize_workers(self, worker_group) -> None:
        from framework.resume import latest_step

        try:
            start = latest_step(self.run_dir) or 0
        except (OSError, ValueError, KeyError, TypeError):  # unreadable meta.json: the ranks say more
            start = 0
        if self._pending is not None:
            rank, how, when = self._pending
            spec = worker_group.spec
            done = spec.max_restarts - self._remaining_restarts
            print(f"duet: rank {rank} {how} {when}; restarting from step {start} (restart {done} of "
                  f"{spec.max_restarts})", file=sys.stderr, flush=True)
            self._pending = None
        self._attempt_started, self._attempt_start_step = time.time(), start
        super()._initialize_workers(worker_group)

    def _monitor_workers(self, worker_group):
        result = super()._monitor_workers(worker_group)
        self._last_failures = result.failures if result.is_failed() else {}
        return result

    def _first_death(self, worker_group) -> tuple[int, str]:
        """(global rank, 'exited (SIGKILL)' or 'exited (exit code 1: RuntimeError: ...)') of the
        rank that died first. torch reports the first one its poll saw and SIGTERMs the rest; a
        peer that failed on the broken connection before that poll may be the one it saw, so
        `first_failed_rank` decides."""
        failures = getattr(self, "_last_failures", {})
        processes = getattr(getattr(self._pcontext, "_pc", None), "processes", None) or []
        codes = {worker_group.workers[i].global_rank: p.exitcode for i, p in enumerate(processes)
                 if p.exitcode is not None}
        codes.update({rank: failure.exitcode for rank, failure in failures.items()})
        seen = sorted(failures) or sorted(r for r, code in codes.items() if code != 0)
        if not seen:
            return -1, "exited"
        rank, code, message, _ = first_failure(failures, codes, seen[0], self.run_dir / "logs",
                                               len(worker_group.workers))
        if code < 0:
            try:
                return rank, f"exited ({signal.Signals(-code).name})"
            except ValueError:
                return rank, f"exited (signal {-code})"
        first = str(message).strip().splitlines()[0][:160] if str(message).strip() else ""
        detail = f": {first}" if first and not first.startswith("To enable traceback") else ""
        return rank, f"exited (exit code {code}{detail})"

    def _logged_step_text(self) -> str:
        """'after step N' for the newest step in metrics.jsonl logged since this attempt began."""
        step = None
        try:
            with open(self.run_dir / "metrics.jsonl", "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - (1 << 16)))
                lines = f.read().decode("utf-8", errors="replace").splitlines()
        except OSError:
            lines = []
        for line in reversed(lines):
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by the seek or by the rank dying mid-write
            if not isinstance(record, dict) or "step" not in record:
                continue
            if record.get("time", 0) >= self._attempt_started - 0.01:  # records round to 1 ms
                step = int(record["step"])
            break
        if step is None:
            return f"before finishing step {self._attempt_start_step + 1}"
        return f"after step {step}"


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
