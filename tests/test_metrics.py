"""Observability pieces that do not need a GPU: comm counters in records, MFU peaks, NVML."""

import pytest

from framework.metrics import PEAK_TFLOPS, NvmlSampler, comm_record, flops_per_token, gpu_peak_tflops


def test_comm_record_reports_megabytes_seconds_and_wait_share():
    stats = {"all_reduce": {"calls": 3, "bytes": 3 * 2**20, "seconds": 0.5},
             "all_gather": {"calls": 1, "bytes": 2**19, "seconds": 0.25}}
    record = comm_record(stats, step_seconds=3.0)
    assert record["comm_all_reduce_mb"] == 3.0 and record["comm_all_gather_mb"] == 0.5
    assert record["comm_all_reduce_s"] == 0.5
    assert record["comm_time_share"] == pytest.approx(0.25)
    assert comm_record({}, 1.0) == {}


def test_flops_per_token_is_six_per_activated_parameter_plus_attention():
    no_attention = flops_per_token(1000, n_layers=0, n_heads=1, qk_head_dim=1, v_head_dim=1, seq_len=8)
    assert no_attention == 6000
    # one layer, one head, head dims 2+2, T=4: 6 * 4 * 4 / 2 = 48 extra
    assert flops_per_token(1000, 1, 1, 2, 2, 4) - no_attention == 48


def test_peaks_know_hopper_fp8_and_cpu_reports_none():
    assert PEAK_TFLOPS["H800"] == {"bf16": 989.0, "fp8": 1979.0}
    assert gpu_peak_tflops("bf16") is None  # no GPU here (and in CI): no MFU claimed


def test_nvml_sampler_is_inert_without_a_gpu():
    sampler = NvmlSampler(None)
    assert sampler.read() == {} and sampler.handle is None
    sampler.close()
    sampler = NvmlSampler(0)  # no driver on CPU machines: NVMLError is swallowed, nothing sampled
    assert sampler.read() == {}
    sampler.close()
