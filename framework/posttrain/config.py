"""The post-training config (duet-r1): PosttrainConfig and its checks, beside the code it drives.

framework/config.py holds the training run's groups; this group configures framework/posttrain/.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

from framework.config import (
    EngineConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    _model_problems,
    engine_problems,
    layout_problems,
)


def _micro_policy() -> ModelConfig:
    """A DeepSeek-shaped micro model for the CPU demo: MLA, one dense block, one MoE block with
    4 routed experts (top-2) and a shared one; byte vocabulary plus the end token."""
    return ModelConfig(name="r1-micro", vocab_size=257, dim=64, n_layers=2, n_dense_layers=1,
                       dense_inter_dim=128, max_seq_len=64, n_heads=2, q_lora_rank=32, kv_lora_rank=32,
                       qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                       n_shared_experts=1,
                       n_activated_experts=2, moe_inter_dim=64, n_expert_groups=1, n_limited_groups=1,
                       init_std=0.02, mtp_depth=0)


def _micro_student() -> ModelConfig:
    """The distillation student: dense (no routed experts), narrower than the policy."""
    return ModelConfig(name="r1-student", vocab_size=257, dim=48, n_layers=2, n_dense_layers=2,
                       dense_inter_dim=96, max_seq_len=64, n_heads=2, q_lora_rank=0, kv_lora_rank=24,
                       qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                       n_shared_experts=0,
                       n_activated_experts=2, moe_inter_dim=32, n_expert_groups=1, n_limited_groups=1,
                       init_std=0.02, mtp_depth=0)


@dataclass
class PosttrainConfig:
    """R1's path on a synthetic verifiable task (framework/posttrain/, `duet-r1`): pre-train on
    the task's text, SFT on the think/answer template, GRPO with rule-based rewards, distil."""

    task: str = "addition"  # addition, sorting, countdown (framework/posttrain/tasks.py)
    digits: int = 2  # operand digits / list length / number count
    sft_data: str = ""  # a jsonl of prompt/completion or messages rows; "" = generated from the task
    policy: ModelConfig = field(default_factory=_micro_policy)
    student: ModelConfig = field(default_factory=_micro_student)
    seed: int = 0
    batch_size: int = 32  # rows per pre-training / SFT / distillation step
    pretrain_steps: int = 1500  # at most: pre-training stops once pretrain_until is reached
    pretrain_lr: float = 3e-3
    # Stop pre-training at this greedy accuracy (checked every 10 steps; 0 = run every step): RL
    # on a tiny model needs a start that can sometimes solve the task, but not always. The micro
    # model's accuracy on 2-digit addition jumps from ~10% to ~98% within ~150 steps
    # (measured: 7% at 650 steps, 99% at 780), so a step count alone cannot place it in between.
    pretrain_until: float = 0.3
    sft_steps: int = 30
    sft_lr: float = 1e-3
    # GRPO: prompts_per_step questions, group_size samples each, at `temperature`. lr: on the
    # micro policy (3-element sorting from 34%, 8 x 8 rollouts, one update each, 30 steps) 1e-3
    # drove greedy accuracy to 0% within 5 steps, 3e-4 rose noisily, 1e-4 rose 16 points.
    grpo_steps: int = 30
    grpo_lr: float = 1e-4
    prompts_per_step: int = 16
    group_size: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 24  # addition's response: <think>3 digits</think>3 digits + END = 22
    epsilon: float = 0.2  # clip low: ratio >= 1 - epsilon
    epsilon_high: float = 0.2  # clip high: ratio <= 1 + epsilon_high (DAPO: 0.28)
    kl_coef: float = 0.0  # beta of the k3 KL to the frozen reference (R1-Zero 0.001); 0 = no reference
    ref_refresh: int = 0  # copy the policy into the reference every this many steps; 0 = never
    loss_agg: str = "grpo"  # grpo (per response, then per group), dapo (token-level), dr_grpo
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal
    updates_per_batch: int = 1  # optimizer steps per rollout batch (old-policy log-probs fixed)
    micro_batches: int = 1  # per update: gradient accumulation over this many pieces
    rewards: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1})
    control: str = "none"  # none, or shuffle: rewards permuted across the batch (a control run)
    routing_replay: bool = False  # force the rollout pass's experts in the training forward
    bias_update: float = 0.0  # aux-loss-free bias during RL: 0 frozen, 1 as in pre-training, else scaled
    # MTP modules during RL (a policy with mtp_depth > 0): drop their loss, or freeze them (the same
    # here: no loss reaches them and post-training has no weight decay, so they stay as they are),
    # or train them on the rollouts' response tokens (grpo.mtp_response_loss; parallel.pp=1).
    mtp: str = "drop"
    # Distillation: rejection-sample correct answers of the policy into an SFT set for the student.
    distill_prompts: int = 512
    distill_steps: int = 200
    distill_lr: float = 3e-3
    eval_prompts: int = 256  # fixed held-out problems for greedy accuracy
    eval_interval: int = 5  # GRPO steps between greedy evaluations (and the last step); 0 = only the last
    run_dir: str = "runs/r1"
    # The layout and engine of every model (policy, reference, student), as duet-train's groups:
    # under torchrun, world = parallel.pp * parallel.dp ranks (gloo on CPU). Under pp > 1 a step's
    # rows are parallel.micro_batches pieces of one shape, so GRPO's micro_batches must equal it.
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)  # native, or deepspeed (ZeRO 1-2, pp=1)


POSTTRAIN_TASKS = ("addition", "sorting", "countdown")
LOSS_AGGS = ("grpo", "dapo", "dr_grpo")


def train_config(c: PosttrainConfig, mesh=None) -> TrainConfig:
    """The TrainConfig parallelize() reads: the policy, fp32 on the CPU, c's layout and engine
    (the sizes of `mesh` where one is given: tests build their own)."""
    cfg = TrainConfig(seed=c.seed, device="cpu", run_dir=c.run_dir)
    cfg.model = c.policy
    cfg.optim = OptimConfig(lr=c.sft_lr, min_lr=0.0, weight_decay=0.0, grad_clip=1.0, warmup_steps=0,
                            schedule="constant")
    cfg.parallel, cfg.engine = copy.deepcopy(c.parallel), copy.deepcopy(c.engine)
    cfg.data.batch_size = c.batch_size
    if mesh is not None and not mesh.is_single:
        cfg.parallel.pp, cfg.parallel.dp, cfg.parallel.ep = mesh.pp, mesh.dp, mesh.ep
    return cfg


def _layout_lines(c: PosttrainConfig) -> list[str]:
    """duet-train's layout and engine checks, in duet-r1's key names, plus post-training's own."""
    cfg = train_config(c)
    lines = [line.replace("data.batch_size", "batch_size").replace("model.", "policy.")
             for line in layout_problems(cfg) + engine_problems(cfg) if not line.startswith("launch.")]
    par = c.parallel
    if par.pp > 1 and c.micro_batches != par.micro_batches:
        lines.append(f"micro_batches={c.micro_batches}: under parallel.pp > 1 GRPO's pieces are the "
                     f"pipeline's; set micro_batches={par.micro_batches} (parallel.micro_batches)")
    if par.pp > 1 and par.ep > 1:
        lines.append(f"parallel.ep={par.ep} with parallel.pp={par.pp}: sampling under a pipeline gathers a "
                     "whole model per rank, without expert parallelism; use parallel.ep=1 with pp > 1")
    if par.pp > 1 and c.dynamic_sampling:
        lines.append("dynamic_sampling=true with parallel.pp > 1: the kept rollouts would not split into "
                     "parallel.micro_batches pieces of one shape; use parallel.pp=1")
    if par.pp > 1 and (c.prompts_per_step // par.dp * c.group_size) % par.micro_batches:
        lines.append(f"prompts_per_step={c.prompts_per_step}: each dp rank's rollouts (prompts_per_step / "
                     f"parallel.dp x group_size) must split into parallel.micro_batches={par.micro_batches}")
    if c.engine.name == "deepspeed" and c.engine.zero_stage == 3:
        lines.append("engine.zero_stage=3: sampling reads the weights outside a forward, where ZeRO-3 holds "
                     "only partitions; use engine.zero_stage=1 or 2")
    if c.prompts_per_step % par.dp or c.distill_prompts % par.dp:
        lines.append(f"prompts_per_step={c.prompts_per_step}, distill_prompts={c.distill_prompts}: each must "
                     f"be divisible by parallel.dp={par.dp}")
    return [f"posttrain.{line}" for line in lines]


def posttrain_problems(c: PosttrainConfig) -> list[str]:
    """Impossible post-training settings, one line each naming the key and the fix."""
    p = [f"posttrain.policy.{line.removeprefix('model.')}" for line in _model_problems(c.policy)]
    p += [f"posttrain.student.{line.removeprefix('model.')}" for line in _model_problems(c.student)]
    if c.task not in POSTTRAIN_TASKS:
        p.append(f"posttrain.task={c.task!r}: choose one of {', '.join(POSTTRAIN_TASKS)}")
    if c.loss_agg not in LOSS_AGGS:
        p.append(f"posttrain.loss_agg={c.loss_agg!r}: choose one of {', '.join(LOSS_AGGS)}")
    if c.group_size < 2:
        p.append(f"posttrain.group_size={c.group_size}: GRPO needs >= 2 samples per prompt (the advantage "
                 "compares a sample with its group); raise it")
    for m, key in ((c.policy, "policy"), (c.student, "student")):
        if m.vocab_size < 257:
            p.append(f"posttrain.{key}.vocab_size={m.vocab_size}: needs >= 257 (256 bytes + the end token)")
    for key in ("digits", "batch_size", "prompts_per_step", "max_new_tokens", "updates_per_batch",
                "micro_batches", "eval_prompts", "distill_prompts"):
        if getattr(c, key) < 1:
            p.append(f"posttrain.{key}={getattr(c, key)}: must be >= 1")
    for key in ("pretrain_steps", "sft_steps", "grpo_steps", "distill_steps", "ref_refresh", "kl_coef",
                "eval_interval",
                "bias_update", "epsilon", "epsilon_high", "temperature"):
        if not getattr(c, key) >= 0:
            p.append(f"posttrain.{key}={getattr(c, key)}: must be >= 0")
    for key in ("pretrain_lr", "sft_lr", "grpo_lr", "distill_lr"):
        if not (getattr(c, key) > 0 and math.isfinite(getattr(c, key))):
            p.append(f"posttrain.{key}={getattr(c, key)}: must be a positive number")
    if c.micro_batches > c.prompts_per_step * c.group_size:
        p.append(f"posttrain.micro_batches={c.micro_batches}: more than the "
                 f"{c.prompts_per_step * c.group_size} rollouts of a step")
    if not 0 <= c.pretrain_until <= 1:
        p.append(f"posttrain.pretrain_until={c.pretrain_until}: give a greedy accuracy in [0, 1] "
                 "(0 = no early stop)")
    if c.control not in ("none", "shuffle"):
        p.append(f"posttrain.control={c.control!r}: choose none or shuffle")
    if c.routing_replay and c.policy.recompute != "none":
        p.append(f"posttrain.routing_replay=true with posttrain.policy.recompute={c.policy.recompute}: a "
                 "recompute re-runs the router outside the replay; set posttrain.policy.recompute=none")
    if c.mtp not in ("drop", "freeze", "train"):
        p.append(f"posttrain.mtp={c.mtp!r}: choose drop, freeze or train")
    elif c.mtp == "train" and c.parallel.pp > 1:
        p.append("posttrain.mtp=train with parallel.pp > 1: the MTP term runs in one process only; use "
                 "posttrain.mtp=drop or parallel.pp=1")
    if not c.rewards:
        p.append("posttrain.rewards is empty: give at least one, e.g. {accuracy: 1.0, format: 0.1}")
    p += _layout_lines(c)
    if c.sft_data and not Path(c.sft_data).expanduser().is_file():
        p.append(f"posttrain.sft_data={c.sft_data!r}: file not found; give a .jsonl path or \"\" for "
                 "rows generated from the task")
    return p
