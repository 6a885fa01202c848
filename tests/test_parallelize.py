"""Build only what a rank holds (DESIGN.md rule 11): parallelize() constructs on meta and
materialises this rank's stages and experts, and every layout starts from the global weights a
single process initialises on the same device type.

One spawn of 4 gloo ranks builds three layouts in turn (ep=4; pp=2 x ep=2; DualPipeV pp=2 with
dp=2). Each rank returns its tensors, its experts' global offset, and the bytes it materialised
off the meta device while building; the test compares them with one process's model and with
duet-plan's independent per-rank parameter count (launch/dry_run.rank_holdings). Then each rank
builds each layout again to train (ZeRO-1) and counts the bytes of every tensor storage alive in
the process after construction, after the first and the second step, and after the model is
dropped: what a rank holds follows its share, stays put from step to step, and goes with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from framework.config import ModelConfig, ParallelConfig, TrainConfig
from framework.model import Transformer
from launch.dry_run import rank_holdings
from launch.ranks import run_ranks

SEED = 1234
LAYOUTS = {  # name -> parallel settings on 4 ranks
    "ep4": dict(dp=4, ep=4),
    "pp2_ep2": dict(pp=2, dp=2, ep=2, schedule="1f1b", micro_batches=2),
    "dualpipev_pp2": dict(pp=2, dp=2, ep=1, schedule="dualpipev", micro_batches=4),
}


def model_cfg() -> ModelConfig:
    """Small, with most weights in routed experts (16 of them), so sharding shows in bytes."""
    return ModelConfig(name="parallelize-test", vocab_size=128, dim=32, n_layers=4, n_dense_layers=1,
                       dense_inter_dim=64, max_seq_len=16, n_heads=2, q_lora_rank=16, kv_lora_rank=16,
                       qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=16,
                       n_shared_experts=1, n_activated_experts=2, moe_inter_dim=64, n_expert_groups=1,
                       n_limited_groups=1, mtp_depth=1)


def train_cfg(layout: str) -> TrainConfig:
    cfg = TrainConfig(seed=SEED, device="cpu")
    cfg.model = model_cfg()
    cfg.parallel = dataclasses.replace(ParallelConfig(), **LAYOUTS[layout])
    cfg.data.seq_len, cfg.data.batch_size = 16, 8
    return cfg


class MaterialisedBytes(TorchDispatchMode):
    """Bytes of every new storage an op creates off the meta device (views and in-place ops
    create none), so temporaries count too: an upper bound of what construction allocates."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes, self._seen = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self._seen and storage.nbytes():
                    self._seen.add(key)
                    self.bytes += storage.nbytes()
        return out


def held_bytes() -> int:
    """Bytes of every distinct tensor storage alive in this process off the meta device: whatever
    holds them (the model, the engine, a forgotten cache), they count."""
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def held_while_training(cfg: TrainConfig, mesh) -> dict[str, int]:
    """Bytes held beyond the baseline: built, after steps 1 and 2, and once everything is dropped."""
    from parallel.parallelize import parallelize

    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, zero1=True))
    torch.manual_seed(SEED)
    base = held_bytes()
    built = parallelize(cfg.model, cfg, mesh, torch.device("cpu"), "fp32")
    out = {"built": held_bytes() - base}

    def step() -> None:  # the trainer's step: its locals (loss, graph) go when it returns
        rows = cfg.data.batch_size // mesh.dp
        inputs, targets = torch.randint(0, 128, (2, rows, cfg.data.seq_len))
        engine = built.engine
        with engine.accumulate():
            if built.pipeline is not None:
                built.pipeline.train(inputs, targets, torch.device("cpu"), contextlib.nullcontext)
            else:
                engine.backward(engine.forward(inputs, targets)[0])
        assert engine.step(1.0, True)[1]

    for k in (1, 2):
        step()
        out[f"step{k}"] = held_bytes() - base
    del built
    out["dropped"] = held_bytes() - base
    return out


def build_worker(rank: int, world: int) -> dict:
    from parallel.mesh import Layout, build_mesh
    from parallel.parallelize import parallelize

    out = {}
    for layout in LAYOUTS:
        cfg = train_cfg(layout)
        mesh = build_mesh(Layout.from_config(cfg.parallel))
        torch.manual_seed(SEED)  # as the trainer does before parallelize
        with MaterialisedBytes() as counter:
            built = parallelize(cfg.model, cfg, mesh, torch.device("cpu"), "fp32", trainable=False)
        model = built.model
        firsts = {name: m.first_expert for name, m in model.named_modules() if hasattr(m, "first_expert")}
        tensors = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
        out[layout] = {"tensors": tensors, "firsts": firsts, "bytes": counter.bytes,
                       "pp_rank": mesh.pp_rank, "ep": mesh.ep, "counts": built.counts}
        del built, model
        out[layout]["held"] = held_while_training(cfg, mesh)
    return out


@pytest.fixture(scope="module")
def built():
    return run_ranks(build_worker, 4, timeout_s=300)


def reference() -> dict[str, torch.Tensor]:
    torch.manual_seed(SEED)  # one process, built and initialised on the CPU, as a script would
    model = Transformer(model_cfg())
    return {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()]}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_starts_from_the_single_process_weights(built, layout):
    ref = reference()
    covered: dict[str, set[int]] = {}
    for rank in built:
        got = rank[layout]
        for name, t in got["tensors"].items():
            want = ref[name]
            if ".experts.w" in name:  # a block of the layer's experts, by global id
                first = got["firsts"][name.rsplit(".", 1)[0]]
                want = want[first:first + t.shape[0]]
                covered.setdefault(name, set()).update(range(first, first + t.shape[0]))
            else:
                covered.setdefault(name, set()).add(0)
            assert torch.equal(t, want), (layout, name)
    assert set(covered) == set(ref), (layout, set(ref) - set(covered))  # every tensor lives somewhere
    for name, ids in covered.items():
        if ".experts.w" in name:
            assert ids == set(range(ref[name].shape[0])), (layout, name)  # every expert too


def test_construction_materialises_only_the_rank_share(built):
    cfg = train_cfg("pp2_ep2")
    holdings = rank_holdings(cfg)  # duet-plan's count, from the model on meta
    with torch.device("meta"):
        full = Transformer(cfg.model)
    full_bytes = sum(t.numel() * t.element_size() for t in [*full.parameters(), *full.buffers()])
    for rank in built:
        got = rank["pp2_ep2"]
        row = holdings[got["pp_rank"]]
        share = 4 * (row.dense + row.embed_head + row.mtp + row.expert // got["ep"])  # fp32 weights
        # Allowed beyond the share: the routers' fp32 balancing buffers and a few small temporaries.
        margin = 2 * 4 * cfg.model.n_routed_experts * (cfg.model.n_layers + cfg.model.mtp_depth) + 4096
        assert share <= got["bytes"] <= share + margin, (got["bytes"], share)
        assert full_bytes >= 3 * share, (full_bytes, share)
        # the full model's counts, not the share's (MTP counted apart, its shared embedding once)
        assert got["counts"]["total"] + got["counts"]["mtp"] == sum(p.numel() for p in full.parameters())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_holds_the_rank_share_step_after_step(built, layout):
    """ZeRO-1, fp32. Per rank, with D its non-expert and E its expert parameters (duet-plan's
    count) and n_D = dp, n_E = dp / ep the ranks that share their optimizer state, the design says:
        weights                      4 (D + E)
        flat gradient buffers        4 (D + E)     (one per bucket: the reduce-scatter's input)
        reduce-scatter outputs       4 (D/n_D + E/n_E)
        AdamW moments (ZeRO-1)       8 (D/n_D + E/n_E)
    (.grad is freed after each step). Allowed beyond it: the model's buffers (the routers'
    balancing state, counted from the model on meta) and 2 KiB of step counters and the step's
    token ids, which the pipeline runtime keeps until the next step."""
    cfg = train_cfg(layout)
    holdings = rank_holdings(cfg)
    with torch.device("meta"):
        full = Transformer(cfg.model)
    par = cfg.parallel
    margin = sum(b.numel() * b.element_size() for b in full.buffers()) + 2048
    for rank in built:
        got = rank[layout]
        row = holdings[got["pp_rank"]]
        dense, expert = row.dense + row.embed_head + row.mtp, row.expert // par.ep
        shard = dense / par.dp + expert / (par.dp // par.ep)
        weights = 4 * (dense + expert)
        expected = 2 * weights + 4 * shard + 8 * shard
        held = got["held"]
        assert expected <= held["step1"] <= expected + margin, (layout, held, expected)
        assert held["step2"] == held["step1"], (layout, held)  # nothing accumulates from step to step
        assert held["built"] <= held["step1"], (layout, held)
        assert held["dropped"] == 0, (layout, held)  # a discarded model (a reference, a student) is gone
