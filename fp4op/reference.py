"""The executable specification: SPEC.md in plain PyTorch.

Slow and simple on purpose: every step is a float32 tensor operation (IEEE, round to nearest even),
so this module is what the kernels are compared against byte for byte, and what a reader checks
the numerics with. It runs on any device PyTorch runs on.
"""

from __future__ import annotations

import math

import torch

from . import layouts

# RN(1/6) as float32: 0x3E2AAAAB
RCP6 = torch.tensor(1.0 / 6.0, dtype=torch.float32).item()
E4M3_MAX = 448.0
FLT_MAX = torch.finfo(torch.float32).max
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _f32(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def float_to_e2m1(y: torch.Tensor) -> torch.Tensor:
    """float32 -> E2M1 codes (uint8, one per element): round to nearest even, saturate to +-6,
    NaN -> +6 (0x7), the sign of zero kept (cvt.rn.satfinite.e2m1x2.f32)."""
    a = y.abs()
    # the midpoints between the E2M1 values; at a tie the even code wins, so `<=` or `<` alternate
    code = (
        (a > 0.25).to(torch.uint8)
        + (a >= 0.75)
        + (a > 1.25)
        + (a >= 1.75)
        + (a > 2.5)
        + (a >= 3.5)
        + (a > 5.0)
    ).to(torch.uint8)
    nan = torch.isnan(y)
    code = torch.where(nan, torch.full_like(code, 7), code)
    negative = torch.signbit(y) & ~nan
    return code | (negative.to(torch.uint8) << 3)


def e2m1_to_float(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, low nibble) -> float32 values."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    mag = table[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -mag, mag)


def float_to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """float32 -> E4M3 bytes: round to nearest even, saturate to +-448 (satfinite), NaN -> 0x7F."""
    sat = x.clamp(-E4M3_MAX, E4M3_MAX)  # keeps NaN; PyTorch's own cast would turn overflow into NaN
    b = sat.to(torch.float8_e4m3fn).view(torch.uint8)
    return torch.where(torch.isnan(x), torch.full_like(b, 0x7F), b)


def e4m3_to_float(b: torch.Tensor) -> torch.Tensor:
    return b.view(torch.float8_e4m3fn).to(torch.float32)


def float_to_ue8m0_ceil(x: torch.Tensor) -> torch.Tensor:
    """float32 -> UE8M0 bytes: exponent of the smallest power of two >= |x|, biased by 127, clamped to
    [0, 254] (|x| <= 2^-127 -> 0, inf -> 254); NaN -> 0xFF."""
    bits = x.contiguous().view(torch.int32) & 0x7FFFFFFF
    exp = bits >> 23
    round_up = ((bits & 0x7FFFFF) != 0) & (bits > 0x00400000)  # 0x00400000 is 2^-127
    exp = (exp + round_up.to(torch.int32)).clamp(max=254)
    exp = torch.where(bits > 0x7F800000, torch.full_like(exp, 0xFF), exp)
    return exp.to(torch.uint8)


def pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e as float32 for int32 exponents in [-149, 127], subnormals included, built from bits."""
    normal = ((e + 127).clamp(min=0) << 23).view(torch.float32)
    subnormal = (torch.ones_like(e) << (e + 149).clamp(0, 22)).view(torch.float32)
    return torch.where(e >= -126, normal, subnormal)


def _amax(blocks: torch.Tensor) -> torch.Tensor:
    """NaN-ignoring max of |x| over the last dim (IEEE maxNum fold); NaN only for an all-NaN block."""
    # spelled out rather than torch.fmax, which returns NaN for signaling NaNs (bf16 NaNs widen to
    # signaling float NaNs)
    a = blocks.abs()
    amax = a[..., 0]
    for i in range(1, a.shape[-1]):
        amax = torch.where((a[..., i] > amax) | torch.isnan(amax), a[..., i], amax)
    return amax


def _rows(x: torch.Tensor) -> tuple[int, int]:
    k = x.shape[-1]
    return math.prod(x.shape[:-1]), k


def _global_scale_rows(global_scale: torch.Tensor, m: int, inversed: bool) -> torch.Tensor:
    gs = global_scale.to(torch.float32).reshape(-1, 1)
    if gs.shape[0] not in (1, m):
        raise ValueError(f"fp4op: global_scale must have 1 or {m} elements, got {global_scale.numel()}")
    return torch.reciprocal(gs) if inversed else gs  # IEEE division


def quantize(
    x: torch.Tensor,
    global_scale: torch.Tensor | None = None,
    sf_vec_size: int = 16,
    sf_use_ue8m0: bool = False,
    layout: str = layouts.SWIZZLED_128x4,
    is_global_scale_inversed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC.md's quantization of row-major `x` [..., K]: returns (x_q uint8 [..., K/2], sf uint8 2-D)."""
    if (sf_vec_size, sf_use_ue8m0) not in ((16, False), (32, True)):
        raise ValueError("fp4op.reference: the recipes are NVFP4 (16, E4M3) and MXFP4 (32, UE8M0)")
    m, k = _rows(x)
    nk = k // sf_vec_size
    xf = x.reshape(m, nk, sf_vec_size).to(torch.float32)  # exact for fp16, bf16 and e4m3
    amax = _amax(xf)  # [m, nk]
    zero = amax == 0

    if sf_use_ue8m0:
        sf = float_to_ue8m0_ceil(amax * _f32(RCP6, amax))
        recip = pow2(127 - sf.to(torch.int32))
        out_scale = torch.where(sf == 0, torch.ones_like(recip), recip)
    else:
        if global_scale is None:
            raise ValueError("fp4op.reference: NVFP4 needs a global_scale")
        s = _global_scale_rows(global_scale.to(x.device), m, is_global_scale_inversed)
        inv_s = torch.reciprocal(s)
        sf = float_to_e4m3(amax * (s * _f32(RCP6, s)))
        out_scale = torch.fmin(torch.reciprocal(e4m3_to_float(sf) * inv_s), _f32(FLT_MAX, s))
    sf = torch.where(zero, torch.zeros_like(sf), sf)
    out_scale = torch.where(zero, torch.zeros_like(out_scale), out_scale)

    codes = float_to_e2m1(xf * out_scale.unsqueeze(-1)).reshape(m, k)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    x_q = packed.reshape(*x.shape[:-1], k // 2)
    return x_q, layouts.swizzle(sf, layout)


def dequantize(
    x_q: torch.Tensor,
    sf: torch.Tensor,
    global_scale: torch.Tensor | None = None,
    sf_vec_size: int = 16,
    sf_use_ue8m0: bool = False,
    layout: str = layouts.SWIZZLED_128x4,
    is_global_scale_inversed: bool = False,
    output_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """SPEC.md's formulas evaluated as written: e2m1(q) * sf_dec / S (NVFP4; the product is exact, the
    quotient rounded once) or e2m1(q) * 2^(sf - 127) (MXFP4)."""
    m, half_k = _rows(x_q)
    k = 2 * half_k
    nk = k // sf_vec_size
    scales = layouts.unswizzle(sf, m, nk, layout)
    q = x_q.reshape(m, half_k)
    codes = torch.stack((q & 0xF, q >> 4), dim=-1).reshape(m, nk, sf_vec_size)
    if sf_use_ue8m0:
        factor = pow2(scales.to(torch.int32) - 127)
        factor = torch.where(scales == 0xFF, torch.full_like(factor, math.nan), factor)
        values = e2m1_to_float(codes) * factor.unsqueeze(-1)
    else:
        s = _global_scale_rows(global_scale.to(x_q.device), m, is_global_scale_inversed)
        values = e2m1_to_float(codes) * e4m3_to_float(scales).unsqueeze(-1) / s.reshape(-1, 1, 1)
    return values.reshape(*x_q.shape[:-1], k).to(output_dtype)
