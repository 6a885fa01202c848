"""Checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is a folder `step_00000300/` inside `<run_dir>/checkpoints/` holding DCP shards
plus `meta.json` (step and the run's config, for humans and for mismatch errors).

Why these choices:
- DCP from the start, so the distributed issues can save sharded state and reshard on load
  with the same files; in a single process DCP simply writes one shard.
- Only tensors go into DCP: optimizer hyper-parameters come from the config and counters
  are stored as 0-dim tensors, so loading never unpickles arbitrary objects.
- Atomic: everything is written to a hidden temporary folder that is renamed into place
  only once complete, so a crash mid-save never leaves a half checkpoint that resume picks.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp


@contextlib.contextmanager
def _quiet_single_process():
    """A single process needs no process group; DCP warns about that on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield

PREFIX = "step_"
TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the model; one-line message."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(checkpoint_root(run_dir))
    return found[-1] if found else None


def optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state keyed by parameter name (tensors only).

    Parameter names, not positions, make the keys stable across pipeline splits and
    resharding. Missing state (before the first step) is created by a zero-learning-rate
    step so there are tensors for DCP to load into.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if any(p not in optimizer.state for _, p in named):
        _materialise_state(named, optimizer)
    flat: dict[str, torch.Tensor] = {}
    for name, param in named:
        for key, value in optimizer.state[param].items():
            flat[f"{name}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return flat


def _materialise_state(named, optimizer: torch.optim.Optimizer) -> None:
    saved_lrs = [g["lr"] for g in optimizer.param_groups]
    saved_grads = [p.grad for _, p in named]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    for _, p in named:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, saved_lrs):
        group["lr"] = lr
    for (_, p), grad in zip(named, saved_grads):
        p.grad = grad


def _restore_python_numbers(model, optimizer, flat: dict[str, torch.Tensor]) -> None:
    """DCP loads in place into tensors; state entries that were Python numbers are
    rebuilt from their loaded 0-dim tensors."""
    for name, param in model.named_parameters():
        state = optimizer.state.get(param, {})
        for key, value in list(state.items()):
            if not torch.is_tensor(value):
                state[key] = type(value)(flat[f"{name}/{key}"].item())


def save(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         extra: dict[str, int], config: dict, keep_last: int) -> Path:
    """Write checkpoint `step` atomically and prune all but the newest `keep_last`."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{TMP_PREFIX}{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    state = {
        "model": model.state_dict(),
        "optim": optimizer_tensors(model, optimizer),
        "extra": {k: torch.tensor(v, dtype=torch.int64) for k, v in extra.items()},
    }
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=str(tmp))
    (tmp / "meta.json").write_text(json.dumps({"step": step, "config": config}, indent=1))
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_weights(path: str | Path, model: torch.nn.Module, config: dict) -> Path:
    """A weights-only checkpoint (e.g. imported from Hugging Face) that a run can start from
    with `checkpoint.load_from`; written atomically like `save`."""
    final = Path(path)
    tmp = final.with_name(TMP_PREFIX + final.name)
    shutil.rmtree(tmp, ignore_errors=True)
    with _quiet_single_process():
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp))
    (tmp / "meta.json").write_text(json.dumps({"step": 0, "config": config, "weights_only": True}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
         extra_keys: list[str]) -> dict[str, int]:
    """Load `path` in place into model (and optimizer, unless None); return the saved integer
    counters named in `extra_keys` (none for a weights-only load)."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"{path} is not a complete duet checkpoint (no meta.json)")
    state: dict = {"model": model.state_dict()}
    if extra_keys:
        state["extra"] = {k: torch.zeros((), dtype=torch.int64) for k in extra_keys}
    if optimizer is not None:
        state["optim"] = optimizer_tensors(model, optimizer)
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(path))
    except Exception as err:  # DCP raises a wrapped multi-line error on any mismatch
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} does not fit this model/config ({first[:200]}); "
                              "start a new run_dir or restore the config it was saved with") from None
    model.load_state_dict(state["model"])
    if optimizer is not None:
        _restore_python_numbers(model, optimizer, state["optim"])
    return {k: int(v) for k, v in state.get("extra", {}).items()}


def read_meta(path: str | Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())
