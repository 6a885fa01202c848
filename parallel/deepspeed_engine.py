"""engine=deepspeed: DeepSpeed's ZeRO (stages 1-3) behind the engine protocol (parallel/engine.py), pp == 1.

Only the optimizer side changes. The model, the expert-parallel dispatcher, the data, the
expert-bias update and the balance loss are the native trainer's; DeepSpeed takes over gradient
reduction, partitioning of optimizer state / gradients / parameters, clipping, the update and
checkpoints. To train the same numbers as the native engine:

- the optimizer is duet's own AdamW (framework/optim.py), handed to DeepSpeed as the client
  optimizer: ZeRO replaces each parameter group's tensors by one flat fp32 partition and calls its
  step(), whose arithmetic is elementwise, so it is the same update;
- the learning rate is duet's schedule (lr_at), written into the param groups before each step
  (the DeepSpeed config has no scheduler);
- clipping is DeepSpeed's `gradient_clipping` = optim.grad_clip: ZeRO 1/2 sums the partitions'
  squared norms over dp (each expert element lives in exactly one partition of its edp group, and
  the ep ranks hold different experts), which is the native global norm; ZeRO-3 adds the ep
  all-reduce for expert groups itself. Same coefficient max / (norm + 1e-6);
- expert parameters (`.experts.`) form their own param groups with DeepSpeed's MoE convention
  ('moe': True, 'name', params marked allreduce=False / group_name). DeepSpeed reduces and
  partitions them over its expert-data-parallel group, which we check equals duet's edp group, and
  divides by the full dp size like the native reducer. ZeRO-3 uses DeepSpeed's AutoEP placement
  attributes so expert parameters are partitioned over edp, not dp.

DeepSpeed recognises MoE models only by its own MoE classes, so `_engine_class` subclasses the
engine to declare the expert groups while the ZeRO 1/2 optimizer is built, and nowhere else: its
MoE checkpoint writer expects DeepSpeed's layer structure. Checkpoints then take DeepSpeed's plain
path, where every rank saves its ZeRO partitions (experts included) and loading rebuilds each
rank's parameters from its fp32 partitions.

Run-folder layout: `checkpoints/step_XXXXXXXX/` as for the native engine, written and published by
the same `checkpoint.Saver` (temp folder, meta.json, manifest, rename, prune), with DeepSpeed's
files in `deepspeed/` and `meta.json` listing the formats present ("formats": ["deepspeed"]).
`engine.convert_to_native=true` adds duet's DCP files to the newest
checkpoint folder (format "native"), which the native engine then resumes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from framework import checkpoint, integrity
from framework.config import TrainConfig
from framework.errors import TrainingError
from framework.optim import AdamW
from parallel import comm
from parallel.data_parallel import DataParallelOptimizer
from parallel.engine import counters, release_step
from parallel.expert_parallel import expert_state_dict
from parallel.grad_reducer import is_expert

DS_TAG = "deepspeed"  # DeepSpeed's folder inside a checkpoint folder


# --------------------------------------------------------------------------- DeepSpeed config


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def deepspeed_config(cfg: TrainConfig) -> dict:
    """The DeepSpeed config for `cfg`, with engine.deepspeed.* merged over it (config.py refuses
    overrides of the keys derived here)."""
    bucket = int(cfg.parallel.bucket_mb * 2**20 / 4)  # DeepSpeed counts elements; fp32 gradients
    zero = {"stage": cfg.engine.zero_stage, "reduce_bucket_size": bucket, "reduce_scatter": True,
            "contiguous_gradients": True}
    if cfg.engine.zero_stage < 3:
        zero["allgather_bucket_size"] = bucket
    generated = {
        "train_batch_size": cfg.data.batch_size,
        "train_micro_batch_size_per_gpu": cfg.data.batch_size // cfg.parallel.dp,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        # duet's bf16/fp8 are autocast over fp32 weights (precision.compute, as in the native engine);
        # DeepSpeed's bf16 mode would store bf16 weights, a different recipe.
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        # duet's AdamW is not on DeepSpeed's list of ZeRO-tested optimizers; its state is per-element,
        # which is all ZeRO's flat partitions need.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # duet logs; DeepSpeed's own step prints would only repeat it
    }
    return _merge(generated, cfg.engine.deepspeed)


# --------------------------------------------------------------------------- DeepSpeed set-up


def import_deepspeed(device: torch.device):
    """deepspeed, on the CPU accelerator for CPU runs, quiet, and without run-time op builds.

    The accelerator is chosen when deepspeed is first imported, hence the environment variable
    before the import. DeepSpeed's communication backend JIT-compiles its shared-memory op
    (deepspeed_shm_comm, about a minute on 2 cores) on first use; that op serves only inference's
    all-reduce, never ZeRO training, so unless it was built ahead of time (DS_BUILD_SHM_COMM=1 at
    install) it is marked unavailable and nothing is compiled.
    """
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator, set_accelerator
    from deepspeed.git_version_info import installed_ops

    if device.type == "cpu" and get_accelerator().device_name() != "cpu":
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        set_accelerator(CPU_Accelerator())
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed calls torch.distributed's all_gather_into_tensor / reduce_scatter_tensor, which
    # torch 2.13 marks deprecated: one warning per call would bury the run's output.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use .*_single",
                            category=FutureWarning)
    if not installed_ops.get("deepspeed_shm_comm", False):
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def _expert_group_name(mesh) -> str:
    """Create (once per process) DeepSpeed's expert and expert-data-parallel groups for the layout
    and check they are duet's ep and edp groups, rank for rank."""
    from deepspeed.utils import groups

    name = f"ep_size_{mesh.ep}"
    if name not in groups._get_expert_data_parallel_group_dict():
        groups._create_expert_and_data_parallel(mesh.ep)
    got = {"ep": list(groups._get_expert_parallel_group_ranks(name)),
           "edp": list(groups._get_expert_data_parallel_group_ranks(name))}
    for kind, ranks in got.items():
        want = mesh.layout.group_of(kind, mesh.rank)
        if ranks != want:
            raise RuntimeError(f"DeepSpeed's {kind} group of rank {mesh.rank} is {ranks}, duet's is {want}")
    return name


def _mark_experts(model: nn.Module, name: str, zero_stage: int) -> None:
    """DeepSpeed's MoE parameter attributes on the routed experts: reduced, broadcast and (ZeRO-3)
    partitioned over the expert-data-parallel group `name`."""
    from deepspeed.utils import groups

    for pname, p in model.named_parameters():
        if not is_expert(pname):
            continue
        p.allreduce, p.group_name = False, name
        if zero_stage == 3:
            p.ds_zero_placement_family = "autoep_expert"
            p.ds_zero_partition_group_name = name
            p.ds_zero_partition_process_group = groups._get_expert_data_parallel_group(name)


def _param_groups(model: nn.Module, weight_decay: float, group_name: str) -> list[dict]:
    """framework.optim.build_optimizer's groups (no decay for ndim < 2), experts apart."""
    found: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for pname, p in model.named_parameters():
        if p.requires_grad:
            found.setdefault((is_expert(pname), p.ndim >= 2), []).append(p)
    out = []
    for (expert, decay), params in found.items():
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if expert:
            group.update(moe=True, name=group_name)
        out.append(group)
    return out


_ENGINE_CLASS = None


def _engine_class(deepspeed):
    """DeepSpeedEngine that builds its ZeRO 1/2 optimizer with expert parameter groups.

    DeepSpeed sets has_moe_layers only for its own MoE classes; the ZeRO 1/2 optimizer needs it to
    partition the 'moe' groups over edp. It is switched on just for that construction, and only when
    there are such groups (a dense model has none, and DeepSpeed refuses the flag without them):
    left on, checkpointing would take the writer for DeepSpeed's MoE layer layout. ZeRO-3 needs no
    flag (the expert placement travels on the parameters)."""
    global _ENGINE_CLASS
    if _ENGINE_CLASS is None:
        class DuetEngine(deepspeed.DeepSpeedEngine):
            def _configure_zero_optimizer(self, optimizer):
                dense = not any(group.get("moe") for group in optimizer.param_groups)  # e.g. a student
                if self.zero_optimization_partition_weights() or dense:
                    return super()._configure_zero_optimizer(optimizer)
                self.has_moe_layers = True
                try:
                    return super()._configure_zero_optimizer(optimizer)
                finally:
                    self.has_moe_layers = False

        _ENGINE_CLASS = DuetEngine
    return _ENGINE_CLASS


class Objective(nn.Module):
    """The module DeepSpeed wraps: forward is the training loss, so engine(inputs, targets)
    runs the model's loss under DeepSpeed's forward bookkeeping (ZeRO-3 hooks, backward hooks)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor):
        return self.model.loss(inputs, targets)


# --------------------------------------------------------------------------- the engine


class DeepSpeedEngine:
    """DeepSpeed's engine behind duet's engine protocol (parallel/engine.py), in place of
    GradReducer + DataParallelOptimizer. `model` is this rank's share, initialised (or loaded from
    checkpoint.load_from) already: ZeRO copies (stage 3: partitions) the weights it finds."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, mesh, device: torch.device) -> None:
        if mesh.is_single:
            raise TrainingError("engine=deepspeed needs a process group; use parallel.dp >= 2 or "
                                "engine=native")
        self.model, self.cfg, self.mesh = model, cfg, mesh
        deepspeed = import_deepspeed(device)
        from deepspeed import comm as ds_comm
        from deepspeed.accelerator import get_accelerator
        from deepspeed.runtime.config import DeepSpeedConfig

        # The process group exists (duet's mesh); this only wraps it in DeepSpeed's comm layer.
        ds_comm.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                 dist_init_required=False)
        group_name = _expert_group_name(mesh)
        _mark_experts(model, group_name, cfg.engine.zero_stage)
        adamw = AdamW(_param_groups(model, cfg.optim.weight_decay, group_name), lr=cfg.optim.lr,
                      betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay,
                      moment_dtype=cfg.precision.moment_dtype)
        self.ds_config = deepspeed_config(cfg)
        deepspeed.zero.partition_parameters.shutdown_init_context()
        self.ds = _engine_class(deepspeed)(
            args=None, model=Objective(model), optimizer=adamw, config=self.ds_config,
            config_class=DeepSpeedConfig(self.ds_config), dist_init_required=False)
        self.optimizer = self.ds.optimizer  # ZeRO's wrapper; param_groups are duet's AdamW's
        self.collective_forward = cfg.engine.zero_stage == 3  # ZeRO-3 gathers weights in every forward

    def set_lr(self, lr: float) -> None:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self.ds(inputs, targets)

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        """Reduce after backward, not from its hooks: the hooks fire in an order that depends on
        the routing (EP's all-to-all backward runs between expert and dense gradients), so ranks
        would issue ZeRO's reductions and EP's all-to-alls in different orders and deadlock (seen
        with ZeRO-3 at ep=2). DeepSpeed's coalesced flush, on exit, reduces in parameter-group order."""
        with self.ds.coalesce_grad_reduction():
            yield
            self._zero_missing_grads()

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        self.ds.backward(loss)  # inside accumulate(): DeepSpeed only accumulates until the flush

    def step(self, max_norm: float, loss_finite: bool) -> tuple[float, bool]:
        """Clipping is DeepSpeed's (gradient_clipping = optim.grad_clip, so max_norm is already in
        its config). ZeRO finds a non-finite global gradient norm itself: it then clears its
        reduced gradients and returns before the optimizer, which is the native skip. A non-finite
        loss gives non-finite gradients, so it must have been caught there too; if ZeRO did step,
        the weights are no longer trusted."""
        skips_before = self.ds.skipped_steps
        self.ds.step()
        applied = self.ds.skipped_steps == skips_before
        if not loss_finite and applied:
            raise TrainingError("the loss was not finite and DeepSpeed applied the update anyway; stopped "
                                "without saving: lower optim.lr or use precision=fp32, then resume from "
                                "the last checkpoint")
        grad_norm = self.ds.get_global_grad_norm()
        release_step(self.model)
        return (math.nan if grad_norm is None else float(grad_norm)), applied

    @torch.no_grad()
    def params_changed(self) -> None:
        """The module's weights were overwritten from outside (post-training's Learner.load_from:
        RL's fresh optimizer on the SFT weights). ZeRO 1/2 copied the weights into its fp32 master
        partitions when the engine was built, and its next step would write those back over the
        new weights: copy the parameters into the masters again."""
        if self.cfg.engine.zero_stage == 3:
            raise TrainingError("engine.zero_stage=3 partitions the parameters: their weights cannot be "
                                "written from outside; use engine.zero_stage=1 or 2")
        self.ds.optimizer.refresh_fp32_params()

    @torch.no_grad()
    def _zero_missing_grads(self) -> None:
        """A rank whose experts got no token has no gradient for them; the flush would skip the
        parameter there and not on its peers. Zeros keep every rank's reductions the same (the
        native GradReducer does the same)."""
        opt = self.ds.optimizer
        accum = getattr(opt, "use_grad_accum_attribute", False)  # ZeRO 1/2 may park grads there
        for p in self.ds.module.parameters():
            if not p.requires_grad:
                continue
            if accum and getattr(p, "grad_accum", None) is None:
                p.grad_accum = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
            elif not accum and p.grad is None:
                p.grad = torch.zeros(getattr(p, "ds_shape", p.shape), dtype=p.dtype, device=p.device)

    # --- checkpoints ---------------------------------------------------------------------------
    def save(self, saver: checkpoint.Saver, step: int, extra: dict[str, int]) -> Path:
        """DeepSpeed's save_checkpoint into the saver's temporary folder; published like any."""
        def write(tmp: Path) -> None:
            self.ds.save_checkpoint(str(tmp), tag=DS_TAG, client_state={"duet": dict(extra)})

        return saver.save_files(step, write, formats=[DS_TAG])

    def load(self, path: Path, extra: dict[str, int]) -> dict[str, int]:
        problem = checkpoint.checkpoint_format_problem(path, "deepspeed")
        if problem:
            raise TrainingError(problem)
        loaded, client = self.ds.load_checkpoint(str(path), tag=DS_TAG)
        if loaded is None:
            raise TrainingError(f"{path}: DeepSpeed found no checkpoint in {path / DS_TAG}; "
                                "move that folder away")
        if self.cfg.engine.zero_stage < 3:
            self._params_from_masters()
        return {k: int(client["duet"][k]) for k in extra}

    @torch.no_grad()
    def _params_from_masters(self) -> None:
        """ZeRO 1/2 loading restores the fp32 master partitions, but the module's parameters keep
        what the model-states file held: rank 0's, experts included, so another ep rank would hold
        rank 0's experts until the next step's all-gather (seen in the converted checkpoint).
        Rebuild every parameter from its masters now (a collective over its dp / edp group)."""
        from deepspeed.utils import safe_get_full_fp32_param

        for p in self.ds.module.parameters():
            p.copy_(safe_get_full_fp32_param(p).to(p.dtype))

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict with whole parameters (ZeRO-3 gathers its partitions), experts
        by global id as the native engine saves them."""
        from deepspeed import zero

        with zero.GatheredParameters(list(self.model.parameters()), enabled=self.cfg.engine.zero_stage == 3):
            whole = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return expert_state_dict(whole, self.mesh)

    def _native_optimizer_state(self) -> dict[str, torch.Tensor]:
        """duet's optimizer checkpoint entries for DeepSpeed's AdamW state: the full state of each
        of this rank's parameters (all-gathered from the ZeRO partitions), laid out by a
        non-sharded DataParallelOptimizer, which also wraps experts as global-id DTensors."""
        from deepspeed.utils import safe_get_full_optimizer_state

        base = self.ds.optimizer.optimizer  # duet's AdamW over the flat fp32 partitions
        steps = {float(s["step"]) for s in base.state.values() if "step" in s}
        if len(steps) > 1:
            raise TrainingError(f"DeepSpeed optimizer state holds different step counts {sorted(steps)}")
        step = steps.pop() if steps else 0.0
        zero = self.ds.optimizer
        if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
            # ZeRO 1/2 link each parameter to its slice of the AdamW state lazily, at the first
            # step; a checkpoint loaded just now has new state tensors, so link them afresh.
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()
        full = {}
        for name, p in self.model.named_parameters():
            for key in ("exp_avg", "exp_avg_sq"):
                value = safe_get_full_optimizer_state(p, key)
                full[f"{name}/{key}"] = value.detach().clone() if value is not None else None
            full[f"{name}/step"] = torch.tensor(step)
        shape_of = {n: getattr(p, "ds_shape", p.shape) for n, p in self.model.named_parameters()}
        with _whole_params(self.model, shape_of):
            native = DataParallelOptimizer(self.model, self.cfg.optim, self.mesh,
                                           self.cfg.precision.moment_dtype, zero=False)
            native.load_state_dict({k: v for k, v in full.items() if v is not None})
            return native.state_dict()

    def convert_to_native(self, path: Path, extra: dict[str, int]) -> Path:
        """Add duet's DCP format to the checkpoint at `path` (the one this run resumed)."""
        state = {"model": self.model_state_dict(), "optim": self._native_optimizer_state(),
                 "extra": counters(extra)}
        import torch.distributed.checkpoint as dcp

        dcp.save(state, checkpoint_id=str(path))
        comm.barrier()
        if comm.global_rank() == 0:  # meta.json, then the manifest of every file (integrity.py) last
            meta = checkpoint.read_meta(path)
            meta["formats"] = sorted(set(meta.get("formats", [DS_TAG])) | {"native"})
            tmp = path / "meta.json.tmp"
            tmp.write_text(json.dumps(meta, indent=1))
            os.replace(tmp, path / "meta.json")
            integrity.write_manifest(path, meta)
        comm.barrier()
        return path


class _whole_params:
    """Under ZeRO-3 the module's parameters are empty placeholders; DataParallelOptimizer only
    needs their shapes to lay out state, so stand in zero tensors of the full shape meanwhile."""

    def __init__(self, model: nn.Module, shape_of: dict[str, torch.Size]) -> None:
        self.model, self.shape_of, self.saved = model, shape_of, []

    def __enter__(self):
        for name, p in self.model.named_parameters():
            if tuple(p.shape) != tuple(self.shape_of[name]):
                self.saved.append((p, p.data))
                p.data = torch.zeros(self.shape_of[name], dtype=p.dtype, device=p.device)
        return self

    def __exit__(self, *exc):
        for p, data in self.saved:
            p.data = data
        return False
