"""AdamW with FP32 master weights and optional BF16 moments, plus learning-rate schedules.

DeepSeek-V3 trains with BF16 parameters for compute, keeps an FP32 master copy for the
update (small steps would vanish in BF16 rounding), and stores the AdamW moments in BF16 to
halve their memory. All arithmetic here is FP32; only storage follows the chosen dtypes.
The optimizer state holds plain tensors only, in the usual `state_dict()` layout, so
torch.distributed.checkpoint can save, load and reshard it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from framework.config import OptimConfig

_MOMENT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_LOW_PRECISION = (torch.bfloat16, torch.float16)


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as in torch.optim.AdamW.

    State per parameter: `step` (0-d fp32 tensor, like torch's), `exp_avg`, `exp_avg_sq`
    (in `moment_dtype`) and, for bf16/fp16 parameters, `master` (fp32).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, moment_dtype: str = "fp32", foreach: bool = True,
                 fused: bool = True) -> None:
        if moment_dtype not in _MOMENT_DTYPES:
            raise ValueError(f"precision.moment_dtype={moment_dtype!r}: choose fp32 or bf16")
        # Kept off the param groups so that they hold only what torch's AdamW holds.
        self.moment_dtype = _MOMENT_DTYPES[moment_dtype]
        # foreach=False updates one parameter at a time (`_update`): the reference the
        # foreach path is tested against, bit for bit.
        self.foreach = foreach
        # fused=True (with foreach) does the fp32 arithmetic in torch's fused AdamW kernel: one
        # pass over each tensor instead of eight (CPU, 35 M parameters: 32 ms against 120 ms per
        # step). Its rounding differs from the foreach ops' by an ulp here and there; fused=False
        # keeps the foreach ops, which equal `_update` bit for bit.
        self.fused = fused
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    def _init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype,
                                            memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype,
                                               memory_format=torch.preserve_format)
        if p.dtype in _LOW_PRECISION:
            state["master"] = p.detach().to(torch.float32, copy=True)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            todo = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                if not self.state[p]:
                    self._init_state(p)
                todo.append(p)
            if self.foreach:
                self._update_many(todo, lr, wd, eps, beta1, beta2)
            else:
                for p in todo:
                    self._update(p, self.state[p], lr, wd, eps, beta1, beta2)
        return loss

    def _update_many(self, params: list[torch.Tensor], lr: float, wd: float, eps: float,
                     beta1: float, beta2: float) -> None:
        """`_update` for many tensors at once: one kernel per operation instead of one per
        parameter, which is most of the optimizer's time for models of many small tensors.

        Low-precision storage (bf16 moments, a bf16 parameter's fp32 master) goes the same way
        as in `_update`: upcast to fp32 copies, the fp32 update (fused, or the same operations in
        the same order, which equal `_update`'s bit for bit), rounded back with one foreach copy.
        Parameters whose step counts differ (e.g. after a partial load) go by step count so
        bias corrections stay per parameter."""
        by_step: dict[float, list[torch.Tensor]] = {}
        for p in params:
            self.state[p]["step"] += 1
            by_step.setdefault(self.state[p]["step"].item(), []).append(p)
        for t, ps in by_step.items():
            states = [self.state[p] for p in ps]
            # fp32 views: the master copy, or the parameter itself when it is fp32.
            w = [st.get("master", p) for st, p in zip(states, ps, strict=True)]
            grads = [p.grad if p.grad.dtype == torch.float32 else p.grad.to(torch.float32) for p in ps]
            m_store = [st["exp_avg"] for st in states]
            v_store = [st["exp_avg_sq"] for st in states]
            low = [i for i, x in enumerate(m_store) if x.dtype != torch.float32]
            m, v = list(m_store), list(v_store)
            for i in low:
                m[i], v[i] = m_store[i].to(torch.float32), v_store[i].to(torch.float32)
            # The fused kernel walks raw storage, so it takes contiguous tensors only (ZeRO's
            # pieces cut along a later dimension are strided views); the rest go the foreach way.
            fused = [self.fused and all(x.is_contiguous() for x in tensors)
                     for tensors in zip(w, grads, m, v, strict=True)]
            for device in {x.device for x, f in zip(w, fused, strict=True) if f}:
                pick = [i for i, x in enumerate(w) if fused[i] and x.device == device]
                w_f, g_f, m_f, v_f = ([xs[i] for i in pick] for xs in (w, grads, m, v))
                # The kernel reads each tensor's step count from a tensor on its device.
                steps = [torch.tensor(t, dtype=torch.float32, device=device)] * len(pick)
                torch._fused_adamw_(w_f, g_f, m_f, v_f, [], steps, lr=lr, beta1=beta1, beta2=beta2,
                                    weight_decay=wd, eps=eps, amsgrad=False, maximize=False)
                # The kernel leaves the tensors' version counters as they were (torch 2.13);
                # what caches by version (the FP8 weight cache) must see the update.
                torch.autograd.graph.increment_version(w_f + m_f + v_f)
            rest = [i for i, f in enumerate(fused) if not f]
            if rest:
                self._foreach_math(*([xs[i] for i in rest] for xs in (w, grads, m, v)),
                                   t, lr, wd, eps, beta1, beta2)
            if low:  # store the fp32 results back, rounded to the storage dtypes
                torch._foreach_copy_([m_store[i] for i in low] + [v_store[i] for i in low],
                                     [m[i] for i in low] + [v[i] for i in low])
            masters = [i for i, st in enumerate(states) if "master" in st]
            if masters:
                torch._foreach_copy_([ps[i] for i in masters], [w[i] for i in masters])

    @staticmethod
    def _foreach_math(w: list[torch.Tensor], grads: list[torch.Tensor], m: list[torch.Tensor],
                      v: list[torch.Tensor], t: float, lr: float, wd: float, eps: float,
                      beta1: float, beta2: float) -> None:
        # The same operation order as _update (and torch.optim.AdamW).
        torch._foreach_mul_(w, 1 - lr * wd)
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, math.sqrt(1 - beta2 ** t))
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(w, m, denom, value=-lr / (1 - beta1 ** t))

    @staticmethod
    def _update(p: torch.Tensor, state: dict[str, torch.Tensor], lr: float, wd: float,
                eps: float, beta1: float, beta2: float) -> None:
        state["step"] += 1
        t = state["step"].item()
        # Work on fp32 views: the master copy, or the parameter itself when it is fp32.
        master = state.get("master")
        w = master if master is not None else p
        exact = w.dtype == torch.float32 and state["exp_avg"].dtype == torch.float32
        grad = p.grad.to(torch.float32)
        m = state["exp_avg"] if exact else state["exp_avg"].to(torch.float32)
        v = state["exp_avg_sq"] if exact else state["exp_avg_sq"].to(torch.float32)

        # Same operation order as torch.optim.AdamW, so fp32 results agree to rounding.
        w.mul_(1 - lr * wd)
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1 = 1 - beta1 ** t
        bias2_sqrt = math.sqrt(1 - beta2 ** t)
        denom = (v.sqrt() / bias2_sqrt).add_(eps)
        w.addcdiv_(m, denom, value=-lr / bias1)

        if not exact:  # store the fp32 results back, rounded to the storage dtypes
            state["exp_avg"].copy_(m)
            state["exp_avg_sq"].copy_(v)
        if master is not None:
            p.copy_(master)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch's loader casts every floating state tensor to its parameter's dtype, which
        # would round the fp32 master to bf16 and change the moment dtype. Load, then put
        # back the saved tensors with their own dtypes.
        super().load_state_dict(state_dict)
        saved_groups = state_dict["param_groups"]
        for saved, group in zip(saved_groups, self.param_groups):
            for index, p in zip(saved["params"], group["params"]):
                for key, value in state_dict["state"].get(index, {}).items():
                    if torch.is_tensor(value) and key != "step":
                        self.state[p][key] = value.to(device=p.device, copy=True)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig,
                    moment_dtype: str = "fp32") -> AdamW:
    """AdamW over the trainable parameters; no weight decay on norms and biases (ndim < 2)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # named_parameters drops shared (tied) duplicates
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    return AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                 weight_decay=cfg.weight_decay, moment_dtype=moment_dtype)


# --------------------------------------------------------------------------- schedules


def _cosine(lr: float, min_lr: float, progress: float) -> float:
    """lr at progress 0, min_lr at progress 1, half-cosine in between."""
    progress = min(max(progress, 0.0), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate of update `step` (0-based) in a run of `total_steps` updates.

    Warm-up is linear: update s < warmup_steps uses lr * (s + 1) / warmup_steps, so the
    first update is not wasted and update warmup_steps - 1 runs at the full lr. Fractions
    (decay_start, decay_end, step_at) are of total_steps; the cosine reaches min_lr at its
    end point and stays there.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(total_steps - cfg.warmup_steps, 1)
        return _cosine(cfg.lr, cfg.min_lr, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "deepseek":
        start, end = cfg.decay_start * total_steps, cfg.decay_end * total_steps
        if step < start:
            return cfg.lr
        if step < end:
            return _cosine(cfg.lr, cfg.min_lr, (step - start) / max(end - start, 1e-12))
        # After the cosine: min_lr, then each step-down whose fraction has been reached
        # (V3: 2.2e-5 for the next 333B tokens, 7.3e-6 for the last 167B).
        lr = cfg.min_lr
        for at, value in sorted(zip(cfg.step_at, cfg.step_lrs)):
            if step >= at * total_steps:
                lr = value
        return lr
    raise ValueError(f"optim.schedule={cfg.schedule!r}: choose cosine, deepseek or constant")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# --------------------------------------------------------------------------- clipping


def grad_sq_sum(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of squared gradient entries in fp32 (a 0-d tensor).

    Exposed so that a sharded run can all-reduce it across ranks before clipping.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    norms = torch._foreach_norm([g.detach().to(torch.float32) for g in grads])
    return torch.stack(norms).pow(2).sum()


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float,
                   total_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Scale gradients so their global L2 norm is at most max_norm; return the norm before.

    max_norm 0 only measures. `total_norm` lets a sharded run pass the global norm it
    already reduced. A non-finite norm leaves the gradients alone so the caller can see it
    and skip the step instead of writing NaN into every gradient.
    """
    params = [p for p in params if p.grad is not None]
    norm = grad_sq_sum(params).sqrt() if total_norm is None else total_norm.to(torch.float32)
    if max_norm > 0 and torch.isfinite(norm) and norm > max_norm:
        # Same coefficient as torch.nn.utils.clip_grad_norm_ (the 1e-6 guards tiny norms).
        scale = max_norm / (float(norm) + 1e-6)
        torch._foreach_mul_([p.grad for p in params], scale)
    return norm
