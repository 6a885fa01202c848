"""The arithmetic behind `duet-plan`: memory, communication and time of one training step.

Exact where it can be: parameters come from the model built on the meta device and split the
way the pipeline engine splits it (launch/dry_run.py `rank_holdings`); live micro-batches and
bubbles come from the schedule simulator run on the very action lists the runtime executes.
Modelled, and said so, where it cannot be:

Activations (bytes per token a block keeps for backward, `activation_items`), after what duet's
  sub-layer steps save (framework/model/substeps.py; tests/test_overlap.py holds the sum within
  25% of the bytes torch.autograd.graph.saved_tensors_hooks see, framework/model/recompute.py
  SavedBytes). `model.recompute`:
  none       every intermediate: the RMSNorms' inputs and outputs, MLA latents and their norms,
             q/k/v as projected, roped, concatenated and padded (v to the q/k head dim: the
             fused attention core), its output and log-sum-exp, the router's scores, each routed
             row and its SwiGLU intermediates and output, the shared expert's likewise;
  selective  DeepSeek-V3's choice: the MLA latents, the attention core's output, the router's
             logits and the SwiGLU inputs kept (in the activation dtype: duet does not cache them
             in FP8 as V3 does); RMSNorms, up-projections, SwiGLU, the expert and attention output
             projections and the rest recomputed;
  full       each compute sub-step's inputs only: the block input, and (MoE) the normed rows and
             gate weights the experts step starts from (the all-to-all results are never re-sent).
  The last stage's tail (final norm, MTP's projection, the heads) is never recomputed.
  Inputs of linear layers are cached as FP8 1x128 tiles (n + 4*ceil(n/128) bytes) under
  precision=fp8, otherwise in the activation dtype (2 bytes; 4 under fp32). The last stage also
  keeps, per token and output head (main + MTP), what the chunked cross-entropy saves: the head's
  input (framework/model/loss.py; its chunk of logits, a few tens of MiB, lives only inside the
  loss and is not counted).
Time (roofline, `stage_costs`): GEMM FLOPs at the precision's peak (output head and gate in BF16,
  FP32 as TF32 = BF16/2) times cluster.gemm_efficiency; the causal attention core in BF16 at
  cluster.attention_efficiency; plus cluster.other_overhead for everything that is no GEMM.
  Backward = input gradients (GEMM as forward, attention core twice) + weight gradients (W, GEMM
  as forward) + the recomputation. Under DualPipe(V) the overlapped pair hides EP communication
  behind compute (pair = max of the two) and cluster.comm_sm_share of the SMs go to
  communication; elsewhere EP communication adds to its chunk. Stages differ in cost: a rank's
  cost is the mean of its stages' (it runs as many chunks of each) and the simulator runs every
  rank at the slowest rank's cost. PP sends are asynchronous and counted hidden; the data-
  parallel reduction (and DualPipe's mirror sum) runs after the last backward, exposed.
EP traffic (`ep_rows`): tokens route uniformly over the experts their node limit allows (what
  the balancing bias aims at); a token goes once to each rank holding one of its experts (duet's
  dedup). With node-limited routing the time assumes DeepEP's forwarding: one InfiniBand copy
  per remote node, fanned out over NVLink; duet's all_to_all_single sends one per remote rank
  (both byte counts are printed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from framework.config import RECOMPUTE_MODES, ModelConfig, TrainConfig
from launch.dry_run import GiB, RankHolding, build_stages, rank_holdings
from parallel.pipeline.schedules import Placement, build
from parallel.pipeline.simulator import Costs, SimResult, simulate

RECOMPUTE = RECOMPUTE_MODES  # model.recompute


def fp8_row_bytes(n: int) -> int:
    """One row of n values as 1x128-scaled e4m3: the bytes plus an fp32 scale per 128."""
    return n + 4 * math.ceil(n / 128)


def act_bytes(compute: str) -> int:
    return 4 if compute == "fp32" else 2


def activation_items(m: ModelConfig, compute: str, recompute: str, moe: bool) -> dict[str, int]:
    """Bytes per token one block keeps for backward, by tensor (module docstring)."""
    a = act_bytes(compute)

    def lin(n: int) -> int:  # a linear layer's cached input
        return fp8_row_bytes(n) if compute == "fp8" else a * n

    D, H, K, E = m.dim, m.n_heads, m.n_activated_experts, m.n_routed_experts
    N, R, V, Q, C = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.q_lora_rank, m.kv_lora_rank
    qk = N + R
    inter = m.moe_inter_dim if moe else m.dense_inter_dim
    shared = m.n_shared_experts * m.moe_inter_dim
    inputs = {"block input": a * D}  # each recomputed step keeps its inputs
    if moe:
        inputs["experts step inputs (normed rows, gate weights)"] = a * D + 4 * K
    if recompute == "full":
        return inputs
    core = a * H * qk + 4 * H  # the fused attention core's output (padded v) and fp32 log-sum-exp
    if recompute == "selective":
        items = {**inputs, "MLA latents": a * (Q + C + R), "attention core output": core}
        if moe:
            items["router logits"] = 4 * E
            items["routed SwiGLU inputs"] = K * a * 2 * inter
            if shared:
                items["shared SwiGLU inputs"] = a * 2 * shared
        else:
            items["dense SwiGLU inputs"] = a * 2 * inter
        return items
    items = {"RMSNorm inputs and outputs": 2 * a * D + 2 * lin(D),
             "MLA latents and their norms": a * (Q + C + R) + lin(Q) + lin(C),
             "q, k, v": a * (H * qk + H * (N + V) + H * R + R + 3 * H * qk),
             "attention core output": core, "attention output": lin(H * V)}
    if moe:
        items["router scores"] = 4 * 3 * E
        items["routed rows and SwiGLU"] = K * (lin(D) + a * D + a * 3 * inter + lin(inter))
        items["shared SwiGLU"] = a * 3 * shared + lin(shared)
    else:
        items["dense SwiGLU"] = a * 3 * inter + lin(inter)
    return items


def head_bytes_per_token(m: ModelConfig, compute: str) -> int:
    """What the chunked head cross-entropy keeps per token for each output head (main + MTP): the
    head's input in the activation dtype -- no logits."""
    return act_bytes(compute) * m.dim * (1 + m.mtp_depth)


def _stage_blocks(m: ModelConfig, lo: int, hi: int) -> tuple[int, int]:
    """(dense blocks, MoE blocks) among blocks [lo, hi)."""
    dense = max(0, min(hi, m.n_dense_layers) - lo)
    return dense, hi - lo - dense


def stage_activation_bytes(m: ModelConfig, compute: str, recompute: str, lo: int, hi: int,
                           last: bool) -> float:
    """Bytes per token one micro-batch leaves on a stage holding blocks [lo, hi)."""
    dense, moe = _stage_blocks(m, lo, hi)
    per = dense * sum(activation_items(m, compute, recompute, False).values())
    per += moe * sum(activation_items(m, compute, recompute, True).values())
    if last:  # MTP: projection input [norm(h); norm(emb)], one MoE block, then the heads
        a = act_bytes(compute)
        mtp = fp8_row_bytes(2 * m.dim) if compute == "fp8" else a * 2 * m.dim
        # RMSNorm inputs (final, MTP's embedding, hidden and output norms) and the normed halves
        norms = a * 5 * m.dim
        per += m.mtp_depth * (mtp + norms + sum(activation_items(m, compute, recompute, True).values()))
        per += a * m.dim + head_bytes_per_token(m, compute)
    return per


# --------------------------------------------------------------------------- expert parallel

@dataclass
class EPRows:
    """Expected rows per token and MoE layer (module docstring's uniform-routing model)."""

    rows: float  # distinct destination ranks (dedup), the own rank included
    self_rows: float  # to the own rank: no transfer
    intra_rows: float  # to other GPUs of the own node (NVLink)
    inter_rows: float  # to other nodes' GPUs (InfiniBand under duet's per-rank all-to-all)
    remote_nodes: float  # distinct other nodes (InfiniBand copies under DeepEP's forwarding)

    @property
    def inter_share(self) -> float:
        moved = self.intra_rows + self.inter_rows
        return self.inter_rows / moved if moved else 0.0


def _p_hit(pool: int, owned: int, k: int) -> float:
    """P(at least one of k experts drawn without replacement from `pool` lies in `owned`)."""
    if pool - owned < k:
        return 1.0
    return 1.0 - math.comb(pool - owned, k) / math.comb(pool, k)


def ep_rows(n_experts: int, top_k: int, ep: int, gpus_per_node: int, max_nodes: int) -> EPRows:
    """Per token: its top_k experts drawn uniformly from the experts of max_nodes nodes (all when
    0 or not fewer than the ep group's nodes), the nodes themselves drawn uniformly."""
    per_rank = n_experts // ep
    g = min(gpus_per_node, ep)
    nodes = max(1, ep // g)
    m = nodes if max_nodes <= 0 or max_nodes >= nodes else max_nodes
    pool = m * g * per_rank
    rows = m * g * _p_hit(pool, per_rank, top_k)
    used_nodes = m * _p_hit(pool, g * per_rank, top_k)
    # By symmetry every rank of the group receives the same share, 1/ep of the rows.
    self_rows = rows / ep
    intra = rows * (g - 1) / ep
    own_node_used = used_nodes / nodes  # P(the own node is among the used ones)
    return EPRows(rows, self_rows, intra, rows - self_rows - intra, used_nodes - own_node_used)


@dataclass
class EPTraffic:
    dispatch_bytes: float  # per token and MoE layer sent by a rank, forward dispatch
    combine_bytes: float  # forward combine (BF16/activation dtype)
    ib_bytes: float  # forward dispatch + combine over InfiniBand (node-dedup when node-limited)
    ib_bytes_per_rank: float  # the same under duet's per-rank all_to_all_single
    nvlink_bytes: float
    seconds_fwd: float  # per token and MoE layer
    seconds_bwd: float


def ep_traffic(cfg: TrainConfig, rows: EPRows) -> EPTraffic:
    D, a = cfg.model.dim, act_bytes(cfg.precision.compute)
    fp8 = cfg.parallel.dispatch_dtype == "fp8" or (
        cfg.parallel.dispatch_dtype == "auto" and cfg.precision.compute == "fp8")
    d_row, c_row = (fp8_row_bytes(D) if fp8 else a * D), a * D
    moved = rows.intra_rows + rows.inter_rows
    hierarchical = cfg.parallel.max_nodes_per_token > 0
    ib_copies = rows.remote_nodes if hierarchical else rows.inter_rows
    cl = cfg.cluster

    def seconds(row_bytes: int) -> float:  # IB and NVLink traffic pipeline: the slower one counts
        return max(ib_copies * row_bytes / (cl.ib_gbps * 1e9), moved * row_bytes / (cl.nvlink_gbps * 1e9))

    # Backward: dispatch's backward is a combine of gradients, combine's a dispatch; both carry
    # gradients in the activation dtype.
    return EPTraffic(moved * d_row, moved * c_row, ib_copies * (d_row + c_row),
                     rows.inter_rows * (d_row + c_row), moved * (d_row + c_row),
                     seconds(d_row) + seconds(c_row), 2 * seconds(c_row))


# --------------------------------------------------------------------------- time

@dataclass
class StageCost:
    """Seconds per micro-batch on one stage: compute of F, B (input grads + recompute), W, and EP
    communication of the forward and the backward."""

    F: float
    B: float
    W: float
    comm_F: float
    comm_B: float
    flops: float  # model FLOPs of forward + backward (no recompute), for the report


def stage_costs(cfg: TrainConfig, recompute: str, lo: int, hi: int, first: bool, last: bool,
                tokens: int, traffic: EPTraffic | None, overlapped: bool) -> StageCost:
    m, cl, compute = cfg.model, cfg.cluster, cfg.precision.compute
    bf16 = cl.bf16_tflops * 1e12
    peak = {"fp8": cl.fp8_tflops * 1e12, "fp32": bf16 / 2}.get(compute, bf16)
    sm = 1 - cl.comm_sm_share if overlapped and traffic is not None else 1.0
    gemm_rate, bf16_rate = peak * cl.gemm_efficiency * sm, bf16 * cl.gemm_efficiency * sm
    attn_rate = bf16 * cl.attention_efficiency * sm
    D, H, K, E = m.dim, m.n_heads, m.n_activated_experts, m.n_routed_experts
    qk, T = m.qk_nope_head_dim + m.qk_rope_head_dim, cfg.data.seq_len
    q_proj = (D * m.q_lora_rank + m.q_lora_rank * H * qk) if m.q_lora_rank else D * H * qk
    attn_params = q_proj + D * (m.kv_lora_rank + m.qk_rope_head_dim) \
        + m.kv_lora_rank * H * (m.qk_nope_head_dim + m.v_head_dim) + H * m.v_head_dim * D
    moe_params = 3 * D * m.moe_inter_dim * (K + m.n_shared_experts)
    dense_blocks, moe_blocks = _stage_blocks(m, lo, hi)
    blocks = hi - lo + (m.mtp_depth if last else 0)
    moe_blocks += m.mtp_depth if last else 0
    gemm = 2 * (blocks * attn_params + dense_blocks * 3 * D * m.dense_inter_dim + moe_blocks * moe_params)
    gemm += 2 * m.mtp_depth * 2 * D * D if last else 0  # MTP's projection
    # BF16 GEMMs: the routers' gates and the output head (used by the main model and each MTP depth)
    head = 2 * D * E * moe_blocks + (2 * D * m.vocab_size * (1 + m.mtp_depth) if last else 0)
    attn = blocks * 2 * H * (qk + m.v_head_dim) * T / 2  # causal: half the score matrix
    f_gemm, f_head, f_attn = gemm * tokens / gemm_rate, head * tokens / bf16_rate, attn * tokens / attn_rate
    over = 1 + cl.other_overhead
    F = (f_gemm + f_head + f_attn) * over
    if recompute == "full":
        extra = F
    elif recompute == "selective":
        up = (m.q_lora_rank * H * qk if m.q_lora_rank else 0) \
            + m.kv_lora_rank * H * (m.qk_nope_head_dim + m.v_head_dim)
        extra = 2 * tokens * (blocks * up + moe_blocks * K * m.moe_inter_dim * D) / gemm_rate * over
    else:
        extra = 0.0
    B = (f_gemm + f_head + 2 * f_attn) * over + extra
    W = (f_gemm + f_head) * over
    comm_F = comm_B = 0.0
    if traffic is not None:
        comm_F, comm_B = (moe_blocks * tokens * s for s in (traffic.seconds_fwd, traffic.seconds_bwd))
    return StageCost(F, B, W, comm_F, comm_B, 3 * (gemm + head + attn) * tokens)


@dataclass
class RankPlan:
    holding: RankHolding
    memory: dict[str, float]  # GiB by item
    act_items_per_token: dict[str, float] = field(default_factory=dict)
    peak_live: int = 0  # the simulator's
    pp_bytes: float = 0.0
    ep_bytes: float = 0.0
    dp_bytes: float = 0.0
    cost: StageCost | None = None

    @property
    def total_gib(self) -> float:
        return sum(self.memory.values())


@dataclass
class Plan:
    cfg: TrainConfig
    recompute: str
    schedule: str  # as simulated ("1f1b" stands in for pp == 1)
    ranks: list[RankPlan]
    costs: Costs  # seconds per chunk handed to the simulator
    sim: SimResult
    tokens_per_micro_batch: int
    ep: EPRows | None
    traffic: EPTraffic | None
    critical_rank: int
    compute_s: float  # on the critical (busiest) rank
    exposed_ep_s: float
    bubble_s: float
    dp_s: float
    flops_per_token: float

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_ep_s + self.bubble_s + self.dp_s

    @property
    def world(self) -> int:
        return self.cfg.parallel.pp * self.cfg.parallel.dp

    @property
    def tokens_per_s_gpu(self) -> float:
        return self.cfg.data.batch_size * self.cfg.data.seq_len / self.step_s / self.world

    @property
    def mfu(self) -> float:
        """framework.metrics' one MFU: train_flops_per_token over the dense BF16 peak (the
        convention of DeepSeek-V3's published ~40%, Megatron-LM and torchtitan)."""
        from framework.metrics import mfu

        return mfu(self.tokens_per_s_gpu, self.flops_per_token, 1, self.cfg.cluster.bf16_tflops)

    @property
    def gpu_hours_per_trillion(self) -> float:
        return 1e12 / self.tokens_per_s_gpu / 3600

    def largest_over(self) -> tuple[RankPlan, str] | None:
        """The first rank over the memory budget and its largest item, or None if all fit."""
        for rp in self.ranks:
            if rp.total_gib > self.cfg.cluster.memory_gib:
                return rp, max(rp.memory, key=rp.memory.get)
        return None


def _live_walk(sim: SimResult, rank: int, per_phase: list[float]) -> tuple[int, float]:
    """(most live micro-batches, most bytes live) on a rank, walking the simulator's spans the
    way the simulator counts: a pair's forward lands before its backward leaves."""
    from parallel.pipeline.simulator import action_parts

    live = [0] * len(per_phase)
    peak, peak_bytes = 0, 0.0
    for _, _, action in sim.spans[rank]:
        for kind, phase, _ in action_parts(action):
            live[phase] += 1 if kind == "F" else -1
            peak = max(peak, sum(live))
            peak_bytes = max(peak_bytes, sum(n * b for n, b in zip(live, per_phase)))
    return peak, peak_bytes


def plan(cfg: TrainConfig, recompute: str | None = None, model=None) -> Plan:
    """recompute None: the run's own, cfg.model.recompute (what the runtime does)."""
    par, m, cl = cfg.parallel, cfg.model, cfg.cluster
    recompute = m.recompute if recompute is None else recompute
    name = par.schedule if par.pp > 1 else "1f1b"
    C = par.micro_batches
    placement = Placement(name, par.pp, C)
    model, stages, _ = build_stages(cfg, model)
    holdings = rank_holdings(cfg, model)
    tokens = cfg.data.batch_size // par.dp // C * cfg.data.seq_len
    a, g = act_bytes(cfg.precision.compute), cfg.launch.gpus_per_node
    rows = traffic = None
    if par.ep > 1:
        rows = ep_rows(m.n_routed_experts, m.n_activated_experts, par.ep, g, par.max_nodes_per_token)
        traffic = ep_traffic(cfg, rows)
    overlapped = name in ("dualpipe", "dualpipev") and par.overlap_fb
    n_stages = len(stages)
    ranges = [getattr(st, "layer_range", (0, m.n_layers)) for st in stages]
    costs_of = [stage_costs(cfg, recompute, lo, hi, s == 0, s == n_stages - 1, tokens, traffic, overlapped)
                for s, (lo, hi) in enumerate(ranges)]
    act_of = [stage_activation_bytes(m, cfg.precision.compute, recompute, lo, hi, s == n_stages - 1) * tokens
              for s, (lo, hi) in enumerate(ranges)]

    def rank_cost(r: int) -> StageCost:
        ids = [placement.stage_of(r, ph) for ph in range(placement.phases)]
        mean = [sum(getattr(costs_of[s], f) for s in ids) / len(ids)
                for f in ("F", "B", "W", "comm_F", "comm_B")]
        return StageCost(*mean, flops=sum(costs_of[s].flops for s in ids))

    per_rank = [rank_cost(r) for r in range(par.pp)]
    slow = max(per_rank, key=lambda c: c.F + c.B + c.W + c.comm_F + c.comm_B)
    fb = max(slow.F + slow.B + slow.W, slow.comm_F + slow.comm_B) if overlapped else \
        slow.F + slow.B + slow.W + slow.comm_F + slow.comm_B
    costs = Costs(F=slow.F + slow.comm_F, B=slow.B + slow.W + slow.comm_B, W=slow.W, FB=fb)
    schedule = build(name, par.pp, C, par.wgrad_split)
    sim = simulate(schedule, placement, costs)

    nonexp = [h.dense + h.embed_head + h.mtp for h in holdings]
    edp = par.dp // par.ep
    dp_shard, edp_shard = (par.dp, edp) if par.zero1 else (1, 1)
    moment = 2 if cfg.precision.moment_dtype == "bf16" else 4
    ranks = []
    for r, h in enumerate(holdings):
        local = nonexp[r] + h.expert // par.ep
        per_phase = [act_of[placement.stage_of(r, ph)] for ph in range(placement.phases)]
        live, act = _live_walk(sim, r, per_phase)
        memory = {"weights": 4 * local / GiB, "gradients": 4 * local / GiB,
                  "optimizer state": 2 * moment * (nonexp[r] / dp_shard + h.expert // par.ep / edp_shard)
                  / GiB,
                  f"activations ({live} live micro-batches)": act / GiB,
                  "reserved": cl.reserved_gib}
        rp = RankPlan(h, memory, peak_live=sim.peak_live[r])
        rp.cost = per_rank[r]
        rp.pp_bytes = _pp_bytes(placement, r, tokens * m.dim * a)
        if traffic is not None:
            held = [placement.stage_of(r, ph) for ph in range(placement.phases)]
            passes = sum(_moe_count(m, *ranges[s], s == n_stages - 1) * len(placement.micro_batches(r, ph))
                         for ph, s in enumerate(held))
            # forward: dispatch + combine; backward: two activation-dtype transfers of gradients
            rp.ep_bytes = passes * tokens * (traffic.dispatch_bytes + 3 * traffic.combine_bytes)
        rp.dp_bytes = _dp_bytes(par, nonexp[r], h.expert // par.ep, edp)
        if name == "dualpipe":  # mirror copies sum their gradients: an all-reduce of two
            rp.dp_bytes += 4 * local
        elif m.mtp_depth and par.pp > 1 and name != "dualpipev" and r in (0, par.pp - 1):
            rp.dp_bytes += 4 * m.vocab_size * m.dim  # the MTP's tie of the embedding, first <-> last
        ranks.append(rp)

    crit = max(range(par.pp), key=lambda r: sim.busy[r])
    compute = _compute_seconds(schedule[crit], slow)
    bw = (cl.ib_gbps if par.dp * par.pp > g else cl.nvlink_gbps) * 1e9
    from framework.metrics import train_flops_per_token

    fpt = train_flops_per_token(m, cfg.data.seq_len)
    return Plan(cfg, recompute, name, ranks, costs, sim, tokens, rows, traffic, crit, compute,
                sim.busy[crit] - compute, sim.bubble[crit], max(rp.dp_bytes for rp in ranks) / bw, fpt)


def _moe_count(m: ModelConfig, lo: int, hi: int, last: bool) -> int:
    return _stage_blocks(m, lo, hi)[1] + (m.mtp_depth if last else 0)


def _pp_bytes(placement: Placement, rank: int, boundary_bytes: int) -> float:
    """Bytes a rank sends per step: each forward's output to the next stage's rank and each
    backward's input gradient to the previous stage's, unless that stage is on this rank."""
    last, total = placement.n_stages - 1, 0.0
    for phase in range(placement.phases):
        stage, direction = placement.stage_of(rank, phase), placement.direction_of_phase(rank, phase)
        n = len(placement.micro_batches(rank, phase))
        if stage < last and placement.locate(stage + 1, direction)[0] != rank:
            total += n * boundary_bytes
        if stage > 0 and placement.locate(stage - 1, direction)[0] != rank:
            total += n * boundary_bytes
    return total


def _dp_bytes(par, nonexpert: int, expert_local: int, edp: int) -> float:
    """Bytes a rank sends per step over dp (dense) and edp (experts), ring collectives (what
    GradReducer and DataParallelOptimizer do): without ZeRO-1 the gradients are all-reduced
    (2(n-1)/n of the buffer); under ZeRO-1 they are reduce-scattered ((n-1)/n) and the updated
    FP32 weights all-gathered ((n-1)/n). Gradients travel in parallel.grad_reduce_dtype."""
    grad = 2 if par.grad_reduce_dtype == "bf16" else 4

    def sent(n: int, count: int) -> float:
        share = (grad + 4) * (n - 1) / n if par.zero1 else 2 * grad * (n - 1) / n
        return share * count

    return sent(par.dp, nonexpert) + sent(edp, expert_local) if par.dp > 1 else 0.0


def _compute_seconds(actions, c: StageCost) -> float:
    total = 0.0
    for act in actions:
        if act.kind == "F":
            total += c.F
        elif act.kind == "W":
            total += c.W
        elif act.kind == "FB":
            total += c.F + c.B + c.W
        else:
            total += c.B + (0 if act.split else c.W)
    return total
