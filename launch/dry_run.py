"""`duet-train --dry-run`: what each rank of a layout would hold, without allocating it.

The model is built on the meta device (shapes only), split into the schedule's pipeline
stages, and counted per pipeline rank; ranks that differ only in their data-parallel
coordinate hold identical shapes, so one row per pipeline rank describes all of them.
Memory counts FP32 weights and gradients plus AdamW state (an FP32 master for non-FP32
weights is not needed: duet keeps FP32 weights), sharded over dp (dense) or edp (experts)
under ZeRO-1. Activations depend on the schedule and are left to `duet-plan`.
"""

from __future__ import annotations

import torch

from framework.config import TrainConfig, world_size

GiB = 2**30


def stage_ids_of_rank(rank: int, pp: int, schedule: str) -> list[int]:
    """Pipeline stages held by pipeline rank `rank` (ANCHORS.md: DualPipe and DualPipeV)."""
    if schedule == "dualpipe":
        return [rank, pp - 1 - rank]  # mirror copies: two stages' weights on every rank
    if schedule == "dualpipev":
        return [rank, 2 * pp - 1 - rank]  # 2P stages, the V turns on the last rank
    return [rank]


def _count(module: torch.nn.Module) -> tuple[int, int]:
    dense = expert = 0
    for name, p in module.named_parameters():
        if ".experts." in name:
            expert += p.numel()
        else:
            dense += p.numel()
    return dense, expert


def dry_run_report(cfg: TrainConfig) -> str:
    from framework.model import Transformer, count_params

    par = cfg.parallel
    with torch.device("meta"):
        model = Transformer(cfg.model)
    counts = count_params(model)
    n_stages = par.pp * (2 if par.schedule == "dualpipev" else 1)
    stages = model.split_stages(n_stages) if par.pp > 1 else [model]
    schedule = par.schedule if par.pp > 1 else "none"
    moment_bytes = 2 if cfg.precision.moment_dtype == "bf16" else 4
    dp_shard = par.dp if par.zero1 else 1
    edp_shard = par.dp // par.ep if par.zero1 else 1
    lines = [
        f"model {cfg.model.name}: {counts['total']:,} parameters ({counts['activated']:,} activated "
        f"per token), MTP {counts['mtp']:,}",
        f"layout: world {world_size(cfg)} = pp {par.pp} x dp {par.dp}; ep {par.ep} inside dp "
        f"(edp {par.dp // par.ep}); schedule {schedule}; ZeRO-1 {'on' if par.zero1 else 'off'}",
        f"batch: {cfg.data.batch_size} sequences x {cfg.data.seq_len} tokens per step, "
        f"{cfg.data.batch_size // par.dp} per dp rank in {par.micro_batches} micro-batches",
        "rank r = pp_rank * dp + dp_rank; ep_rank = dp_rank % ep; edp_rank = dp_rank // ep",
        "",
        f"{'pp rank':>7}  {'stages':>8}  {'blocks':>12}  {'dense params':>16}  "
        f"{'expert params':>16}  {'weights+grads GiB':>17}  {'optimizer GiB':>13}",
    ]
    for pp_rank in range(par.pp):
        dense = expert = 0
        blocks = []
        seen: set[int] = set()
        for sid in stage_ids_of_rank(pp_rank, par.pp, schedule):
            stage = stages[sid]
            d, e = _count(stage)
            dense, expert = dense + d, expert + e
            lo, hi = getattr(stage, "layer_range", (0, cfg.model.n_layers))
            blocks.append(f"{lo}-{hi - 1}")
            seen.add(sid)
        expert_local = expert // par.ep
        params = dense + expert_local
        weights_grads = params * 8 / GiB
        optimizer = (dense / dp_shard + expert_local / edp_shard) * 2 * moment_bytes / GiB
        lines.append(f"{pp_rank:>7}  {','.join(map(str, sorted(seen))):>8}  {'/'.join(blocks):>12}  "
                     f"{dense:>16,}  {expert_local:>16,}  {weights_grads:>17.2f}  {optimizer:>13.2f}")
    lines.append(f"(each row holds for all {par.dp} dp ranks of that pipeline rank; experts split "
                 f"{par.ep} ways)")
    return "\n".join(lines)
