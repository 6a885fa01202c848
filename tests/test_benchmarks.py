"""The benchmark scripts still run (speed itself is never asserted: DESIGN.md rule 8)."""

from benchmarks import trainer_overhead


def test_trainer_overhead_benchmark_runs_and_reports_a_ratio(corpus, capsys):
    result = trainer_overhead.main(["--steps", "2", "--rounds", "1", f"data.source={corpus}",
                                    "data.tokenizer=byte", "model.vocab_size=256", "data.seq_len=32",
                                    "data.batch_size=4"])
    out = capsys.readouterr().out
    assert result["ratio"] > 0 and result["duet_tokens_per_s"] > 0
    assert "ratio duet/bare" in out


def test_fp8_gemm_benchmark_says_when_no_gpu_was_measured(capsys):
    from benchmarks import fp8_gemm

    fp8_gemm.main(["--reps", "1"])
    out = capsys.readouterr().out
    assert "NO GPU FIGURES WERE MEASURED" in out and "duet torch reference" in out


def test_ep_overlap_benchmark_reports_exposed_comm_and_dedup_bytes(capsys):
    from benchmarks import ep_overlap

    result = ep_overlap.main(["--quick"])
    out = capsys.readouterr().out
    assert result["serial_exposed_ms"] > 0 and result["hidden_fraction"] <= 1
    for ranks in (4, 8):
        b = result["bytes_per_token"][ranks]
        assert b["dedup"] <= b["per_expert"]
    assert ep_overlap.TABLE_HEADING in out


def test_pipeline_bubble_benchmark_measures_every_schedule_and_draws_a_timeline(tmp_path, capsys):
    from benchmarks import pipeline_bubble

    result = pipeline_bubble.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert set(result["schedules"]) == {"gpipe", "1f1b", "dualpipe", "dualpipev"}
    for entry in result["schedules"].values():
        assert entry["step_ms"] > 0 and entry["sim_step_ms"] > 0 and entry["bubble_max_ms"] > 0
    assert result["dualpipe_vs_1f1b"] > 0 and "DualPipe step / 1F1B step" in out
    from matplotlib.image import imread

    from framework.plots import timeline_height

    for name in pipeline_bubble.DRAWN:  # --quick: pp 2, drawn 1200 pixels wide
        png = tmp_path / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in result["files"]
        assert imread(png).shape[:2] == (timeline_height(2), 1200)
        assert (tmp_path / f"{name}.trace.json").exists()


def test_peers_benchmark_runs_both_models_at_the_same_size_and_names_the_allocator(tmp_path, capsys):
    """benchmarks/peers.py against transformers (which a transformers release that shadowed a package
    of ours once broke): the same 33,014,016 parameters on both sides (torchtitan's count for the
    debug model, ANCHORS.md), a ratio over the best peer, and the allocator in the header."""
    from benchmarks import peers

    result = peers.main(["--quick"])
    out = capsys.readouterr().out
    (shape,) = result["results"]
    assert set(shape["params"].values()) == {33_014_016}
    best = shape["contenders"][shape["best_peer"]]["tok_s_median"]
    assert shape["ratio_median"] == shape["contenders"][f"duet {result['compute']}"]["tok_s_median"] / best
    assert f", {result['malloc']}; speed is never asserted" in out
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert peers.malloc_in_use(str(maps)) == "glibc malloc"
    maps.write_text("7f00-7f01 r-xp 0 08:01 2 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10\n")
    assert peers.malloc_in_use(str(maps)) == "tcmalloc"
