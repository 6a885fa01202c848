"""The fast paths equal the plain ones: MLA's padded-v attention core, the three-pass rope,
RMSNorm's closed-form backward, the bucketed bf16 CPU experts, the chunked head cross-entropy
(no full logits), precision=auto's pick, and the one FLOP count (hand-counted)."""

import functools

import pytest
import torch
import torch.nn.functional as F

from framework.metrics import train_flops_per_token
from framework.model import Transformer, moe
from framework.model import transformer as transformer_module
from framework.model.attention import attention_core
from framework.model.loss import head_cross_entropy
from framework.model.norm import RMSNorm
from framework.model.rope import apply_rope, rope_tail
from framework.precision import resolve_compute
from launch.run import compose

pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def test_padded_v_attention_equals_the_plain_call_values_and_gradients():
    torch.manual_seed(0)
    B, H, T, K, V = 2, 3, 96, 48, 32  # MLA-like: q/k head dim 48 (nope 32 + rope 16), v 32
    q, k, v = (torch.randn(B, H, T, d, requires_grad=True) for d in (K, K, V))
    g = torch.randn(B, H, T, V)
    outs, grads = [], []
    for pad in (True, False):
        o = attention_core(q, k, v, scale=K ** -0.5, pad_v=pad)
        outs.append(o)
        grads.append(torch.autograd.grad(o, (q, k, v), g))
    assert outs[0].shape == (B, H, T, V)
    assert rel(outs[0], outs[1]) < 1e-5
    for a, b in zip(*grads):
        assert rel(a, b) < 1e-5


def _attention_grads(fn, q64, k64, v64, g64, dtype):
    q, k, v = (x.to(dtype).requires_grad_() for x in (q64, k64, v64))
    o = fn(q, k, v, q64.shape[-1] ** -0.5)
    return (o, *torch.autograd.grad(o, (q, k, v), g64.to(dtype)))


def test_cpu_blocked_attention_backward_equals_the_plain_call_and_keeps_flash_precision():
    """duet_kernels/cpu_attention.py: flash's forward, its own blocked backward. In fp64 it equals the
    plain call; in bf16 its error against that fp64 answer stays near the error of PyTorch's own
    bf16 flash backward (which keeps fp32 scores), at flat and at peaked attention."""
    from duet_kernels import cpu_attention

    def plain(q, k, v, scale):
        return attention_core(q, k, v, scale, pad_v=False)

    torch.manual_seed(0)
    B, H, T, K, V = 2, 3, 300, 48, 32  # two query blocks and a partial third (BLOCK 128 here)
    for sharpness in (1.0, 4.0):  # scores of order 1 (flat attention) and 16 (peaked)
        q64, k64 = (sharpness * torch.randn(B, H, T, K, dtype=torch.float64) for _ in range(2))
        v64, g64 = (torch.randn(B, H, T, V, dtype=torch.float64) for _ in range(2))
        exact = _attention_grads(plain, q64, k64, v64, g64, torch.float64)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cpu_attention, "BLOCK", 128)
            ours64 = _attention_grads(cpu_attention.causal_attention, q64, k64, v64, g64, torch.float64)
            ours = _attention_grads(cpu_attention.causal_attention, q64, k64, v64, g64, torch.bfloat16)
        flash = _attention_grads(plain, q64, k64, v64, g64, torch.bfloat16)
        for name, a, b, c, d in zip(("o", "dq", "dk", "dv"), ours64, exact, ours, flash):
            assert rel(a, b) < 1e-10, (sharpness, name)
            assert rel(c, b) < 2 * rel(d, b), (sharpness, name, rel(c, b), rel(d, b))
    # The model's bf16 core takes this path from CPU_BF16_ATTENTION_MIN_SEQ tokens on.
    q = torch.randn(1, 2, 512, 48, dtype=torch.bfloat16, requires_grad=True)
    o = attention_core(q, q, q[..., :32], 0.1)
    assert o.grad_fn.name().endswith("FlashBlockedBackwardBackward")


def test_rope_is_the_pairwise_rotation_to_within_its_roundings_and_a_complex_product():
    """Forward (x0 cos - x1 sin, x0 sin + x1 cos) and backward (g0 cos + g1 sin, g1 cos - g0 sin)
    against the written-out formula in fp64: off by at most the compute dtype's roundings of two
    products and a sum (torch's scalar complex product may fuse them, so not always bit for bit),
    plus one rounding into bf16. Shapes cover both torch's vector loop and its scalar tail."""
    torch.manual_seed(0)
    for B, T, H, F_ in ((2, 7, 3, 4), (1, 9, 2, 32)):
        angle_TF = torch.rand(T, F_, dtype=torch.float64) * 6.3
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            table = torch.float64 if dtype == torch.float64 else torch.float32
            eps = torch.finfo(table).eps
            cos_TF, sin_TF = angle_TF.cos().to(table), angle_TF.sin().to(table)
            c, s = cos_TF.double()[:, None], sin_TF.double()[:, None]
            x = torch.randn(B, T, H, 2 * F_, dtype=dtype, requires_grad=True)
            got = apply_rope(x, cos_TF, sin_TF)
            g = torch.randn_like(got)
            (dx,) = torch.autograd.grad(got, x, g)
            for y, v, sign in ((got, x, 1.0), (dx, g, -1.0)):  # the backward rotates by -angle
                v0, v1 = v.detach().double().unflatten(-1, (-1, 2)).unbind(-1)
                exact = torch.stack((v0 * c - sign * v1 * s, v0 * sign * s + v1 * c), -1).flatten(-2)
                size = torch.stack(((v0 * c).abs() + (v1 * s).abs(),
                                    (v0 * s).abs() + (v1 * c).abs()), -1).flatten(-2)
                bound = 2 * eps * size + (2 ** -8 * exact.abs() if dtype == torch.bfloat16 else 0)
                assert ((y.double() - exact).abs() <= bound).all(), (B, T, H, F_, dtype, sign)
    # And the rotation itself: (x0 + i x1) * e^(i angle), in fp64.
    x = torch.randn(B, T, H, 2 * F_, dtype=torch.float64)
    z = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous()) * torch.polar(
        torch.ones_like(angle_TF), angle_TF)[:, None]
    assert torch.allclose(apply_rope(x, angle_TF.cos(), angle_TF.sin()), torch.view_as_real(z).flatten(-2),
                          rtol=0, atol=1e-12)


def test_rope_tail_equals_split_rope_and_cat_bit_for_bit():
    """MLA's query: rope_tail writes [x[..., :N] | apply_rope(x[..., N:])] in one tensor. Its output
    and its gradient equal those of the split -> apply_rope -> cat it replaces, also for the strided
    upstream gradient that the attention core hands back ([B, H, T, K] seen as [B, T, H, K])."""
    torch.manual_seed(0)
    B, T, H, N, R = 2, 7, 3, 5, 8
    angle_TF = torch.rand(T, R // 2, dtype=torch.float64) * 6.3
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        table = torch.float64 if dtype == torch.float64 else torch.float32
        cos_TF, sin_TF = angle_TF.cos().to(table), angle_TF.sin().to(table)
        x = torch.randn(B, T, H, N + R, dtype=dtype, requires_grad=True)
        got = rope_tail(x, cos_TF, sin_TF)
        ref = torch.cat([x[..., :N], apply_rope(x[..., N:], cos_TF, sin_TF)], dim=-1)
        assert torch.equal(got, ref), dtype
        g = torch.randn(B, H, T, N + R, dtype=dtype).transpose(1, 2)
        assert torch.equal(*(torch.autograd.grad(y, x, g)[0] for y in (got, ref))), dtype


def test_rms_norm_backward_equals_autograd_of_the_reference_formula():
    torch.manual_seed(0)
    D = 40
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 2 ** -7)):
        norm = RMSNorm(D, eps=1e-6).to(torch.float64 if dtype == torch.float64 else torch.float32)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
        x = (3 * torch.randn(2, 5, D, dtype=torch.float64)).to(dtype).requires_grad_()
        weight = norm.weight.detach().clone().requires_grad_()
        # The reference's arithmetic (DeepSeek's and transformers'), differentiated by autograd.
        x32 = x.to(weight.dtype)
        plain = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
        got = norm(x)
        g = torch.randn_like(got)
        assert torch.equal(got, plain), dtype
        (dx, dw), (dx_ref, dw_ref) = (torch.autograd.grad(y, (x, w), g)
                                      for y, w in ((got, norm.weight), (plain, weight)))
        assert dx.dtype == dtype and rel(dx, dx_ref) < tol and rel(dw, dw_ref) < 1e-12, dtype


def test_bucket_rows_pads_less_than_half_and_takes_two_sizes_per_octave():
    sizes = [moe.bucket_rows(n) for n in range(1, 4097)]
    assert moe.bucket_rows(0) == 0 and sizes[:16] == [16] * 16
    assert all(n <= b < 1.5 * n for n, b in enumerate(sizes[16:], start=17))
    assert len(set(sizes)) == 17  # 16, 24, 32, ..., 3072, 4096


@pytest.mark.parametrize("max_rows, block", [(0, 0), (10.0, 96)])  # per-expert buckets; one block of 96
def test_bucketed_bf16_experts_equal_the_plain_grouped_gemms(monkeypatch, max_rows, block):
    torch.manual_seed(0)
    E, M, D, I, tail = 4, 150, 32, 16, 7
    ws = [(0.1 * torch.randn(*shape)).requires_grad_() for shape in ((E, I, D), (E, I, D), (E, D, I))]
    x = torch.randn(M + tail, D).bfloat16().requires_grad_()
    count_E = torch.tensor([70, 0, 33, 47])  # an idle expert, and tail rows for other ranks
    g = torch.randn(M + tail, D).bfloat16()
    swiglu, seen = moe._swiglu, []
    monkeypatch.setattr(moe, "CPU_UNIFORM_MAX_ROWS", max_rows)
    monkeypatch.setattr(moe, "_swiglu", lambda *a, **kw: seen.append(a[4].block_rows) or swiglu(*a, **kw))
    outs = []
    for fn in (moe._bucketed_swiglu, functools.partial(swiglu, grouped=True)):
        layout = moe.ExpertRows(count_E, M + tail, None, exact=False)
        y = fn(x, *ws, layout=layout, weight_grad=None)
        outs.append((y, torch.autograd.grad(y, [x, *ws], g)))
    (y, grads), (y_ref, grads_ref) = outs
    assert seen == [block]  # the path under test ran (0: per-expert buckets, else bmm blocks)
    assert y.shape == y_ref.shape and y.dtype == torch.bfloat16
    assert not y[M:].any()  # tail rows stay zero
    assert rel(y, y_ref) < 1e-3
    for a, b in zip(grads, grads_ref, strict=True):
        assert rel(a, b) < 1e-3


def test_chunked_cross_entropy_equals_full_logits_loss_and_gradients():
    torch.manual_seed(0)
    N, D, Vocab = 150, 24, 97
    h = torch.randn(N, D, requires_grad=True)
    w = (0.3 * torch.randn(Vocab, D)).requires_grad_()
    t = torch.randint(0, Vocab, (N,))
    t[[3, 77]] = -100  # ignored rows, as F.cross_entropy's default ignore_index
    ref = F.cross_entropy(F.linear(h, w).float(), t)
    ref_h, ref_w = torch.autograd.grad(2.5 * ref, (h, w))
    # chunk 16 < D: gradients from recomputed logits in backward; else computed in forward.
    # Several chunks with a short last one; one; one larger than N.
    for chunk in (16, 64, 150, 1000):
        loss = head_cross_entropy(h, w, t, chunk=chunk)
        got_h, got_w = torch.autograd.grad(2.5 * loss, (h, w))
        assert abs(loss.item() - ref.item()) <= 1e-6 * ref.item()
        assert rel(got_h, ref_h) < 1e-6 and rel(got_w, ref_w) < 1e-6
    with torch.no_grad():  # evaluation: the loss alone
        assert abs(head_cross_entropy(h, w, t, chunk=64).item() - ref.item()) <= 1e-6 * ref.item()


def test_model_loss_with_chunked_heads_equals_full_logits_and_saves_no_logits(monkeypatch):
    cfg = compose(["model=tiny", "precision=fp32"]).model  # with one MTP depth
    torch.manual_seed(0)
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 33))
    x, y = tokens[:, :-1], tokens[:, 1:]
    saved_shapes = []

    def pack(t):
        saved_shapes.append(tuple(t.shape))
        return t

    def run():
        model.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, parts = model.loss(x, y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), parts, grads

    loss, parts, grads = run()
    # Nothing [rows, V] is kept for backward (the head's own weight [V, D] is).
    assert not [s for s in saved_shapes if len(s) > 1 and s[-1] == cfg.vocab_size and s[0] != cfg.vocab_size]
    # The reference: today's path, full logits through F.cross_entropy.
    monkeypatch.setattr(transformer_module, "head_cross_entropy",
                        lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t))
    saved_shapes.clear()
    ref_loss, ref_parts, ref_grads = run()
    assert any(s == (64, cfg.vocab_size) for s in saved_shapes)  # the check above can fail
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * ref_loss.item()
    assert abs(parts["mtp_loss"].item() - ref_parts["mtp_loss"].item()) <= 1e-6 * ref_parts["mtp_loss"].item()
    assert sorted(grads) == sorted(ref_grads)
    for name, g in grads.items():
        assert rel(g, ref_grads[name]) < 1e-6, name


@pytest.mark.parametrize("flags, picked", [
    ("fpu sse avx2 avx512f avx512_bf16 avx512_vnni", "bf16"),  # Cooper Lake, Zen 4
    ("fpu sse avx2 avx512f amx_bf16 amx_tile amx_int8", "bf16"),  # Sapphire Rapids
    ("fpu sse avx2 avx512f avx512_vnni", "fp32"),  # AVX-512 without bf16: emulated, slow
])
def test_auto_precision_reads_the_cpu_flags(flags, picked):
    cpuinfo = f"processor\t: 0\nmodel name\t: a cpu\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t: {flags}\n"
    assert resolve_compute("auto", torch.device("cpu"), cpuinfo) == picked
    assert resolve_compute("fp32", torch.device("cpu"), cpuinfo) == "fp32"  # explicit choices stand
    assert resolve_compute("auto", torch.device("cuda"), "flags\t: fpu\n") == "bf16"


def test_train_flops_per_token_of_the_tiny_preset_by_hand():
    cfg = compose(["model=tiny"]).model
    # configs/model/tiny.yaml: D 128, 3 layers (1 dense, inter 384), 4 heads, q_lora 64,
    # kv_lora 32, nope 32, rope 16, v 32, 8 experts (2 active + 1 shared, inter 64), vocab 2048, MTP 1.
    attention = 128 * 64 + 64 * 4 * 48 + 128 * (32 + 16) + 32 * 4 * (32 + 32) + 4 * 32 * 128  # 51,200
    per_moe_block = 3 * 128 * 64 * (2 + 1) + 128 * 8  # experts the token visits + the gate
    matmul = (3 + 1) * attention + 3 * 128 * 384 + (2 + 1) * per_moe_block \
        + 2 * 128 * 128 + 2 * 128 * 2048  # MTP projection; head for main + MTP (no embedding)
    core = 3 * (3 + 1) * 4 * 2 * (48 + 32) * 128 / 2  # fwd+bwd, 4 attending blocks, causal
    assert matmul == 1_133_568
    assert train_flops_per_token(cfg, 128) == 6 * matmul + core == 7_292_928
