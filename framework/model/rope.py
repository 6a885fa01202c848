"""Rotary position embedding with optional YaRN context extension (DeepSeek-V2/V3 flavour).

Rotation acts on *adjacent* pairs (x0, x1), (x2, x3), ... as DeepSeek's reference does; its
checkpoints' rope weights are laid out for that, and transformers reads them with
`rope_interleave=True` (V3) or the complex-pair code (V2).

Tables are computed on the fly from the config (cheap: T x R/2 angles) instead of being kept in
a buffer, so a model built on the meta device, cast to bf16 or split into pipeline stages never
carries a stale or low-precision table.

Legend: B batch, T sequence, H heads, R rope head dim, F = R/2 frequencies.
"""

import math

import torch

from framework.config import ModelConfig


def _yarn_mscale(factor: float, mscale: float) -> float:
    # YaRN's attention temperature: 0.1 * m * ln(s) + 1 (1 when not extending).
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(qk head dim), times mscale(factor, mscale_all_dim)^2 under YaRN.

    DeepSeek corrects the softmax temperature for the interpolated positions on the whole logit
    (all head dims, hence "all_dim"), not only on the rope part.
    """
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    if cfg.rope_factor > 1 and cfg.mscale_all_dim:
        m = _yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim)
        scale = scale * m * m
    return scale


def _rope_cos_sin_factor(cfg: ModelConfig) -> float:
    # The rope half of q.k is additionally scaled by (mscale / mscale_all_dim)^2 through cos/sin;
    # with V3's mscale == mscale_all_dim == 1 this is exactly 1.
    if cfg.rope_factor <= 1:
        return 1.0
    if cfg.mscale and cfg.mscale_all_dim:
        return _yarn_mscale(cfg.rope_factor, cfg.mscale) / _yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim)
    return _yarn_mscale(cfg.rope_factor, 1.0)


def inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """[F] rotation speeds; YaRN blends interpolated (slow) and original (fast) frequencies."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freq_F = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    if cfg.rope_factor <= 1:
        return freq_F

    def correction_dim(n_rotations: float) -> float:
        # The dimension whose wavelength fits n_rotations times into the original context.
        return dim * math.log(cfg.original_seq_len / (n_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp_F = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    # ramp 0: high-frequency dims kept as they are; ramp 1: low-frequency dims interpolated.
    return freq_F / cfg.rope_factor * ramp_F + freq_F * (1 - ramp_F)


def rope_tables(cfg: ModelConfig, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos_TF, sin_TF) in fp32 for positions 0..seq_len-1."""
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"sequence of {seq_len} tokens is longer than model.max_seq_len={cfg.max_seq_len}")
    pos_T = torch.arange(seq_len, dtype=torch.float32, device=device)
    angle_TF = pos_T[:, None] * inv_freq(cfg, device)[None, :]
    k = _rope_cos_sin_factor(cfg)
    return angle_TF.cos() * k, angle_TF.sin() * k


def _swap_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...) along the last dim."""
    return torch.stack((x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


class _SwapPairs(torch.autograd.Function):
    """A pair swap is a permutation that is its own transpose, so its backward is itself. Autograd's
    own backward of flip or stack is 3-6x the forward on CPU (4 x 512 x 16 x 64 fp32: 11.6 ms fwd +
    bwd for flip against 2.8 ms here)."""

    @staticmethod
    def forward(ctx, x):
        return _swap_pairs(x)

    @staticmethod
    def backward(ctx, g):
        return _swap_pairs(g)


def _pair_tables(cos_TF: torch.Tensor, sin_TF: torch.Tensor, dtype: torch.dtype):
    """(cos2_T1R, sin2_T1R) = ((cos, cos), (-sin, sin)) per pair, shaped to broadcast over B and H."""
    cos2_T1R = cos_TF.to(dtype).repeat_interleave(2, dim=-1)[:, None, :]
    sin2_T1R = torch.stack((-sin_TF, sin_TF), dim=-1).flatten(-2).to(dtype)[:, None, :]
    return cos2_T1R, sin2_T1R


def apply_rope(x_BTHR: torch.Tensor, cos_TF: torch.Tensor, sin_TF: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of the last dim by the per-position angles (computed in fp32, or in
    fp64 for fp64 inputs: an fp32 round trip would cap fp64 reference checks at ~1e-7).

    (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), written as x * cos2 + swap(x) * sin2 with
    cos2 = (cos, cos) and sin2 = (-sin, sin) per pair: the same products and sums, so the same
    bits, in three passes over x instead of nine (no unflatten, stack and flatten)."""
    dtype = torch.promote_types(x_BTHR.dtype, torch.float32)
    x = x_BTHR.to(dtype)
    return _rotate(x, *_pair_tables(cos_TF, sin_TF, dtype), swap=_SwapPairs.apply).to(x_BTHR.dtype)


def _rotate(x: torch.Tensor, cos2_T1R: torch.Tensor, sin2_T1R: torch.Tensor,
            swap=_swap_pairs) -> torch.Tensor:
    """x * cos2 + swap(x) * sin2: the rotation of every pair, in the tables' dtype."""
    return (x * cos2_T1R).add_(swap(x) * sin2_T1R)


def _pass_and_rotate(x_BTHK: torch.Tensor, rotate, cos2_T1R: torch.Tensor) -> torch.Tensor:
    """A new contiguous tensor: x's leading columns copied, its last R from rotate(them in the
    tables' dtype), rounded once into x's dtype by the slice write (as apply_rope's .to)."""
    R = cos2_T1R.shape[-1]
    out_BTHK = torch.empty(x_BTHK.shape, dtype=x_BTHK.dtype, device=x_BTHK.device)
    out_BTHK[..., :-R] = x_BTHK[..., :-R]
    out_BTHK[..., -R:] = rotate(x_BTHK[..., -R:].to(cos2_T1R.dtype))
    return out_BTHK


class _RopeTail(torch.autograd.Function):
    """x_BTHK with apply_rope on its last R columns and the rest passed through, in one new tensor.

    MLA's query is [no-rope part | rope part] of one projection. Built as split -> rope -> cat, it
    costs a pass over the whole query in the cat and another in the split's backward (which cats
    the two gradients); here each direction writes its result once. Same arithmetic as apply_rope
    (the backward is autograd's of it: g * cos2 + swap(g * sin2)), so the same bits."""

    @staticmethod
    def forward(ctx, x_BTHK, cos2_T1R, sin2_T1R):
        ctx.save_for_backward(cos2_T1R, sin2_T1R)
        return _pass_and_rotate(x_BTHK, lambda r: _rotate(r, cos2_T1R, sin2_T1R), cos2_T1R)

    @staticmethod
    def backward(ctx, g_BTHK):
        cos2_T1R, sin2_T1R = ctx.saved_tensors
        return _pass_and_rotate(g_BTHK, lambda r: (r * cos2_T1R).add_(_swap_pairs(r * sin2_T1R)),
                                cos2_T1R), None, None


def rope_tail(x_BTHK: torch.Tensor, cos_TF: torch.Tensor, sin_TF: torch.Tensor) -> torch.Tensor:
    """cat([x[..., :-R], apply_rope(x[..., -R:])], -1) with R = 2F, bit for bit, in fewer passes."""
    dtype = torch.promote_types(x_BTHK.dtype, torch.float32)
    return _RopeTail.apply(x_BTHK, *_pair_tables(cos_TF, sin_TF, dtype))
