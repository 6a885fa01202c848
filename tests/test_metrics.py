"""Observability pieces that do not need a GPU: comm counters in records, MFU peaks, NVML."""

import types

import pytest

from framework import metrics
from framework.metrics import (
    PEAK_TFLOPS,
    NvmlSampler,
    ThroughputWindow,
    comm_record,
    gpu_peak_tflops,
    mfu,
)


def test_comm_record_reports_megabytes_seconds_and_wait_share():
    stats = {"all_reduce": {"calls": 3, "bytes": 3 * 2**20, "seconds": 0.5},
             "all_gather": {"calls": 1, "bytes": 2**19, "seconds": 0.25}}
    record = comm_record(stats, step_seconds=3.0)
    assert record["comm_all_reduce_mb"] == 3.0 and record["comm_all_gather_mb"] == 0.5
    assert record["comm_all_reduce_s"] == 0.5
    assert record["comm_time_share"] == pytest.approx(0.25)
    assert comm_record({}, 1.0) == {}


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


def test_mfu_divides_by_the_bf16_peak_of_every_gpu():
    # 1000 tokens/s x 1e9 FLOPs per token on 2 GPUs of 1 TFLOPS: half the peak.
    assert mfu(1000.0, 1e9, 2, 1.0) == pytest.approx(0.5)
    assert mfu(1000.0, 1e9, 2, None) is None  # CPU: no peak, no MFU


def test_nvml_handle_is_found_by_the_cuda_device_uuid(monkeypatch):
    # torch's visible device 0 is physical GPU 3 under CUDA_VISIBLE_DEVICES=3: the UUID finds it.
    props = {0: types.SimpleNamespace(uuid="6c1e3a2b-0000-4000-8000-000000000003")}
    monkeypatch.setattr("torch.cuda.get_device_properties", lambda i: props[i])
    asked = []
    fake = types.SimpleNamespace(nvmlDeviceGetHandleByUUID=lambda u: asked.append(u) or f"handle {u}",
                                 nvmlDeviceGetHandleByIndex=lambda i: pytest.fail("by index"))
    assert metrics.nvml_handle(fake, 0) == "handle GPU-6c1e3a2b-0000-4000-8000-000000000003"
    assert asked == ["GPU-6c1e3a2b-0000-4000-8000-000000000003"]


def test_throughput_window_leaves_out_paused_time():
    now = [0.0]
    window = ThroughputWindow(clock=lambda: now[0])
    now[0] = 2.0
    window.add(100)
    with window.paused():  # an evaluation or a checkpoint save
        now[0] = 7.0
    now[0] = 8.0
    window.add(100)
    assert window.seconds() == 3.0 and window.tokens_per_s() == pytest.approx(200 / 3)
    window.reset()
    now[0] = 9.0
    assert window.tokens == 0 and window.seconds() == 1.0
