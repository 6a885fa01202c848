"""Pipeline parallelism inside the trainer: which stages this rank keeps, the runner that
executes its schedule, and the reductions that make the stages add up to one model.

    engine = PipelineEngine(model, cfg, mesh)        # prunes `model` to this rank's stages
    out = engine.train(inputs_BT, targets_BT, device, autocast)   # forward + backward of all micro-batches
    engine.sync_shared_grads()                       # after the dp reduction
    engine.sync_shared_loads()                       # before the expert-bias update
    engine.loss_terms(out)                           # per-rank share of the loss terms, sum over pp
    losses = engine.train_heads(tokens_mbs, fns, device, autocast, scale)   # loss of mb = fns[mb](logits)
    values = engine.forward_heads(tokens_mbs, fns, device, autocast)        # fns[mb](logits), every pp rank

Every rank keeps the full model's parameter names for what it holds (parallel.pipeline.runtime
.prune), so checkpoints and the data-parallel code need no pipeline knowledge, except that a
parameter held by several pipeline ranks (DualPipe's mirror stages; the embedding that the MTP
head reads on the last stage) gets its gradients summed over its holders, and is counted once
in the gradient norm (`copies`).

Stage split: `parallel.layers_per_stage` when given, else the blocks split so that the largest
stage's parameter count (embedding with the first stage, head and MTP with the last) is as
small as possible.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from framework.config import TrainConfig
from framework.model.moe import Router
from framework.model.transformer import Transformer
from parallel import comm
from parallel.mesh import Mesh
from parallel.pipeline.runtime import PipelineRunner, StepOutput, boundary_dtype, hold_stages, holders, prune
from parallel.pipeline.schedules import Placement
from parallel.pipeline.timeline import Timeline, write_chrome_trace
from parallel.pipeline.wgrad import split_weight_grads


def balanced_layers(model: Transformer, n_stages: int) -> list[int]:
    """Blocks per stage minimising the largest stage's parameter count (contiguous split)."""
    L = len(model.blocks)
    if not 1 <= n_stages <= L:
        raise ValueError(f"cannot split {L} blocks into {n_stages} stages")
    size = [sum(p.numel() for p in block.parameters()) for block in model.blocks]
    first = sum(p.numel() for p in model.embed.parameters())
    last = sum(p.numel() for m in (model.norm, model.head, model.mtp) for p in m.parameters())
    prefix = [0]
    for s in size:
        prefix.append(prefix[-1] + s)

    def cost(stage: int, lo: int, hi: int) -> int:
        extra = (first if stage == 0 else 0) + (last if stage == n_stages - 1 else 0)
        return prefix[hi] - prefix[lo] + extra

    # best[k][i]: smallest max cost placing blocks [0, i) on stages [0, k); each stage >= 1 block
    inf = float("inf")
    best = [[inf] * (L + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (L + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0
    for k in range(1, n_stages + 1):
        for i in range(k, L - (n_stages - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], cost(k - 1, j, i))
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    counts, i = [], L
    for k in range(n_stages, 0, -1):
        j = cut[k][i]
        counts.append(i - j)
        i = j
    return counts[::-1]


class PipelineEngine:
    def __init__(self, model: Transformer, cfg: TrainConfig, mesh: Mesh) -> None:
        par = cfg.parallel
        self.mesh, self.chunks = mesh, par.micro_batches
        self.placement = Placement(par.schedule, par.pp, par.micro_batches)
        layers = list(par.layers_per_stage) or balanced_layers(model, self.placement.n_stages)
        all_stages = model.split_stages(self.placement.n_stages, layers)
        self.stages = hold_stages(all_stages, self.placement, mesh.pp_rank)
        held_by = holders(model, all_stages, self.placement)
        prune(model, self.stages)
        if par.wgrad_split:
            split_weight_grads(model)
        self.model = model
        # Groups of this dp column's pipeline ranks that share tensors. Group creation is
        # collective: every rank creates every group, in one order.
        self.copies = {name: len(ranks) for name, ranks in held_by.items() if len(ranks) > 1}
        holder_sets = sorted({tuple(ranks) for ranks in held_by.values() if len(ranks) > 1})
        # (group, names): per group of this rank, the tensors it sums, in one order on every member.
        self._shared: list[tuple[comm.Group, list[str]]] = []
        for ranks in holder_sets:
            for dp_rank in range(mesh.dp):
                group = comm.new_group([mesh.layout.rank_of(p, dp_rank) for p in ranks])
                if dp_rank == mesh.dp_rank and mesh.pp_rank in ranks:
                    names = sorted(n for n, rs in held_by.items() if tuple(rs) == ranks)
                    self._shared.append((group, names))
        peers = [mesh.layout.rank_of(p, mesh.dp_rank) for p in range(par.pp)]
        self.runner = PipelineRunner(self.stages, self.placement, mesh.pp_rank, peers, mesh.pp_group,
                                     wgrad_split=par.wgrad_split, interleave=par.overlap_fb)

    # --- one step ------------------------------------------------------------------------
    def _args(self, inputs: torch.Tensor, device, autocast) -> tuple:
        B, T = inputs.shape
        if B % self.chunks:
            raise ValueError(f"{B} sequences per rank do not split into {self.chunks} micro-batches")
        return (B // self.chunks, T, self.model.cfg.dim), boundary_dtype(device, autocast), device, autocast

    def train(self, inputs: torch.Tensor, targets: torch.Tensor, device, autocast,
              timeline_dir: Path | None = None) -> StepOutput:
        """timeline_dir: record this step's spans there (see write_timeline)."""
        args = self._args(inputs, device, autocast)
        recorder = Timeline() if timeline_dir is not None else None
        self.runner.record = recorder
        try:
            return self.runner.step(list(inputs.to(device).chunk(self.chunks)),
                                    list(targets.to(device).chunk(self.chunks)), *args)
        finally:
            self.runner.record = None
            if recorder is not None:
                self._write_timeline(recorder, timeline_dir)

    def _write_timeline(self, recorder: Timeline, out_dir: Path) -> None:
        """Each pipeline rank of dp column 0 writes its spans; the first pipeline rank then
        gathers them all into timeline.trace.json (timestamps are comparable across the processes
        of one host). The PNG is the caller's to draw (framework.plots): parallel/ draws nothing."""
        parts = out_dir / "timeline-parts"
        if self.mesh.dp_rank == 0:
            parts.mkdir(parents=True, exist_ok=True)
            (parts / f"rank{self.mesh.pp_rank}.json").write_text(json.dumps(recorder.spans[0]))
        comm.barrier()
        if self.mesh.rank == 0:
            spans = [[tuple(s) for s in json.loads((parts / f"rank{r}.json").read_text())]
                     for r in range(self.mesh.pp)]
            write_chrome_trace(spans, out_dir / "timeline.trace.json")
            shutil.rmtree(parts, ignore_errors=True)

    def _heads_args(self, tokens_mbs: list[torch.Tensor], heads: list, device, autocast) -> tuple:
        shapes = {tuple(t.shape) for t in tokens_mbs}
        if len(tokens_mbs) != self.chunks or len(heads) != self.chunks or len(shapes) != 1:
            raise ValueError(f"the pipeline runs parallel.micro_batches={self.chunks} micro-batches of one "
                             f"shape; got {len(tokens_mbs)} of shapes {sorted(shapes)}")
        b, T = tokens_mbs[0].shape
        shape = (b, T, self.model.cfg.dim)
        return [t.to(device) for t in tokens_mbs], shape, boundary_dtype(device, autocast)

    def train_heads(self, tokens_mbs: list[torch.Tensor], heads: list, device, autocast,
                    scale: float, scope=None) -> torch.Tensor:
        """Forward and backward of per-micro-batch losses heads[mb](logits_BTV), each already a
        share of a globally normalised objective (the runtime's docstring: no 1/micro-batches,
        root gradient `scale`). Returns the sum of the shares, float64, on every pipeline rank.
        scope(mb): a context around each forward computation of mb on this rank (runner.step)."""
        tokens, shape, dtype = self._heads_args(tokens_mbs, heads, device, autocast)
        out = self.runner.step(tokens, None, shape, dtype, device, autocast, heads=heads, scale=scale,
                               scope=scope)
        total = sum((loss.double() for loss in out.losses.values()), torch.zeros((), dtype=torch.float64))
        return self.sum_over_pp(total.to(comm.collective_device(self.mesh.pp_group)))

    @torch.no_grad()
    def forward_heads(self, tokens_mbs: list[torch.Tensor], heads: list, device,
                      autocast, scope=None) -> list[torch.Tensor]:
        """Forward only: heads[mb](logits_BTV) for per-token values (each [b, T], fp32, as the
        micro-batch's tokens), computed on the last stage and summed over pp (the other ranks
        add zeros), so every pipeline rank returns them."""
        tokens, shape, dtype = self._heads_args(tokens_mbs, heads, device, autocast)
        out = self.runner.forward_only(tokens, None, shape, dtype, device, autocast, heads=heads, scope=scope)
        where = comm.collective_device(self.mesh.pp_group)
        flat = torch.stack([out.logits[mb].float() if mb in out.logits else torch.zeros(t.shape)
                            for mb, t in enumerate(tokens)]).to(where)
        return list(self.sum_over_pp(flat).unbind())

    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor, device, autocast) -> torch.Tensor:
        """This rank's share of the main cross-entropy of a batch (sum over pp gives it)."""
        args = self._args(inputs, device, autocast)
        out = self.runner.forward_only(list(inputs.to(device).chunk(self.chunks)),
                                       list(targets.to(device).chunk(self.chunks)), *args)
        total = sum((p["main_loss"].float() for p in out.parts.values()), torch.zeros((), device=device))
        return self.sum_over_pp(total / self.chunks)

    def loss_terms(self, out: StepOutput, device) -> dict[str, torch.Tensor]:
        """loss, main_loss, mtp_loss, balance_loss: means over the micro-batches, summed over the
        pipeline ranks (each adds what its stages computed), equal on every pipeline rank."""
        zero = torch.zeros((), dtype=torch.float32, device=device)
        terms = {"loss": zero, "main_loss": zero, "mtp_loss": zero, "balance_loss": zero}
        for mb, loss in out.losses.items():
            terms["loss"] = terms["loss"] + loss.float()
            for key in ("main_loss", "mtp_loss", "balance_loss"):
                terms[key] = terms[key] + out.parts[mb][key].float()
        for aux in out.aux.values():
            terms["loss"] = terms["loss"] + aux.float()
            terms["balance_loss"] = terms["balance_loss"] + aux.float()
        flat = self.sum_over_pp(torch.stack(list(terms.values())) / self.chunks)
        return dict(zip(terms, flat.unbind(), strict=True))

    def sum_over_pp(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        comm.all_reduce(t, "sum", self.mesh.pp_group)
        return t

    # --- shared tensors ------------------------------------------------------------------
    @torch.no_grad()
    def _sum_shared(self, tensors: dict[str, torch.Tensor | None], like: dict[str, torch.Tensor]) -> None:
        for group, shared in self._shared:
            names = [n for n in shared if n in like]
            if not names:
                continue
            flat = torch.cat([like[n].new_zeros(like[n].numel()) if tensors[n] is None
                              else tensors[n].reshape(-1) for n in names])
            comm.all_reduce(flat, "sum", group)
            offset = 0
            for n in names:
                piece = flat[offset:offset + like[n].numel()].view_as(like[n])
                if tensors[n] is None:
                    tensors[n] = piece.clone()
                else:
                    tensors[n].copy_(piece)
                offset += like[n].numel()

    def sync_shared_grads(self) -> None:
        """Sum the gradients of parameters several pipeline ranks hold (mirrors, tied embedding)."""
        params = dict(self.model.named_parameters())
        grads = {n: p.grad for n, p in params.items()}
        self._sum_shared(grads, params)
        for n, p in params.items():
            if p.grad is None and grads[n] is not None:
                p.grad = grads[n]

    def sync_shared_loads(self) -> None:
        """Mirror routers saw different micro-batches: add their expert loads before the bias update."""
        loads = {f"{n}.expert_load": m.expert_load for n, m in self.model.named_modules()
                 if isinstance(m, Router)}
        self._sum_shared(dict(loads), loads)

