"""Process layout: which rank does what, and the process groups that connect them.

Rank order (fixed; the launcher, checkpoints and tests rely on it):

    world = pp * dp                     rank = pp_rank * dp + dp_rank
    ep divides dp: inside one pipeline stage's dp ranks, expert-parallel groups are
    contiguous blocks of ep ranks (ep_rank = dp_rank % ep), and the ranks holding the same
    experts form the expert-data-parallel group (edp_rank = dp_rank // ep, edp = dp // ep).

Contiguous EP blocks keep the all-to-all traffic (the heaviest) between neighbouring ranks,
which are on the same node when dp >= ep and ranks are numbered node by node.

`Layout` is pure arithmetic (no processes needed: the launcher validates with it and
duet-plan prints it). `Mesh` holds the live process groups; `Mesh.single()` is the
single-process stand-in whose groups are None, so every collective in parallel.comm becomes a
no-op and the trainer keeps one code path.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

GROUP_KINDS = ("pp", "dp", "ep", "edp")


class Coords(NamedTuple):
    pp_rank: int
    dp_rank: int
    ep_rank: int
    edp_rank: int


@dataclass(frozen=True)
class Layout:
    pp: int = 1
    dp: int = 1
    ep: int = 1

    @classmethod
    def from_config(cls, parallel) -> Layout:
        """From a framework.config.ParallelConfig (anything with pp, dp, ep)."""
        return cls(parallel.pp, parallel.dp, parallel.ep)

    @property
    def world(self) -> int:
        return self.pp * self.dp

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    def problems(self, world: int | None = None, n_experts: int | None = None) -> list[str]:
        """Every reason this layout cannot run, one line each naming the key and the fix."""
        sizes = {"pp": self.pp, "dp": self.dp, "ep": self.ep}
        p = [f"parallel.{key}={value}: must be a positive integer"
             for key, value in sizes.items() if not isinstance(value, int) or value < 1]
        if p:
            return p
        if self.dp % self.ep:
            fits = [d for d in range(1, self.dp + 1) if self.dp % d == 0]
            p.append(f"parallel.ep={self.ep} does not divide parallel.dp={self.dp}: expert-parallel "
                     f"groups live inside the data-parallel ranks; choose ep in {fits}")
        if world is not None and world != self.world:
            p.append(f"world size {world} != parallel.pp * parallel.dp = {self.pp} * {self.dp} = "
                     f"{self.world}; start {self.world} processes or change pp/dp")
        if n_experts is not None and n_experts % self.ep:
            p.append(f"model.n_routed_experts={n_experts} is not divisible by parallel.ep={self.ep}; "
                     "every expert-parallel rank must hold the same number of experts")
        return p

    def check(self, world: int | None = None) -> None:
        found = self.problems(world)
        if found:
            raise ValueError("; ".join(found))

    def coords(self, rank: int) -> Coords:
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} outside world {self.world}")
        pp_rank, dp_rank = divmod(rank, self.dp)
        edp_rank, ep_rank = divmod(dp_rank, self.ep)
        return Coords(pp_rank, dp_rank, ep_rank, edp_rank)

    def rank_of(self, pp_rank: int, dp_rank: int) -> int:
        return pp_rank * self.dp + dp_rank

    def group_of(self, kind: str, rank: int) -> list[int]:
        """The global ranks of `rank`'s group of `kind` (pp, dp, ep, edp), in group-rank order."""
        c = self.coords(rank)
        base = c.pp_rank * self.dp
        if kind == "pp":
            return [self.rank_of(p, c.dp_rank) for p in range(self.pp)]
        if kind == "dp":
            return [base + d for d in range(self.dp)]
        if kind == "ep":
            return [base + c.edp_rank * self.ep + e for e in range(self.ep)]
        if kind == "edp":
            return [base + k * self.ep + c.ep_rank for k in range(self.edp)]
        raise ValueError(f"unknown group kind {kind!r}; choose one of {', '.join(GROUP_KINDS)}")

    def groups(self, kind: str) -> list[list[int]]:
        """Every group of `kind`, each listed once, ordered by its lowest rank."""
        seen: dict[int, list[int]] = {}
        for rank in range(self.world):
            ranks = self.group_of(kind, rank)
            seen.setdefault(ranks[0], ranks)
        return [seen[k] for k in sorted(seen)]


@dataclass
class Mesh:
    """Live groups of one rank. Sizes come from the layout; a group is None only in the single-
    process mesh (parallel.comm then treats every op as a no-op)."""

    layout: Layout
    rank: int
    device_mesh: DeviceMesh | None = None  # dims (pp, edp, ep); used for DTensor state
    dp_mesh: DeviceMesh | None = None  # 1-D view over the dp ranks (edp x ep flattened)
    dp_group: dist.ProcessGroup | None = None
    ep_group: dist.ProcessGroup | None = None
    edp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None

    @classmethod
    def single(cls) -> Mesh:
        return cls(Layout(), 0)

    @property
    def is_single(self) -> bool:
        return self.device_mesh is None

    @property
    def world(self) -> int:
        return self.layout.world

    @property
    def coords(self) -> Coords:
        return self.layout.coords(self.rank)

    # Group sizes and this rank's place in each group.
    @property
    def pp(self) -> int:
        return self.layout.pp

    @property
    def dp(self) -> int:
        return self.layout.dp

    @property
    def ep(self) -> int:
        return self.layout.ep

    @property
    def edp(self) -> int:
        return self.layout.edp

    @property
    def pp_rank(self) -> int:
        return self.coords.pp_rank

    @property
    def dp_rank(self) -> int:
        return self.coords.dp_rank

    @property
    def ep_rank(self) -> int:
        return self.coords.ep_rank

    @property
    def edp_rank(self) -> int:
        return self.coords.edp_rank

    @property
    def expert_mesh(self) -> DeviceMesh | None:
        """2-D (edp, ep) view of this stage's dp ranks, for expert-parameter DTensors."""
        return None if self.device_mesh is None else self.device_mesh["edp", "ep"]


def build_mesh(layout: Layout, device_type: str | None = None) -> Mesh:
    """Create the process groups for `layout`. Every rank must call it (group creation is
    collective and must happen in the same order everywhere)."""
    if not (dist.is_available() and dist.is_initialized()):
        if layout.world == 1:
            return Mesh.single()
        raise RuntimeError(f"build_mesh: layout needs {layout.world} processes but torch.distributed is not "
                           "initialised; call parallel.mesh.init_distributed() in every worker first")
    layout.check(dist.get_world_size())
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    device_mesh = init_device_mesh(device_type, (layout.pp, layout.edp, layout.ep),
                                   mesh_dim_names=("pp", "edp", "ep"))
    # DeviceMesh has no public way to merge two dims into one group; _flatten is what
    # torchtitan uses for the same purpose (dp = edp x ep, contiguous by construction).
    dp_mesh = device_mesh["edp", "ep"]._flatten("dp")
    mesh = Mesh(layout, dist.get_rank(), device_mesh, dp_mesh,
                dp_group=dp_mesh.get_group(), ep_group=device_mesh.get_group("ep"),
                edp_group=device_mesh.get_group("edp"), pp_group=device_mesh.get_group("pp"))
    _check_groups(mesh)
    return mesh


def _check_groups(mesh: Mesh) -> None:
    """The groups DeviceMesh made must be exactly the layout's (rank order is a contract)."""
    for kind in GROUP_KINDS:
        got = dist.get_process_group_ranks(getattr(mesh, f"{kind}_group"))
        want = mesh.layout.group_of(kind, mesh.rank)
        if got != want:
            raise RuntimeError(f"build_mesh: {kind} group of rank {mesh.rank} is {got}, layout says {want}")


# How NCCL hangs are caught (parallel/watchdog.py's docstring): PyTorch's NCCL watchdog tears the
# process down at the process group's timeout and dumps its flight recorder. A user's own
# setting wins; TORCH_FR_BUFFER_SIZE is the newer name of the trace buffer's size.
NCCL_HANG_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
                 "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}


def set_nccl_hang_env(env: MutableMapping[str, str]) -> None:
    """Set NCCL_HANG_ENV's variables that `env` (os.environ) lacks; before init_process_group."""
    for key, value in NCCL_HANG_ENV.items():
        if key == "TORCH_NCCL_TRACE_BUFFER_SIZE" and "TORCH_FR_BUFFER_SIZE" in env:
            continue
        env.setdefault(key, value)


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> tuple[int, int]:
    """Join the process group described by the torchrun/elastic environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT; LOCAL_RANK picks the GPU). Returns (rank, world).

    No RANK/WORLD_SIZE in the environment means a plain single process: nothing is initialised
    and (0, 1) is returned. backend defaults to nccl when CUDA is present, gloo otherwise
    (pass "gloo" to run all ranks on one GPU, the simulated mode). On nccl the hang-reporting
    environment (NCCL_HANG_ENV) is filled in where the user has not set it."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return 0, 1
    missing = [key for key in ("MASTER_ADDR", "MASTER_PORT") if not env.get(key)]
    if missing:
        raise RuntimeError(f"init_distributed: RANK/WORLD_SIZE are set but {', '.join(missing)} is not; "
                           "launch with torchrun or set them")
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(env.get("LOCAL_RANK", 0)))
        set_nccl_hang_env(env)
    timeout = timedelta(seconds=timeout_s if timeout_s is not None else 600)
    restart = env.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
        return rank, world
    # Under the elastic agent the workers share the agent's store across restarts, so a
    # restarted group would read the dead group's addresses (gloo: "connection refused").
    # A key prefix per restart keeps each attempt's rendezvous apart.
    agent_store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False,
                                timeout=timeout)
    store = dist.PrefixStore(f"duet/attempt_{restart}", agent_store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return rank, world


def side_group() -> dist.ProcessGroup | None:
    """A second gloo group over all ranks, for work that runs on a background thread (async
    checkpoint writes) so its collectives never interleave with the training's. Every rank
    must call this at the same point; None in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.new_group(backend="gloo")


def shutdown() -> None:
    """Leave the process group (all outstanding handles must have been waited)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
