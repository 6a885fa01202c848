"""Typed configuration for every part of duet.

Hydra composes YAML from `configs/` at the edge (`launch/run.py`) and turns it into these
dataclasses; nothing below the launcher ever sees a `DictConfig`. `validate()` returns one
line per problem (naming the key and the fix) so the launcher can refuse a run before any
worker starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ModelConfig:
    name: str = "tiny"
    vocab_size: int = 2048
    dim: int = 128
    n_layers: int = 3
    n_dense_layers: int = 1  # the first k blocks use a dense SwiGLU instead of MoE
    dense_inter_dim: int = 384
    max_seq_len: int = 256
    norm_eps: float = 1e-6
    init_std: float = 0.006
    # Multi-head latent attention (MLA). q_lora_rank == 0 means no query compression (V2-Lite).
    n_heads: int = 4
    q_lora_rank: int = 64
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # RoPE with optional YaRN scaling; rope_factor == 1 means plain RoPE.
    rope_theta: float = 10000.0
    rope_factor: float = 1.0
    original_seq_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    # DeepSeekMoE: shared experts plus fine-grained routed experts.
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2  # top-k
    moe_inter_dim: int = 64
    n_expert_groups: int = 4
    n_limited_groups: int = 2  # top groups kept per token
    score_func: str = "sigmoid"  # sigmoid (V3) or softmax (V2)
    route_scale: float = 2.5  # routed_scaling_factor
    norm_topk_prob: bool = True  # renormalise the selected weights to sum 1
    # Load balancing: aux-loss-free bias (gamma == 0 disables) and the sequence-wise loss.
    bias_update_rate: float = 0.001
    seq_aux_alpha: float = 1e-4
    # Multi-token prediction: depth D (0 disables) and loss weight lambda.
    mtp_depth: int = 1
    mtp_loss_weight: float = 0.3
    # Activation recompute per compute sub-step: none, selective (DeepSeek-V3's: RMSNorms, MLA
    # up-projections, SwiGLU activations) or full (every compute sub-step of a block); the
    # all-to-alls are never re-run (framework/model/recompute.py). duet-plan reads it too.
    recompute: str = "none"


@dataclass
class ParallelConfig:
    """The layout: world = pp * dp ranks; ep groups live inside dp (edp = dp / ep)."""

    pp: int = 1
    dp: int = 1
    ep: int = 1
    zero1: bool = True  # shard optimizer state (FP32 master + moments) across dp
    schedule: str = "1f1b"  # gpipe, 1f1b, dualpipe, dualpipev
    micro_batches: int = 1  # per step and dp rank
    bucket_mb: float = 25.0  # gradient-reduction bucket size
    # Dtype fp32 gradients are reduced in across dp: fp32 (exact sums, what the equality tests
    # use) or bf16 (half the bytes; each rank's gradient and the sum rounded to bf16).
    grad_reduce_dtype: str = "fp32"
    # Expert parallelism. Node-limited routing (V3): a token's experts span at most this many
    # nodes (launch.gpus_per_node ranks each; simulated on one machine); 0 = no limit.
    max_nodes_per_token: int = 0
    # Dispatch payload: auto (fp8 under precision=fp8, else the activations' dtype), fp8
    # (1x128-scaled e4m3 + scales, about half of bf16's bytes), activation. Combine never uses fp8.
    dispatch_dtype: str = "auto"
    # Pipeline: blocks per stage (empty: balance parameters; DualPipeV has 2 * pp stages), and
    # the weight-gradient split (zero bubble: backward computes input gradients first).
    layers_per_stage: list[int] = field(default_factory=list)
    wgrad_split: bool = True
    # DualPipe(V)'s pairs (FB actions): the runtime interleaves a pair's forward and backward
    # sub-layer steps on one thread (DeepSeek-V3's order, parallel/pipeline/runtime.py), and
    # duet-plan models the pair as overlapped; false: forward, then backward (same numbers).
    overlap_fb: bool = True


@dataclass
class EngineConfig:
    """Who runs the optimizer: duet's own data-parallel engine, or DeepSpeed's ZeRO (pp == 1 only,
    parallel/deepspeed_engine.py). The model, EP dispatcher, data, LR schedule and AdamW are duet's
    under both, so the two engines train the same numbers."""

    name: str = "native"  # native or deepspeed
    zero_stage: int = 1  # deepspeed: 1, 2 or 3 (the native engine uses parallel.zero1)
    # deepspeed: write the newest DeepSpeed checkpoint of run_dir in duet's format too (so the native
    # engine can resume it), then stop without training. Needs the layout it was saved with.
    convert_to_native: bool = False
    # deepspeed: keys merged over the generated DeepSpeed config, e.g.
    # +engine.deepspeed.zero_optimization.reduce_bucket_size=1e6
    deepspeed: dict[str, Any] = field(default_factory=dict)


@dataclass
class PrecisionConfig:
    # auto (bf16 on GPU, fp32 on CPU), fp32, bf16, or fp8: DeepSeek-V3's FP8 GEMMs
    # (framework/fp8.py) with the rest in bf16 on GPU, fp32 on CPU.
    compute: str = "auto"
    moment_dtype: str = "fp32"  # AdamW moments: fp32 or bf16 (V3 uses bf16)


@dataclass
class DataConfig:
    # "stdlib" is the embedded corpus: this Python's own standard library sources.
    # Otherwise a path to a .txt/.py text file, a .jsonl file with a `text` field,
    # or a pre-tokenized .bin memmap.
    source: str = "stdlib"
    bin_dtype: str = "uint16"  # dtype of a .bin memmap: uint16 or uint32
    tokenizer: str = "bpe"  # bpe (trained locally, cached in the run folder) or byte
    max_corpus_mb: float = 4.0  # cap on text read for the corpus and tokenizer training
    seq_len: int = 128
    batch_size: int = 16  # global batch, in sequences
    val_fraction: float = 0.05
    seed: int = 1234


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    warmup_steps: int = 20
    # cosine: warm-up then cosine to min_lr over the run.
    # deepseek: warm-up, constant until decay_start, cosine to min_lr until decay_end,
    # then steps down to each of step_lrs at the fractions in step_at.
    schedule: str = "cosine"
    decay_start: float = 0.5
    decay_end: float = 0.9
    step_lrs: list[float] = field(default_factory=list)
    step_at: list[float] = field(default_factory=list)
    # NaN/Inf guard: a step whose loss or gradient norm is not finite on any rank is skipped on
    # every rank; this many skips in a row are tolerated, the next one stops the run.
    max_consecutive_skips: int = 3


@dataclass
class CheckpointConfig:
    interval: int = 100  # steps between saves; 0 saves only at the end
    keep_last: int = 2
    async_save: bool = False  # write in the background while training continues
    resume: bool = True  # resume from the latest checkpoint in the run folder, if any
    load_from: str = ""  # an explicit checkpoint folder to start from


@dataclass
class LaunchConfig:
    mode: str = "local"  # local, simulated, torchrun, slurm
    nproc: int = 0  # processes on this host; 0 = parallel.pp * parallel.dp
    dry_run: bool = False
    max_restarts: int = 0  # restart a crashed group this often; it resumes from the checkpoint
    port: int = 0  # rendezvous port on loopback for local/simulated; 0 picks a free one
    # A blocking wait on a collective longer than this is a hang: the watchdog names the rank,
    # collective and step, and exits so the group restarts (parallel/watchdog.py).
    collective_timeout_s: float = 300.0
    nodes: int = 1  # slurm: nodes to request
    gpus_per_node: int = 8  # ranks per node: slurm's processes per node, and the node size
    # node-limited expert routing assumes (real on clusters, simulated on one machine)
    slurm_partition: str = ""
    slurm_time: str = "24:00:00"


@dataclass
class ClusterConfig:
    """The machines `duet-plan` plans for (configs/cluster/); training never reads it. Node size
    is launch.gpus_per_node. Bandwidths are per GPU and direction, taken as achieved (DeepEP
    reaches 153-158 of NVLink's 160 GB/s and 43-58 of IB's 50 on H800); the efficiencies are the
    planner's stated assumptions, the share of peak a kernel class reaches."""

    name: str = "h800"
    memory_gib: float = 80.0
    reserved_gib: float = 4.0  # CUDA context, NCCL buffers, allocator fragmentation
    nvlink_gbps: float = 160.0
    ib_gbps: float = 50.0
    bf16_tflops: float = 989.0  # dense peaks; FP32 runs as TF32 at half the BF16 peak
    fp8_tflops: float = 1979.0
    gemm_efficiency: float = 0.6  # linear layers and grouped expert GEMMs (DeepGEMM: 1214-1550 of 1979)
    attention_efficiency: float = 0.4  # causal attention core, forward and backward
    other_overhead: float = 0.15  # norms, SwiGLU, RoPE, quantisation, routing: share of GEMM time
    comm_sm_share: float = 0.15  # SMs given to overlapped communication (V3: 20 of 132)


@dataclass
class LoggingConfig:
    progress_bar: bool = True
    log_interval: int = 10  # steps between JSONL records
    wandb_mode: str = "auto"  # auto (online with a key, else offline), online, offline, disabled
    wandb_project: str = "duet"
    sample_tokens: int = 48  # greedy sample printed at the end; 0 disables
    # pp > 1: record this step's pipeline timeline (every rank's F/B/W/receive spans) into
    # run_dir/timeline.png and timeline.trace.json (chrome://tracing); 0 disables.
    timeline_step: int = 0


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    steps: int = 300
    eval_interval: int = 100  # 0 evaluates only at the end
    eval_batches: int = 8
    seed: int = 0
    device: str = "auto"  # auto (cuda when present), cpu, cuda
    run_dir: str = "runs/default"


SCORE_FUNCS = ("sigmoid", "softmax")
RECOMPUTE_MODES = ("none", "selective", "full")
SCHEDULES = ("gpipe", "1f1b", "dualpipe", "dualpipev")
COMPUTE_DTYPES = ("auto", "fp32", "bf16", "fp8")
MOMENT_DTYPES = ("fp32", "bf16")
LR_SCHEDULES = ("cosine", "deepseek", "constant")
WANDB_MODES = ("auto", "online", "offline", "disabled")
LAUNCH_MODES = ("local", "simulated", "torchrun", "slurm")
DISPATCH_DTYPES = ("auto", "fp8", "activation")
TOKENIZERS = ("bpe", "byte")
BIN_DTYPES = ("uint16", "uint32")


def _model_problems(m: ModelConfig) -> list[str]:
    p: list[str] = []
    positive = ("vocab_size", "dim", "n_layers", "n_heads", "kv_lora_rank", "qk_rope_head_dim",
                "v_head_dim", "max_seq_len", "n_routed_experts", "n_activated_experts",
                "moe_inter_dim", "n_expert_groups", "n_limited_groups")
    for key in positive:
        if getattr(m, key) <= 0:
            p.append(f"model.{key}={getattr(m, key)}: must be positive")
    for key in ("q_lora_rank", "n_shared_experts", "mtp_depth", "qk_nope_head_dim",
                "bias_update_rate", "seq_aux_alpha", "mtp_loss_weight"):
        if getattr(m, key) < 0:
            p.append(f"model.{key}={getattr(m, key)}: must be >= 0")
    if p:
        return p
    if not 0 <= m.n_dense_layers <= m.n_layers:
        p.append(f"model.n_dense_layers={m.n_dense_layers}: must lie in [0, model.n_layers={m.n_layers}]")
    if m.n_dense_layers > 0 and m.dense_inter_dim <= 0:
        p.append(f"model.dense_inter_dim={m.dense_inter_dim}: must be positive when dense layers exist")
    if m.qk_rope_head_dim % 2:
        p.append(f"model.qk_rope_head_dim={m.qk_rope_head_dim}: must be even (RoPE rotates pairs)")
    if m.recompute not in RECOMPUTE_MODES:
        p.append(f"model.recompute={m.recompute!r}: choose one of {', '.join(RECOMPUTE_MODES)}")
    if m.score_func not in SCORE_FUNCS:
        p.append(f"model.score_func={m.score_func!r}: choose one of {', '.join(SCORE_FUNCS)}")
    if m.n_activated_experts > m.n_routed_experts:
        p.append(f"model.n_activated_experts={m.n_activated_experts}: top-k larger than "
                 f"model.n_routed_experts={m.n_routed_experts}; lower it")
    elif m.n_routed_experts % m.n_expert_groups:
        p.append(f"model.n_expert_groups={m.n_expert_groups}: must divide "
                 f"model.n_routed_experts={m.n_routed_experts}")
    elif m.n_limited_groups > m.n_expert_groups:
        p.append(f"model.n_limited_groups={m.n_limited_groups}: more than "
                 f"model.n_expert_groups={m.n_expert_groups}")
    elif m.n_activated_experts > m.n_limited_groups * (m.n_routed_experts // m.n_expert_groups):
        p.append(f"model.n_activated_experts={m.n_activated_experts}: more than the "
                 f"{m.n_limited_groups} kept groups hold; raise model.n_limited_groups")
    if m.rope_factor < 1:
        p.append(f"model.rope_factor={m.rope_factor}: must be >= 1 (1 disables YaRN)")
    return p


def _recompute_problems(cfg: TrainConfig) -> list[str]:
    """Recompute combinations that do not compose (framework/model/recompute.py)."""
    mode = cfg.model.recompute
    if mode == "none":
        return []
    if cfg.engine.name == "deepspeed" and cfg.engine.zero_stage == 3:
        return [f"model.recompute={mode} with engine.zero_stage=3: ZeRO-3 frees the parameters the "
                "recompute re-reads; use model.recompute=none or engine.zero_stage<=2"]
    return []


def validate(cfg: TrainConfig) -> list[str]:
    """Every problem with `cfg`, one line each naming the key and the fix; [] means valid."""
    p = _model_problems(cfg.model)
    d, o = cfg.data, cfg.optim
    if d.seq_len <= 0 or d.batch_size <= 0:
        p.append(f"data.seq_len={d.seq_len}, data.batch_size={d.batch_size}: both must be positive")
    elif d.seq_len > cfg.model.max_seq_len:
        p.append(f"data.seq_len={d.seq_len}: longer than model.max_seq_len="
                 f"{cfg.model.max_seq_len} (the RoPE table); shorten it or raise model.max_seq_len")
    if not d.source:
        p.append("data.source is empty: give a .txt/.jsonl/.bin path or data.source=stdlib")
    elif d.source != "stdlib" and not Path(d.source).expanduser().is_file():
        p.append(f"data.source={d.source!r}: file not found; give an existing .txt/.jsonl/.bin "
                 f"path or data.source=stdlib")
    if d.tokenizer not in TOKENIZERS:
        p.append(f"data.tokenizer={d.tokenizer!r}: choose one of {', '.join(TOKENIZERS)}")
    if d.bin_dtype not in BIN_DTYPES:
        p.append(f"data.bin_dtype={d.bin_dtype!r}: choose one of {', '.join(BIN_DTYPES)}")
    if d.tokenizer == "byte" and cfg.model.vocab_size < 256:
        p.append(f"model.vocab_size={cfg.model.vocab_size}: the byte tokenizer needs >= 256")
    if not 0 < d.val_fraction < 1:
        p.append(f"data.val_fraction={d.val_fraction}: must lie strictly between 0 and 1")
    if d.max_corpus_mb <= 0:
        p.append(f"data.max_corpus_mb={d.max_corpus_mb}: must be positive")
    if not (o.lr > 0 and math.isfinite(o.lr)):
        p.append(f"optim.lr={o.lr}: must be a positive number")
    elif o.min_lr < 0 or o.min_lr > o.lr:
        p.append(f"optim.min_lr={o.min_lr}: must lie in [0, optim.lr={o.lr}]")
    if o.weight_decay < 0 or o.grad_clip < 0 or o.warmup_steps < 0 or o.eps <= 0:
        p.append("optim.weight_decay, optim.grad_clip and optim.warmup_steps must be >= 0 "
                 "and optim.eps > 0")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        p.append(f"optim.betas={list(o.betas)}: give two numbers in [0, 1)")
    if o.schedule not in LR_SCHEDULES:
        p.append(f"optim.schedule={o.schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
    if not 0 <= o.decay_start <= o.decay_end <= 1:
        p.append(f"optim.decay_start={o.decay_start}, optim.decay_end={o.decay_end}: "
                 "need 0 <= decay_start <= decay_end <= 1")
    if len(o.step_lrs) != len(o.step_at):
        p.append("optim.step_lrs and optim.step_at must have the same length")
    if o.max_consecutive_skips < 0:
        p.append(f"optim.max_consecutive_skips={o.max_consecutive_skips}: must be >= 0 (0 stops at the "
                 "first non-finite step)")
    if cfg.precision.compute not in COMPUTE_DTYPES:
        p.append(f"precision.compute={cfg.precision.compute!r}: choose one of {', '.join(COMPUTE_DTYPES)}")
    if cfg.precision.moment_dtype not in MOMENT_DTYPES:
        p.append(f"precision.moment_dtype={cfg.precision.moment_dtype!r}: choose one of "
                 f"{', '.join(MOMENT_DTYPES)}")
    p += _recompute_problems(cfg)
    if cfg.steps <= 0:
        p.append(f"steps={cfg.steps}: must be positive")
    if cfg.eval_interval < 0 or cfg.eval_batches <= 0:
        p.append("eval_interval must be >= 0 and eval_batches > 0")
    if cfg.checkpoint.interval < 0 or cfg.checkpoint.keep_last < 1:
        p.append("checkpoint.interval must be >= 0 and checkpoint.keep_last >= 1")
    if cfg.checkpoint.load_from and not Path(cfg.checkpoint.load_from).is_dir():
        p.append(f"checkpoint.load_from={cfg.checkpoint.load_from!r}: no such checkpoint folder")
    if cfg.device not in ("auto", "cpu", "cuda"):
        p.append(f"device={cfg.device!r}: choose auto, cpu or cuda")
    if cfg.logging.wandb_mode not in WANDB_MODES:
        p.append(f"logging.wandb_mode={cfg.logging.wandb_mode!r}: choose one of {', '.join(WANDB_MODES)}")
    p += layout_problems(cfg)
    p += engine_problems(cfg)
    return p


def world_size(cfg: TrainConfig) -> int:
    return cfg.parallel.pp * cfg.parallel.dp


def layout_problems(cfg: TrainConfig) -> list[str]:
    """Impossible parallel layouts and launch settings (DESIGN.md rule 3)."""
    par, launch, p = cfg.parallel, cfg.launch, []
    if par.schedule not in SCHEDULES:
        p.append(f"parallel.schedule={par.schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if min(par.pp, par.dp, par.ep, par.micro_batches) < 1:
        return p + ["parallel.pp, parallel.dp, parallel.ep and parallel.micro_batches must be >= 1"]
    if par.bucket_mb <= 0:
        p.append(f"parallel.bucket_mb={par.bucket_mb}: must be positive")
    if par.grad_reduce_dtype not in ("fp32", "bf16"):
        p.append(f"parallel.grad_reduce_dtype={par.grad_reduce_dtype!r}: choose fp32 or bf16")
    if par.dp % par.ep:
        p.append(f"parallel.ep={par.ep}: must divide parallel.dp={par.dp} (ep groups live inside dp)")
    if cfg.model.n_routed_experts % par.ep:
        p.append(f"parallel.ep={par.ep}: must divide model.n_routed_experts={cfg.model.n_routed_experts}")
    if cfg.data.batch_size % par.dp:
        p.append(f"data.batch_size={cfg.data.batch_size}: must be divisible by parallel.dp={par.dp}")
    elif (cfg.data.batch_size // par.dp) % par.micro_batches:
        p.append(f"parallel.micro_batches={par.micro_batches}: must divide the per-rank batch "
                 f"data.batch_size / parallel.dp = {cfg.data.batch_size // par.dp}")
    p += _expert_routing_problems(cfg)
    stages = par.pp * (2 if par.schedule == "dualpipev" else 1)
    if par.pp > 1 and stages > cfg.model.n_layers:
        p.append(f"parallel.pp={par.pp}: {stages} pipeline stages need at least as many blocks, "
                 f"model.n_layers={cfg.model.n_layers}")
    elif par.layers_per_stage and (len(par.layers_per_stage) != stages or min(par.layers_per_stage) < 1
                                   or sum(par.layers_per_stage) != cfg.model.n_layers):
        p.append(f"parallel.layers_per_stage={list(par.layers_per_stage)}: give {stages} counts >= 1 "
                 f"summing to model.n_layers={cfg.model.n_layers} (or [] to balance parameters)")
    if par.pp > 1 and par.schedule == "dualpipe":
        if par.pp % 2:
            p.append(f"parallel.pp={par.pp}: DualPipe needs an even pp (or parallel.schedule=dualpipev)")
        if par.micro_batches % 2 or par.micro_batches < 2 * par.pp:
            p.append(f"parallel.micro_batches={par.micro_batches}: DualPipe needs an even count "
                     f">= 2 * pp = {2 * par.pp}")
    if par.pp > 1 and par.schedule == "dualpipev" and par.micro_batches < 2 * par.pp:
        p.append(f"parallel.micro_batches={par.micro_batches}: DualPipeV needs >= 2 * pp = {2 * par.pp}")
    if launch.mode not in LAUNCH_MODES:
        p.append(f"launch.mode={launch.mode!r}: choose one of {', '.join(LAUNCH_MODES)}")
    if launch.nproc < 0 or launch.max_restarts < 0 or launch.nodes < 1 or launch.gpus_per_node < 1:
        p.append("launch.nproc and launch.max_restarts must be >= 0, launch.nodes and "
                 "launch.gpus_per_node >= 1")
    elif launch.mode in ("local", "simulated") and launch.nproc not in (0, world_size(cfg)):
        p.append(f"launch.nproc={launch.nproc}: the layout needs parallel.pp * parallel.dp = "
                 f"{world_size(cfg)} processes; set launch.nproc={world_size(cfg)} or 0")
    elif launch.mode == "slurm" and launch.nodes * launch.gpus_per_node != world_size(cfg):
        p.append(f"launch.nodes * launch.gpus_per_node = {launch.nodes * launch.gpus_per_node}: must "
                 f"equal parallel.pp * parallel.dp = {world_size(cfg)}")
    if not 0 <= launch.port < 65536:
        p.append(f"launch.port={launch.port}: must lie in [0, 65535]")
    if not (launch.collective_timeout_s > 0 and math.isfinite(launch.collective_timeout_s)):
        p.append(f"launch.collective_timeout_s={launch.collective_timeout_s}: must be a positive number "
                 "of seconds (default 300)")
    return p


def _expert_routing_problems(cfg: TrainConfig) -> list[str]:
    """Node-limited routing and the dispatch payload (parallel/expert_parallel.py)."""
    par, m, p = cfg.parallel, cfg.model, []
    if par.dispatch_dtype not in DISPATCH_DTYPES:
        p.append(f"parallel.dispatch_dtype={par.dispatch_dtype!r}: choose one of "
                 f"{', '.join(DISPATCH_DTYPES)}")
    limit, per_node = par.max_nodes_per_token, cfg.launch.gpus_per_node
    if limit < 0:
        return p + [f"parallel.max_nodes_per_token={limit}: must be >= 0 (0 = no node limit)"]
    if limit == 0 or par.ep <= per_node or per_node < 1:
        return p
    if par.ep % per_node:
        return p + [f"parallel.ep={par.ep}: node-limited routing needs whole nodes, a multiple of "
                    f"launch.gpus_per_node={per_node}"]
    nodes, E = par.ep // per_node, m.n_routed_experts
    if limit >= nodes or E % par.ep:
        return p
    if m.n_expert_groups > 1 and m.n_limited_groups < m.n_expert_groups and m.n_expert_groups % nodes:
        p.append(f"model.n_expert_groups={m.n_expert_groups}: with node-limited routing over {nodes} nodes "
                 "the expert groups must nest in nodes (a multiple of the node count)")
    if limit * (E // nodes) < m.n_activated_experts:
        p.append(f"parallel.max_nodes_per_token={limit}: {limit} nodes hold {limit * (E // nodes)} experts, "
                 f"fewer than the {m.n_activated_experts} each token picks; raise it")
    return p


ENGINES = ("native", "deepspeed")
# DeepSpeed keys duet derives from its own config (one source of truth): overriding them would be
# ignored or would make the two engines train different numbers.
DS_OWNED_KEYS = {
    "optimizer": "duet's AdamW is DeepSpeed's client optimizer; set optim.*",
    "scheduler": "duet's LR schedule drives the optimizer; set optim.schedule and friends",
    "train_batch_size": "set data.batch_size", "train_micro_batch_size_per_gpu": "set data.batch_size",
    "gradient_accumulation_steps": "derived from data.batch_size and parallel.dp",
    "gradient_clipping": "set optim.grad_clip",
    "fp16": "set precision.compute", "bf16": "set precision.compute",
    "zero_optimization.stage": "set engine.zero_stage",
    "zero_optimization.offload_optimizer": "offload needs DeepSpeed's CPUAdam op instead of duet's AdamW",
    "zero_optimization.offload_param": "offload needs DeepSpeed's CPUAdam op instead of duet's AdamW",
}


def engine_problems(cfg: TrainConfig) -> list[str]:
    """engine=deepspeed combinations DeepSpeed cannot honour (parallel/deepspeed_engine.py)."""
    e, p = cfg.engine, []
    if e.name not in ENGINES:
        return [f"engine.name={e.name!r}: choose one of {', '.join(ENGINES)}"]
    if e.name != "deepspeed":
        return [] if not e.convert_to_native else ["engine.convert_to_native=true needs engine=deepspeed"]
    if e.zero_stage not in (1, 2, 3):
        p.append(f"engine.zero_stage={e.zero_stage}: choose 1, 2 or 3")
    if cfg.parallel.pp > 1:
        p.append(f"parallel.pp={cfg.parallel.pp}: engine=deepspeed runs without pipeline parallelism; "
                 "use parallel.pp=1 or engine=native")
    if cfg.checkpoint.async_save:
        p.append("checkpoint.async_save=true: DeepSpeed checkpoints are written synchronously; "
                 "set it to false")
    flat = _flatten(e.deepspeed)
    for key, why in DS_OWNED_KEYS.items():
        if any(k == key or k.startswith(key + ".") for k in flat):
            p.append(f"engine.deepspeed.{key}: not settable with engine=deepspeed ({why})")
    zero = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("zero_optimization.")}
    # DeepSpeed asserts these for expert parameter groups (stage_1_and_2.py _configure_moe_settings).
    if e.zero_stage in (1, 2) and zero.get("reduce_scatter") is False:
        p.append("engine.deepspeed.zero_optimization.reduce_scatter=false: DeepSpeed's ZeRO 1/2 needs "
                 "reduce_scatter for expert parameter groups; drop the override")
    if e.zero_stage == 2 and zero.get("contiguous_gradients") is False:
        p.append("engine.deepspeed.zero_optimization.contiguous_gradients=false: DeepSpeed's ZeRO-2 needs "
                 "contiguous gradients for expert parameter groups; drop the override")
    # ZeRO-3 partitions experts over the expert-data-parallel group through DeepSpeed's AutoEP
    # placement, which refuses these (engine.py _validate_zero3_moe_compatibility).
    if e.zero_stage == 3:
        for key in ("zero_hpz_partition_size", "zero_quantized_gradients", "zero_quantized_weights"):
            if key in zero and zero[key] not in (False, 0, 1):
                p.append(f"engine.deepspeed.zero_optimization.{key}={zero[key]}: DeepSpeed's ZeRO-3 cannot "
                         "partition expert parameters with it; drop the override or use engine.zero_stage=2")
    return p


def _flatten(node: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
