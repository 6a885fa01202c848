"""The one place where a model meets the layout: build on meta, cut, materialise what is held.

    built = parallelize(cfg.model, cfg, mesh, device, compute)
    built.model      this rank's share on `device`: pipeline stages pruned, experts sharded
    built.counts     parameter counts of the full model
    built.pipeline   the PipelineEngine (pp > 1), else None
    built.reducer, built.optimizer   native data parallelism (gradient buckets, ZeRO-1 AdamW)

The order is fixed and reads top to bottom in `parallelize`:
    1. the whole model on the meta device (no memory); its initial weights are those of
       `Transformer(model_cfg)` built after the same torch.manual_seed in one process
    2. FP8 layers (precision=fp8): a class swap, still on meta
    3. expert parallelism: keep this rank's block of routed experts, install the all-to-all
       dispatcher, node-limited routing from the layout
    4. the pipeline split: keep this rank's stages (the weight-gradient split is a class swap)
    5. materialise only what is left, directly on `device`, and initialise it: weights are a
       function of (seed, global name, global expert id) (framework/model/init.py), so every
       layout starts from the global weights one process would on the same device type
    6. data parallelism: the native engine's bucketed reducer and ZeRO-1 optimizer
       (trainable=True and engine=native; engine=deepspeed builds DeepSpeed's engine over the
       same model in parallel/deepspeed_engine.py)
A second model of the same layout (a frozen reference, a student) comes from another call with
trainable=False: steps 1-5, parameters frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.config import ModelConfig, TrainConfig
from framework.fp8 import apply_fp8
from framework.model import Transformer, count_params
from parallel.data_parallel import DataParallelOptimizer, GradReducer
from parallel.expert_parallel import enable_expert_parallel
from parallel.mesh import Mesh
from parallel.pipeline.engine import PipelineEngine


@dataclass
class Parallelized:
    model: Transformer  # this rank's share on its device
    counts: dict[str, int]  # count_params of the full model, before anything was cut
    pipeline: PipelineEngine | None = None
    reducer: GradReducer | None = None  # native engine only
    optimizer: DataParallelOptimizer | None = None


def parallelize(model_cfg: ModelConfig, cfg: TrainConfig, mesh: Mesh, device: torch.device, compute: str,
                trainable: bool = True, init_seed: int | None = None) -> Parallelized:
    """This rank's share of a `model_cfg` model under cfg's layout (see the module docstring).
    init_seed None: drawn from torch's global generator, as `Transformer(model_cfg)` draws it, so
    after the same torch.manual_seed every rank (and one process) gets the same weights."""
    par = cfg.parallel
    with torch.device("meta"):
        model = Transformer(model_cfg, init_seed=init_seed)
    counts = count_params(model)
    if compute == "fp8":
        apply_fp8(model)
    fp8_dispatch = par.dispatch_dtype == "fp8" or (par.dispatch_dtype == "auto" and compute == "fp8")
    enable_expert_parallel(model, mesh, cfg.launch.gpus_per_node, par.max_nodes_per_token, fp8_dispatch)
    pipeline = PipelineEngine(model, cfg, mesh) if par.pp > 1 else None
    model.to_empty(device=device)
    model.init_weights()
    built = Parallelized(model, counts, pipeline)
    if not trainable:
        model.requires_grad_(False)
    elif cfg.engine.name == "native":
        built.reducer = GradReducer(model, mesh, par.bucket_mb, zero=par.zero1,
                                    reduce_dtype=par.grad_reduce_dtype)
        built.optimizer = DataParallelOptimizer(model, cfg.optim, mesh, cfg.precision.moment_dtype,
                                                zero=par.zero1, bucket_mb=par.bucket_mb,
                                                pp_copies=pipeline.copies if pipeline else None,
                                                reducer=built.reducer)
    return built
