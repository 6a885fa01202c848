"""`duet-plan`: plan a layout on a cluster before having it - per pipeline rank parameters,
memory, communication, and a roofline time per step, on one CPU in seconds.

    duet-plan model=deepseek_v3 parallel=deepseek_v3 cluster=h800 data.seq_len=4096 data.batch_size=15360
    duet-plan model=small parallel.dp=8 parallel.ep=8 cluster=h100 precision=bf16
    duet-plan ... model.recompute=full        # none, selective (DeepSeek-V3's choices) or full: the run's key

Overrides are duet-train's (the same Hydra tree) plus the `cluster` group (h800, h100, h200).
Precision defaults to fp8 here (the clusters planned for are Hopper, and fp8 is V3's recipe);
give precision=bf16 to plan BF16. After the plan come the same figures for a 1F1B schedule and
for the other precision. A layout whose ranks do not fit the GPU's memory exits with status 2
and one line naming the rank and its largest item. What is exact and what is modelled:
launch/planner.py.
"""

from __future__ import annotations

import sys

from launch.planner import Plan, plan

PUBLISHED_V3_GPU_HOURS = 180_000  # H800 GPU-hours per trillion tokens (ANCHORS.md)
USAGE = __doc__.split("\n\n", 2)[1]


def _fail(line: str) -> int:
    print(f"duet-plan: error: {line}", file=sys.stderr)
    return 2


def _gb(x: float) -> str:
    return f"{x / 1e9:.1f}"


def cluster_problems(cfg) -> list[str]:
    cl = cfg.cluster
    p = [f"cluster.{k}={getattr(cl, k)}: must be positive" for k in
         ("memory_gib", "nvlink_gbps", "ib_gbps", "bf16_tflops", "fp8_tflops", "gemm_efficiency",
          "attention_efficiency") if not getattr(cl, k) > 0]
    p += [f"cluster.{k}={getattr(cl, k)}: must lie in [0, 1)" for k in ("comm_sm_share",)
          if not 0 <= getattr(cl, k) < 1]
    p += [f"cluster.{k}={getattr(cl, k)}: must be >= 0" for k in ("reserved_gib", "other_overhead")
          if getattr(cl, k) < 0]
    return p


def report(p: Plan) -> str:
    cfg, par, m = p.cfg, p.cfg.parallel, p.cfg.model
    from framework.model import count_params
    from launch.planner import activation_items

    g = cfg.launch.gpus_per_node
    counts = count_params(m)
    mirrors = 2 if p.schedule == "dualpipe" else 1
    held = sum(rp.holding.params for rp in p.ranks)
    lines = [
        f"duet-plan: {m.name} on {p.world} x {cfg.cluster.name} ({max(1, p.world // g)} nodes of {g}): "
        f"pp {par.pp} x dp {par.dp}, ep {par.ep} (edp {par.dp // par.ep}), {p.schedule}, "
        f"{par.micro_batches} micro-batches of {p.tokens_per_micro_batch:,} tokens, precision "
        f"{cfg.precision.compute}, moments {cfg.precision.moment_dtype}, recompute {p.recompute}",
        f"parameters: {counts['total']:,} + MTP {counts['mtp']:,} (exact, meta device); the ranks hold "
        f"{held:,} = {held / (counts['total'] + counts['mtp']):.2f}x" + (" (DualPipe's mirror copies)"
                                                                         if mirrors == 2 else ""),
        "",
        "per pipeline rank (each of its dp ranks alike); parameters in millions, expert = this rank's "
        "1/ep share; memory GiB; communication GB sent per step",
        f"{'rank':>4} {'stages':>6} {'blocks':>11} {'dense':>7} {'expert':>7} {'emb/head':>8} {'MTP':>6} | "
        f"{'weights':>7} {'grads':>6} {'optim':>6} {'act':>6} {'live':>4} {'total':>6} | "
        f"{'PP':>6} {'EP':>7} {'DP':>6}",
    ]
    for rp in p.ranks:
        h, mem = rp.holding, list(rp.memory.values())
        blocks = "/".join(f"{lo}-{hi - 1}" for lo, hi in h.blocks)
        stages = ",".join(map(str, sorted(set(h.stage_ids))))
        lines.append(
            f"{h.rank:>4} {stages:>6} {blocks:>11} {h.dense / 1e6:>7,.0f} {h.expert / par.ep / 1e6:>7,.0f} "
            f"{h.embed_head / 1e6:>8,.0f} {h.mtp / 1e6:>6,.0f} | {mem[0]:>7.1f} {mem[1]:>6.1f} "
            f"{mem[2]:>6.1f} {mem[3]:>6.1f} {rp.peak_live:>4} {rp.total_gib:>6.1f} | "
            f"{_gb(rp.pp_bytes):>6} {_gb(rp.ep_bytes):>7} {_gb(rp.dp_bytes):>6}")
    worst = max(p.ranks, key=lambda rp: rp.total_gib)
    lines.append(f"memory: largest {worst.total_gib:.1f} GiB on rank {worst.holding.rank} of "
                 f"{cfg.cluster.memory_gib:.0f} GiB (incl. {cfg.cluster.reserved_gib:.0f} GiB reserved); "
                 f"live = the simulator's most live micro-batches (activations weigh each by its stage)")
    items = activation_items(m, cfg.precision.compute, p.recompute, True)
    lines.append(f"activations per token and MoE block: {sum(items.values()):,} B = "
                 + " + ".join(f"{k} {v:,}" for k, v in items.items() if v))
    if p.ep is not None and p.traffic is not None:
        e, t = p.ep, p.traffic
        lines.append(
            f"expert parallel, per token and MoE layer: {e.rows:.2f} ranks reached ({e.self_rows:.2f} own, "
            f"{e.intra_rows:.2f} same node, {e.inter_rows:.2f} other nodes = {e.inter_share:.0%} of moved "
            f"rows; {e.remote_nodes:.2f} other nodes); dispatch {t.dispatch_bytes / 1e3:.1f} KB, combine "
            f"{t.combine_bytes / 1e3:.1f} KB; InfiniBand {t.ib_bytes / 1e3:.1f} KB"
            + (f" with DeepEP's node forwarding ({t.ib_bytes_per_rank / 1e3:.1f} KB per-rank all-to-all)"
               if par.max_nodes_per_token > 0 else ""))
    cl = cfg.cluster
    lines += [
        f"time per step (roofline; GEMM {cl.gemm_efficiency:.0%} and attention {cl.attention_efficiency:.0%} "
        f"of peak, +{cl.other_overhead:.0%} non-GEMM, {cl.comm_sm_share:.0%} of SMs to overlapped "
        f"communication, NVLink {cl.nvlink_gbps:.0f} / IB {cl.ib_gbps:.0f} GB/s): compute {p.compute_s:.2f} s"
        f" + exposed EP {p.exposed_ep_s:.2f} s + bubble {p.bubble_s:.2f} s (simulator) + DP {p.dp_s:.2f} s"
        f" = {p.step_s:.2f} s (critical rank {p.critical_rank})",
        f"throughput: {p.tokens_per_s_gpu:,.0f} tokens/s/GPU, MFU {p.mfu:.1%} (of BF16 {cl.bf16_tflops:.0f} "
        f"TFLOPS), {p.gpu_hours_per_trillion:,.0f} GPU-hours per trillion tokens" + _published(p),
    ]
    return "\n".join(lines)


def _published(p: Plan) -> str:
    if p.cfg.model.name != "deepseek_v3":
        return ""
    return (f"; published DeepSeek-V3: {PUBLISHED_V3_GPU_HOURS:,} on H800 "
            f"(ratio {p.gpu_hours_per_trillion / PUBLISHED_V3_GPU_HOURS:.2f})")


def _row(label: str, p: Plan) -> str:
    worst = max(rp.total_gib for rp in p.ranks)
    fits = "yes" if p.largest_over() is None else "NO"
    ratio = (f"{p.gpu_hours_per_trillion / PUBLISHED_V3_GPU_HOURS:>7.2f}"
             if p.cfg.model.name == "deepseek_v3" else f"{'-':>7}")
    return (f"{label:<22} {fits:>4} {worst:>7.1f} {p.step_s:>7.2f} {p.bubble_s:>6.2f} "
            f"{p.tokens_per_s_gpu:>9,.0f} {p.mfu:>6.1%} {p.gpu_hours_per_trillion:>9,.0f} {ratio}")


def main(argv: list[str] | None = None) -> int:
    from framework.config import validate
    from launch.run import ConfigError, compose

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    if any(a.startswith("-") for a in args):
        return _fail(f"unknown option {next(a for a in args if a.startswith('-'))}; use key=value "
                     "overrides (model.recompute=full, ...) or --help")
    if not any(a.startswith(("precision=", "precision.compute=")) for a in args):
        args = ["precision=fp8", *args]
    try:
        cfg = compose(args)
    except ConfigError as err:
        return _fail(str(err))
    problems = validate(cfg) + cluster_problems(cfg)
    if problems:
        return _fail(problems[0])
    import torch

    from framework.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg.model)  # one meta build serves the plan and every variant
    main_plan = plan(cfg, model=model)
    print(report(main_plan))
    other = "bf16" if cfg.precision.compute == "fp8" else "fp8"
    variants = [(f"as planned ({main_plan.schedule})", args)]
    if main_plan.schedule != "1f1b" and cfg.parallel.pp > 1:
        variants.append(("schedule 1f1b", [*args, "parallel.schedule=1f1b"]))
    variants.append((f"precision {other}", [*args, f"precision={other}"]))
    print(f"\n{'variant':<22} {'fits':>4} {'max GiB':>7} {'step s':>7} {'bubble':>6} {'tok/s/GPU':>9} "
          f"{'MFU':>6} {'GPU-h/1T':>9} {'vs 180K':>7}")
    for label, overrides in variants:
        vcfg = compose(overrides) if overrides is not args else cfg
        bad = validate(vcfg)
        print(_row(label, plan(vcfg, model=model)) if not bad else f"{label:<22} invalid: {bad[0]}")
    over = main_plan.largest_over()
    if over is not None:
        rp, item = over
        return _fail(f"pipeline rank {rp.holding.rank} needs {rp.total_gib:.1f} GiB of the "
                     f"{cfg.cluster.name}'s {cfg.cluster.memory_gib:.0f} GiB; its largest item is {item} at "
                     f"{rp.memory[item]:.1f} GiB - add pipeline stages or micro-batches, raise ep, or "
                     "recompute more (model.recompute=full)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
