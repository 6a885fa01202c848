"""What a run reports: progress bar, JSONL records, wandb, GPU samples and MFU.

Every sink is optional and cheap when off: tests run with the bar and wandb disabled, and
wandb is imported only when a run actually uses it (its import costs about a second).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

from framework.config import LoggingConfig

# Dense peaks in TFLOPS by GPU name (ANCHORS.md gives H800's; H100/H200 SXM share the
# Hopper tensor cores). MFU divides achieved model FLOPs by the peak of the precision used.
PEAK_TFLOPS = {
    "H800": {"bf16": 989.0, "fp8": 1979.0},
    "H100": {"bf16": 989.0, "fp8": 1979.0},
    "H200": {"bf16": 989.0, "fp8": 1979.0},
    "A100": {"bf16": 312.0, "fp8": 312.0},  # no FP8 tensor cores: FP8 runs at BF16 rate at best
}


def flops_per_token(activated_params: int, n_layers: int, n_heads: int, qk_head_dim: int,
                    v_head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 per activated parameter plus causal attention scores
    and values (forward 2*T/2 multiply-adds per head dim, times 3 for backward)."""
    attention = 6 * n_layers * n_heads * (qk_head_dim + v_head_dim) * seq_len / 2
    return 6 * activated_params + attention


def gpu_peak_tflops(compute: str = "bf16") -> float | None:
    """Dense peak of GPU 0 for `compute` (fp8 or bf16; fp32 counts as bf16's tensor-core
    peak, the usual MFU convention), or None where unknown (CPU runs report no MFU)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(0)
    except Exception:
        return None
    peaks = next((p for key, p in PEAK_TFLOPS.items() if key in name), None)
    return None if peaks is None else peaks["fp8" if compute == "fp8" else "bf16"]


class NvmlSampler:
    """Samples this rank's GPU every `interval_s` on a daemon thread: utilisation, memory,
    power and temperature, averaged between reads. Silent and inert where NVML or a GPU is
    missing (CPU runs, CI), so callers need no checks."""

    def __init__(self, device_index: int | None, interval_s: float = 1.0):
        self.samples: list[dict[str, float]] = []
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.handle = None
        if device_index is None:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            self.pynvml = pynvml
        except Exception:  # pynvml.NVMLError where no driver; ImportError without the package
            self.handle = None
            return
        self.thread = threading.Thread(target=self._loop, args=(interval_s,), daemon=True,
                                       name="duet-nvml")
        self.thread.start()

    def _sample(self) -> dict[str, float]:
        nv, h = self.pynvml, self.handle
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        return {"gpu_util": float(nv.nvmlDeviceGetUtilizationRates(h).gpu),
                "gpu_mem_gib": mem.used / 2**30,
                "gpu_power_w": nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
                "gpu_temp_c": float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))}

    def _loop(self, interval_s: float) -> None:
        while not self.stop_event.wait(interval_s):
            try:
                sample = self._sample()
            except Exception:
                return  # the driver went away: stop sampling quietly
            with self.lock:
                self.samples.append(sample)

    def read(self) -> dict[str, float]:
        """Means since the last read ({} without samples)."""
        with self.lock:
            samples, self.samples = self.samples, []
        if not samples:
            return {}
        return {k: sum(s[k] for s in samples) / len(samples) for k in samples[0]}

    def close(self) -> None:
        self.stop_event.set()


def comm_record(stats: dict[str, dict[str, float]], step_seconds: float) -> dict[str, float]:
    """Per-collective MB and seconds since the last reset, and their seconds over the
    wall time. An async op counts from issue until its wait() returns, so collectives that
    overlap backward can push the share past 1: it measures communication in flight, and
    the exposed part is what the overlap failed to hide."""
    record: dict[str, float] = {}
    waited = 0.0
    for kind, entry in sorted(stats.items()):
        record[f"comm_{kind}_mb"] = entry["bytes"] / 2**20
        record[f"comm_{kind}_s"] = entry["seconds"]
        waited += entry["seconds"]
    if stats and step_seconds > 0:
        record["comm_time_share"] = waited / step_seconds
    return record


class ProgressBar:
    """A one-line bar: step, loss, tokens/s, lr; a line every 30 s when not a TTY. On stdout,
    which the launcher shows for rank 0 (stderr goes to the rank's log file)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.tty = sys.stdout.isatty()
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stdout, mininterval=0.5 if self.tty else 30)

    def update(self, step: int, loss: float, tokens_per_s: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  lr {lr:.2e}",
                                     refresh=False)
            self.bar.update(step - self.bar.n)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsLogger:
    """Fans records out to `<run_dir>/metrics.jsonl` and, when enabled, a wandb run."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, run_config: object, resume: bool,
                 enabled: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.file = open(self.path, "a" if resume else "w") if enabled else None
        self.wandb_run = None
        mode = wandb_mode(cfg.wandb_mode)
        if enabled and mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(project=cfg.wandb_project, dir=str(run_dir), mode=mode,
                                        config=asdict(run_config), name=run_dir.name,
                                        resume="allow", id=_wandb_id(run_dir),
                                        settings=wandb.Settings(silent=True))

    def log(self, record: dict) -> None:
        if self.file is None:
            return
        record = {"time": round(time.time(), 3), **record}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k not in ("time", "step")},
                               step=record.get("step"))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def wandb_mode(configured: str) -> str:
    """auto -> online with an API key, else offline (wandb fails at once with neither).
    WANDB_MODE in the environment wins, as wandb users expect."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if configured != "auto":
        return configured
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _wandb_id(run_dir: Path) -> str:
    """A stable id per run folder so a resumed run appends to the same wandb run."""
    id_file = run_dir / "wandb_id.txt"
    if not id_file.exists():
        id_file.write_text(os.urandom(6).hex())
    return id_file.read_text().strip()
