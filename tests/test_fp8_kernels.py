"""FP8 kernels: Triton (under TRITON_INTERPRET=1, see conftest) against the torch twins and fp32.

Legend: M rows, N out features, K reduction dim, E experts, Kb = ceil(K/128).
Expected values come from torch's own float8 cast, fp32 matmuls of the unquantised inputs,
or the e4m3 grid worked out by hand -- never from the code under test.
"""

from __future__ import annotations

import importlib
import zlib

import pytest
import torch

from duet_kernels import fp8
from duet_kernels.fp8 import quantize as fp8_quantize

# By module path: the package re-exports functions named gemm and grouped_gemm.
fp8_gemm = importlib.import_module("duet_kernels.fp8.gemm")
fp8_grouped = importlib.import_module("duet_kernels.fp8.grouped_gemm")

E4M3 = torch.float8_e4m3fn
GEMM_TOL = 1e-3  # DeepGEMM's pass criterion for calc_diff against the unquantised product
LINEAR_TOL = 1.5e-3  # FP8Linear: three quantised GEMMs, plus the quantised grad_out


def torch_cast_bytes(x: torch.Tensor) -> torch.Tensor:
    """The e4m3 bytes torch itself produces (saturating, round to nearest even)."""
    return x.float().clamp(-448, 448).to(E4M3).view(torch.uint8)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # fixed data: error margins below are measured, not luck


# ----------------------------------------------------------------------------- helpers


def test_calc_diff_definition():
    x = torch.randn(100)
    assert fp8.calc_diff(x, x) == pytest.approx(0.0, abs=1e-15)
    assert fp8.calc_diff(x, -x) == pytest.approx(2.0)
    assert fp8.calc_diff(x, 2 * x) == pytest.approx(1 - 4 / 5)  # 1 - 2*2/(1+4)


def test_backend_resolution(monkeypatch):
    cpu = torch.zeros(1)
    assert fp8_quantize.use_triton("auto", cpu) is False  # CPU tensors take the reference
    assert fp8_quantize.use_triton("triton", cpu) is True  # interpreter is on in tests
    with pytest.raises(ValueError):
        fp8_quantize.use_triton("cuda", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fp8_quantize.use_triton("triton", cpu)


# ----------------------------------------------------------------------------- rounding fix


def test_rounding_fix_hand_values():
    # Worked out on the e4m3 grid (3 mantissa bits, min normal 2^-6, subnormal step 2^-9, max 448).
    cases = {
        31.6: 32.0,  # [16, 32) step 2: rounds up across the power of two (the interpreter bug gives 16)
        15.9: 16.0,
        447.0: 448.0,
        460.0: 448.0,  # between 448 and the (non-finite) next step: saturates
        1000.0: 448.0,
        -31.6: -32.0,
        1.0625: 1.0,  # tie between 1.0 and 1.125 -> even mantissa (1.0)
        1.1875: 1.25,  # tie between 1.125 and 1.25 -> even mantissa (1.25)
        2.0**-9: 2.0**-9,  # smallest subnormal
        2.0**-10: 0.0,  # tie between 0 and 2^-9 -> 0
        3 * 2.0**-10: 2 * 2.0**-9,  # tie between 1 and 2 steps -> 2 steps
        0.0139: 7 * 2.0**-9,  # 7.1168 steps
        0.0156: 2.0**-6,  # 7.987 steps: rounds up into the normal range
        1e-9: 0.0,
    }
    x = torch.tensor(list(cases.keys()), dtype=torch.float32)
    got = fp8.to_fp8_e4m3(x, backend="triton").float()
    assert torch.equal(got, torch.tensor(list(cases.values())))


def test_rounding_matches_torch_cast_everywhere():
    grid = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    grid = grid[~grid.isnan()]
    pos = grid[grid > 0].unique()
    midpoints = (pos[1:] + pos[:-1]) / 2  # every tie, where rounding direction is decided
    nudged = torch.cat([midpoints * (1 + 2**-20), midpoints * (1 - 2**-20)])
    logs = torch.empty(20000).uniform_(-14, 10)
    random = torch.exp2(logs) * torch.where(torch.rand(20000) < 0.5, -1.0, 1.0)
    x = torch.cat([grid, midpoints, -midpoints, nudged, random, torch.tensor([-0.0, 0.0, 465.0, -1e30])])
    got = fp8.to_fp8_e4m3(x, backend="triton").view(torch.uint8)
    assert torch.equal(got, torch_cast_bytes(x))


# ----------------------------------------------------------------------------- quantisers


def make_data(kind: str, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(repr((kind, tuple(shape))).encode()))  # stable across runs
    x = torch.randn(*shape, generator=g)
    if kind == "outliers":
        flat = x.view(-1)
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 200),), generator=g)
        flat[idx] *= 1e4  # pushes the rest of their tiles into e4m3's subnormal range
    elif kind == "zero_tiles":
        x[..., :128] = 0  # whole 1x128 tiles (and the first 128x128 weight blocks' columns) zero
        x.view(-1)[-50:] = 0
    elif kind == "tiny":
        x *= 1e-7  # below the 1e-4 amax floor: exercises the clamp
    return x


KINDS = ["random", "outliers", "zero_tiles", "tiny"]
ACT_SHAPES = [(48, 256), (37, 300), (3, 5, 130), (1, 7)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", ACT_SHAPES, ids=str)
@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_act_bitwise(kind, shape, pow2):
    x = make_data(kind, shape)
    q_t, s_t = fp8.quantize_act(x, power_of_2_scale=pow2, backend="triton")
    q_r, s_r = fp8.quantize_act(x, power_of_2_scale=pow2, backend="torch")
    assert q_t.shape == x.shape and s_t.shape == (*x.shape[:-1], -(-x.shape[-1] // 128))
    assert same_bytes(q_t, q_r) and torch.equal(s_t, s_r)
    qT_t, sT_t = fp8.quantize_act_transposed(x, power_of_2_scale=pow2, backend="triton")
    qT_r, sT_r = fp8.quantize_act_transposed(x, power_of_2_scale=pow2, backend="torch")
    assert same_bytes(qT_t, qT_r) and torch.equal(sT_t, sT_r)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(256, 384), (130, 200), (2, 70, 129)], ids=str)
@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_weight_bitwise(kind, shape, pow2):
    w = make_data(kind, shape)
    q_t, s_t = fp8.quantize_weight(w, power_of_2_scale=pow2, backend="triton")
    q_r, s_r = fp8.quantize_weight(w, power_of_2_scale=pow2, backend="torch")
    assert s_t.shape == (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))
    assert same_bytes(q_t, q_r) and torch.equal(s_t, s_r)


def test_scale_semantics_and_bf16_input():
    x_MK = torch.zeros(4, 256)
    x_MK[0, :128] = torch.linspace(-3.5, 2.0, 128)  # amax 3.5
    x_MK[1, 128:] = 1e-6  # amax below the floor
    x_MK[2, 5] = 3.0  # amax 3: pow2 scale 3/448 -> 2^-7
    _, s = fp8.quantize_act(x_MK, backend="triton")
    assert s[0, 0] == torch.tensor(3.5) / 448 and s[1, 1] == torch.tensor(1e-4) / 448
    assert s[3, 0] == torch.tensor(1e-4) / 448  # all-zero tile: floor, not 0 or inf
    _, s2 = fp8.quantize_act(x_MK, power_of_2_scale=True, backend="triton")
    assert s2[2, 0] == 2.0**-7 and s2[0, 0] == 2.0**-7  # 3.5/448 = 2^-7 exactly
    # bf16 input goes through the same fp32 maths
    xb = torch.randn(33, 200).to(torch.bfloat16)
    q_t, s_t = fp8.quantize_act(xb, backend="triton")
    q_r, s_r = fp8.quantize_act(xb.float(), backend="torch")
    assert same_bytes(q_t, q_r) and torch.equal(s_t, s_r)


@pytest.mark.parametrize("kind", ["random", "outliers"])
def test_dequantize_error_bound(kind):
    # Half an e4m3 step: 2^-4 relative in the normal range, 2^-10 * scale in the subnormals.
    x = make_data(kind, (40, 300))
    q, s = fp8.quantize_act(x, backend="triton")
    deq = fp8.dequantize_act(q, s, backend="triton")
    s_full = s.repeat_interleave(128, dim=1)[:, :300]
    assert torch.all((deq - x).abs() <= x.abs() * 2**-4 + s_full * 2**-10 + 1e-12)
    assert torch.equal(deq, fp8.dequantize_act(q, s, backend="torch"))
    w = make_data(kind, (3, 200, 150))
    qw, sw = fp8.quantize_weight(w, backend="triton")
    dw_t = fp8.dequantize_weight(qw, sw, out_dtype=torch.bfloat16, backend="triton")
    assert torch.equal(dw_t, fp8.dequantize_weight(qw, sw, out_dtype=torch.bfloat16, backend="torch"))
    if kind == "random":
        assert fp8.calc_diff(fp8.dequantize_weight(qw, sw), w) < 1e-3


def test_transposed_weight_is_the_transposed_quantisation():
    # FP8Linear's dgrad uses w_fp8.T instead of re-quantising w.T: they must be the same bytes.
    w = make_data("outliers", (300, 200))
    q, s = fp8.quantize_weight(w, backend="triton")
    qT, sT = fp8.quantize_weight(w.t().contiguous(), backend="triton")
    assert same_bytes(qT, q.t().contiguous()) and torch.equal(sT, s.t())


# ----------------------------------------------------------------------------- NaN

NAN = float("nan")
GPU_NAN = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32)  # what NVIDIA GPUs produce
# The interpreter's numpy operations warn on NaN and on x / 0 (e.g. NaN -> int32 in the
# rounding bit trick, whose result the kernels then discard): expected here, not a failure.
numpy_nan_warnings = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                                "ignore:divide by zero encountered:RuntimeWarning")


def same_with_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where the other is NaN (NaN != NaN defeats torch.equal)."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])


def test_cast_keeps_nan():
    x = torch.tensor([NAN, -NAN, float(GPU_NAN), 1.0, float("inf"), -float("inf")])
    got = fp8.to_fp8_e4m3(x, backend="triton").view(torch.uint8)
    # e4m3fn's NaN is S.1111.111 with the input's sign (torch's cast); infinities saturate.
    assert got.tolist() == [0x7F, 0xFF, 0x7F, 0x38, 0x7E, 0xFE]
    assert torch.equal(got, torch_cast_bytes(x))


@numpy_nan_warnings
@pytest.mark.parametrize("pow2", [False, True])
def test_quantisers_propagate_nan_like_reference(pow2):
    x = make_data("random", (5, 300))
    x[0, 3], x[0, 10] = NAN, 0.0  # tile (0, 0): a NaN, and a zero (0 / a zero scale is NaN)
    x[2, 260] = -NAN  # tile (2, 2), the ragged one (44 columns)
    nan_tiles = torch.zeros(5, 3, dtype=torch.bool)
    nan_tiles[0, 0] = nan_tiles[2, 2] = True
    q, s = fp8.quantize_act(x, power_of_2_scale=pow2, backend="triton")
    q_ref, s_ref = fp8.quantize_act(x, power_of_2_scale=pow2, backend="torch")
    # Worked out by hand: the tile's amax is NaN, so is its scale (max(amax, 1e-4) / 448); the
    # power-of-2 bit trick maps a NaN scale to 0.0. Values: x / NaN is NaN; x / 0 is +-inf,
    # which saturates to +-448, and NaN for 0 or NaN.
    in_nan_tile = nan_tiles.repeat_interleave(128, dim=1)[:, :300]
    deq = q.float()
    if pow2:
        assert torch.all(s[nan_tiles] == 0) and not s.isnan().any()
        expect_nan = in_nan_tile & (x.isnan() | (x == 0))
        assert torch.equal(deq.isnan(), expect_nan)
        finite = in_nan_tile & ~expect_nan
        assert finite.sum() == 128 + 44 - 3 and torch.equal(deq[finite], 448 * x[finite].sign())
    else:
        assert torch.equal(s.isnan(), nan_tiles)
        assert torch.equal(deq.isnan(), in_nan_tile)
    # The other tiles are untouched by the NaN: as if it were not there.
    clean_q, clean_s = fp8.quantize_act(torch.where(in_nan_tile, 0.0, x), pow2, backend="triton")
    assert torch.equal(s[~nan_tiles], clean_s[~nan_tiles])
    assert same_bytes(q[~in_nan_tile], clean_q[~in_nan_tile])
    # And the twin agrees byte for byte (NaN's sign included: numpy and torch divide alike).
    assert same_bytes(q, q_ref) and same_with_nan(s, s_ref)
    qT, sT = fp8.quantize_act_transposed(x.t().contiguous(), power_of_2_scale=pow2, backend="triton")
    assert same_bytes(qT, q) and same_with_nan(sT, s)  # 128x1 tiles of x.T are the 1x128 tiles of x

    w = make_data("random", (2, 130, 140))
    w[1, 129, 5] = NAN  # block (1, 0) of expert 1: the ragged 2-row one
    qw, sw = fp8.quantize_weight(w, power_of_2_scale=pow2, backend="triton")
    qw_ref, sw_ref = fp8.quantize_weight(w, power_of_2_scale=pow2, backend="torch")
    nan_blocks = torch.zeros(2, 2, 2, dtype=torch.bool)
    nan_blocks[1, 1, 0] = True
    assert torch.equal(sw == 0 if pow2 else sw.isnan(), nan_blocks)
    if not pow2:  # every value of that block NaN, none elsewhere
        expect_nan = torch.zeros(w.shape, dtype=torch.bool)
        expect_nan[1, 128:, :128] = True
        assert torch.equal(qw.float().isnan(), expect_nan)
    assert same_bytes(qw, qw_ref) and same_with_nan(sw, sw_ref)


@numpy_nan_warnings
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_dequantize_and_gemm_keep_nan(out_dtype):
    q = torch.tensor([[0x7F, 0xFF, 0x38, 0x00]], dtype=torch.uint8).view(E4M3)  # NaN, -NaN, 1, 0
    s = torch.tensor([[2.0]])
    got = fp8.dequantize_act(q, s, out_dtype=out_dtype, backend="triton")
    assert got.dtype == out_dtype and same_with_nan(got.float(), torch.tensor([[NAN, NAN, 2.0, 0.0]]))
    # A NaN scale with the GPU's NaN bits: rounding that to bf16 by adding to its int32 view
    # would carry into the sign bit (-0.0) unless NaN is kept apart.
    got = fp8.dequantize_act(q, GPU_NAN.view(1, 1), out_dtype=out_dtype, backend="triton")
    assert got.isnan().all()
    a_q, a_s = fp8.quantize_act(torch.randn(3, 256), backend="triton")
    b_q, b_s = fp8.quantize_weight(torch.randn(40, 256), backend="triton")
    a_s[1, 1] = GPU_NAN
    c = fp8.gemm(a_q, a_s, b_q, b_s, out_dtype=out_dtype, backend="triton")
    c_ref = fp8.gemm(a_q, a_s, b_q, b_s, out_dtype=out_dtype, backend="torch")
    assert torch.equal(c.isnan(), c_ref.isnan()) and c[1].isnan().all() and not c[[0, 2]].isnan().any()


# ----------------------------------------------------------------------------- GEMMs


GEMM_SHAPES = [(64, 64, 4096), (50, 70, 300), (16, 48, 129), (96, 160, 256)]


@pytest.mark.parametrize("M,N,K", GEMM_SHAPES)
def test_gemm(M, N, K):
    a_MK, b_NK = torch.randn(M, K), torch.randn(N, K)
    a_q, a_s = fp8.quantize_act(a_MK, backend="triton")
    b_q, b_s = fp8.quantize_weight(b_NK, backend="triton")
    c_t = fp8.gemm(a_q, a_s, b_q, b_s, out_dtype=torch.float32, backend="triton")
    c_r = fp8.gemm(a_q, a_s, b_q, b_s, out_dtype=torch.float32, backend="torch")
    exact_MN = a_MK.double() @ b_NK.double().T
    assert fp8.calc_diff(c_t, exact_MN) < GEMM_TOL
    # Same products and block order; only the summation order inside a 128-block differs.
    torch.testing.assert_close(c_t, c_r, rtol=1e-5, atol=1e-5 * float(c_r.abs().max()))
    c_bf16 = fp8.gemm(a_q, a_s, b_q, b_s, backend="triton")
    assert c_bf16.dtype == torch.bfloat16 and fp8.calc_diff(c_bf16, exact_MN) < GEMM_TOL


@pytest.mark.parametrize("M,N,K", [(40, 72, 300), (128, 96, 256)])
def test_gemm_1x128_accumulate(M, N, K):
    a_MK, b_NK = torch.randn(M, K), torch.randn(N, K)
    a_q, a_s = fp8.quantize_act(a_MK, backend="triton")
    b_q, b_s = fp8.quantize_act(b_NK, backend="triton")  # 1x128 on both operands
    prior_MN = torch.randn(M, N) * 10
    acc_t, acc_r = prior_MN.clone(), prior_MN.clone()
    out_t = fp8.gemm_1x128(a_q, a_s, b_q, b_s, accumulate_into=acc_t, backend="triton")
    fp8.gemm_1x128(a_q, a_s, b_q, b_s, accumulate_into=acc_r, backend="torch")
    assert out_t is acc_t and out_t.dtype == torch.float32
    torch.testing.assert_close(acc_t, acc_r, rtol=1e-5, atol=1e-4)
    fresh = fp8.gemm_1x128(a_q, a_s, b_q, b_s, backend="triton")
    assert fp8.calc_diff(fresh, a_MK.double() @ b_NK.double().T) < GEMM_TOL
    torch.testing.assert_close(acc_t - prior_MN, fresh, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("M,N,K", [(1, 33, 129), (0, 40, 256), (20, 1, 100)])
def test_gemm_edge_shapes(M, N, K):
    # Too few outputs for calc_diff to be a stable statistic: check against the twin only.
    a_q, a_s = fp8.quantize_act(torch.randn(M, K), backend="triton")
    b_q, b_s = fp8.quantize_weight(torch.randn(N, K), backend="triton")
    c_t = fp8.gemm(a_q, a_s, b_q, b_s, out_dtype=torch.float32, backend="triton")
    c_r = fp8.gemm(a_q, a_s, b_q, b_s, out_dtype=torch.float32, backend="torch")
    assert c_t.shape == (M, N)
    torch.testing.assert_close(c_t, c_r, rtol=1e-5, atol=1e-5)


def test_gemm_rejects_mismatched_scales():
    a_q, a_s = fp8.quantize_act(torch.randn(8, 256))
    b_q, b_s = fp8.quantize_act(torch.randn(16, 256))  # 1x128: wrong for gemm's 128x128 operand
    with pytest.raises(ValueError):
        fp8.gemm(a_q, a_s, b_q, b_s, backend="triton")


# ----------------------------------------------------------------------------- grouped GEMM

# Expert 1 gets no rows; -1 entries are rows routed to experts that live elsewhere.
RAGGED_COUNTS = {0: 37, 1: 0, 2: 5, 3: 20, 4: 70, -1: 4}


def ragged_expert_ids(seed: int = 0) -> torch.Tensor:
    ids = torch.cat([torch.full((n,), e) for e, n in RAGGED_COUNTS.items()])
    return ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize("alignment", [1, 8, 32, 128])
def test_contiguous_layout(alignment):
    ids_R = ragged_expert_ids()
    lay = fp8.contiguous_layout(ids_R, num_experts=5, alignment=alignment)
    m = lay.m_indices
    for e in range(5):
        count = RAGGED_COUNTS[e]
        rows = (m == e).nonzero().squeeze(1)
        assert rows.numel() == count and lay.rows_per_expert[e] == count
        if count:  # one contiguous segment starting on an aligned row
            assert rows[0] % alignment == 0 and torch.equal(rows, torch.arange(rows[0], rows[0] + count))
    valid = m[m >= 0]
    assert torch.all(valid[1:] >= valid[:-1])  # sorted by expert
    assert m.numel() == sum(-(-n // alignment) * alignment for e, n in RAGGED_COUNTS.items() if e >= 0)
    x_R = torch.randn(ids_R.numel(), 3)
    back = lay.scatter(lay.gather(x_R))
    routed = ids_R >= 0
    assert torch.equal(back[routed], x_R[routed]) and torch.all(back[~routed] == 0)
    assert torch.equal(m[lay.dst_rows[routed]].long(), ids_R[routed])


@pytest.mark.parametrize("alignment,K", [(1, 256), (8, 300), (32, 130), (128, 384)])
def test_grouped_gemm(alignment, K):
    E, N = 5, 80
    ids_R = ragged_expert_ids(seed=alignment)
    x_RK, w_ENK = torch.randn(ids_R.numel(), K), torch.randn(E, N, K)
    lay = fp8.contiguous_layout(ids_R, E, alignment)
    a_MK = lay.gather(x_RK)
    a_MK[lay.m_indices < 0] = 1e3  # garbage in padding rows must not leak into the output
    a_q, a_s = fp8.quantize_act(a_MK, backend="triton")
    b_q, b_s = fp8.quantize_weight(w_ENK, backend="triton")
    c_t = fp8.grouped_gemm(a_q, a_s, b_q, b_s, lay.m_indices, out_dtype=torch.float32, backend="triton")
    c_r = fp8.grouped_gemm(a_q, a_s, b_q, b_s, lay.m_indices, out_dtype=torch.float32, backend="torch")
    pad = lay.m_indices < 0
    assert torch.all(c_t[pad] == 0) and torch.all(c_r[pad] == 0)
    torch.testing.assert_close(c_t, c_r, rtol=1e-5, atol=1e-5 * float(c_r.abs().max()))
    # fp32 reference straight from the routed rows and their experts, no layout involved
    routed = ids_R >= 0
    exact_RN = torch.einsum("rk,rnk->rn", x_RK[routed].double(), w_ENK[ids_R[routed]].double())
    assert fp8.calc_diff(lay.scatter(c_t)[routed], exact_RN) < GEMM_TOL
    c_bf16 = fp8.grouped_gemm(a_q, a_s, b_q, b_s, lay.m_indices, backend="triton")
    assert c_bf16.dtype == torch.bfloat16 and torch.all(c_bf16[pad] == 0)


# The GPU runs the autotuners' tiles, the tests above the interpreter's 32x32 ones: every
# tuning tile under the interpreter too (ragged in M, N and K). 64x256 is the one wider than
# b's 128-column scale blocks, so it takes gemm's per-column scale path.
GEMM_TILES = sorted({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in fp8_gemm.tuning_configs()})
GROUPED_TILES = sorted({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"])
                        for c in fp8_grouped.grouped_tuning_configs()})


def use_tile(monkeypatch, bm: int, bn: int) -> None:
    # INTERPRET_BLOCKS is one dict, shared by gemm and grouped_gemm.
    monkeypatch.setitem(fp8_gemm.INTERPRET_BLOCKS, "BLOCK_M", bm)
    monkeypatch.setitem(fp8_gemm.INTERPRET_BLOCKS, "BLOCK_N", bn)


@pytest.mark.parametrize("bm,bn", GEMM_TILES, ids=str)
def test_gemm_at_every_tuning_tile(bm, bn, monkeypatch):
    use_tile(monkeypatch, bm, bn)
    M, N, K = 200, 300, 300
    a_q, a_s = fp8.quantize_act(torch.randn(M, K), backend="torch")
    b_q, b_s = fp8.quantize_weight(torch.randn(N, K), backend="torch")
    c_t = fp8.gemm(a_q, a_s, b_q, b_s, out_dtype=torch.float32, backend="triton")
    c_r = fp8.gemm(a_q, a_s, b_q, b_s, out_dtype=torch.float32, backend="torch")
    torch.testing.assert_close(c_t, c_r, rtol=1e-5, atol=1e-5 * float(c_r.abs().max()))
    g_q, g_s = fp8.quantize_act(torch.randn(N, K), backend="torch")  # 1x128 on both operands
    prior_MN = torch.randn(M, N)
    acc_t = fp8.gemm_1x128(a_q, a_s, g_q, g_s, accumulate_into=prior_MN.clone(), backend="triton")
    acc_r = fp8.gemm_1x128(a_q, a_s, g_q, g_s, accumulate_into=prior_MN.clone(), backend="torch")
    torch.testing.assert_close(acc_t, acc_r, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bm,bn", GROUPED_TILES, ids=str)
@pytest.mark.parametrize("alignment", [8, 128])
def test_grouped_gemm_at_every_tuning_tile(bm, bn, alignment, monkeypatch):
    # alignment 8: most tiles hold several experts; 128: one per tile (or part of one, at 256 rows).
    use_tile(monkeypatch, bm, bn)
    E, N, K = 5, 200, 300
    lay = fp8.contiguous_layout(ragged_expert_ids(seed=bm + bn), E, alignment)
    a_q, a_s = fp8.quantize_act(torch.randn(lay.m_indices.numel(), K), backend="torch")
    b_q, b_s = fp8.quantize_weight(torch.randn(E, N, K), backend="torch")
    c_t = fp8.grouped_gemm(a_q, a_s, b_q, b_s, lay.m_indices, out_dtype=torch.float32, backend="triton")
    c_r = fp8.grouped_gemm(a_q, a_s, b_q, b_s, lay.m_indices, out_dtype=torch.float32, backend="torch")
    torch.testing.assert_close(c_t, c_r, rtol=1e-5, atol=1e-5 * float(c_r.abs().max()))


def test_grouped_gemm_empty_k():
    # An empty sum is zero for every row, padding or not (the reference's answer).
    m_indices = torch.tensor([0, 0, -1, 1], dtype=torch.int32)
    a_q, a_s = torch.zeros(4, 0, dtype=E4M3), torch.zeros(4, 0)
    b_q, b_s = torch.zeros(2, 8, 0, dtype=E4M3), torch.zeros(2, 1, 0)
    c = fp8.grouped_gemm(a_q, a_s, b_q, b_s, m_indices, out_dtype=torch.float32, backend="triton")
    assert torch.equal(c, torch.zeros(4, 8))
    assert torch.equal(c, fp8.grouped_gemm(a_q, a_s, b_q, b_s, m_indices, out_dtype=torch.float32,
                                           backend="torch"))


def test_k_grouped_wgrad_is_one_gemm_1x128_per_expert():
    # Segments of 256, 0 (an expert without tokens), 128 and 128 tokens.
    offsets = [0, 256, 256, 384, 512]
    A, B, P = 24, 40, offsets[-1]
    a_AP, b_BP = torch.randn(A, P), torch.randn(B, P)
    aT_q, aT_s = fp8.quantize_act(a_AP, backend="torch")  # 1x128 along tokens, as the wgrad takes them
    bT_q, bT_s = fp8.quantize_act(b_BP, backend="torch")
    got = fp8.k_grouped_gemm_1x128(aT_q, aT_s, bT_q, bT_s, offsets, backend="triton")
    ref = fp8.k_grouped_gemm_1x128(aT_q, aT_s, bT_q, bT_s, offsets, backend="torch")
    assert got.shape == (4, A, B) and got.dtype == torch.float32
    assert torch.equal(got[1], torch.zeros(A, B))
    for e in range(4):
        lo, hi = offsets[e], offsets[e + 1]
        if hi == lo:
            continue
        t = slice(lo // 128, hi // 128)
        # The per-expert launch it replaces: the same K loop over the same tiles.
        one = fp8.gemm_1x128(aT_q[:, lo:hi], aT_s[:, t], bT_q[:, lo:hi], bT_s[:, t], backend="triton")
        assert torch.equal(got[e], one), e
        assert fp8.calc_diff(got[e], a_AP[:, lo:hi].double() @ b_BP[:, lo:hi].double().T) < GEMM_TOL
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="multiples of 128"):
        fp8.k_grouped_gemm_1x128(aT_q, aT_s, bT_q, bT_s, [0, 100, 768], backend="torch")


# ----------------------------------------------------------------------------- FP8 linear


def run_linear(x, w, backend, dtype=torch.float32, grad_y=None):
    """(y, dx, dw) of fp8_linear and of an fp64 linear on the same inputs and output gradient."""
    x_ref, w_ref = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y_ref = x_ref @ w_ref.T
    if grad_y is None:
        grad_y = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(7))
    y_ref.backward(grad_y.double())
    x8, w8 = x.detach().to(dtype).clone().requires_grad_(), w.detach().clone().requires_grad_()
    y8 = fp8.fp8_linear(x8, w8, backend=backend)
    y8.backward(grad_y.to(dtype))
    assert y8.dtype == dtype and x8.grad.dtype == dtype and w8.grad.dtype == torch.float32
    return (y8.detach(), x8.grad, w8.grad), (y_ref.detach(), x_ref.grad, w_ref.grad)


def errors(got, ref):
    return [fp8.calc_diff(a, b) for a, b in zip(got, ref, strict=True)]


def test_fp8_linear_matches_fp32_and_backends_agree():
    x = torch.randn(2, 72, 256)  # 144 tokens: a ragged 128-token tile for the wgrad operands
    w = torch.randn(160, 256) * 0.05
    outs_t, ref = run_linear(x, w, "triton")
    outs_r, _ = run_linear(x, w, "torch")
    errs_t, errs_r = errors(outs_t, ref), errors(outs_r, ref)
    assert max(errs_t) < LINEAR_TOL and max(errs_r) < LINEAR_TOL, (errs_t, errs_r)
    for a, b in zip(outs_t, outs_r, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_fp8_linear_saves_fp8_and_no_grad_path():
    x = torch.randn(3, 50, 256, requires_grad=True)
    w = (torch.randn(64, 256) * 0.05).requires_grad_()
    bias = torch.randn(64)
    y = fp8.fp8_linear(x, w, bias, backend="triton")
    saved = y.grad_fn.next_functions[0][0].saved_tensors  # y = FP8Linear(...) + bias
    assert {t.dtype for t in saved} == {torch.float8_e4m3fn, torch.float32}
    # fp32 only for per-tile scales (~1/128 of x): no high-precision copy of x or w is kept
    assert all(t.numel() * 32 <= x.numel() for t in saved if t.dtype == torch.float32)
    with torch.no_grad():
        y_ng = fp8.fp8_linear(x, w, bias, backend="triton")
    assert y_ng.grad_fn is None and torch.equal(y_ng, y.detach())


def test_fp8_linear_bf16_input():
    x = torch.randn(64, 256)
    w = torch.randn(96, 256) * 0.05
    errs = errors(*run_linear(x, w, "torch", dtype=torch.bfloat16))
    assert max(errs) < LINEAR_TOL, errs


def test_fp8_linear_outliers_cost_accuracy():
    # Outliers share a tile's scale with their neighbours and push them into e4m3's
    # subnormals. Each outlier is placed where it does not itself enter the result being
    # measured (zero weight column, zero input channel, zero-gradient token), so the exact
    # result keeps its scale and only the quantisation damage shows.
    x = torch.randn(128, 256)
    w = torch.randn(128, 256) * 0.05
    clean_out, clean_ref = run_linear(x, w, "torch")
    clean = errors(clean_out, clean_ref)
    assert max(clean) < LINEAR_TOL, clean

    # Forward and dgrad: a massive activation channel (its weight column zero) and a weight
    # outlier on an input channel that is always zero (crushes its 128x128 block).
    x_out, w_out = x.clone(), w.clone()
    x_out[:, 3], w_out[:, 3] = 1e5, 0.0
    x_out[:, 200], w_out[5, 200] = 0.0, 1e4
    (y, dx, _), (y_ref, dx_ref, _) = run_linear(x_out, w_out, "torch")
    keep = torch.arange(256) != 200  # dx[:, 200] carries the outlier itself
    assert fp8.calc_diff(y, y_ref) > 5 * clean[0]
    assert fp8.calc_diff(dx[:, keep], dx_ref[:, keep]) > 5 * fp8.calc_diff(clean_out[1][:, keep],
                                                                             clean_ref[1][:, keep])
    # Wgrad: a massive token with zero output gradient (e.g. masked) crushes the 128x1 tiles
    # of x^T that every other token shares.
    x_tok = x.clone()
    x_tok[7] = 1e5
    grad_y = torch.randn(128, 128)
    grad_y[7] = 0
    (_, _, dw_clean), (_, _, dw_clean_ref) = run_linear(x, w, "torch", grad_y=grad_y)
    (_, _, dw), (_, _, dw_ref) = run_linear(x_tok, w, "torch", grad_y=grad_y)
    assert fp8.calc_diff(dw, dw_ref) > 5 * fp8.calc_diff(dw_clean, dw_clean_ref)
