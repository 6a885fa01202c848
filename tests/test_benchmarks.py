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
