"""What a run reports: progress bar, JSONL records, wandb, GPU samples and MFU.

Every sink is optional and cheap when off: tests run with the bar and wandb disabled, and
wandb is imported only when a run actually uses it (its import costs about a second).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from framework.config import LoggingConfig

# Dense BF16 / FP8 peaks (TFLOPS) used for MFU; ANCHORS.md gives H800's.
PEAK_TFLOPS_BF16 = {"H800": 989.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


def flops_per_token(activated_params: int, n_layers: int, n_heads: int, qk_head_dim: int,
                    v_head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 per activated parameter plus causal attention scores
    and values (forward 2*T/2 multiply-adds per head dim, times 3 for backward)."""
    attention = 6 * n_layers * n_heads * (qk_head_dim + v_head_dim) * seq_len / 2
    return 6 * activated_params + attention


def gpu_peak_tflops() -> float | None:
    """Dense BF16 peak of GPU 0 by name, or None where unknown (CPU runs report no MFU)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(0)
    except Exception:
        return None
    return next((peak for key, peak in PEAK_TFLOPS_BF16.items() if key in name), None)


def gpu_sample() -> dict[str, float]:
    """Utilisation and memory of GPU 0 from NVML; empty where there is no driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        util = pynvml.nvmlDeviceGetUtilizationRates(handle)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return {"gpu_util": float(util.gpu), "gpu_mem_gib": mem.used / 2**30}
    except Exception:  # pynvml.NVMLError where no driver; ImportError without the package
        return {}


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
