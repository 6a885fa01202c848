"""FP8 autotuning (duet_kernels/fp8/tuning.py): keys bucketed to powers of two, no tuning inside a
multi-rank step, and the number of distinct keys a recorded 50-step run touches."""

from __future__ import annotations

import importlib

import torch

# By module path: the package re-exports functions named gemm and grouped_gemm.
fp8_gemm = importlib.import_module("duet_kernels.fp8.gemm")
fp8_grouped = importlib.import_module("duet_kernels.fp8.grouped_gemm")


def test_autotune_keys_bucket_the_batch_sizes():
    from duet_kernels.fp8.tuning import pow2_bucket

    assert [pow2_bucket(n) for n in (1, 16, 17, 128, 129, 1000, 1024, 1025)] == [16, 16, 32, 128, 256,
                                                                                 1024, 1024, 2048]
    # gemm: M and K (the wgrad's tokens) bucketed, N exact; grouped: M bucketed, N, K, E exact.
    def key(**sizes):
        return fp8_gemm._gemm_tuned.key(B_SCALE_ROWS=1, out="f", **sizes)

    assert key(M=300, N=96, K=700) == key(M=512, N=96, K=1024) != key(M=300, N=97, K=700)
    gkey = fp8_grouped._grouped_tuned.key
    assert gkey(M=640, N=64, K=128, E=8, out="f") == gkey(M=1024, N=64, K=128, E=8, out="f")
    assert gkey(M=640, N=64, K=128, E=8, out="f") != gkey(M=640, N=64, K=256, E=8, out="f")


def _two_rank_world(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)


def test_no_tuning_inside_a_multi_rank_step_only_in_a_warm_up(monkeypatch):
    from duet_kernels.fp8.tuning import ConfigTable, may_tune, warming_up

    configs = fp8_gemm.tuning_configs()
    table = ConfigTable("t", configs, ("M", "N"), ("M",))
    timed = []

    def bench(cfg):  # config i "takes" i + 1 ms, except config 2, the fastest
        timed.append(cfg)
        return 0.5 if cfg is configs[2] else configs.index(cfg) + 1.0

    assert may_tune()  # one process: a new key is tuned at once
    assert table.pick(table.key(M=200, N=64), bench) is configs[2] and len(timed) == len(configs)
    _two_rank_world(monkeypatch)
    assert not may_tune()
    timed.clear()
    # A new M bucket in a multi-rank step: nearest tuned M (256 -> the 256 entry), no benchmark.
    table.table[table.key(M=4096, N=64)] = configs[4]
    assert table.pick(table.key(M=300, N=64), bench) is configs[2]
    assert table.pick(table.key(M=3000, N=64), bench) is configs[4]
    assert table.pick(table.key(M=300, N=65), bench) is configs[0]  # nothing for N=65: the first config
    assert timed == [] and table.tuned == 1
    assert table.key(M=300, N=64) not in table.table  # untuned keys stay open for a warm-up
    with warming_up():
        assert may_tune()
        table.pick(table.key(M=300, N=65), bench)
    assert len(timed) == len(configs) and table.tuned == 2 and not may_tune()


def test_a_recorded_50_step_run_settles_on_few_autotune_keys():
    """Shapes of every FP8 GEMM in a 50-step precision=fp8 run of the tiny preset
    (tests/fixtures/fp8_gemm_shapes.json, recorded by tests/fixtures/make_fp8_shapes.py)."""
    import json
    from pathlib import Path

    data = json.loads((Path(__file__).parent / "fixtures" / "fp8_gemm_shapes.json").read_text())
    assert data["steps"] == 50
    rows = data["shapes"]
    tables = {"gemm": (fp8_gemm._gemm_tuned, {"B_SCALE_ROWS": 128, "out": "-"}),
              "gemm_1x128": (fp8_gemm._gemm_tuned, {"B_SCALE_ROWS": 1, "out": "-"}),
              "grouped_gemm": (fp8_grouped._grouped_tuned, {"out": "-"}),
              "k_grouped_gemm_1x128": (fp8_grouped._k_grouped_tuned, {})}
    exact, bucketed = set(), set()
    for r in rows:
        sizes = {k: v for k, v in r.items() if k not in ("op", "calls")}
        table, extra = tables[r["op"]]
        exact.add((r["op"], tuple(sorted(sizes.items()))))
        bucketed.add((r["op"], table.key(**sizes, **extra)))
    calls = sum(r["calls"] for r in rows)
    print(f"{len(exact)} exact keys -> {len(bucketed)} bucketed keys over {calls} calls")
    # Layer shapes (what the model fixes) are few; per layer shape, the batch-driven sizes span
    # a range of tokens and so a few powers of two, not one key per step.
    layer_shapes = {(r["op"], tuple(sorted((k, v) for k, v in r.items() if k in ("N", "E")))) for r in rows}
    assert len(bucketed) <= 3 * len(layer_shapes) and len(bucketed) < len(exact)
    # The expert GEMMs' padded rows vary run-long: each layer shape's keys are at most the powers
    # of two between its smallest and largest row count.
    by_layer: dict = {}
    for r in (r for r in rows if r["op"] == "grouped_gemm"):
        by_layer.setdefault((r["N"], r["K"], r["E"]), set()).add(r["M"])
    assert any(len(ms) > 2 for ms in by_layer.values())  # really varying
    for (n, k, e), ms in by_layer.items():
        keys = {fp8_grouped._grouped_tuned.key(M=m, N=n, K=k, E=e, out="-") for m in ms}
        span = (max(ms) - 1).bit_length() - (min(ms) - 1).bit_length() + 1
        assert len(keys) <= span < len(ms) or len(ms) <= 2, (n, k, e, sorted(ms))
