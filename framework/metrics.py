"""What a run reports: progress bar, JSONL records, wandb, GPU samples and MFU.

Every sink is optional and cheap when off: tests run with the bar and wandb disabled, and
wandb is imported only when a run actually uses it (its import costs about a second).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

from framework.config import LoggingConfig, ModelConfig

# Dense BF16 peaks in TFLOPS by GPU name (ANCHORS.md gives H800's; H100/H200 SXM share the
# Hopper tensor cores). One convention for every MFU duet prints (trainer, benchmarks, planner):
# model FLOPs over the dense BF16 peak, whatever the run computes in -- as Megatron-LM,
# torchtitan and DeepSeek-V3's ~40% report it. An FP8 run is not credited with FP8's 2x peak.
PEAK_TFLOPS = {
    "H800": {"bf16": 989.0, "fp8": 1979.0},
    "H100": {"bf16": 989.0, "fp8": 1979.0},
    "H200": {"bf16": 989.0, "fp8": 1979.0},
    "A100": {"bf16": 312.0, "fp8": 312.0},  # no FP8 tensor cores: FP8 runs at BF16 rate at best
}


def matmul_params_per_token(cfg: ModelConfig) -> dict[str, int]:
    """Weights one token multiplies in one forward, by part: attention projections, dense and
    shared/routed-expert SwiGLUs (the K routed experts it picks), routers' gates, MTP's projection
    and the output head once per head use (main + each MTP depth). The embedding is a gather, not
    a matmul, and norms are elementwise: neither counts."""
    D, H = cfg.dim, cfg.n_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    q = D * cfg.q_lora_rank + cfg.q_lora_rank * H * qk if cfg.q_lora_rank else D * H * qk
    attn = q + D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) \
        + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim) + H * cfg.v_head_dim * D
    moe_blocks = cfg.n_layers - cfg.n_dense_layers + cfg.mtp_depth  # MTP blocks are MoE blocks
    experts = 3 * D * cfg.moe_inter_dim * (cfg.n_activated_experts + cfg.n_shared_experts)
    return {"attention": (cfg.n_layers + cfg.mtp_depth) * attn,
            "dense": cfg.n_dense_layers * 3 * D * cfg.dense_inter_dim,
            "experts": moe_blocks * experts,
            "gates": moe_blocks * D * cfg.n_routed_experts,
            "mtp projection": cfg.mtp_depth * 2 * D * D,
            "head": (1 + cfg.mtp_depth) * D * cfg.vocab_size}


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of the attention core: per layer and head, q.k over qk dims and
    p.v over v dims, 2 FLOPs per multiply-add, causal (a token sees T/2 others on average), times
    3 for forward + backward. MTP blocks attend too."""
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    layers = cfg.n_layers + cfg.mtp_depth
    return 3 * layers * cfg.n_heads * 2 * (qk + cfg.v_head_dim) * seq_len / 2


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """duet's one FLOP count, used by the trainer's MFU, the benchmarks and duet-plan: 6 per matmul
    weight a token multiplies (matmul_params_per_token: embedding gather excluded, MTP included)
    plus the causal attention core (attention_flops_per_token). Recomputation is not counted."""
    return 6 * sum(matmul_params_per_token(cfg).values()) + attention_flops_per_token(cfg, seq_len)


def gpu_peak_tflops(compute: str = "bf16", device_index: int = 0) -> float | None:
    """Dense BF16 peak of the GPU, the one MFU convention (PEAK_TFLOPS), whatever `compute` is
    (kept for callers that pass it); None where unknown (CPU runs report no MFU)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(device_index)
    except Exception:
        return None
    peaks = next((p for key, p in PEAK_TFLOPS.items() if key in name), None)
    return None if peaks is None else peaks["bf16"]


def mfu(tokens_per_s: float, flops_per_token: float, n_gpus: int, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over n_gpus x the BF16 peak (None without one)."""
    if not peak_tflops:
        return None
    return tokens_per_s * flops_per_token / (n_gpus * peak_tflops * 1e12)


class ThroughputWindow:
    """Tokens/s over training alone: time spent inside `paused()` (evaluation, checkpoints,
    sampling) is left out of the window, so a save does not show up as a slow step.

        window = ThroughputWindow()
        ... step ...; window.add(tokens_per_step)
        with window.paused():
            evaluate() / save()
        rate = window.tokens_per_s(); window.reset()
    """

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        self.start, self.excluded, self.tokens, self.steps = self.clock(), 0.0, 0, 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        self.steps += 1

    @contextlib.contextmanager
    def paused(self):
        t0 = self.clock()
        try:
            yield
        finally:
            self.excluded += self.clock() - t0

    def seconds(self) -> float:
        """Training seconds in the window (wall time minus the paused time)."""
        return self.clock() - self.start - self.excluded

    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds(), 1e-9)


def nvml_handle(pynvml, device_index: int):
    """NVML's handle of torch's CUDA device `device_index`, found by UUID: NVML numbers GPUs
    physically and ignores CUDA_VISIBLE_DEVICES, torch numbers the visible ones, so an index
    would sample the wrong GPU whenever the two orders differ."""
    uuid = _cuda_uuid(device_index)
    return pynvml.nvmlDeviceGetHandleByUUID(uuid)


def _cuda_uuid(device_index: int) -> str:
    """'GPU-<uuid>' as NVML spells it (torch gives the bare UUID; MIG instances already carry 'MIG-')."""
    import torch

    uuid = str(torch.cuda.get_device_properties(device_index).uuid)
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


class NvmlSampler:
    """Samples this rank's GPU (torch's CUDA index, found in NVML by UUID) every `interval_s` on a
    daemon thread: utilisation, memory, power and temperature, averaged between reads. Silent and
    inert where NVML or a GPU is missing (CPU runs, CI), so callers need no checks."""

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
            self.handle = nvml_handle(pynvml, device_index)
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
