"""Scale-factor layouts: fp4op.layouts against SPEC.md's offset formula, the kernels' sf bytes, and
torchao (to_blocked, and its MX / NVFP4 quantizers where their recipe coincides with ours)."""

import pytest
import torch

from conftest import LAYOUTS, make_global_scale, op_quantize, random_input
from fp4op import layouts, reference

ODD_SHAPES = [(1, 1), (1, 4), (7, 3), (8, 4), (9, 5), (127, 7), (128, 4), (129, 1), (130, 9), (300, 12), (257, 130)]
SWIZZLED = (layouts.SWIZZLED_128x4, layouts.SWIZZLED_8x4)


def offsets(m, nk, layout):
    """SPEC.md's offsets of every (row, column) of an [m, nk] scale matrix, as a tensor."""
    return torch.tensor([[layouts.sf_offset(r, c, nk, layout) for c in range(nk)] for r in range(m)])


def distinct_scales(m, nk):
    # nonzero, distinct where possible, so that a misplaced byte shows
    return (torch.arange(m * nk) % 255 + 1).to(torch.uint8).reshape(m, nk)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("m,nk", ODD_SHAPES)
def test_swizzle_places_bytes_at_sf_offset(layout, m, nk):
    lin = distinct_scales(m, nk)
    sf = layouts.swizzle(lin, layout)
    assert sf.shape == layouts.sf_shape(m, nk, layout) and sf.dtype == torch.uint8
    flat = sf.flatten()
    off = offsets(m, nk, layout)
    assert torch.equal(flat[off.flatten()], lin.flatten())
    # every other byte is padding, and padding is 0
    pad = torch.ones(flat.numel(), dtype=torch.bool)
    pad[off.flatten()] = False
    assert (flat[pad] == 0).all()
    assert off.unique().numel() == m * nk, "offsets must not collide"


@pytest.mark.parametrize("m,nk", ODD_SHAPES)
def test_round_trips_and_convert(m, nk):
    lin = distinct_scales(m, nk)
    for src in LAYOUTS:
        sf = layouts.swizzle(lin, src)
        assert torch.equal(layouts.unswizzle(sf, m, nk, src), lin)
        assert torch.equal(layouts.unswizzle(sf.flatten(), m, nk, src), lin), "unswizzle takes flat sf too"
        for dst in LAYOUTS:
            assert torch.equal(layouts.convert(sf, m, nk, src, dst), layouts.swizzle(lin, dst))


def test_sf_shape_formula():
    for m, nk in ODD_SHAPES + [(0, 4), (5, 0)]:
        assert layouts.sf_shape(m, nk, "128x4") == (-(-m // 128) * 128, -(-nk // 4) * 4)
        assert layouts.sf_shape(m, nk, "8x4") == (-(-m // 8) * 8, -(-nk // 4) * 4)
        assert layouts.sf_shape(m, nk, "linear") == (m, nk)


def test_layout_flags_round_trip():
    for layout in LAYOUTS:
        assert layouts.layout_from_flags(*layouts.layout_flags(layout)) == layout
    assert layouts.layout_from_flags(False, True) == "linear"  # 8x4 flag ignored when not swizzled
    with pytest.raises(ValueError, match="layout"):
        layouts.swizzle(torch.zeros(2, 2, dtype=torch.uint8), "4x4")


def test_large_offsets_are_exact():
    # SPEC.md: 64-bit index arithmetic; the last row of a 2^31-element problem
    m, nk = 2**31 // 64 + 129, 1024
    last = layouts.sf_offset(m - 1, nk - 1, nk, "128x4")
    rows, cols = layouts.sf_shape(m, nk, "128x4")
    assert last < rows * cols and last > 2**31


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("vec,ue8m0", [(16, False), (32, True)], ids=["nvfp4", "mxfp4"])
@pytest.mark.parametrize("m,k", [(1, 32), (7, 96), (129, 160), (300, 64 * 3)])
def test_kernel_sf_matches_linear_layout(layout, vec, ue8m0, m, k):
    x = random_input((m, k), torch.bfloat16)
    gs = make_global_scale(x, "per_row")
    _, sf_lin = op_quantize(x, gs, vec, ue8m0, "linear")
    _, sf = op_quantize(x, gs, vec, ue8m0, layout)
    nk = k // vec
    flat = sf.flatten()
    off = offsets(m, nk, layout).flatten()
    assert torch.equal(flat[off], sf_lin.flatten())
    pad = torch.ones(flat.numel(), dtype=torch.bool)
    pad[off] = False
    assert (flat[pad] == 0).all(), "padding bytes must be 0"


# ---- torchao ---------------------------------------------------------------------------------------

torchao_utils = pytest.importorskip("torchao.prototype.mx_formats.utils")


@pytest.mark.parametrize("m,nk", [(128, 4), (256, 8), (129, 5), (7, 3), (300, 17)])
def test_128x4_equals_torchao_to_blocked(m, nk):
    lin = distinct_scales(m, nk)
    theirs = torchao_utils.to_blocked(lin)  # pads to 128 x 4 tiles internally, returns it flat
    ours = layouts.swizzle(lin, "128x4")
    assert torch.equal(ours.flatten(), theirs)
    assert torch.equal(layouts.unswizzle(theirs, m, nk, "128x4"), lin)


def test_mxfp4_codes_and_scales_equal_torchao_rceil():
    # torchao's MX RCEIL recipe: sf = ceil-pow2(amax / 6) (a division, we multiply by RN(1/6)), data
    # times 2^(127 - sf), or times 1 when sf == 0, clamp to +-6, RNE to E2M1. For fp16/bf16 blocks the
    # division and the multiply agree on the power-of-two ceiling (they can only differ within an ulp of
    # a power of two, which an 8- or 11-bit amax times 1/6 never is), so bytes coincide. They differ for
    # NaN (torchao's amax propagates NaN), so the input here is finite.
    mx_tensor = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode

    x = random_input((64, 256), torch.bfloat16)
    x[3, :32] = 0  # a zero block: torchao gives sf 0 and codes 0 as well
    x[5, :32] = 6 * 2.0**-3  # amax exactly 6 * 2^k
    scale, data = mx_tensor.to_mx(x, torch.float4_e2m1fn_x2, 32, ScaleCalculationMode.RCEIL)
    x_q, sf = op_quantize(x, None, 32, True, "linear")
    assert torch.equal(sf, scale.view(torch.uint8).reshape(64, 8))
    assert torch.equal(x_q, data.view(torch.uint8).reshape(64, 128))


def test_nvfp4_codes_equal_torchao_with_exact_block_scales():
    # torchao's NVFP4 recipe computes the block scale as (amax / 6) / per_tensor_scale and the data
    # multiplier as (1 / per_tensor_scale) / sf_dec, where fp4op computes amax * (S * RN(1/6)) and
    # 1 / (sf_dec * (1 / S)): the roundings differ, and torchao clamps zero-block scales up to the
    # smallest E4M3 value. They coincide when S = 1 and every block's amax / 6 is an E4M3 value
    # (both scale computations are then exact), which is what this input is built for.
    nvfp4 = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    m, nk = 32, 8
    sf_values = torch.randint(0x20, 0x70, (m, nk), dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    x = torch.randn(m, nk, 16).clamp(-1, 1) * (6 * sf_values).unsqueeze(-1)
    x[..., 0] = 6 * sf_values  # the block amax
    x = x.reshape(m, nk * 16).to(torch.bfloat16)
    assert torch.equal(x.float().reshape(m, nk, 16).abs().amax(-1), 6 * sf_values)
    scales, data = nvfp4.nvfp4_quantize(x, 16, torch.ones(1))
    x_q, sf = op_quantize(x, torch.ones(1), 16, False, "linear")
    assert torch.equal(sf, scales.view(torch.uint8).reshape(m, nk))
    assert torch.equal(x_q, data.view(torch.uint8).reshape(m, nk * 8))
    assert torch.equal(sf, reference.float_to_e4m3(sf_values))
