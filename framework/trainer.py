"""The step loop: data -> forward/backward -> clip -> optimizer -> expert bias -> log -> save.

One `Trainer` owns a run folder:

    <run_dir>/config.yaml      the resolved config of the latest start
    <run_dir>/metrics.jsonl    one JSON record per log interval and per evaluation
    <run_dir>/checkpoints/     DCP checkpoints, newest `keep_last` kept
    <run_dir>/data/            tokenizer.json and the tokenized corpus cache
    <run_dir>/wandb/           the (offline by default) wandb run

Starting again in the same folder resumes from the newest checkpoint: model, optimizer,
expert biases, data position and LR schedule all continue exactly where they stopped.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from framework import checkpoint
from framework.config import TrainConfig
from framework.data import DataError, build_data
from framework.metrics import MetricsLogger, ProgressBar, flops_per_token, gpu_peak_tflops, gpu_sample
from framework.model import Transformer, count_params
from framework.optim import build_optimizer, clip_grad_norm, lr_at, set_lr

SAMPLE_PROMPT = "def "


class TrainingError(RuntimeError):
    """A run cannot start or continue; reported by the launcher as one line, exit 2."""


@dataclass
class TrainResult:
    run_dir: Path
    start_step: int
    losses: list[float] = field(default_factory=list)  # one per step trained by this call
    val_loss: float = math.nan
    sample: str = ""


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device=cuda but no CUDA GPU is visible; use device=auto or device=cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_compute(compute: str, device: torch.device) -> str:
    """auto -> bf16 on GPUs; fp32 on CPU, where bf16 matmuls run about ten times slower."""
    if compute == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return compute


def autocast(device: torch.device, compute: str):
    """BF16 autocast around forward/backward; master weights stay FP32."""
    if compute == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def expert_imbalance(model: Transformer) -> float:
    """Max over mean expert load, averaged over MoE layers (1.0 is perfectly balanced)."""
    ratios = []
    for moe in model.moe_layers():
        load = moe.router.expert_load.double()
        if load.sum() > 0:
            ratios.append((load.max() / load.mean()).item())
    return sum(ratios) / len(ratios) if ratios else 1.0


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir).expanduser()
        self.device = pick_device(cfg.device)
        self.compute = resolve_compute(cfg.precision.compute, self.device)
        # Resuming this run folder restores everything; `checkpoint.load_from` only initialises
        # the weights of a new run (fine-tuning, HF imports) and is ignored once the run has
        # checkpoints of its own.
        self.resume_from = checkpoint.latest_checkpoint(self.run_dir)
        if self.resume_from is not None and not cfg.checkpoint.resume:
            raise TrainingError(f"{self.run_dir} already holds checkpoints; use a new run_dir or "
                                "checkpoint.resume=true (refusing to overwrite them)")
        self.init_from = Path(cfg.checkpoint.load_from) if cfg.checkpoint.load_from else None
        if self.resume_from is not None:
            self.init_from = None
        for path in (self.resume_from, self.init_from):
            if path is not None:
                self._check_same_model(path)
        self.run_dir.mkdir(parents=True, exist_ok=True)

        torch.manual_seed(cfg.seed)
        self.data = build_data(cfg.data, cfg.model.vocab_size, self.run_dir / "data")
        self.model = Transformer(cfg.model).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim, cfg.precision.moment_dtype)
        self.step = 0
        if self.resume_from is not None:
            self._load(self.resume_from)
        elif self.init_from is not None:
            self._load_weights(self.init_from)
        self.counts = count_params(self.model)
        self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        m = cfg.model
        self.flops_per_token = flops_per_token(self.counts["activated"], m.n_layers, m.n_heads,
                                               m.qk_nope_head_dim + m.qk_rope_head_dim,
                                               m.v_head_dim, cfg.data.seq_len)

    # --- state ---------------------------------------------------------------------------
    def _check_same_model(self, path: Path) -> None:
        try:
            saved = checkpoint.read_meta(path)["config"]["model"]
        except (OSError, KeyError, ValueError):
            raise TrainingError(f"{path}: unreadable checkpoint metadata; remove it or start a new "
                                "run_dir") from None
        current = asdict(self.cfg.model)
        diff = [k for k in current if saved.get(k) != current[k]]
        if diff:
            k = diff[0]
            raise TrainingError(f"checkpoint {path} was saved with model.{k}={saved.get(k)!r}, this run "
                                f"has {current[k]!r}; use a new run_dir or the original model config")

    def _load(self, path: Path) -> None:
        try:
            extra = checkpoint.load(path, self.model, self.optimizer, ["step", "data_position"])
        except checkpoint.CheckpointError as err:
            raise TrainingError(str(err)) from None
        self.step = extra["step"]
        state = self.data.train.state_dict()
        state["position"] = extra["data_position"]
        self.data.train.load_state_dict(state)

    def _load_weights(self, path: Path) -> None:
        try:
            checkpoint.load(path, self.model, None, [])
        except checkpoint.CheckpointError as err:
            raise TrainingError(str(err)) from None

    def save(self) -> Path:
        extra = {"step": self.step, "data_position": self.data.train.state_dict()["position"]}
        return checkpoint.save(self.run_dir, self.step, self.model, self.optimizer, extra,
                               asdict(self.cfg), self.cfg.checkpoint.keep_last)

    # --- one step ----------------------------------------------------------------------------
    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        cfg = self.cfg
        lr = lr_at(self.step, cfg.steps, cfg.optim)
        set_lr(self.optimizer, lr)
        self.model.train()
        with autocast(self.device, self.compute):
            loss, parts = self.model.loss(inputs.to(self.device), targets.to(self.device))
        loss.backward()
        grad_norm = clip_grad_norm(self.model.parameters(), cfg.optim.grad_clip)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise TrainingError(f"loss became {loss_value} at step {self.step}; lower optim.lr or use "
                                "precision=fp32, then resume from the last checkpoint")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        imbalance = expert_imbalance(self.model)
        # Aux-loss-free balancing: bias moves after the optimizer step, from this step's loads.
        self.model.update_expert_bias(cfg.model.bias_update_rate)
        self.step += 1
        return {"loss": loss_value, **{k: float(v) for k, v in parts.items()}, "lr": lr,
                "grad_norm": float(grad_norm), "expert_imbalance": imbalance}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token cross-entropy (main head only) over a fixed set of val batches."""
        self.model.eval()
        total = 0.0
        for index in range(self.cfg.eval_batches):
            inputs, targets = self.data.val.batch(index)
            with autocast(self.device, self.compute):
                logits = self.model(inputs.to(self.device))
            total += F.cross_entropy(logits.float().flatten(0, 1), targets.to(self.device).flatten()).item()
        self.model.train()
        return total / self.cfg.eval_batches

    @torch.no_grad()
    def sample(self, n_tokens: int, prompt: str = SAMPLE_PROMPT) -> str:
        self.model.eval()
        try:
            prompt_ids = self.data.tokenizer.encode(prompt)
        except DataError:  # pre-tokenized .bin corpora have no text tokenizer: prompt from val
            prompt_ids = self.data.val_tokens[:4].tolist()
        ids = torch.tensor([prompt_ids], device=self.device)
        with autocast(self.device, self.compute):
            out = self.model.generate(ids, n_tokens)
        self.model.train()
        return self.data.tokenizer.decode(out[0].tolist())

    # --- the loop ------------------------------------------------------------------------
    def run(self, until_step: int | None = None) -> TrainResult:
        """Train to `cfg.steps` (or stop early at `until_step`, saving a checkpoint there, as a
        preempted job would), then evaluate and sample."""
        cfg = self.cfg
        last = cfg.steps if until_step is None else min(until_step, cfg.steps)
        result = TrainResult(run_dir=self.run_dir, start_step=self.step)
        (self.run_dir / "config.yaml").write_text(_to_yaml(cfg))
        print(f"duet: {cfg.model.name} model, {self.counts['total']:,} parameters "
              f"({self.counts['activated']:,} activated), {self.device}, {self.compute}, "
              f"run folder {self.run_dir}", flush=True)
        if self.resume_from is not None:
            print(f"duet: resumed from {self.resume_from} at step {self.step}", flush=True)
        elif self.init_from is not None:
            print(f"duet: weights initialised from {self.init_from}", flush=True)
        logger = MetricsLogger(self.run_dir, cfg.logging, cfg, resume=self.step > 0)
        bar = ProgressBar(cfg.steps, self.step, cfg.logging.progress_bar)
        peak = gpu_peak_tflops()
        window_start, window_steps = time.perf_counter(), 0
        try:
            while self.step < last:
                inputs, targets = self.data.train.next()
                record = self.train_step(inputs, targets)
                result.losses.append(record["loss"])
                window_steps += 1
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_steps * self.tokens_per_step / max(elapsed, 1e-9)
                bar.update(self.step, record["loss"], tokens_per_s, record["lr"])
                if self.step % cfg.logging.log_interval == 0 or self.step == cfg.steps:
                    record.update(step=self.step, tokens_per_s=tokens_per_s, **gpu_sample())
                    if peak:
                        record["mfu"] = tokens_per_s * self.flops_per_token / (peak * 1e12)
                    logger.log(record)
                    window_start, window_steps = time.perf_counter(), 0
                if cfg.eval_interval and self.step % cfg.eval_interval == 0 and self.step < cfg.steps:
                    val = self.evaluate()
                    logger.log({"step": self.step, "val_loss": val})
                    bar.write(f"step {self.step}: validation loss {val:.4f}")
                if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
                    self.save()
            bar.close()
            if latest_step(self.run_dir) != self.step:
                self.save()
            result.val_loss = self.evaluate()
            logger.log({"step": self.step, "val_loss": result.val_loss})
            print(f"duet: final validation loss {result.val_loss:.4f} at step {self.step} "
                  f"(checkpoint in {checkpoint.checkpoint_root(self.run_dir)})")
            if cfg.logging.sample_tokens:
                result.sample = self.sample(cfg.logging.sample_tokens)
                print("duet: greedy sample:\n" + result.sample)
        finally:
            bar.close()
            logger.close()
        if logger.wandb_run is not None and logger.wandb_run.settings.mode == "offline":
            print(f"duet: offline wandb run in {self.run_dir / 'wandb'} "
                  f"(upload it with `wandb sync {self.run_dir / 'wandb'}/offline-run-*`)")
        return result


def latest_step(run_dir: Path) -> int | None:
    found = checkpoint.latest_checkpoint(run_dir)
    return None if found is None else checkpoint.read_meta(found)["step"]


def _to_yaml(cfg: TrainConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def train(cfg: TrainConfig) -> TrainResult:
    return Trainer(cfg).run()
