"""Checkpoint integrity: a manifest written last, verified before loading, and a safe reader.

Every checkpoint folder ends with `manifest.json`:

    {"format": 1, "step": 300, "config_hash": "<sha256 of the model config>",
     "layout": {"world": 4, "pp": 1, "dp": 4, "ep": 2},
     "files": {"meta.json": {"bytes": 1234, "sha256": "..."}, "__0_0.distcp": {...}, ...}}

It lists every file the checkpoint was written with, so bit rot (a checksum mismatch), a
truncated shard (a size mismatch), a deleted file, or a folder copied while being written
(no manifest) is found before anything is read, and the caller can fall back to an older
checkpoint. Files added later (a `model.yaml` beside imported weights, a user's notes) are
not listed and are ignored.

DCP stores its index (`.metadata`) as a pickle and `dcp.load` unpickles it with the plain
`pickle` module, which would run any code a crafted file names. `SafeReader` reads it with
an unpickler that only builds DCP's own metadata classes, torch.Size and dtypes, and refuses
byte (non-tensor) entries, which DCP would load with `torch.load(weights_only=False)`.
Tensor shards are already read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata

MANIFEST = "manifest.json"
FORMAT = 1


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def config_hash(model_config: dict) -> str:
    """A stable hash of the model config: two checkpoints with equal hashes hold the same model."""
    return hashlib.sha256(json.dumps(model_config, sort_keys=True, default=str).encode()).hexdigest()


def write_manifest(folder: Path, meta: dict) -> None:
    """Checksum every file in `folder` and write the manifest, last."""
    config = meta.get("config", {})
    par = config.get("parallel", {})
    layout = {k: par[k] for k in ("pp", "dp", "ep") if k in par}
    if layout:
        layout["world"] = layout.get("pp", 1) * layout.get("dp", 1)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size,
                                                      "sha256": file_digest(path)}
    manifest = {"format": FORMAT, "step": meta.get("step"),
                "config_hash": config_hash(config.get("model", {})), "layout": layout, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def verify(folder: Path) -> str | None:
    """Why `folder` is not an intact checkpoint (one phrase), or None when it is."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        meta["step"], meta["config"]["model"]  # noqa: B018 -- the keys every checkpoint has
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable checkpoint metadata (meta.json)"
    if not (folder / MANIFEST).is_file():
        return f"no {MANIFEST} (written partially, or not by duet)"
    try:
        manifest = read_manifest(folder)
        files = manifest["files"]
        listed = [(str(name), int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"unreadable {MANIFEST}"
    # engine=deepspeed checkpoints hold DeepSpeed's files and DCP's only once converted
    # (parallel/deepspeed_engine.py); "formats" is absent from native checkpoints.
    native = "native" in meta.get("formats", ["native"])
    if (manifest.get("step") != meta["step"] or "meta.json" not in files
            or (native and ".metadata" not in files)):
        return f"{MANIFEST} does not describe this folder"
    for name, size, digest in listed:
        path = folder / name
        if ".." in Path(name).parts or not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size} (truncated?)"
        if file_digest(path) != digest:
            return f"{name} fails its checksum (corrupted)"
    try:
        if native:
            read_metadata(folder / ".metadata")
    except UnsafeCheckpoint as err:
        return f"refused: {err}"
    return None


# --------------------------------------------------------------------------- safe reading

_METADATA_CLASSES = {"Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
                     "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"}
_ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"),
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
            ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
            ("collections", "OrderedDict")}


class UnsafeCheckpoint(ValueError):
    """The checkpoint's index names something other than DCP's own metadata."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        ok = ((module, name) in _ALLOWED
              or (module == dcp_metadata.__name__ and name in _METADATA_CLASSES)
              or (module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                                torch.memory_format))))
        if not ok:
            raise UnsafeCheckpoint(f"its .metadata names {module}.{name}, which a checkpoint never holds")
        return super().find_class(module, name)


def read_metadata(path: Path) -> dcp_metadata.Metadata:
    """DCP's index of a checkpoint, unpickled without running foreign code."""
    try:
        with path.open("rb") as f:
            md = _MetadataUnpickler(f).load()
    except UnsafeCheckpoint:
        raise
    except Exception as err:  # a damaged pickle raises anything from EOFError to KeyError
        raise UnsafeCheckpoint(f"its .metadata is unreadable ({type(err).__name__})") from None
    if not isinstance(md, dcp_metadata.Metadata):
        raise UnsafeCheckpoint(f"its .metadata holds a {type(md).__name__}, not DCP metadata")
    if any(isinstance(v, dcp_metadata.BytesStorageMetadata) for v in md.state_dict_metadata.values()):
        raise UnsafeCheckpoint("it holds pickled (non-tensor) entries, which duet never writes")
    return md


class SafeReader(FileSystemReader):
    """FileSystemReader whose index is read by `read_metadata` above instead of pickle.load."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        md = read_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = dcp_metadata.StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md
