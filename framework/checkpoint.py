"""Checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is a folder `step_00000300/` inside `<run_dir>/checkpoints/` holding DCP shards
plus `meta.json` (step and the run's config, for humans and for mismatch errors).

Why these choices:
- DCP from the start, so the distributed issues can save sharded state and reshard on load
  with the same files; in a single process DCP simply writes one shard.
- Only tensors go into DCP: optimizer hyper-parameters come from the config and counters
  are stored as 0-dim tensors, so loading never unpickles arbitrary objects.
- Every rank writes its own shard; rank 0 alone commits the folder (after a barrier) and
  prunes old ones.
- Atomic: everything is written to a hidden temporary folder that is renamed into place
  only once complete, so a crash mid-save never leaves a half checkpoint that resume picks.
- Verified: `manifest.json` (framework/integrity.py) is written last, with the size and
  checksum of every file; loading checks it, and resume falls back to the newest intact
  checkpoint when the latest is damaged. DCP's pickled index is read by a restricted
  unpickler, so loading never runs code a crafted checkpoint names.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from framework import integrity
from framework.faults import maybe_fail
from parallel import comm
from parallel.mesh import side_group

PREFIX = "step_"
TMP_PREFIX = ".tmp-"


# DCP warns on every call made without a process group, even when told so; a single
# process is a supported way to run, not a mistake.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _no_dist() -> bool:
    """A single process has no process group: DCP then neither gathers nor barriers."""
    return not comm.is_distributed()


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the model; one-line message."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit() and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(checkpoint_root(run_dir))
    return found[-1] if found else None


def latest_good_checkpoint(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint whose manifest verifies, and the newer damaged ones with the reason
    each failed (newest first). Every file of the chosen one is checksummed."""
    damaged = []
    for path in reversed(list_checkpoints(checkpoint_root(run_dir))):
        problem = integrity.verify(path)
        if problem is None and integrity.read_manifest(path)["step"] != int(path.name[len(PREFIX):]):
            problem = "its manifest is for another step (a copied or renamed folder)"
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    return None, damaged


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to a hidden folder: kept for inspection, never resumed from
    or counted by pruning."""
    target = path.with_name(f".damaged-{path.name}")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(path, target)
    return target


class Saver:
    """Writes checkpoints `<run_dir>/checkpoints/step_*` atomically from every rank.

    `state` maps sections ("model", "optim", "extra") to tensors; replicated tensors are
    written once, DTensor shards (ZeRO-1 state) by their owners. Each checkpoint is written
    into a hidden temporary folder that rank 0 renames into place once every rank's shard is
    on disk, then prunes all but the newest `keep_last`.

    With `async_save`, DCP copies the state to host memory and writes it on a background
    thread while training goes on; the checkpoint is committed at the next save or at
    close(). Its collectives use a side process group so they never interleave with the
    training's own.
    """

    def __init__(self, run_dir: str | Path, config: dict, keep_last: int, async_save: bool = False):
        self.run_dir, self.config, self.keep_last = Path(run_dir), config, keep_last
        self.root = checkpoint_root(run_dir)
        self.async_save = async_save
        self.group = side_group() if async_save else None
        self.pending: tuple | None = None  # (future, step, tmp, final, formats) of an async save

    def save(self, step: int, state: dict[str, dict[str, torch.Tensor]]) -> Path:
        """`state` in DCP's format (asynchronously with async_save)."""
        tmp, final = self._begin(step)
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.group,
                                    no_dist=_no_dist())
            self.pending = (future, step, tmp, final, None)
            return final
        dcp.save(state, checkpoint_id=str(tmp), no_dist=_no_dist())
        self._commit(step, tmp, final)
        return final

    def save_files(self, step: int, write: Callable[[Path], None], formats: list[str]) -> Path:
        """Another engine's files (DeepSpeed's): `write(tmp)` fills the temporary folder on every
        rank; it is then published like a DCP checkpoint, meta.json naming `formats`."""
        tmp, final = self._begin(step)
        write(tmp)
        self._commit(step, tmp, final, formats)
        return final

    def _begin(self, step: int) -> tuple[Path, Path]:
        self.wait()
        final = self.root / f"{PREFIX}{step:08d}"
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        if comm.global_rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        comm.barrier()
        maybe_fail("save-begin", step, comm.global_rank(), self.run_dir)
        return tmp, final

    def wait(self) -> None:
        """Finish and commit an async save still in flight."""
        if self.pending is None:
            return
        future, step, tmp, final, formats = self.pending
        self.pending = None
        future.result()
        self._commit(step, tmp, final, formats)

    def _commit(self, step: int, tmp: Path, final: Path, formats: list[str] | None = None) -> None:
        maybe_fail("save", step, comm.global_rank(), self.run_dir)
        comm.barrier()  # every rank's shard is on disk before the folder becomes visible
        if comm.global_rank() == 0:
            meta = {"step": step, "config": self.config, **({"formats": formats} if formats else {})}
            publish(tmp, final, meta, self.run_dir)
            for old in list_checkpoints(self.root)[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        comm.barrier()

    close = wait


def save_weights(path: str | Path, model: torch.nn.Module, config: dict) -> Path:
    """A weights-only checkpoint (e.g. imported from Hugging Face) that a run can start from
    with `checkpoint.load_from`; written atomically like `save`."""
    final = Path(path)
    tmp = final.with_name(TMP_PREFIX + final.name)
    shutil.rmtree(tmp, ignore_errors=True)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp), no_dist=_no_dist())
    publish(tmp, final, {"step": 0, "config": config, "weights_only": True})
    return final


def publish(tmp: Path, final: Path, meta: dict, run_dir: Path | None = None) -> None:
    """Make a fully written temporary folder a checkpoint: meta.json, then the manifest of every
    file (last), then one rename. An existing folder of the same name (re-saving a step after a
    resume) is replaced whole. run_dir enables the fault-injection points."""
    step = meta["step"]
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if run_dir is not None:
        maybe_fail("publish-meta", step, 0, run_dir)
    integrity.write_manifest(tmp, meta)
    if run_dir is not None:
        maybe_fail("publish-manifest", step, 0, run_dir)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if run_dir is not None:
        maybe_fail("publish-done", step, 0, run_dir)


def checkpoint_formats(path: Path) -> list[str]:
    """Formats held by a checkpoint folder; native DCP checkpoints predate the key."""
    return read_meta(path).get("formats", ["native"])


def checkpoint_format_problem(path: Path, engine: str) -> str | None:
    """One line when `engine` cannot resume the checkpoint at `path` (None: it can)."""
    try:
        formats = checkpoint_formats(path)
    except (OSError, ValueError, AttributeError):
        return None  # unreadable metadata is reported by the model check
    if engine in formats:
        return None
    if engine == "native":
        return (f"{path} holds a DeepSpeed checkpoint only; add duet's format with `duet-train "
                "engine=deepspeed engine.convert_to_native=true` (same run_dir and layout), or resume "
                "with engine=deepspeed")
    return (f"{path} is a native duet checkpoint, which engine=deepspeed cannot resume; resume with "
            "engine=native, or start a new run_dir with checkpoint.load_from pointing at it")


def load(path: str | Path, state: dict[str, dict[str, torch.Tensor]], verify: bool = True,
         alone: bool = False) -> None:
    """Fill `state` (same layout as saved; any subset of sections) in place from `path`.
    The caller then hands the sections to model/optimizer `load_state_dict`. verify=False
    skips the checksums (when the caller verified the folder already); alone=True reads it in
    this process only, without the process group's collectives (one rank reading a whole model)."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"{path} is not a complete duet checkpoint (no meta.json)")
    problem = integrity.verify(path) if verify else None
    if problem:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}; use an older checkpoint")
    try:
        integrity.read_metadata(path / ".metadata")
    except integrity.UnsafeCheckpoint as err:
        raise CheckpointError(f"checkpoint {path} refused: {err}") from None
    try:
        dcp.load(state, storage_reader=integrity.SafeReader(str(path)), no_dist=alone or _no_dist())
    except Exception as err:  # DCP raises a wrapped multi-line error on any mismatch
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} does not fit this model/config ({first[:200]}); "
                              "start a new run_dir or restore the config it was saved with") from None


def load_model(path: str | Path, model: torch.nn.Module, alone: bool = False) -> None:
    """Only the weights (and buffers such as expert biases) of a checkpoint."""
    state = {"model": model.state_dict()}
    load(path, state, alone=alone)
    model.load_state_dict(state["model"])


def read_meta(path: str | Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())
