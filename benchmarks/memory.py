"""Memory that follows the shard: what each rank of a layout really holds, against its share.

    python -m benchmarks.memory [--pp 2] [--dp 2] [--ep 2] [--experts 64] [--quick]

Spawns pp * dp gloo ranks on this host. Each rank resets its peak resident set (Linux:
/proc/self/clear_refs), notes its resident memory as the baseline, builds its share of the
model with parallel.parallelize (on meta, then only its stages and experts on the CPU), runs one
training step (forward, backward, optimizer: gradients and AdamW state appear), and reports
    peak RSS - baseline    what construction, then construction and the step, cost this process
    share                  bytes of the weights it holds (fp32)
    full model             bytes of every weight of the model (fp32, on meta)
    plan                   duet-plan's prediction for the rank: weights, gradients, optimizer state
Numbers depend on the allocator and the host; nothing here is asserted (DESIGN.md rule 8).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses

import torch

from framework.config import ModelConfig, ParallelConfig, TrainConfig

MiB = 2**20


def _status_kib(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def train_cfg(pp: int, dp: int, ep: int, experts: int) -> TrainConfig:
    cfg = TrainConfig(seed=0, device="cpu")
    cfg.model = ModelConfig(name="memory-bench", vocab_size=2048, dim=256, n_layers=8, n_dense_layers=1,
                            dense_inter_dim=512, max_seq_len=64, n_heads=4, q_lora_rank=64, kv_lora_rank=64,
                            qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                            n_routed_experts=experts, n_shared_experts=1, n_activated_experts=4,
                            moe_inter_dim=256, n_expert_groups=1, n_limited_groups=1, mtp_depth=1)
    cfg.parallel = dataclasses.replace(ParallelConfig(), pp=pp, dp=dp, ep=ep,
                                       schedule="1f1b" if pp > 1 else "gpipe", micro_batches=2)
    cfg.data.seq_len, cfg.data.batch_size = 64, 2 * dp * 2
    return cfg


def _rank(rank: int, world: int, cfg: TrainConfig) -> dict:
    from parallel.mesh import Layout, build_mesh
    from parallel.parallelize import parallelize

    mesh = build_mesh(Layout.from_config(cfg.parallel))
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    baseline = _status_kib("VmRSS")
    built = parallelize(cfg.model, cfg, mesh, torch.device("cpu"), "fp32")
    after_build = _status_kib("VmHWM")
    share = sum(t.numel() * t.element_size() for t in [*built.model.parameters(), *built.model.buffers()])
    # One training step on this rank's share of a random batch: gradients and AdamW state appear.
    g = torch.Generator().manual_seed(mesh.dp_rank)
    rows = cfg.data.batch_size // cfg.parallel.dp
    tokens = torch.randint(0, cfg.model.vocab_size, (rows, cfg.data.seq_len + 1), generator=g)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    engine = built.engine
    with engine.accumulate():  # the trainer's step (framework/trainer.py), without its logging
        if built.pipeline is not None:
            built.pipeline.train(inputs, targets, torch.device("cpu"), contextlib.nullcontext)
        else:
            engine.backward(engine.forward(inputs, targets)[0])
    engine.step(1.0, loss_finite=True)
    return {"rank": rank, "pp_rank": mesh.pp_rank, "build_kib": after_build - baseline,
            "step_kib": _status_kib("VmHWM") - baseline, "share": share}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="16 experts")
    args = parser.parse_args(argv)
    if args.quick:
        args.experts = 16
    from launch.planner import plan
    from launch.ranks import run_ranks

    cfg = train_cfg(args.pp, args.dp, args.ep, args.experts)
    with torch.device("meta"):
        from framework.model import Transformer

        full = Transformer(cfg.model)
    full_bytes = sum(t.numel() * t.element_size() for t in [*full.parameters(), *full.buffers()])
    predicted = plan(cfg, recompute="none").ranks
    rows = run_ranks(_rank, args.pp * args.dp, cfg, timeout_s=600)
    print(f"model: {sum(p.numel() for p in full.parameters()):,} parameters, {full_bytes / MiB:.1f} MiB "
          f"fp32; layout pp={args.pp} dp={args.dp} ep={args.ep}")
    print(f"{'rank':>4} {'pp':>3} {'peak-base build MiB':>20} {'peak-base step MiB':>19} {'share MiB':>10} "
          f"{'full / share':>13} {'plan: weights+grads+optim MiB':>30}")
    for row in rows:
        mem = predicted[row["pp_rank"]].memory
        plan_mib = sum(mem[k] for k in ("weights", "gradients", "optimizer state")) * 1024
        print(f"{row['rank']:>4} {row['pp_rank']:>3} {row['build_kib'] / 1024:>20.1f} "
              f"{row['step_kib'] / 1024:>19.1f} {row['share'] / MiB:>10.1f} "
              f"{full_bytes / row['share']:>13.2f} {plan_mib:>30.1f}")
    return rows


if __name__ == "__main__":
    main()
