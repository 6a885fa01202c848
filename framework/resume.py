"""Where a run starts: the checkpoint to resume or the weights to start from, checked against
the config before any worker trains (the launcher calls starting_point before spawning), and
agreed on by every rank (rank 0 verifies, the others follow)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from framework import checkpoint, integrity
from framework.config import ModelConfig, TrainConfig
from framework.errors import TrainingError
from parallel import comm
from parallel.mesh import Mesh


def starting_point(cfg: TrainConfig, damaged: list | None = None) -> tuple[Path | None, Path | None]:
    """(checkpoint to resume, weights to start from), checked against this config.

    Resuming the run folder restores everything; `checkpoint.load_from` only initialises the
    weights of a new run (fine-tuning, HF imports) and is ignored once the run has
    checkpoints of its own. The launcher calls this before spawning, so a mismatch is one
    line and exit 2 rather than a failure in every worker.

    Checkpoints are verified against their manifests: a damaged newest one is skipped for the
    newest intact one, and (path, reason) of each skipped one is appended to `damaged`; when
    none is intact the run is refused rather than silently started from scratch.
    """
    resume_from, found_damaged = checkpoint.latest_good_checkpoint(Path(cfg.run_dir).expanduser())
    if damaged is not None:
        damaged += found_damaged
    if resume_from is None and found_damaged:
        path, why = found_damaged[-1]
        raise TrainingError(f"{path}: {why}, and no intact checkpoint is left to resume from; move the "
                            "damaged folders out of checkpoints/ or use a new run_dir")
    if resume_from is not None and not cfg.checkpoint.resume:
        raise TrainingError(f"{cfg.run_dir} already holds checkpoints; use a new run_dir or "
                            "checkpoint.resume=true (refusing to overwrite them)")
    init_from = Path(cfg.checkpoint.load_from) if cfg.checkpoint.load_from and resume_from is None else None
    if init_from is not None and (problem := integrity.verify(init_from)):
        raise TrainingError(f"checkpoint.load_from={cfg.checkpoint.load_from}: {problem}; point it at an "
                            "intact checkpoint folder")
    for path in (resume_from, init_from):
        if path is not None:
            _check_same_model(path, cfg)
    if resume_from is not None:
        problem = checkpoint.checkpoint_format_problem(resume_from, cfg.engine.name)
        if problem:
            raise TrainingError(problem)
    return resume_from, init_from


RUN_ONLY_MODEL_KEYS = {"recompute"}


def _check_same_model(path: Path, cfg: TrainConfig) -> None:
    try:
        saved = checkpoint.read_meta(path)["config"]["model"]
    except (OSError, KeyError, ValueError, TypeError):
        raise TrainingError(f"{path}: unreadable checkpoint metadata; move that folder away or start "
                            "a new run_dir") from None
    # A key newer than the checkpoint was added with a default that keeps the old behaviour;
    # keys that only say how the model runs (not what its weights are) may change on resume.
    defaults, current = asdict(ModelConfig()), asdict(cfg.model)
    saved = {**defaults, **saved}
    diff = [k for k in current if k not in RUN_ONLY_MODEL_KEYS and saved.get(k) != current[k]]
    if diff:
        keys = ", ".join(f"model.{k}={saved.get(k)!r} (this run: {current[k]!r})" for k in diff)
        raise TrainingError(f"checkpoint {path} was saved with a different model: {keys}; use a new "
                            "run_dir or the original model config")


def agreed_start(cfg: TrainConfig, mesh: Mesh, run_dir: Path) -> tuple[Path | None, Path | None, list]:
    """starting_point() on rank 0 only, which checksums the checkpoint once rather than once
    per rank, sets damaged checkpoints aside and broadcasts the chosen step, so every rank
    loads the same folder."""
    damaged: list[tuple[Path, str]] = []
    if mesh.is_single:
        return (*starting_point(cfg, damaged), damaged)
    choice = torch.tensor([0, -1], dtype=torch.int64, device=comm.collective_device())  # ok, step
    error = None
    if mesh.rank == 0:
        try:
            resume_from, init_from = starting_point(cfg, damaged)
            step = -1 if resume_from is None else int(resume_from.name[len(checkpoint.PREFIX):])
            choice = torch.tensor([1, step], dtype=torch.int64, device=choice.device)
        except TrainingError as err:
            error = err
    comm.broadcast(choice, src=0)
    if error is not None:
        raise error
    ok, step = choice.tolist()
    if not ok:
        raise TrainingError("rank 0 found no usable starting point; its log says why")
    root = checkpoint.checkpoint_root(run_dir)
    resume_from = None if step < 0 else root / f"{checkpoint.PREFIX}{step:08d}"
    load_from = cfg.checkpoint.load_from
    init_from = Path(load_from) if load_from and resume_from is None else None
    return resume_from, init_from, damaged


def latest_step(run_dir: Path) -> int | None:
    found = checkpoint.latest_checkpoint(run_dir)
    return None if found is None else checkpoint.read_meta(found)["step"]
