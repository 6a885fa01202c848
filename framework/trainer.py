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
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from framework import checkpoint
from framework.config import TrainConfig
from framework.data import DataError, build_data
from framework.errors import TrainingError
from framework.faults import maybe_fail, planned, poison
from framework.fp8 import fp8_warming_up, fp8_weight_cache
from framework.generate import SamplingParams, ep_all_done, generate
from framework.hf import load_duet_checkpoint
from framework.metrics import (
    MetricsLogger,
    NvmlSampler,
    ProgressBar,
    ThroughputWindow,
    comm_record,
    gpu_peak_tflops,
    mfu,
    train_flops_per_token,
)
from framework.model import Transformer
from framework.optim import lr_at
from framework.plots import write_timeline
from framework.precision import autocast, resolve_compute
from framework.resume import agreed_start, latest_step
from parallel import comm, watchdog
from parallel.data_parallel import all_reduce_expert_load, reduce_mean
from parallel.expert_parallel import ep_record
from parallel.mesh import Layout, Mesh, build_mesh, init_distributed, shutdown
from parallel.parallelize import parallelize
from parallel.pipeline.timeline import read_chrome_trace

SAMPLE_PROMPT = "def "
# The process group's own timeout is this much longer than the watchdog's, so a hang is
# reported by the watchdog's one line rather than by gloo's multi-line error.
WATCHDOG_GRACE_S = 60.0


@dataclass
class TrainResult:
    run_dir: Path
    start_step: int
    losses: list[float] = field(default_factory=list)  # one per step trained by this call
    val_loss: float = math.nan
    sample: str = ""


def pick_device(name: str, launch_mode: str = "local") -> torch.device:
    """This rank's device: its own GPU (LOCAL_RANK) normally, GPU 0 for every rank of a
    simulated layout, the CPU without GPUs or when asked."""
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device=cuda but no CUDA GPU is visible; use device=auto or device=cpu")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = 0 if launch_mode == "simulated" else int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device("cuda", local_rank)


def setup_mesh(cfg: TrainConfig, device: torch.device) -> Mesh:
    """Join the process group when started as one of several ranks (elastic agent, torchrun);
    a single process gets the stand-in mesh whose collectives are no-ops."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Mesh.single()
    simulated = os.environ.get("DUET_LAUNCH_MODE", cfg.launch.mode) == "simulated"
    init_distributed("nccl" if device.type == "cuda" and not simulated else "gloo",
                     timeout_s=cfg.launch.collective_timeout_s + WATCHDOG_GRACE_S)
    return build_mesh(Layout.from_config(cfg.parallel))


def expert_imbalance(model: Transformer, per_layer: bool = False) -> dict[str, float | list]:
    """Max over mean expert load, averaged over MoE layers that saw tokens (1.0 is perfectly
    balanced). Computed on the device with one read back, since it runs every step.
    per_layer adds each MoE layer's ratio and its tokens per expert (lists, for the log)."""
    moes = model.moe_layers()
    if not moes:
        return {"expert_imbalance": 1.0}
    load_LE = torch.stack([moe.router.expert_load.double() for moe in moes])
    mean_L = load_LE.mean(-1)
    used_L = mean_L > 0
    ratio_L = torch.where(used_L, load_LE.amax(-1) / mean_L.clamp_min(1e-30), 0.0)
    n_used = used_L.sum()
    out = {"expert_imbalance": float(torch.where(n_used > 0, ratio_L.sum() / n_used.clamp_min(1), 1.0))}
    if per_layer:
        out["expert_imbalance_per_layer"] = ratio_L.tolist()
        out["expert_load"] = load_LE.long().tolist()
    return out


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir).expanduser()
        mode = os.environ.get("DUET_LAUNCH_MODE", cfg.launch.mode)
        self.device = pick_device(cfg.device, mode)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.compute = resolve_compute(cfg.precision.compute, self.device)
        self.mesh = setup_mesh(cfg, self.device)
        self.is_main = self.mesh.rank == 0
        self.resume_from, self.init_from, self.damaged = agreed_start(cfg, self.mesh, self.run_dir)
        self.consecutive_skips = 0  # NaN/Inf guard: skipped steps in a row (train_step)
        self.run_dir.mkdir(parents=True, exist_ok=True)

        # Rank 0 tokenizes (or finds the launcher's cache) first; the others then read the cache.
        for turn in (True, False):
            if self.is_main == turn:
                self.data = build_data(cfg.data, cfg.model.vocab_size, self.run_dir / "data",
                                       rank=self.mesh.dp_rank, world=self.mesh.dp)
            comm.barrier()
        torch.manual_seed(cfg.seed)  # the same initial weights and random streams on every rank
        # Built on meta; this rank materialises only its stages and experts (DESIGN.md rule 11).
        # checkpoint.load_from's weights are loaded before the engine exists (ZeRO copies them).
        weights_from = self.init_from if self.resume_from is None else None
        built = parallelize(cfg.model, cfg, self.mesh, self.device, self.compute, weights_from=weights_from)
        self.model, self.counts, self.pipeline = built.model, built.counts, built.pipeline
        self.engine = built.engine
        self.optimizer = self.engine.optimizer
        self.saver = checkpoint.Saver(self.run_dir, asdict(cfg), cfg.checkpoint.keep_last,
                                      cfg.checkpoint.async_save)
        self.step = 0
        if self.resume_from is not None:
            self._load(self.resume_from)
        self.first_step = self.step
        self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        self.flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)  # the one MFU count

    @property
    def every_rank_generates(self) -> bool:
        """Under expert parallelism every rank generates: its experts serve the others' tokens;
        under ZeRO-3 every forward gathers the weights collectively."""
        return self.mesh.ep > 1 or self.engine.collective_forward

    def say(self, line: str) -> None:
        """Console output comes from rank 0 only (the others' logs are files)."""
        if self.is_main:
            print(line, flush=True)

    # --- state ---------------------------------------------------------------------------
    def _extra(self) -> dict[str, int]:
        """The counters a checkpoint keeps beside model and optimizer."""
        return {"step": self.step, "data_position": self.data.train.state_dict()["position"]}

    def _load(self, path: Path) -> None:
        extra = self.engine.load(path, self._extra())
        self.step = extra["step"]
        data_state = self.data.train.state_dict()
        data_state["position"] = extra["data_position"]
        self.data.train.load_state_dict(data_state)

    def save(self) -> Path:
        return self.engine.save(self.saver, self.step, self._extra())

    # --- one step ----------------------------------------------------------------------------
    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, detail: bool = False) -> dict:
        """One optimizer step on this rank's share of the global batch; returns global-batch
        metrics (identical on every rank); `detail` adds per-layer expert loads.

        NaN/Inf guard: when the loss or the gradient norm is not finite on any rank (two flags
        that ride in the loss's own all-reduce, so the check costs no extra collective), every
        rank skips the step: no optimizer update (weights, AdamW moments and AdamW's update count
        stay as they were) and no expert-bias update (the batch's expert loads are dropped). A
        skipped step k still counts as a step: the step counter moves to k, batch k is consumed
        (the data position moves on), and the LR schedule, a function of the step counter, moves
        on with it, so step k+1 trains on batch k+1 at the LR of step k+1. The weights after a
        run that skipped step k therefore equal those of a run that discarded batch k unseen.
        The record names the non-finite quantity under `skipped`; more than
        optim.max_consecutive_skips skips in a row stop the run with a TrainingError (nothing is
        saved, so the last checkpoint stays the last good one). The count of skips in a row
        restarts at 0 when a run resumes.
        """
        cfg, engine = self.cfg, self.engine
        watchdog.set_step(self.step + 1)
        lr = lr_at(self.step, cfg.steps, cfg.optim)
        engine.set_lr(lr)
        self.model.train()
        with self._fp8_step(), engine.accumulate():  # on exit: dense grads averaged over dp, experts over edp
            if self.pipeline is not None:  # the schedule runs forwards and backwards itself
                loss, parts = self._pipeline_forward_backward(inputs, targets)
                loss = self._poisoned(loss)
            else:
                with self._autocast():
                    loss, parts = engine.forward(inputs.to(self.device), targets.to(self.device))
                loss = self._poisoned(loss)
                engine.backward(loss)
        if (bad := poison("grad", self.step + 1, self.mesh.rank)) is not None:
            next(p for p in self.model.parameters() if p.grad is not None).grad.view(-1)[0] = bad
        flags = {"nonfinite_loss": (~torch.isfinite(loss.detach())).float()}
        record = reduce_mean({"loss": loss.detach(), **parts, **flags}, self.mesh)
        loss_finite = record.pop("nonfinite_loss") == 0
        grad_norm, applied = engine.step(cfg.optim.grad_clip, loss_finite)
        if not applied:
            bad_parts = ["loss"] * (not loss_finite) + ["grad_norm"] * (not math.isfinite(float(grad_norm)))
            return self._skip_step(record, lr, grad_norm, bad_parts or ["grad_norm"])
        return self._finish_step(record, lr, grad_norm, detail)

    def _fp8_step(self) -> contextlib.ExitStack:
        """Under fp8: each weight quantised once per optimizer step (micro-batches reuse it), and
        the FP8 GEMMs' autotuning allowed only in this process's first step (the warm-up), never
        inside a later multi-rank step."""
        stack = contextlib.ExitStack()
        if self.compute == "fp8":
            stack.enter_context(fp8_weight_cache())
            if self.step == self.first_step:
                stack.enter_context(fp8_warming_up())
        return stack

    def _poisoned(self, loss: torch.Tensor) -> torch.Tensor:
        """Fault injection (framework/faults.py): this rank's loss times NaN/Inf when planned."""
        bad = poison("loss", self.step + 1, self.mesh.rank)
        return loss if bad is None else loss * bad

    def _finish_step(self, record: dict, lr: float, grad_norm, detail: bool) -> dict:
        """After the optimizer step: aux-loss-free balancing from the global batch's expert
        loads, then the step counter; returns the step's record. A finished step ends a run of skips."""
        self.consecutive_skips = 0
        if self.pipeline is not None:
            self.pipeline.sync_shared_loads()
        all_reduce_expert_load(self.model, self.mesh)
        balance = expert_imbalance(self.model, per_layer=detail)
        self.model.update_expert_bias(self.cfg.model.bias_update_rate)
        self.step += 1
        maybe_fail("step", self.step, self.mesh.rank, self.run_dir)
        return {**record, "lr": lr, "grad_norm": float(grad_norm), **balance}

    def _autocast(self):
        return autocast(self.device, self.compute)

    def _pipeline_forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor):
        """The schedule's forwards and backwards over parallel.micro_batches micro-batches; the
        loss terms come back summed over the pipeline ranks (the same value on each)."""
        timeline = self.run_dir if self.step + 1 == self.cfg.logging.timeline_step else None
        out = self.pipeline.train(inputs, targets, self.device, self._autocast, timeline)
        if timeline is not None and self.mesh.rank == 0:  # the engine gathered the trace there; draw it
            par = self.cfg.parallel
            write_timeline(read_chrome_trace(timeline / "timeline.trace.json"), timeline / "timeline.png",
                           title=f"{par.schedule} pp={par.pp} step {self.step + 1}")
        terms = self.pipeline.loss_terms(out, self.device)
        loss = terms.pop("loss")
        return loss, terms

    def _skip_step(self, record: dict, lr: float, grad_norm: torch.Tensor, bad: list[str]) -> dict:
        """The rest of a step whose loss or gradient norm was not finite (see train_step); the
        engine has left weights and optimizer state as they were."""
        self.model.update_expert_bias(0.0)  # rate 0: only drop this batch's expert loads
        self.step += 1
        self.consecutive_skips += 1
        limit = self.cfg.optim.max_consecutive_skips
        if self.consecutive_skips > limit:
            raise TrainingError(f"non-finite {' and '.join(bad)} at {self.consecutive_skips} steps in a row "
                                f"(steps {self.step - self.consecutive_skips + 1}-{self.step}, more than "
                                f"optim.max_consecutive_skips={limit}); stopped without saving, so the last "
                                "checkpoint is intact: lower optim.lr or use precision=fp32, then resume")
        maybe_fail("step", self.step, self.mesh.rank, self.run_dir)
        return {**record, "lr": lr, "grad_norm": float(grad_norm), "skipped": "+".join(bad)}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token cross-entropy (main head only) over a fixed set of val batches,
        each rank taking its share of every batch."""
        self.model.eval()
        total = 0.0
        for index in range(self.cfg.eval_batches):
            inputs, targets = self.data.val.batch(index)
            if self.pipeline is not None:
                total += self.pipeline.evaluate(inputs, targets, self.device, self._autocast).item()
                continue
            with autocast(self.device, self.compute):
                logits = self.model(inputs.to(self.device))
            total += F.cross_entropy(logits.float().flatten(0, 1), targets.to(self.device).flatten()).item()
        self.model.train()
        return reduce_mean({"val": total / self.cfg.eval_batches}, self.mesh)["val"]

    @torch.no_grad()
    def sample(self, n_tokens: int, prompt: str = SAMPLE_PROMPT) -> str:
        """A greedy sample on the latent KV cache (framework/generate.py). Under pp > 1 each rank
        holds only its stages, so rank 0 reads the final checkpoint into one whole model on the
        CPU and samples from that; under ep > 1 every rank decodes in lock-step (its experts
        serve the others' tokens) until all are done."""
        try:
            prompt_ids = self.data.tokenizer.encode(prompt)
        except DataError:  # pre-tokenized .bin corpora have no text tokenizer: prompt from val
            prompt_ids = self.data.val_tokens[:4].tolist()
        params = SamplingParams(max_new_tokens=min(n_tokens, self.cfg.model.max_seq_len - len(prompt_ids)),
                                temperature=0)
        model, device, all_done = self.model, self.device, None
        if self.pipeline is not None:
            model = load_duet_checkpoint(checkpoint.latest_checkpoint(self.run_dir))[0]
            device = torch.device("cpu")
        elif self.mesh.ep > 1:
            all_done = ep_all_done(self.mesh.ep_group)
        with autocast(device, self.compute):
            out = generate(model, [prompt_ids], params, all_done=all_done)
        return self.data.tokenizer.decode(prompt_ids + out.tokens[0].tolist())

    # --- the loop ------------------------------------------------------------------------
    def run(self, until_step: int | None = None) -> TrainResult:
        """Train to `cfg.steps` (or stop early at `until_step`, saving a checkpoint there, as a
        preempted job would), then evaluate and sample."""
        cfg = self.cfg
        last = cfg.steps if until_step is None else min(until_step, cfg.steps)
        result = TrainResult(run_dir=self.run_dir, start_step=self.step)
        if cfg.engine.convert_to_native:  # engine=deepspeed only (config.py)
            path = self.engine.convert_to_native(self.resume_from, self._extra())
            self.say(f"duet: {path} now holds duet's format too; resume it with engine=native")
            return result
        if self.is_main:
            (self.run_dir / "config.yaml").write_text(_to_yaml(cfg))
        mesh = self.mesh
        pp = f", pp {mesh.pp} {self.cfg.parallel.schedule}" if mesh.pp > 1 else ""
        layout = "" if mesh.is_single else f", {mesh.world} ranks (dp {mesh.dp}, ep {mesh.ep}{pp})"
        self.say(f"duet: {cfg.model.name} model, {self.counts['total']:,} parameters "
                 f"({self.counts['activated']:,} activated), {self.device}, {self.compute}{layout}, "
                 f"run folder {self.run_dir}")
        for path, why in self.damaged:  # set aside by rank 0 when it picked the starting point
            self.say(f"duet: checkpoint {path.name} is damaged ({why}); moved to "
                     f"{checkpoint.set_aside(path).name}, using the newest intact one")
        if self.resume_from is not None:
            self.say(f"duet: resumed from {self.resume_from} at step {self.step}")
        elif self.init_from is not None:
            self.say(f"duet: weights initialised from {self.init_from}")
        logger = MetricsLogger(self.run_dir, cfg.logging, cfg, resume=self.step > 0, enabled=self.is_main)
        bar = ProgressBar(cfg.steps, self.step, cfg.logging.progress_bar and self.is_main)
        peak = gpu_peak_tflops(device_index=self.device.index or 0)  # dense bf16, whatever the precision
        nvml = NvmlSampler(self.device.index or 0 if self.device.type == "cuda" else None)
        comm.reset_comm_stats()
        if not mesh.is_single:  # hang detection: a blocking wait longer than the timeout exits
            watchdog.arm(cfg.launch.collective_timeout_s, mesh.rank, comm.backend())
            if planned("collective"):  # fault injection: stall this rank inside a collective
                watchdog.on_wait = lambda kind, step: maybe_fail("collective", step, mesh.rank, self.run_dir)
        window = ThroughputWindow()  # evaluation and checkpoint time paused out of tokens/s
        try:
            while self.step < last:
                inputs, targets = self.data.train.next()
                log_now = (self.step + 1) % cfg.logging.log_interval == 0 or self.step + 1 == cfg.steps
                record = self.train_step(inputs, targets, detail=log_now)
                if "skipped" in record:  # always logged, whatever the interval
                    log_now = True
                    bar.write(f"step {self.step}: non-finite {record['skipped']}; optimizer step skipped "
                              f"on every rank ({self.consecutive_skips} in a row)")
                result.losses.append(record["loss"])
                window.add(self.tokens_per_step)
                tokens_per_s = window.tokens_per_s()
                bar.update(self.step, record["loss"], tokens_per_s, record["lr"])
                if log_now:
                    record.update(step=self.step, tokens_per_s=tokens_per_s, **nvml.read(),
                                  **comm_record(comm.comm_stats(), window.seconds()),
                                  **ep_record(self.model, window.steps))
                    comm.reset_comm_stats()
                    if (value := mfu(tokens_per_s, self.flops_per_token, self.mesh.world, peak)) is not None:
                        record["mfu"] = value
                    logger.log(record)
                    if not self.is_main:  # lands in this rank's log file
                        print(f"step {self.step} loss {record['loss']:.4f}", flush=True)
                    window.reset()
                with window.paused():
                    if cfg.eval_interval and self.step % cfg.eval_interval == 0 and self.step < cfg.steps:
                        val = self.evaluate()
                        logger.log({"step": self.step, "val_loss": val})
                        bar.write(f"step {self.step}: validation loss {val:.4f}")
                    if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
                        self.save()
            bar.close()
            self.saver.wait()
            if latest_step(self.run_dir) != self.step:
                self.save()
            self.saver.wait()
            result.val_loss = self.evaluate()
            logger.log({"step": self.step, "val_loss": result.val_loss})
            self.say(f"duet: final validation loss {result.val_loss:.4f} at step {self.step} "
                     f"(checkpoint in {checkpoint.checkpoint_root(self.run_dir)})")
            generates = self.is_main or (self.pipeline is None and self.every_rank_generates)
            if cfg.logging.sample_tokens and generates:
                result.sample = self.sample(cfg.logging.sample_tokens)
                self.say("duet: greedy sample:\n" + result.sample)
        finally:
            watchdog.disarm()
            bar.close()
            logger.close()
            nvml.close()
        if logger.wandb_run is not None and logger.wandb_run.settings.mode == "offline":
            self.say(f"duet: offline wandb run in {self.run_dir / 'wandb'} "
                     f"(upload it with `wandb sync {self.run_dir / 'wandb'}/offline-run-*`)")
        return result


def _to_yaml(cfg: TrainConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def build_trainer(cfg: TrainConfig) -> Trainer:
    """One trainer for every engine: parallelize() builds the one cfg.engine names."""
    return Trainer(cfg)


def train(cfg: TrainConfig, on_failure: Callable[[], None] | None = None) -> TrainResult:
    """Build and run; `on_failure` runs on an exception before the process group is left,
    so while the peers still wait on this rank rather than on a closed connection."""
    try:
        return build_trainer(cfg).run()
    except BaseException:
        if on_failure is not None:
            on_failure()
        raise
    finally:
        shutdown()  # leave the process group (a no-op in a single process)
