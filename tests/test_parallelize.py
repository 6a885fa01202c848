"""Build only what a rank holds (DESIGN.md rule 11): parallelize() constructs on meta and
materialises this rank's stages and experts, and every layout starts from the global weights a
single process initialises on the same device type.

One spawn of 4 gloo ranks builds three layouts in turn (ep=4; pp=2 x ep=2; DualPipeV pp=2 with
dp=2). Each rank returns its tensors, its experts' global offset, and the bytes it materialised
off the meta device while building; the test compares them with one process's model and with
duet-plan's independent per-rank parameter count (launch/dry_run.rank_holdings).
"""

from __future__ import annotations

import dataclasses

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
