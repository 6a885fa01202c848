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


def _phasors(cos_TF: torch.Tensor, sin_TF: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[T, 1, F] unit phasors cos + i sin in the compute dtype's complex type (fp32 tables give
    complex64, fp64 give complex128), shaped to broadcast over B and H."""
    return torch.complex(cos_TF.to(dtype), sin_TF.to(dtype))[:, None, :]


def _pass_and_rotate(x_BTHK: torch.Tensor, f_T1F: torch.Tensor) -> torch.Tensor:
    """A new contiguous tensor: x's leading columns copied, its last R = 2F rotated pairwise by f.

    A pair (x0, x1) read as x0 + i x1 times cos + i sin is (x0 cos - x1 sin) + i (x0 sin + x1 cos):
    the same two products and one sum per output as the written-out rotation, so on CPU (where
    torch's complex product is a multiply and a horizontal add, no FMA) the same bits, which the
    tests pin. It takes one pass over the pairs where the written-out form takes five (x * cos,
    swap, swap * sin, add, and the cat inside swap). The rounded-once write into x's dtype is the
    slice assignment's (as apply_rope's .to)."""
    R = 2 * f_T1F.shape[-1]
    out_BTHK = torch.empty(x_BTHK.shape, dtype=x_BTHK.dtype, device=x_BTHK.device)
    out_BTHK[..., :-R] = x_BTHK[..., :-R]
    # view_as_complex wants unit-stride pairs at even offsets: the slice of an odd-width row, or a
    # transposed gradient, is copied once into that layout (a cast copies anyway).
    pairs = x_BTHK[..., -R:].to(f_T1F.real.dtype).contiguous().unflatten(-1, (-1, 2))
    out_BTHK[..., -R:] = torch.view_as_real(torch.view_as_complex(pairs) * f_T1F).flatten(-2)
    return out_BTHK


class _RopeTail(torch.autograd.Function):
    """x_BTHK with apply_rope on its last R columns and the rest passed through, in one new tensor.

    MLA's query is [no-rope part | rope part] of one projection. Built as split -> rope -> cat, it
    costs a pass over the whole query in the cat and another in the split's backward (which cats
    the two gradients); here each direction writes its result once. A rotation's transpose is
    the rotation back, so the backward is the same product with the conjugate phasors: per pair
    (g0 cos + g1 sin, g1 cos - g0 sin), the products and sums of autograd's backward of apply_rope."""

    @staticmethod
    def forward(ctx, x_BTHK, f_T1F):
        ctx.save_for_backward(f_T1F)
        return _pass_and_rotate(x_BTHK, f_T1F)

    @staticmethod
    def backward(ctx, g_BTHK):
        (f_T1F,) = ctx.saved_tensors
        return _pass_and_rotate(g_BTHK, f_T1F.conj().resolve_conj()), None


def rope_tail(x_BTHK: torch.Tensor, cos_TF: torch.Tensor, sin_TF: torch.Tensor) -> torch.Tensor:
    """cat([x[..., :-R], apply_rope(x[..., -R:])], -1) with R = 2F, in one pass each way."""
    dtype = torch.promote_types(x_BTHK.dtype, torch.float32)
    return _RopeTail.apply(x_BTHK, _phasors(cos_TF, sin_TF, dtype))


def apply_rope(x_BTHR: torch.Tensor, cos_TF: torch.Tensor, sin_TF: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of the last dim by the per-position angles: (x0, x1) ->
    (x0 cos - x1 sin, x0 sin + x1 cos), computed in fp32, or in fp64 for fp64 inputs (an fp32
    round trip would cap fp64 reference checks at ~1e-7), rounded once into x's dtype.

    It is rope_tail with nothing to pass through, so the two share one arithmetic."""
    return rope_tail(x_BTHR, cos_TF, sin_TF)
