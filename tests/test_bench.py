"""duet-bench --quick writes a report with valid PNGs of the expected sizes (timings are never asserted)."""

import numpy as np
import torch
from matplotlib.image import imread

from benchmarks.bench import main
from framework.plots import COLOURS, timeline_height


def test_quick_bench_writes_report_and_png(tmp_path, capsys):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "## Pipeline schedules on paper" in report and "failed:" not in report
    pngs = {p.name: p for p in tmp_path.glob("*.png")}
    sims = {"sim_1f1b.png", "sim_dualpipe.png", "sim_dualpipev.png"}
    assert sims <= set(pngs) and "alltoall_busbw.png" in pngs
    assert all(f"]({name})" in report for name in pngs if name.startswith("sim_"))
    for name, path in pngs.items():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        img = (imread(path)[..., :3] * 255).round().astype(int)  # decoded by Pillow
        if name in sims:  # --quick: pp=4 timelines, 1200 pixels wide; forwards drawn in their colour
            assert img.shape == (timeline_height(4), 1200, 3), name
            assert (np.abs(img - COLOURS["F0"]).sum(axis=2) == 0).sum() > 1000, name
        elif name == "alltoall_busbw.png":
            assert img.shape == (420, 900, 3)
        assert len(np.unique(img.reshape(-1, 3), axis=0)) > 10, name  # something was drawn
    assert "duet-bench [1/" in capsys.readouterr().out  # progress shown


def test_alltoall_bandwidth_counts_the_bytes_it_moved():
    from benchmarks import alltoall_bw

    r = alltoall_bw.main(["--quick"])  # 2 gloo ranks, 256 tokens x 256 bf16, top-8 of 256 experts
    ranks, tokens, dim, topk, experts = 2, 256, 256, 8, 256
    for e in r["sizes"]:
        assert abs(e["algbw_gbps"] - e["bytes"] / (e["ms"] / 1e3) / 1e9) < 1e-6 * e["algbw_gbps"]
        assert abs(e["busbw_gbps"] - e["algbw_gbps"] * (ranks - 1) / ranks) < 1e-9
    # Independent count of the dispatch payload: each rank sends a token once to every rank
    # owning one of its experts (dedup), dim bf16 values per row; the largest rank is reported.
    rows = []
    for rank in range(ranks):
        gen = torch.Generator().manual_seed(100 + rank)  # the benchmark's routing inputs
        torch.randn(tokens, dim, generator=gen)
        idx = torch.rand(tokens, experts, generator=gen).topk(topk, dim=1).indices
        owner = idx // (experts // ranks)
        rows.append(sum(len(set(row.tolist())) for row in owner))
    assert r["payload_bytes"] == max(rows) * dim * 2
    assert abs(r["rows_per_token"] - sum(rows) / ranks / tokens) < 1e-9
    assert r["dispatcher_ms"] > 0 and r["raw_same_bytes_ms"] > 0


def test_throughput_reports_tokens_and_flops_of_the_preset():
    from benchmarks import throughput

    r = throughput.main(["--quick"])  # tiny preset, fp32 on CPU
    (run,) = r["runs"]
    seq = 128  # configs/data/stdlib.yaml, batch 16
    assert run["tokens_per_step"] == 16 * seq
    assert run["flops_per_token"] == 7_292_928  # tests/test_speed_paths.py counts it by hand
    tokens = run["tokens_per_s"] * run["step_ms"] / 1e3
    assert abs(tokens - run["tokens_per_step"]) < 1e-6 * run["tokens_per_step"]
    assert abs(run["model_tflops"] - run["tokens_per_s"] * run["flops_per_token"] / 1e12) < 1e-12
    assert abs(run["of_matmul_ceiling"] - run["model_tflops"] / r["matmul_tflops"]) < 1e-12
    assert r["datasheet_bf16_tflops"] is None and run["mfu"] is None  # no GPU: no MFU claimed
