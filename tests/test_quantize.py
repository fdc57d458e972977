"""The CPU kernels of fp4op::quantize / fp4op::dequantize against fp4op.reference, bit for bit, plus
hand-computed SPEC.md cases that check the reference itself."""

import math

import pytest
import torch

from conftest import (
    matrix_params,
    DTYPES,
    LAYOUTS,
    assert_same_bytes,
    dtype_id,
    make_global_scale,
    op_dequantize,
    op_quantize,
    random_input,
)
from fp4op import layouts, reference

MS = (1, 7, 128, 129, 300)
KS = (16, 32, 48, 2048)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FLOAT_DTYPES = (torch.float16, torch.bfloat16)


def e2m1_code_by_search(v: float) -> int:
    """SPEC.md's cvt_e2m1 written independently of fp4op: the nearest E2M1 value, ties to the even
    code, saturating, NaN -> 0x7, the sign kept (also for zero)."""
    if math.isnan(v):
        return 7
    sign = 8 if math.copysign(1.0, v) < 0 else 0
    a = min(abs(v), 6.0)
    dist = [abs(a - e) for e in E2M1_VALUES]
    best = min(dist)
    candidates = [c for c, d in enumerate(dist) if d == best]
    code = candidates[0] if len(candidates) == 1 else next(c for c in candidates if c % 2 == 0)
    return code | sign


def unpack(x_q: torch.Tensor) -> torch.Tensor:
    """Packed bytes [..., K/2] -> codes [..., K] (element 2i in the low nibble)."""
    return torch.stack((x_q & 0xF, x_q >> 4), dim=-1).reshape(*x_q.shape[:-1], 2 * x_q.shape[-1])


def both(x, gs, vec, ue8m0, layout, inversed=False):
    """(kernel outputs, reference outputs), checking they are equal byte for byte."""
    got = op_quantize(x, gs, vec, ue8m0, layout, inversed)
    want = reference.quantize(x, gs, vec, ue8m0, layout, inversed)
    assert_same_bytes(got[0], want[0], "x_q")
    assert_same_bytes(got[1], want[1], "sf")
    return got


def linear_sf(x, gs, vec, ue8m0, inversed=False):
    _, sf = op_quantize(x, gs, vec, ue8m0, layouts.LINEAR, inversed)
    return sf


# ---- the matrix ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,vec,ue8m0,layout,kind,inversed", list(matrix_params()))
def test_kernel_matches_reference(dtype, vec, ue8m0, layout, kind, inversed):
    for m in MS:
        for k in KS:
            # every M with the small K; the long rows (K = 2048) with a short and a partial-tile M
            if k % vec or (k == 2048 and m not in (7, 129)):
                continue
            x = random_input((m, k), dtype)
            gs = None
            if not ue8m0:
                gs = make_global_scale(x, kind)
                if inversed:
                    gs = 1.0 / gs
            try:
                both(x, gs, vec, ue8m0, layout, inversed)
            except AssertionError as e:
                raise AssertionError(f"M={m} K={k}: {e}") from None


# ---- hand-computed SPEC.md facts (check the reference as well as the kernel) ---------------------------

ONE = torch.ones(1)


def test_nvfp4_block_amax_6_with_scale_1():
    # sf = e4m3(6 * RN(1/6)) = e4m3(1.0) = 0x38, out_scale = 1: the E2M1 values encode as themselves
    row = torch.tensor([6.0, -6.0, 0.5, -0.5, 1.0, 1.5, 2.0, 3.0, 4.0, -4.0, 0.0, -0.0, 3.0, -1.0, 2.0, 0.5])
    x = row.to(torch.bfloat16).reshape(1, 16)
    x_q, sf = both(x, ONE, 16, False, "linear")
    assert sf.tolist() == [[0x38]]
    assert unpack(x_q)[0].tolist() == [e2m1_code_by_search(v) for v in row.tolist()]
    # element 0 in the low nibble of byte 0: 6 -> 0x7, -6 -> 0xF
    assert x_q[0, 0].item() == 0xF7


@pytest.mark.parametrize(
    "amax,sf_byte",
    [
        (6.0, 0x38),  # 1.0
        (6.375, 0x38),  # 1.0625: halfway between 1.0 (0x38) and 1.125 (0x39), ties to even
        (7.125, 0x3A),  # 1.1875: halfway between 1.125 (0x39) and 1.25 (0x3A), ties to even
        (6.75, 0x39),  # 1.125 exactly
        (3000.0, 0x7E),  # 500 saturates to 448
        (6.0 * 2.0**-9, 0x01),  # 2^-9: the smallest E4M3 subnormal
        (6.0 * 2.0**-11, 0x00),  # 2^-11 < 2^-10 (half the smallest subnormal): underflows to 0
    ],
)
def test_nvfp4_scale_byte_hand_computed(amax, sf_byte):
    x = torch.zeros(1, 16, dtype=torch.float32)
    x[0, 3] = amax
    x = x.to(torch.float16)
    assert x[0, 3].item() == amax  # exact in fp16
    _, sf = both(x, ONE, 16, False, "linear")
    assert sf.item() == sf_byte


def test_nvfp4_usual_global_scale_maps_tensor_amax_to_448():
    x = random_input((4, 64), torch.bfloat16)
    gs = make_global_scale(x, "scalar")
    _, sf = both(x, gs, 16, False, "linear")
    amax = x.float().abs().amax()
    assert (sf[x.float().abs().reshape(4, 4, 16).amax(-1) == amax] == 0x7E).all()


@pytest.mark.parametrize(
    "amax,sf_byte",
    [
        (6.0, 127),  # t = 1
        (12.0, 128),  # t = 2
        (7.0, 128),  # t = 1.17 -> 2
        (1.0, 125),  # t = 0.1667 -> 0.25
        (6.0 * 2.0**-20, 107),
    ],
)
def test_mxfp4_scale_byte_hand_computed(amax, sf_byte):
    x = torch.zeros(1, 32)
    x[0, 5] = amax
    x = x.to(torch.bfloat16)
    assert x[0, 5].item() == amax
    x_q, sf = both(x, None, 32, True, "linear")
    assert sf.item() == sf_byte
    out_scale = 2.0 ** (127 - sf_byte)
    assert unpack(x_q)[0, 5].item() == e2m1_code_by_search(amax * out_scale)


def test_mxfp4_seven_rounds_half_up_to_even():
    # amax 7 -> scale 2 -> 7/2 = 3.5, halfway between 3 (code 5) and 4 (code 6): code 6
    x = torch.zeros(1, 32, dtype=torch.float16)
    x[0, 0] = 7.0
    x_q, _ = both(x, None, 32, True, "linear")
    assert x_q[0, 0].item() & 0xF == 6


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("vec,ue8m0", [(16, False), (32, True)], ids=["nvfp4", "mxfp4"])
@pytest.mark.parametrize("binade", [0, -3, 2])
def test_e2m1_midpoints(dtype, vec, ue8m0, binade):
    # a block with amax 6 * 2^binade and global scale 1 has out_scale exactly 2^-binade: the other
    # elements land exactly on the midpoints between E2M1 values (and on the values themselves)
    points = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 0.125, 5.5]
    vals = [6.0] + points + [-p for p in points]
    vals = (vals * 4)[: 2 * vec]
    x = (torch.tensor(vals) * 2.0**binade).reshape(1, -1)
    assert torch.equal(x.to(dtype).float(), x)  # exact in every dtype
    x_q, sf = both(x.to(dtype), ONE, vec, ue8m0, "linear")
    assert unpack(x_q)[0].tolist() == [e2m1_code_by_search(v) for v in vals]
    expected_sf = 127 + binade if ue8m0 else reference.float_to_e4m3(torch.tensor([2.0**binade])).item()
    assert sf.flatten().tolist() == [expected_sf] * 2


# ---- crafted values ----------------------------------------------------------------------------------

RECIPE_PARAMS = [pytest.param(16, False, id="nvfp4"), pytest.param(32, True, id="mxfp4")]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("vec,ue8m0", RECIPE_PARAMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_outlier_channels(dtype, vec, ue8m0, layout):
    x = torch.randn(130, 256) * 0.01
    x[:, 7] = 400.0
    x[:, 100] = -300.0
    x = x.to(dtype)
    both(x, make_global_scale(x, "scalar"), vec, ue8m0, layout)
    both(x, make_global_scale(x, "per_row"), vec, ue8m0, layout)


@pytest.mark.parametrize("vec,ue8m0", RECIPE_PARAMS)
def test_scale_underflow_block(vec, ue8m0):
    # NVFP4 with S = 1: amax 1e-5 gives sf_f ~ 1.7e-6 < 2^-10 -> sf 0 -> out_scale = FLT_MAX (SPEC.md)
    x = torch.full((2, vec), 1e-5)
    x[0, 1::2] *= -1
    x[1] = 1e-5 * torch.linspace(-1, 1, vec)
    x = x.to(torch.bfloat16)
    x_q, sf = both(x, ONE, vec, ue8m0, "linear")
    codes = unpack(x_q)
    if ue8m0:
        # t = amax/6 ~ 2^-19 is representable: no underflow in MXFP4, the elements quantize normally
        assert sf[0].item() == reference.float_to_ue8m0_ceil(torch.tensor([x[0].float().abs().max().item() * reference.RCP6])).item()
    else:
        assert sf.flatten().tolist() == [0, 0]
        nonzero = x.float() != 0
        assert ((codes & 7)[nonzero] == 7).all(), "out_scale = FLT_MAX saturates every nonzero element"
        assert ((codes >> 3) == torch.signbit(x.float()).to(torch.uint8)).all()
        deq = op_dequantize(x_q, sf, ONE, vec, ue8m0, "linear")
        assert (deq == 0).all()


def test_mxfp4_scale_underflow_bf16_denormals():
    # t = amax * RN(1/6) <= 2^-127 -> sf byte 0, out_scale 1, so the codes are the values themselves (0)
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([2.0**-130, -(2.0**-131), 2.0**-133, 6 * 2.0**-130])
    x = x.to(torch.bfloat16)
    assert x[0, 3].item() == 6 * 2.0**-130
    x_q, sf = both(x, None, 32, True, "linear")
    assert sf.item() == 0
    assert unpack(x_q)[0, :4].tolist() == [0, 8, 0, 0]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("vec,ue8m0", RECIPE_PARAMS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_infinity_saturates_scale(dtype, vec, ue8m0, sign):
    x = torch.linspace(-3, 3, 2 * vec).reshape(1, -1)
    x[0, 2] = sign * math.inf
    x = x.to(dtype)
    x_q, sf = both(x, ONE, vec, ue8m0, "linear")
    assert sf[0, 0].item() == (0xFE if ue8m0 else 0x7E)
    assert unpack(x_q)[0, 2].item() == (0x7 if sign > 0 else 0xF)
    # the second block is untouched by the first one's infinity
    clean = x.clone()
    clean[0, 2] = 0
    assert sf[0, 1] == linear_sf(clean, ONE, vec, ue8m0)[0, 1]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("vec,ue8m0", RECIPE_PARAMS)
def test_nan_elements(dtype, vec, ue8m0):
    x = (torch.randn(3, 2 * vec) * 4).to(dtype)
    nan = torch.tensor(math.nan).to(dtype)
    x_nan = x.clone()
    x_nan[0, 5] = nan  # a single NaN in a block
    x_nan[1, :vec] = nan  # an all-NaN block
    x_nan[2, vec - 1] = nan  # NaN as the last element of a block
    x_q, sf = both(x_nan, ONE, vec, ue8m0, "linear")
    codes = unpack(x_q)
    assert codes[0, 5].item() == 0x7 and codes[2, vec - 1].item() == 0x7
    # NaN does not change its block's scale (maxNum); compare with the NaN replaced by a smaller value
    x_small = x_nan.clone()
    x_small[0, 5] = 0
    x_small[2, vec - 1] = 0
    x_small[1, :vec] = 0
    ref_sf = linear_sf(x_small, ONE, vec, ue8m0)
    assert sf[0].tolist() == ref_sf[0].tolist() and sf[2].tolist() == ref_sf[2].tolist()
    # the all-NaN block: the formulas literally (E4M3(NaN) = 0x7F, UE8M0(NaN) = 0xFF, codes 0x7)
    assert sf[1, 0].item() == (0xFF if ue8m0 else 0x7F)
    assert (codes[1, :vec] == 0x7).all()
    assert sf[1, 1] == ref_sf[1, 1]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("vec,ue8m0", RECIPE_PARAMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero_and_negative_zero_blocks(dtype, vec, ue8m0, layout):
    x = torch.zeros(3, 2 * vec)
    x[1, :vec] = -0.0
    x[2, :vec] = torch.where(torch.arange(vec) % 2 == 0, torch.tensor(0.0), torch.tensor(-0.0))
    x[2, vec:] = 1.0
    x = x.to(dtype)
    x_q, sf = both(x, ONE, vec, ue8m0, layout)
    codes = unpack(x_q)
    assert (codes[0] == 0).all()
    assert (codes[1, :vec] == 0x8).all(), "-0.0 keeps its sign: 0x8"
    assert codes[2, :vec].tolist() == [0, 8] * (vec // 2)
    scales = layouts.unswizzle(sf, 3, 2, layout)
    assert scales[:, 0].tolist() == [0, 0, 0] and scales[0, 1].item() == 0


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("vec,ue8m0", RECIPE_PARAMS)
@pytest.mark.parametrize("flush_denormal", [False, True])
def test_denormal_inputs(dtype, vec, ue8m0, flush_denormal):
    info = torch.finfo(dtype)
    bits = torch.randint(1, 0x7F, (64, 4 * vec), dtype=torch.int16)  # subnormal bit patterns
    sign = torch.randint(0, 2, bits.shape, dtype=torch.int16) << 15
    x = (bits | sign).view(dtype)
    assert (x.float().abs() < info.smallest_normal).all()
    x[::3, : vec // 2] = info.smallest_normal * 64  # some blocks mix denormals and normals
    # a global scale that brings the denormals into the E4M3 range (for bf16 1/S is itself denormal)
    gs = torch.tensor([1e6 if dtype == torch.float16 else 3e38])
    # the kernel must keep IEEE denormals even when the caller enabled flush-to-zero
    torch.set_flush_denormal(flush_denormal)
    try:
        got = op_quantize(x, gs, vec, ue8m0, "linear")
    finally:
        torch.set_flush_denormal(False)
    want = reference.quantize(x, gs, vec, ue8m0, "linear")
    assert_same_bytes(got[0], want[0], "x_q")
    assert_same_bytes(got[1], want[1], "sf")
    # not vacuous: NVFP4 gives the all-denormal blocks nonzero scales; MXFP4 only the mixed ones for
    # bf16 (amax/6 <= 2^-127 for bf16 denormals: UE8M0 byte 0)
    scaled_rows = got[1][1::3] if not ue8m0 or dtype == torch.float16 else got[1][::3]
    assert (scaled_rows != 0).any()


@pytest.mark.parametrize("value", [0.0, -0.0, -2.5, math.inf, -math.inf, math.nan, 1e-38, 3e38])
@pytest.mark.parametrize("scale_kind", ["scalar", "per_row"])
@pytest.mark.parametrize("inversed", [False, True])
def test_special_global_scales(value, scale_kind, inversed):
    x = random_input((5, 64), torch.bfloat16)
    gs = torch.full((1 if scale_kind == "scalar" else 5,), value)
    if scale_kind == "per_row":
        gs[1] = 100.0  # mixed with an ordinary row
    both(x, gs, 16, False, "128x4", inversed)


def test_equal_rows_under_per_row_scales():
    # the CPU kernel memoizes NVFP4 block scales over the rows of a call that share one global scale;
    # equal rows (equal block maxima) under different row scales must each get their own
    x = random_input((1, 1024), torch.bfloat16).repeat(64, 1)
    gs = make_global_scale(x, "per_row") * torch.linspace(0.5, 2.0, 64)
    _, sf = both(x, gs, 16, False, "linear")
    assert len({tuple(row) for row in sf.tolist()}) > 1


def test_zero_global_scale_hand_computed():
    # S = 0: sf_f = 0 -> byte 0; out_scale = fminf(1 / (0 * inf), FLT_MAX) = FLT_MAX: codes saturate
    x = torch.tensor([[1.0, -2.0, 0.0, -0.0] * 4], dtype=torch.float16)
    x_q, sf = both(x, torch.zeros(1), 16, False, "linear")
    assert sf.item() == 0
    assert unpack(x_q)[0].tolist() == [0x7, 0xF, 0x0, 0x8] * 4


@pytest.mark.parametrize("gs_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_global_scale_dtype_converted(gs_dtype):
    x = random_input((8, 64), torch.float16)
    gs = torch.tensor([3.0]).to(gs_dtype)
    got = op_quantize(x, gs, 16, False, "linear")
    want = op_quantize(x, gs.float(), 16, False, "linear")
    assert_same_bytes(got[0], want[0], "x_q")
    assert_same_bytes(got[1], want[1], "sf")


@pytest.mark.parametrize("vec,ue8m0", RECIPE_PARAMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rank3_input(vec, ue8m0, layout):
    x = random_input((3, 43, 128), torch.bfloat16)
    gs = make_global_scale(x, "per_row")
    x_q, sf = both(x, gs, vec, ue8m0, layout)
    assert x_q.shape == (3, 43, 64)
    x_q2, sf2 = op_quantize(x.reshape(129, 128), gs, vec, ue8m0, layout)
    assert torch.equal(x_q.reshape(129, 64), x_q2) and torch.equal(sf, sf2)


def _non_contiguous_cases():
    base = random_input((40, 256), torch.bfloat16)
    return {
        "sliced_rows": base[3::2],
        "column_stride_2": base[:, ::2],
        "column_window": base[:, 64:192],
        "expanded_rows": base[5:6].expand(33, 256),
        "transposed_3d": random_input((64, 6, 5), torch.bfloat16).permute(2, 1, 0),
        "storage_offset": base.reshape(-1)[32 : 32 + 39 * 256].view(39, 256),
    }


@pytest.mark.parametrize("case", list(_non_contiguous_cases()))
@pytest.mark.parametrize("vec,ue8m0", RECIPE_PARAMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_quantized_as_row_major(case, vec, ue8m0, layout):
    x = _non_contiguous_cases()[case]
    gs = make_global_scale(x, "per_row")
    got = op_quantize(x, gs, vec, ue8m0, layout)
    want = op_quantize(x.contiguous(), gs, vec, ue8m0, layout)
    assert_same_bytes(got[0], want[0], "x_q")
    assert_same_bytes(got[1], want[1], "sf")
    both(x, gs, vec, ue8m0, layout)


@pytest.mark.parametrize("vec,ue8m0", RECIPE_PARAMS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(0, 64), (5, 0), (0, 0), (2, 0, 64), (3, 4, 0)])
def test_empty_inputs(vec, ue8m0, layout, shape):
    x = torch.empty(shape, dtype=torch.float16)
    m = math.prod(shape[:-1])
    gs = torch.ones(1)
    x_q, sf = op_quantize(x, gs, vec, ue8m0, layout)
    assert x_q.shape == (*shape[:-1], shape[-1] // 2) and x_q.dtype == torch.uint8
    assert sf.shape == layouts.sf_shape(m, shape[-1] // vec, layout) and sf.dtype == torch.uint8
    assert (sf == 0).all()
    ref = reference.quantize(x, gs, vec, ue8m0, layout)
    assert ref[0].shape == x_q.shape and ref[1].shape == sf.shape


# ---- dequantize --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("vec,ue8m0", RECIPE_PARAMS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind,inversed", [("scalar", False), ("per_row", True), ("per_row_2d", False)])
def test_dequantize_matches_reference(dtype, vec, ue8m0, layout, kind, inversed):
    for m, k in ((1, 32), (7, 64), (129, 96), (300, 256)):
        x = random_input((m, k), dtype)
        gs = make_global_scale(x, kind)
        if inversed:
            gs = 1.0 / gs
        x_q, sf = op_quantize(x, gs, vec, ue8m0, layout, inversed)
        for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
            got = op_dequantize(x_q, sf, gs, vec, ue8m0, layout, inversed, out_dtype)
            want = reference.dequantize(x_q, sf, gs, vec, ue8m0, layout, inversed, out_dtype)
            assert got.dtype == out_dtype and got.shape == (m, k)
            assert_same_bytes(got, want, f"M={m} K={k} {out_dtype}")


@pytest.mark.parametrize("vec,ue8m0", RECIPE_PARAMS)
def test_dequantize_special_scale_bytes(vec, ue8m0):
    # every scale byte (incl. NaN encodings and UE8M0 0 / 0xFF) and every code
    m = 256
    sf = torch.arange(256, dtype=torch.uint8).reshape(m, 1).repeat(1, 2)
    x_q = torch.arange(256, dtype=torch.uint8).reshape(1, -1).repeat(m, 1)[:, :vec]
    gs = torch.full((1,), 3.0)
    # UE8M0 254 times 6 overflows float32 and every narrower output: infinities and NaNs in each dtype
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = op_dequantize(x_q, sf, gs, vec, ue8m0, "linear", output_dtype=out_dtype)
        want = reference.dequantize(x_q, sf, gs, vec, ue8m0, "linear", output_dtype=out_dtype)
        assert_same_bytes(got, want, f"dequantize to {out_dtype}")


@pytest.mark.parametrize("scale", [0.3, 3.0, 1e-30, 7e35], ids=lambda s: f"S={s:g}")
def test_nvfp4_dequantize_is_the_formula_rounded_once(scale):
    # SPEC.md: x = e2m1(q) * sf_dec / S, as written: the product is exact, the quotient rounded once (not
    # e2m1(q) * RN(sf_dec / S), one float32 step off for some values: 6 * 0.15625 (sf 0x22) / 0.3f is
    # 3.1249998, not 3.125)
    from fractions import Fraction

    sf = torch.arange(256, dtype=torch.uint8).reshape(256, 1)  # every scale byte, NaN encodings included
    codes = torch.arange(8, dtype=torch.uint8)
    x_q = (codes | ((codes + 8) << 4)).reshape(1, 8).repeat(256, 1)  # every code, negative ones included
    gs = torch.tensor([scale], dtype=torch.float32)
    got = op_dequantize(x_q, sf, gs, 16, False, "linear")
    assert_same_bytes(got, reference.dequantize(x_q, sf, gs, 16, False, "linear"), "reference")
    s = Fraction(gs.item())
    codes = torch.stack((x_q & 0xF, x_q >> 4), dim=-1).reshape(256, 16)
    e2m1 = reference.e2m1_to_float(codes)
    sf_dec = reference.e4m3_to_float(sf.reshape(256))
    for b in range(256):
        if math.isnan(sf_dec[b].item()):
            assert got[b].isnan().all()
            continue
        for j in range(16):
            exact = Fraction(e2m1[b, j].item()) * Fraction(sf_dec[b].item()) / s
            # the nearest float32: the one reached through float64 or a neighbour (double rounding)
            near = torch.tensor(float(exact), dtype=torch.float64).to(torch.float32)
            inf = torch.tensor(math.inf)
            candidates = (near, torch.nextafter(near, -inf), torch.nextafter(near, inf))
            error = min(abs(exact - Fraction(c.item())) for c in candidates)
            assert abs(exact - Fraction(got[b, j].item())) == error, (b, j)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("vec,ue8m0", RECIPE_PARAMS)
def test_round_trip_error(dtype, vec, ue8m0):
    x = random_input((64, 512), dtype)
    gs = make_global_scale(x, "scalar")
    x_q, sf = op_quantize(x, gs, vec, ue8m0, "128x4")
    deq = op_dequantize(x_q, sf, gs, vec, ue8m0, "128x4")
    xf = x.float()
    amax = xf.abs().reshape(64, -1, vec).amax(-1, keepdim=True)
    err = (deq - xf).abs().reshape(64, -1, vec)
    # the E2M1 step relative to the block amax is at most 2/6 (NVFP4, scaled amax ~ 6) or 2/3
    # (MXFP4, scaled amax in (3, 6]); rounding errs by at most half a step (plus E4M3 scale rounding
    # and subnormal scales, hence the slack for the smallest blocks)
    bound = amax * (0.19 if not ue8m0 else 0.34) + 1e-6
    assert (err <= bound).all(), (err - bound).max()
    # and on average it is far better than the bound
    assert err.sum() / xf.abs().sum() < 0.15


@pytest.mark.parametrize("vec,ue8m0", RECIPE_PARAMS)
def test_round_trip_exact_for_representable_values(vec, ue8m0):
    # blocks of E2M1 values times a power of two, amax 6 * 2^e: quantize + dequantize is exact
    codes = torch.randint(0, 16, (32, 4 * vec), dtype=torch.uint8)
    codes[:, ::vec] = 7
    values = reference.e2m1_to_float(codes) * torch.pow(2.0, torch.randint(-6, 6, (32, 1)).float())
    x_q, sf = op_quantize(values.to(torch.bfloat16), ONE, vec, ue8m0, "linear")
    deq = op_dequantize(x_q, sf, ONE, vec, ue8m0, "linear")
    assert torch.equal(deq, values)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_infinity_times_denormal_scale_with_flush_to_zero(dtype):
    # MXFP4 scale of an infinite block is 2^-127, a float32 denormal: with denormals flushed,
    # -inf * 2^-127 would be -inf * 0 = NaN (code 0x7) instead of -6 (code 0xF). The kernel must keep
    # IEEE denormals even when the caller turned flush-to-zero on.
    x = torch.zeros(1, 32)
    x[0, 0] = -math.inf
    x[0, 1] = math.inf
    x = x.to(dtype)
    torch.set_flush_denormal(True)
    try:
        x_q, sf = op_quantize(x, None, 32, True, "linear")
    finally:
        torch.set_flush_denormal(False)
    assert sf.item() == 0xFE
    assert unpack(x_q)[0, :2].tolist() == [0xF, 0x7]
