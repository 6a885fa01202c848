"""`duet-train --dry-run`: what each rank of a layout would hold, without allocating it.

The model is built on the meta device (shapes only), split into the schedule's pipeline
stages the way the pipeline engine splits it, and counted per pipeline rank; ranks that differ
only in their data-parallel coordinate hold identical shapes, so one row per pipeline rank
describes all of them. Memory counts FP32 weights and gradients plus AdamW state (an FP32
master for non-FP32 weights is not needed: duet keeps FP32 weights), sharded over dp (dense) or
edp (experts) under ZeRO-1. Activations depend on the schedule and are left to `duet-plan`,
which builds on `rank_holdings` here.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class RankHolding:
    """Parameters one pipeline rank holds (every dp rank of it alike). `expert` counts the routed
    experts of its blocks in full; each ep rank keeps expert // ep of them."""

    rank: int
    stage_ids: list[int]
    blocks: list[tuple[int, int]]  # [lo, hi) of each held stage, in stage_ids order
    dense: int = 0  # attention, dense FFNs, shared experts, routers, norms
    expert: int = 0  # routed experts, MTP's included
    embed_head: int = 0  # embedding, final norm and output head (tied copies counted once)
    mtp: int = 0  # MTP modules without their routed experts

    @property
    def params(self) -> int:
        return self.dense + self.expert + self.embed_head + self.mtp


def _kind(name: str) -> str:
    if ".experts." in name:
        return "expert"
    if name.startswith(("embed.", "head.", "norm.", "mtp_embed.")):
        return "embed_head"
    return "mtp" if name.startswith("mtp.") else "dense"


def build_stages(cfg: TrainConfig, model=None):
    """(model, stages, schedule name) as the pipeline engine would split them, on meta."""
    from framework.model import Transformer
    from parallel.pipeline.engine import balanced_layers

    par = cfg.parallel
    if model is None:
        with torch.device("meta"):
            model = Transformer(cfg.model)
    schedule = par.schedule if par.pp > 1 else "none"
    n_stages = par.pp * (2 if par.schedule == "dualpipev" else 1) if par.pp > 1 else 1
    if n_stages == 1:
        return model, [model], schedule
    layers = list(par.layers_per_stage) or balanced_layers(model, n_stages)
    return model, model.split_stages(n_stages, layers), schedule


def rank_holdings(cfg: TrainConfig, model=None) -> list[RankHolding]:
    """One RankHolding per pipeline rank; a tensor shared by a rank's stages (the MTP's tie of
    the embedding when one rank holds the first and last stage) is counted once."""
    _, stages, schedule = build_stages(cfg, model)
    rows = []
    for pp_rank in range(cfg.parallel.pp):
        ids = stage_ids_of_rank(pp_rank, cfg.parallel.pp, schedule) if len(stages) > 1 else [0]
        row = RankHolding(pp_rank, ids, [getattr(stages[s], "layer_range", (0, cfg.model.n_layers))
                                         for s in ids])
        seen: set[int] = set()
        for sid in ids:
            for name, p in stages[sid].named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    kind = _kind(name)
                    setattr(row, kind, getattr(row, kind) + p.numel())
        rows.append(row)
    return rows


def dry_run_report(cfg: TrainConfig) -> str:
    from framework.model import Transformer, count_params

    par = cfg.parallel
    with torch.device("meta"):
        model = Transformer(cfg.model)
    counts = count_params(model)
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
    for row in rank_holdings(cfg, model):
        dense = row.dense + row.embed_head + row.mtp
        expert_local = row.expert // par.ep
        weights_grads = (dense + expert_local) * 8 / GiB
        optimizer = (dense / dp_shard + expert_local / edp_shard) * 2 * moment_bytes / GiB
        blocks = "/".join(f"{lo}-{hi - 1}" for lo, hi in row.blocks)
        stage_list = ",".join(map(str, sorted(set(row.stage_ids))))
        lines.append(f"{row.rank:>7}  {stage_list:>8}  {blocks:>12}  "
                     f"{dense:>16,}  {expert_local:>16,}  {weights_grads:>17.2f}  {optimizer:>13.2f}")
    lines.append(f"(each row holds for all {par.dp} dp ranks of that pipeline rank; experts split "
                 f"{par.ep} ways)")
    return "\n".join(lines)
