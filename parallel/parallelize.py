"""The one place where a model meets the layout: build on meta, cut, materialise what is held.

    built = parallelize(cfg.model, cfg, mesh, device, compute)
    built.model      this rank's share on `device`: pipeline stages pruned, experts sharded
    built.counts     parameter counts of the full model
    built.pipeline   the PipelineEngine (pp > 1), else None
    built.engine     gradients, optimizer and checkpoints behind one protocol (parallel/engine.py):
                     the native engine (bucketed reduction, ZeRO-1 AdamW) or DeepSpeed's ZeRO

The order is fixed and reads top to bottom in `parallelize`:
    1. the whole model on the meta device (no memory); its initial weights are those of
       `Transformer(model_cfg)` built after the same torch.manual_seed in one process
    2. FP8 layers (precision=fp8): a class swap, still on meta
    3. expert parallelism: keep this rank's block of routed experts, install the all-to-all
       dispatcher, node-limited routing from the layout
    4. the pipeline split: keep this rank's stages (the weight-gradient split is a class swap)
    5. materialise only what is left, directly on `device`, and initialise it: weights are a
       function of (seed, global name, global expert id) (framework/model/init.py), so every
       layout starts from the global weights one process would on the same device type; or
       load them from a checkpoint (`weights_from`, any layout's)
    6. data parallelism: the engine of cfg.engine.name over this share (trainable=True only)
A second model of the same layout (a frozen reference, a student) comes from another call with
trainable=False: steps 1-5, parameters frozen, no engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from framework.config import ModelConfig, TrainConfig
from framework.fp8 import apply_fp8
from framework.model import Transformer, count_params
from parallel.engine import Engine, NativeEngine, load_weights
from parallel.expert_parallel import enable_expert_parallel
from parallel.mesh import Mesh
from parallel.pipeline.engine import PipelineEngine


@dataclass
class Parallelized:
    model: Transformer  # this rank's share on its device
    counts: dict[str, int]  # count_params of the full model, before anything was cut
    pipeline: PipelineEngine | None = None
    engine: Engine | None = None  # trainable=True only


def build_engine(model: Transformer, cfg: TrainConfig, mesh: Mesh, device: torch.device,
                 pipeline: PipelineEngine | None) -> Engine:
    if cfg.engine.name == "deepspeed":  # imported only when chosen (config.py refuses it with pp > 1)
        from parallel.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, mesh, device)
    return NativeEngine(model, cfg, mesh, pipeline)


def parallelize(model_cfg: ModelConfig, cfg: TrainConfig, mesh: Mesh, device: torch.device, compute: str,
                trainable: bool = True, init_seed: int | None = None,
                weights_from: Path | None = None) -> Parallelized:
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
    if weights_from is not None:
        load_weights(model, weights_from, mesh)
    built = Parallelized(model, counts, pipeline)
    if not trainable:
        model.requires_grad_(False)
    else:
        built.engine = build_engine(model, cfg, mesh, device, pipeline)
    return built
