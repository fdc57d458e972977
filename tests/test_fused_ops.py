"""The fused "norm/activation + FP4 quantize" ops (issue 4).

Contract: each op equals eager PyTorch computing the norm/activation in the model dtype (float16/
bfloat16, float32 opmath, as the modules do) followed by fp4op.quantize; only the reduction order (and
the transcendental functions' last float32 bit) may differ. Acceptance: >= 99.9% of (scale byte,
packed bytes) blocks identical to the eager composition, and no element more than one E2M1 step away.
"""

import functools
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import capture_cuda_graph, requires_cuda
from torch._subclasses.fake_tensor import FakeTensorMode

import fp4op
from fp4op import layouts, reference

OPS = torch.ops.fp4op
DTYPES = (torch.bfloat16, torch.float16)
# (sf_vec_size, sf_use_ue8m0)
RECIPES = {"nvfp4": (16, False), "mxfp4": (32, True)}
LAYOUTS = layouts.LAYOUTS
MIN_IDENTICAL_BLOCKS = 0.999


# ---- inputs -----------------------------------------------------------------------------------------


def make_input(shape, dtype, device="cpu", seed=0):
    """Gaussian values with per-row magnitudes over several decades and a few large outliers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    rows = x.reshape(-1, shape[-1]) if shape[-1] else x.reshape(-1, 1)
    rows *= torch.exp2(torch.randint(-6, 7, (rows.shape[0], 1), generator=g).float())
    flat = x.view(-1)
    if flat.numel():
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 500),), generator=g)
        flat[idx] *= 40.0
    return x.to(dtype).to(device)


def make_affine(k, dtype, device="cpu", seed=1, mean=1.0):
    g = torch.Generator().manual_seed(seed)
    return (mean + 0.5 * torch.randn(k, generator=g)).to(dtype).to(device)


def quantize_kwargs(recipe, layout, global_scale=None):
    vec, ue8m0 = RECIPES[recipe]
    swizzled, is_8x4 = layouts.layout_flags(layout)
    return dict(
        global_scale=None if ue8m0 else global_scale,
        sf_vec_size=vec,
        sf_use_ue8m0=ue8m0,
        is_sf_swizzled_layout=swizzled,
        is_sf_8x4_layout=is_8x4,
    )


def global_scale_of(y):
    return fp4op.nvfp4_global_scale(y).to(y.device)


# ---- the eager compositions ----------------------------------------------------------------------------


def eager_rms_norm(x, weight, eps, weight_offset=0.0, weight_in_input_dtype=False):
    k = x.shape[-1]
    if weight is None or (weight_offset == 0.0 and not weight_in_input_dtype):
        return F.rms_norm(x, (k,), weight, eps)  # torch's own kernel / decomposition
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight_in_input_dtype:  # Hugging Face Llama: product in the model dtype
        w = weight if weight_offset == 0.0 else weight + weight_offset  # (0 + w turns -0 into +0)
        return w * normed.to(x.dtype)
    return (normed * (weight_offset + weight.float())).to(x.dtype)  # Hugging Face Gemma


def eager_layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def eager_act(name, x):
    if name == "silu":
        return F.silu(x)
    if name == "gelu_new":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    if name == "relu":
        return F.relu(x)
    if name == "relu2":
        return F.relu(x) ** 2
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if name == "silu_written":
        return x * torch.sigmoid(x)
    return F.gelu(x, approximate="tanh" if name == "gelu_tanh" else "none")


# ---- comparison ------------------------------------------------------------------------------------------


def _block_factors(sf_bytes, recipe, global_scale):
    """Dequantization factors of scale bytes (NVFP4: one global scale per byte)."""
    if RECIPES[recipe][1]:
        return reference.pow2(sf_bytes.to(torch.int32) - 127)
    return reference.e4m3_to_float(sf_bytes) / global_scale


def _e2m1_step(mag):
    return torch.where(mag <= 2.0, 0.5, torch.where(mag <= 4.0, 1.0, 2.0))


class Tally:
    """Counts differing blocks over several calls, checks every element bound and the padding."""

    def __init__(self):
        self.blocks = 0
        self.differing = 0

    def add(self, got, want, shape, recipe, layout, global_scale):
        (xq, sf), (xq_ref, sf_ref) = got, want
        vec = RECIPES[recipe][0]
        m, k = math.prod(shape[:-1]), shape[-1]
        nk = k // vec
        assert xq.shape == xq_ref.shape and xq.dtype == torch.uint8
        assert sf.shape == sf_ref.shape and sf.dtype == torch.uint8
        xq, sf, xq_ref, sf_ref = (t.cpu() for t in (xq, sf, xq_ref, sf_ref))
        # padding bytes of the swizzled layouts are exactly zero
        padding = layouts.swizzle(torch.ones(m, nk, dtype=torch.uint8), layout) == 0
        assert (sf[padding] == 0).all()
        if m == 0 or k == 0:
            return
        sf_lin = layouts.unswizzle(sf, m, nk, layout)
        sf_lin_ref = layouts.unswizzle(sf_ref, m, nk, layout)
        q = xq.reshape(m, nk, vec // 2)
        q_ref = xq_ref.reshape(m, nk, vec // 2)
        same = (q == q_ref).all(-1) & (sf_lin == sf_lin_ref)
        self.blocks += same.numel()
        self.differing += int((~same).sum())
        # every element of the differing blocks within one E2M1 step (of the larger block scale)
        rows, blocks = torch.nonzero(~same, as_tuple=True)
        if rows.numel() == 0:
            return
        gs = None if global_scale is None else global_scale.cpu().float().reshape(-1)
        if gs is not None:
            gs = gs[rows] if gs.numel() > 1 else gs.expand(rows.numel())
        fa = _block_factors(sf_lin[rows, blocks], recipe, gs).unsqueeze(-1)
        fb = _block_factors(sf_lin_ref[rows, blocks], recipe, gs).unsqueeze(-1)
        qa, qb = q[rows, blocks], q_ref[rows, blocks]
        ea = reference.e2m1_to_float(torch.stack((qa & 0xF, qa >> 4), -1).reshape(-1, vec))
        eb = reference.e2m1_to_float(torch.stack((qb & 0xF, qb >> 4), -1).reshape(-1, vec))
        bound = torch.maximum(fa, fb) * _e2m1_step(torch.maximum(ea.abs(), eb.abs()))
        err = (ea * fa - eb * fb).abs()
        assert (err <= bound * (1 + 1e-6)).all(), f"an element differs by more than one E2M1 step: {err.max()}"

    def check(self):
        assert self.blocks > 0
        identical = 1.0 - self.differing / self.blocks
        assert identical >= MIN_IDENTICAL_BLOCKS, f"{self.differing} of {self.blocks} blocks differ"


# ---- the ops under test, as (fused call, eager reference) pairs ---------------------------------------------

NORMS = (
    "rms_norm",
    "rms_norm_no_weight",
    "rms_norm_gemma",
    "rms_norm_llama",
    "add_rms_norm",
    "add_rms_norm_llama",
    "add_rms_norm_float32_sum_vllm",
    "add_rms_norm_float32_sum",
    "add_rms_norm_float32_sum_no_weight",
    # residual + RMSNorm(x): quantizes and returns that sum (OLMo2's post-norm residual stream)
    "rms_norm_add",
    "rms_norm_add_llama",
    "rms_norm_add_no_weight",
    "layer_norm",
    "layer_norm_no_affine",
    # LayerNorm(x) * multiplier + shift per sample (adaLN: DiT, SD3, FLUX), with and without weight and bias
    "layer_norm_modulate",
    "layer_norm_modulate_affine",
    # the *_with_normed ops: the (x_q, sf) of the op named before the suffix, and the norm output
    "rms_norm_with_normed",
    "rms_norm_llama_with_normed",
    "rms_norm_gemma_with_normed",
    "layer_norm_with_normed",
    "layer_norm_no_affine_with_normed",
    "add_rms_norm_with_normed",
    "add_rms_norm_llama_with_normed",
)
WITH_NORMED = "_with_normed"
ACTIVATIONS = ("silu_and_mul", "gelu_and_mul", "gelu_tanh_and_mul", "gelu_new_and_mul", "relu_and_mul", "relu2_and_mul",
               "silu", "gelu", "gelu_tanh", "gelu_new", "relu", "relu2", "quick_gelu", "silu_written")

# (M, K, eps): odd row counts, K = 16 * odd (NVFP4) or 32 * odd (MXFP4), 2048, 4096
NORM_SHAPES = ((1, 2048, 1e-5), (7, None, 1e-6), (129, 4096, 3e-7))
ACT_SHAPES = ((1, None), (7, 2048), (129, 4096))


def odd_k(recipe):
    return RECIPES[recipe][0] * 33


def norm_case(name, x, eps, device):
    """(fused op, args, eager result, next residual to compare exactly or None) of a norm case; the
    *_with_normed ops also return the norm output, last."""
    if name.endswith(WITH_NORMED):
        op, args, y, total = norm_case(name.removesuffix(WITH_NORMED), x, eps, device)
        with_normed = {OPS.rms_norm_quantize: OPS.rms_norm_quantize_with_normed,
                       OPS.layer_norm_quantize: OPS.layer_norm_quantize_with_normed,
                       OPS.add_rms_norm_quantize: OPS.add_rms_norm_quantize_with_normed}
        return with_normed[op], args, y, total
    k, dtype = x.shape[-1], x.dtype
    if name.startswith("add_rms_norm_float32_sum"):
        # vLLM's RMSNorm: the sum in float32 normalized as it is (the residual small against x, so that
        # the float32 sum often carries bits its rounding drops)
        residual = make_input(x.shape, dtype, device, seed=7) * 0.01
        weight = None if name.endswith("no_weight") else make_affine(k, dtype, device)
        in_dtype = name.endswith("vllm")
        s = x.float() + residual.float()
        normed = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
        if weight is None:
            y = normed.to(dtype)
        elif in_dtype:
            y = normed.to(dtype) * weight  # vLLM: x.to(orig_dtype) * self.weight
        else:
            y = (weight * normed).to(dtype)
        args = (x, residual, weight, eps, 0.0, in_dtype)
        return functools.partial(OPS.add_rms_norm_quantize, sum_in_float32=True), args, y, s.to(dtype)
    if name.startswith("add_rms_norm"):
        residual = make_input(x.shape, dtype, device, seed=7)
        weight = make_affine(k, dtype, device)
        in_dtype = name.endswith("llama")
        total = x + residual
        y = eager_rms_norm(total, weight, eps, 0.0, in_dtype)
        return OPS.add_rms_norm_quantize, (x, residual, weight, eps, 0.0, in_dtype), y, total
    if name.startswith("rms_norm_add"):
        residual = make_input(x.shape, dtype, device, seed=7)
        weight = None if name.endswith("no_weight") else make_affine(k, dtype, device)
        in_dtype = name.endswith("llama")
        y = residual + eager_rms_norm(x, weight, eps, 0.0, in_dtype)
        # the sum is checked as a norm output (check_norm_output): it carries the norm's reduction order
        return OPS.rms_norm_add_quantize, (x, residual, weight, eps, 0.0, in_dtype), y, None
    if name.startswith("rms_norm"):
        weight = None if name.endswith("no_weight") else make_affine(k, dtype, device)
        offset, in_dtype = 0.0, False
        if name.endswith("gemma") or name.endswith("offset"):
            offset, weight = 1.0, make_affine(k, dtype, device, mean=0.0)
        if "llama" in name:
            in_dtype = True
        y = eager_rms_norm(x, weight, eps, offset, in_dtype)
        return OPS.rms_norm_quantize, (x, weight, eps, offset, in_dtype), y, None
    if name.startswith("layer_norm_modulate"):
        affine = name.endswith("affine")
        weight = make_affine(k, dtype, device, seed=3) if affine else None
        bias = make_affine(k, dtype, device, seed=4, mean=0.0) if affine else None
        x, multiplier, shift = modulation_operands(x)
        y = eager_layer_norm(x, weight, bias, eps) * multiplier + shift
        return OPS.layer_norm_modulate_quantize, (x, weight, bias, eps, multiplier, shift), y, None
    affine = not name.endswith("no_affine")
    weight = make_affine(k, dtype, device) if affine else None
    bias = make_affine(k, dtype, device, seed=2, mean=0.0) if affine else None
    return OPS.layer_norm_quantize, (x, weight, bias, eps), eager_layer_norm(x, weight, bias, eps), None


def modulation_operands(x):
    """(x, multiplier, shift) of an adaLN case from rows x [M, K]: x as [3, M / 3, K] with a multiplier a
    sample ([3, 1, K], 1 + scale) where 3 divides M, else a multiplier a row ([M, K]); one shift for all rows."""
    m, k = x.shape
    samples = 3 if m % 3 == 0 else m
    if samples != m:
        x = x.view(samples, m // samples, k)
    g = torch.Generator().manual_seed(m + k)
    scale = (0.5 * torch.randn(samples, k, generator=g)).to(x.dtype).to(x.device)
    shift = (0.5 * torch.randn(1, k, generator=g)).to(x.dtype).to(x.device)
    multiplier = 1 + scale
    if samples != m:
        multiplier, shift = multiplier[:, None], shift[:, None]
    return x, multiplier, shift


def gated_op(act, gate, up):
    """(fused op, its arguments) of eager_act(act, gate) * up."""
    if act == "silu":
        return OPS.silu_and_mul_quantize, (gate, up)
    if act == "gelu_new":
        return OPS.gelu_new_and_mul_quantize, (gate, up)
    if act.startswith("relu"):
        return OPS.relu_and_mul_quantize, (gate, up, act == "relu2")
    return OPS.gelu_and_mul_quantize, (gate, up, "tanh" if act == "gelu_tanh" else "none")


def act_case(name, x, device):
    if name.endswith("_and_mul"):
        # up without outliers, so that float16 products stay finite
        up = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(x.dtype).to(device)
        act = name[: -len("_and_mul")]
        return (*gated_op(act, x, up), eager_act(act, x) * up)
    y = eager_act(name, x)
    if name == "silu":
        return OPS.silu_quantize, (x,), y
    if name == "gelu_new":
        return OPS.gelu_new_quantize, (x,), y
    if name.startswith("relu"):
        return OPS.relu_quantize, (x, name == "relu2"), y
    if name in ("quick_gelu", "silu_written"):
        return OPS.sigmoid_mul_quantize, (x, 1.702 if name == "quick_gelu" else 1.0), y
    return OPS.gelu_quantize, (x, "tanh" if name == "gelu_tanh" else "none"), y


def run_fused(op, args, y_ref, recipe, layout):
    gs = global_scale_of(y_ref)
    kw = quantize_kwargs(recipe, layout, gs)
    return op(*args, **kw), OPS.quantize(y_ref, **kw), kw["global_scale"]


# ---- numerics vs the eager composition --------------------------------------------------------------------


def check_norm(name, dtype, recipe, layout, device):
    tally = Tally()
    for i, (m, k, eps) in enumerate(NORM_SHAPES):
        k = k or odd_k(recipe)
        x = make_input((m, k), dtype, device, seed=10 + i)
        op, args, y_ref, total = norm_case(name, x, eps, device)
        got, want, gs = run_fused(op, args, y_ref, recipe, layout)
        if name.startswith("rms_norm_add"):
            check_post_norm_sum(got, y_ref, args[1], quantize_kwargs(recipe, layout, gs))
        if name.endswith(WITH_NORMED):
            check_norm_output(got, y_ref, quantize_kwargs(recipe, layout, gs))
            kw = quantize_kwargs(recipe, layout, gs)
            plain = norm_case(name.removesuffix(WITH_NORMED), x, eps, device)[0]
            # the plain op's outputs (codes, scales, the next residual), bit for bit
            assert all(torch.equal(a, b) for a, b in zip(got[:-1], plain(*args, **kw), strict=True))
        if total is not None:
            assert torch.equal(got[2], total)  # x + residual in the model dtype, exactly
        got = got[:2]
        tally.add(got, want, x.shape, recipe, layout, gs)
    tally.check()


def check_norm_output(got, y_ref, kw):
    """A *_with_normed op's norm output (its last): contiguous, in x's dtype, exactly what its (x_q, sf)
    quantize, and eager's norm up to reduction order (a row's statistic one float32 ulp apart moves some
    elements by a model-dtype ulp, two where the Llama form rounds twice)."""
    normed = got[-1]
    assert normed.dtype == y_ref.dtype and normed.shape == y_ref.shape and normed.is_contiguous()
    requantized = OPS.quantize(normed, **kw)
    assert torch.equal(requantized[0], got[0]) and torch.equal(requantized[1], got[1])
    torch.testing.assert_close(normed, y_ref, rtol=2.0**-6, atol=1e-6)


def post_norm_sums_close(a, b, residual):
    """Two values of residual + norm(x) whose norm outputs may be an ulp or two apart (reduction order,
    the device's rsqrt): within 2^-6 of the norm output's magnitude, which is at most |sum| + |residual|
    (where the two cancel, the sum's own ulps are finer than the norm's); NaN where both are."""
    a, b, r = a.float(), b.float(), residual.float()
    bound = 2.0**-6 * (a.abs() + r.abs()) + 1e-6
    return bool(((a == b) | (a.isnan() & b.isnan()) | ((a - b).abs() <= bound)).all())


def check_post_norm_sum(got, y_ref, residual, kw):
    """rms_norm_add_quantize's sum (its last output): contiguous, in x's dtype, exactly what its (x_q, sf)
    quantize, and residual + eager's norm up to the norm's reduction order."""
    total = got[-1]
    assert total.dtype == y_ref.dtype and total.shape == y_ref.shape and total.is_contiguous()
    requantized = OPS.quantize(total, **kw)
    assert torch.equal(requantized[0], got[0]) and torch.equal(requantized[1], got[1])
    assert post_norm_sums_close(total, y_ref, residual)


def check_activation(name, dtype, recipe, layout, device):
    tally = Tally()
    for i, (m, k) in enumerate(ACT_SHAPES):
        k = k or odd_k(recipe)
        x = make_input((m, k), dtype, device, seed=20 + i)
        op, args, y_ref = act_case(name, x, device)
        got, want, gs = run_fused(op, args, y_ref, recipe, layout)
        tally.add(got, want, x.shape, recipe, layout, gs)
    tally.check()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NORMS)
def test_norm_matches_eager(name, dtype, recipe, layout):
    check_norm(name, dtype, recipe, layout, "cpu")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_matches_eager(name, dtype, recipe, layout):
    check_activation(name, dtype, recipe, layout, "cpu")


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_weight_offset_in_input_dtype(dtype, recipe):
    check_norm("rms_norm_llama_offset", dtype, recipe, "128x4", "cpu")


@requires_cuda
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_weight_offset_in_input_dtype_cuda(dtype, recipe):
    check_norm("rms_norm_llama_offset", dtype, recipe, "128x4", "cuda")


@requires_cuda
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_llama_weight_product_special_values_cuda(dtype, recipe, offset):
    """The Llama form's packed multiply (fused_math.h, rms_norm_input_dtype_pair) where a float32 product
    rounded to the model dtype and a packed product could part: infinities, NaN, signed zeros, products
    below the normal range, overflow. Rows of +-0.5, +-1, +-2 make the sum of squares exact in any order
    (and K = 256 makes the mean exact), so the fused op equals eager CUDA PyTorch byte for byte."""
    k = 256
    g = torch.Generator().manual_seed(5)
    levels = torch.tensor([0.5, -0.5, 1.0, -1.0, 2.0, -2.0])
    x = levels[torch.randint(0, len(levels), (16, k), generator=g)].to(dtype).cuda()
    fi = torch.finfo(dtype)
    specials = [float("inf"), -float("inf"), float("nan"), 0.0, -0.0, fi.max, -fi.max, fi.tiny, -fi.tiny,
                fi.tiny * 2**-3, fi.tiny * 2**-6, fi.smallest_normal * 1.5, 1.0, -3.0, 2.0**-20, 0.75]
    w = torch.tensor(specials)[torch.randint(0, len(specials), (k,), generator=g)].to(dtype).cuda()
    kw = quantize_kwargs(recipe, "128x4", torch.tensor([3.0], device="cuda"))
    got = OPS.rms_norm_quantize(x, w, 1e-6, offset, True, **kw)
    want = OPS.quantize(eager_rms_norm(x, w, 1e-6, offset, True), **kw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_leading_dims_and_per_row_global_scale():
    x = make_input((2, 3, 256), torch.bfloat16)
    w = make_affine(256, torch.bfloat16)
    y = F.rms_norm(x, (256,), w, 1e-6)
    gs = fp4op.nvfp4_global_scale(y, per_row=True)
    got = OPS.rms_norm_quantize(x, w, 1e-6, global_scale=gs, is_global_scale_inversed=False)
    want = OPS.quantize(y, gs)
    assert got[0].shape == (2, 3, 128)
    tally = Tally()
    tally.add(got, want, x.shape, "nvfp4", "128x4", gs)
    tally.check()


@pytest.mark.parametrize("op", ["silu_and_mul", "gelu_and_mul"])
def test_gate_up_halves_of_one_tensor(op):
    h = 96
    t = make_input((2, 5, 2 * h), torch.bfloat16)
    gate, up = t[..., :h], t[..., h:]
    assert not gate.is_contiguous() and gate.stride(-1) == 1
    fused = getattr(OPS, f"{op}_quantize")
    kw = quantize_kwargs("nvfp4", "128x4", torch.tensor([100.0]))
    got = fused(gate, up, **kw)
    want = fused(gate.contiguous(), up.contiguous(), **kw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("name", ["rms_norm", "rms_norm_llama", "add_rms_norm", "add_rms_norm_llama", "layer_norm"])
def test_zero_weights_keep_the_sign_of_their_zeros(name, device):
    # the elements a zero weight produces are +-0 whatever the reduction order: their codes (0 or 8)
    # must be eager's exactly; a -0 weight must not become +0 on the way (weight_offset 0 included)
    m, k, eps, dtype = 4, 256, 1e-6, torch.bfloat16
    x = make_input((m, k), dtype, device, seed=3)
    weight = make_affine(k, dtype, device)
    weight[0::5] = -0.0
    weight[1::5] = 0.0
    in_dtype = name.endswith("llama")
    if name == "layer_norm":  # weight only
        op, args, y = OPS.layer_norm_quantize, (x, weight, None, eps), eager_layer_norm(x, weight, None, eps)
    elif name.startswith("add"):
        residual = make_input((m, k), dtype, device, seed=4)
        op, args = OPS.add_rms_norm_quantize, (x, residual, weight, eps, 0.0, in_dtype)
        y = eager_rms_norm(x + residual, weight, eps, 0.0, in_dtype)
    else:
        op, args = OPS.rms_norm_quantize, (x, weight, eps, 0.0, in_dtype)
        y = eager_rms_norm(x, weight, eps, 0.0, in_dtype)
    zero = (weight == 0).cpu()
    assert (y.cpu()[:, zero] == 0).all()
    # (torch's CPU layer norm adds a zero bias that turns them all into +0)
    assert y.cpu()[:, zero].signbit().any() or (name, device) == ("layer_norm", "cpu")
    got, want, _ = run_fused(op, args, y, "nvfp4", "linear")

    def codes(x_q):
        x_q = x_q.cpu().view(torch.uint8)
        return torch.stack([x_q & 0xF, x_q >> 4], -1).reshape(m, k)[:, zero]

    assert torch.equal(codes(got[0]), codes(want[0]))


def test_non_contiguous_inputs():
    t = make_input((6, 2, 128), torch.float16)
    x = t[:, 0, :]  # rows strided by 256
    xt = make_input((64, 6), torch.float16).t()  # last-dim stride != 1
    w = make_affine(128, torch.float16)[None].expand(6, 128)[0]
    kw = quantize_kwargs("mxfp4", "linear")
    for a in (x, t[:, :, ::2].reshape(6, -1)[:, :64], xt):
        for fused, args in (
            (OPS.rms_norm_quantize, lambda v: (v, None, 1e-6)),
            (OPS.silu_and_mul_quantize, lambda v: (v, v)),
            (OPS.gelu_quantize, lambda v: (v,)),
        ):
            got = fused(*args(a), **kw)
            want = fused(*args(a.contiguous()), **kw)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    got = OPS.layer_norm_quantize(x, w, None, 1e-5, **kw)
    want = OPS.layer_norm_quantize(x.contiguous(), w.contiguous(), None, 1e-5, **kw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("shape", [(0, 64), (4, 0), (0, 3, 32)])
def test_empty(shape):
    x = torch.zeros(shape, dtype=torch.bfloat16)
    kw = quantize_kwargs("mxfp4", "128x4")
    xq, sf, total = OPS.add_rms_norm_quantize(x, x, None, 1e-6, **kw)
    want = OPS.quantize(x, **kw)
    assert xq.shape == want[0].shape and torch.equal(sf, want[1]) and total.shape == x.shape
    xq, sf = OPS.silu_quantize(x, **kw)
    assert xq.shape == want[0].shape and torch.equal(sf, want[1])


# ---- opcheck, fakes, errors ----------------------------------------------------------------------------------


def op_cases(device):
    """(op, args, kwargs) covering every op, both recipes and every optional argument."""
    dt = torch.bfloat16
    x = make_input((3, 64), dt, device)
    x2 = make_input((2, 3, 64), torch.float16, device)
    w, b = make_affine(64, dt, device), make_affine(64, dt, device, seed=3)
    gs = torch.tensor([50.0], device=device)
    nv = dict(global_scale=gs)
    mx = dict(global_scale=None, sf_vec_size=32, sf_use_ue8m0=True, is_sf_swizzled_layout=False)
    eightx4 = dict(global_scale=gs, is_sf_8x4_layout=True, is_global_scale_inversed=True)
    return [
        (OPS.rms_norm_quantize, (x, w, 1e-6), nv),
        (OPS.rms_norm_quantize, (x, w, 1e-6, 1.0, True), mx),
        (OPS.rms_norm_quantize, (x2, None, 1e-5), mx),
        (OPS.add_rms_norm_quantize, (x, x.flip(0), w, 1e-6), eightx4),
        (OPS.add_rms_norm_quantize, (x2, x2 * 2, None, 1e-6, 0.0, True), mx),
        (OPS.add_rms_norm_quantize, (x, x.flip(0) * 0.01, w, 1e-6, 0.0, True), {**nv, "sum_in_float32": True}),
        # eps as a tensor: a 0-d float64 CPU scalar (what Dynamo passes) and one float32 element on x's device
        (OPS.rms_norm_quantize_eps_tensor, (x, w, torch.tensor(1e-6, dtype=torch.float64)), nv),
        (OPS.add_rms_norm_quantize_eps_tensor, (x2, x2 * 2, None, torch.tensor([1e-5], device=device)), mx),
        (
            OPS.add_rms_norm_quantize_eps_tensor,
            (x2, x2 * 3, None, torch.tensor(1e-5, dtype=torch.float64)),
            {**mx, "sum_in_float32": True},
        ),
        (OPS.layer_norm_quantize, (x, w, b, 1e-5), nv),
        (OPS.layer_norm_quantize, (x2, None, None, 1e-5), mx),
        # the multiplier a sample ([2, 1, K] of x2 [2, 3, K]) or a row, the shift one for all rows or a sample
        (OPS.layer_norm_modulate_quantize, (x2, None, None, 1e-6, 1 + x2[:, :1] * 0.1, x2[0, 0]), nv),
        (OPS.layer_norm_modulate_quantize, (x, w, b, 1e-5, x.flip(0), x[:1]), mx),
        (OPS.layer_norm_modulate_quantize, (x2, w.half(), None, 1e-5, x2 * 0.5, x2[:, :1]), eightx4),
        (OPS.rms_norm_add_quantize, (x, x.flip(0), w, 1e-6), nv),
        (OPS.rms_norm_add_quantize, (x2, x2 * 2, None, 1e-5, 0.0, True), mx),
        (OPS.rms_norm_add_quantize_eps_tensor, (x, x.flip(0), w, torch.tensor([1e-5], device=device), 0.0, True), eightx4),
        (OPS.rms_norm_quantize_with_normed, (x, w, 1e-6, 1.0, True), nv),
        (OPS.rms_norm_quantize_with_normed, (x2, None, 1e-5), mx),
        (OPS.rms_norm_quantize_with_normed_eps_tensor, (x, w, torch.tensor(1e-6, dtype=torch.float64)), eightx4),
        (OPS.layer_norm_quantize_with_normed, (x, w, b, 1e-5), nv),
        (OPS.layer_norm_quantize_with_normed, (x2, None, None, 1e-5), mx),
        (OPS.add_rms_norm_quantize_with_normed, (x, x.flip(0), w, 1e-6, 0.0, True), nv),
        (OPS.add_rms_norm_quantize_with_normed, (x2, x2 * 2, None, 1e-6), {**mx, "sum_in_float32": True}),
        (OPS.add_rms_norm_quantize_with_normed_eps_tensor, (x, x.flip(0), w, torch.tensor([1e-5], device=device)), eightx4),
        (OPS.silu_and_mul_quantize, (x, x.flip(1)), nv),
        (OPS.silu_and_mul_quantize, (x2, x2), mx),
        (OPS.gelu_and_mul_quantize, (x, x, "tanh"), eightx4),
        (OPS.gelu_and_mul_quantize, (x2, x2), mx),
        (OPS.gelu_new_and_mul_quantize, (x, x.flip(1)), nv),
        (OPS.gelu_new_and_mul_quantize, (x2, x2), eightx4),
        (OPS.relu_and_mul_quantize, (x, x.flip(1)), nv),
        (OPS.relu_and_mul_quantize, (x2, x2, True), mx),
        (OPS.silu_quantize, (x,), nv),
        (OPS.gelu_quantize, (x2, "none"), mx),
        (OPS.gelu_quantize, (x, "tanh"), nv),
        (OPS.gelu_new_quantize, (x,), nv),
        (OPS.gelu_new_quantize, (x2,), mx),
        # sqrt_2_over_pi as a tensor: a 0-d float32 CPU scalar (what the dynamic=True graph computes), one
        # float64 element on x's device
        (OPS.gelu_new_quantize, (x,), {**nv, "sqrt_2_over_pi": torch.tensor(0.7978845608028654)}),
        (OPS.gelu_new_and_mul_quantize, (x2, x2.flip(0)), {**mx, "sqrt_2_over_pi": torch.tensor([0.75], dtype=torch.float64, device=device)}),
        (OPS.relu_quantize, (x,), nv),
        (OPS.relu_quantize, (x2, True), mx),
        (OPS.sigmoid_mul_quantize, (x, 1.702), nv),
        (OPS.sigmoid_mul_quantize, (x2,), mx),
    ]


@pytest.mark.parametrize("case", range(len(op_cases("cpu"))))
def test_opcheck_cpu(case):
    op, args, kwargs = op_cases("cpu")[case]
    torch.library.opcheck(op, args, kwargs)


@requires_cuda
@pytest.mark.parametrize("case", range(len(op_cases("cpu"))))
def test_opcheck_cuda(case):
    op, args, kwargs = op_cases("cuda")[case]
    torch.library.opcheck(op, args, kwargs)


@pytest.mark.parametrize("case", range(len(op_cases("cpu"))))
def test_fake_shapes(case):
    op, args, kwargs = op_cases("cpu")[case]
    real = op(*args, **kwargs)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake_kwargs = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        fake = op(*fake_args, **fake_kwargs)
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]


def test_compile_fullgraph():
    x = make_input((5, 128), torch.bfloat16)
    w = make_affine(128, torch.bfloat16)
    gs = torch.tensor([80.0])

    def f(x, w, gs):
        return OPS.rms_norm_quantize(x, w, 1e-6, global_scale=gs)

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w, gs)
    want = f(x, w, gs)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _bad_calls():
    bf = torch.bfloat16
    x = torch.randn(4, 64).to(bf)
    w = torch.ones(64, dtype=bf)
    gs = torch.tensor([1.0])
    x3 = x.view(2, 2, 64)
    return [
        ("fp8", NotImplementedError, "float16 or bfloat16", lambda: OPS.silu_quantize(x.to(torch.float8_e4m3fn), gs)),
        ("float32", NotImplementedError, "x of a fused", lambda: OPS.rms_norm_quantize(x.float(), None, 1e-6, global_scale=gs)),
        ("float32 gate", NotImplementedError, "gate", lambda: OPS.silu_and_mul_quantize(x.float(), x.float(), gs)),
        ("weight dtype", ValueError, "weight must have the dtype", lambda: OPS.rms_norm_quantize(x, w.half(), 1e-6, global_scale=gs)),
        ("weight fp32", ValueError, "weight must have the dtype", lambda: OPS.layer_norm_quantize(x, w.float(), None, 1e-6, gs)),
        ("bias shape", ValueError, "bias must have shape", lambda: OPS.layer_norm_quantize(x, w, w[:32], 1e-6, gs)),
        ("weight shape", ValueError, "weight must have shape", lambda: OPS.rms_norm_quantize(x, w[None], 1e-6, global_scale=gs)),
        ("residual dtype", ValueError, "residual must have the dtype", lambda: OPS.add_rms_norm_quantize(x, x.half(), w, 1e-6, global_scale=gs)),
        ("residual shape", ValueError, "residual must have the shape", lambda: OPS.add_rms_norm_quantize(x, x[:2], w, 1e-6, global_scale=gs)),
        ("up shape", ValueError, "up must have the shape", lambda: OPS.silu_and_mul_quantize(x, x[:, :32], gs)),
        ("up dtype", ValueError, "up must have the dtype", lambda: OPS.gelu_and_mul_quantize(x, x.half(), "none", gs)),
        ("approximate", ValueError, "approximate", lambda: OPS.gelu_quantize(x, "fast", gs)),
        ("K", ValueError, "multiple of sf_vec_size", lambda: OPS.silu_quantize(x[:, :24], gs)),
        ("no global_scale", ValueError, "global_scale is required", lambda: OPS.silu_quantize(x)),
        ("global_scale size", ValueError, "global_scale must have 1 element", lambda: OPS.silu_quantize(x, torch.ones(3))),
        ("sf_vec_size", NotImplementedError, "sf_vec_size", lambda: OPS.silu_quantize(x, gs, 8)),
        ("recipe", ValueError, "sf_use_ue8m0", lambda: OPS.silu_quantize(x, gs, 16, True)),
        ("eps shape", ValueError, "eps must have one element", lambda: OPS.rms_norm_quantize_eps_tensor(x, w, torch.ones(2), global_scale=gs)),
        ("eps dtype", ValueError, "eps must be a floating-point", lambda: OPS.add_rms_norm_quantize_eps_tensor(x, x, w, torch.tensor(1), global_scale=gs)),
        ("normed weight", ValueError, "weight must have shape", lambda: OPS.rms_norm_quantize_with_normed(x, w[:32], 1e-6, global_scale=gs)),
        ("normed eps", ValueError, "eps must have one element", lambda: OPS.rms_norm_quantize_with_normed_eps_tensor(x, w, torch.ones(2), global_scale=gs)),
        ("normed bias", ValueError, "bias must have the dtype", lambda: OPS.layer_norm_quantize_with_normed(x, w, w.half(), 1e-6, gs)),
        ("normed float32", NotImplementedError, "x of a fused", lambda: OPS.layer_norm_quantize_with_normed(x.float(), None, None, 1e-6, gs)),
        ("normed residual", ValueError, "residual must have the shape", lambda: OPS.add_rms_norm_quantize_with_normed(x, x[:2], w, 1e-6, global_scale=gs)),
        ("post-norm residual", ValueError, "residual must have the shape", lambda: OPS.rms_norm_add_quantize(x, x[:2], w, 1e-6, global_scale=gs)),
        ("post-norm residual dtype", ValueError, "residual must have the dtype", lambda: OPS.rms_norm_add_quantize(x, x.half(), w, 1e-6, global_scale=gs)),
        ("post-norm weight", ValueError, "weight must have shape", lambda: OPS.rms_norm_add_quantize(x, x, w[:8], 1e-6, global_scale=gs)),
        ("post-norm eps", ValueError, "eps must be a floating-point", lambda: OPS.rms_norm_add_quantize_eps_tensor(x, x, w, torch.tensor(1), global_scale=gs)),
        ("normed residual eps", ValueError, "eps must be a floating-point", lambda: OPS.add_rms_norm_quantize_with_normed_eps_tensor(x, x, w, torch.tensor(1), global_scale=gs)),
        # adaLN operands: per sample, x's dtype; a position-wise [1, T, K] multiplier is not per sample
        ("modulate a position", ValueError, "multiplier must broadcast to x", lambda: OPS.layer_norm_modulate_quantize(x3, None, None, 1e-6, x3[:1], x3[:, :1], gs)),
        ("modulate K", ValueError, "shift must broadcast to x", lambda: OPS.layer_norm_modulate_quantize(x3, None, None, 1e-6, x3, x3[..., :32], gs)),
        ("modulate rank", ValueError, "shift must broadcast to x", lambda: OPS.layer_norm_modulate_quantize(x, None, None, 1e-6, x, x[None], gs)),
        ("modulate 0-d", ValueError, "multiplier must broadcast to x", lambda: OPS.layer_norm_modulate_quantize(x, None, None, 1e-6, x[0, 0], x, gs)),
        ("modulate dtype", ValueError, "multiplier must have the dtype", lambda: OPS.layer_norm_modulate_quantize(x, None, None, 1e-6, x.float(), x, gs)),
        ("modulate None", ValueError, "shift must be a tensor", lambda: OPS.layer_norm_modulate_quantize(x, None, None, 1e-6, x, None, gs)),
        ("modulate bias", ValueError, "bias must have shape", lambda: OPS.layer_norm_modulate_quantize(x, w, w[:8], 1e-6, x, x, gs)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_errors(case):
    _, exc, message, call = _bad_calls()[case]
    with pytest.raises(exc, match=message):
        call()
    # the fake kernels raise the same errors
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(exc, match=message):
            call()


EPS_TENSOR_CASES = [
    (torch.float64, ()),  # what Dynamo passes for a module's float eps under dynamic=True
    (torch.float32, ()),
    (torch.float32, (1,)),
    (torch.bfloat16, ()),
]


def check_eps_tensor_overloads(device, eps_device):
    """The *_eps_tensor ops equal the float-eps ones with eps = the tensor's float32 value, bit for bit."""
    x = make_input((7, 96), torch.bfloat16, device)
    r = make_input((7, 96), torch.bfloat16, device, seed=5)
    w = make_affine(96, torch.bfloat16, device)
    gs = torch.tensor([30.0], device=device)
    for dtype, shape in EPS_TENSOR_CASES:
        # 1e-1 is not a float32 value (the float32 rounding is what the ops use); 1e-6 is typical
        for value in (1e-1, 1e-6):
            eps = torch.full(shape, value, dtype=dtype, device=eps_device)
            eps_f = float(eps.to(torch.float32).item())
            want = OPS.rms_norm_quantize(x, w, eps_f, 0.0, True, gs)
            got = OPS.rms_norm_quantize_eps_tensor(x, w, eps, 0.0, True, gs)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (dtype, shape, value)
            want = OPS.add_rms_norm_quantize(x, r, None, eps_f, global_scale=gs)
            got = OPS.add_rms_norm_quantize_eps_tensor(x, r, None, eps, global_scale=gs)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (dtype, shape, value)
            want = OPS.rms_norm_quantize_with_normed(x, w, eps_f, global_scale=gs)
            got = OPS.rms_norm_quantize_with_normed_eps_tensor(x, w, eps, global_scale=gs)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (dtype, shape, value)
            want = OPS.rms_norm_add_quantize(x, r, w, eps_f, global_scale=gs)
            got = OPS.rms_norm_add_quantize_eps_tensor(x, r, w, eps, global_scale=gs)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (dtype, shape, value)
            want = OPS.add_rms_norm_quantize_with_normed(x, r, w, eps_f, 0.0, True, global_scale=gs)
            got = OPS.add_rms_norm_quantize_with_normed_eps_tensor(x, r, w, eps, 0.0, True, global_scale=gs)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (dtype, shape, value)


def test_eps_tensor_overloads():
    check_eps_tensor_overloads("cpu", "cpu")


def gelu_new_with(x, coef):
    """gelu_new with its factor sqrt(2 / pi) replaced by the Python float `coef`."""
    return 0.5 * x * (1.0 + torch.tanh(coef * (x + 0.044715 * torch.pow(x, 3.0))))


def check_gelu_new_coef_tensor(device, coef_device):
    """gelu_new's ops with sqrt_2_over_pi a tensor compute gelu_new with that factor's float32 value,
    bit for bit as eager does with it as a Python float; the constant's tensor gives the default's bytes."""
    x, u = make_input((7, 96), torch.bfloat16, device), make_input((7, 96), torch.bfloat16, device, seed=5)
    gs = torch.tensor([30.0], device=device)
    constant = math.sqrt(2.0 / math.pi)
    for value, dtype, shape in ((constant, torch.float32, ()), (constant, torch.float64, ()), (0.75, torch.float32, (1,)),
                                (0.1, torch.float64, (1, 1)), (1.5, torch.bfloat16, ())):
        coef = torch.full(shape, value, dtype=dtype, device=coef_device)
        c = float(coef.to(torch.float32).item())
        got = OPS.gelu_new_quantize(x, gs, sqrt_2_over_pi=coef)
        assert all(torch.equal(a, b) for a, b in zip(got, OPS.quantize(gelu_new_with(x, c), gs))), (value, dtype)
        got = OPS.gelu_new_and_mul_quantize(x, u, gs, sqrt_2_over_pi=coef)
        assert all(torch.equal(a, b) for a, b in zip(got, OPS.quantize(gelu_new_with(x, c) * u, gs))), (value, dtype)
        if value == constant:
            assert all(torch.equal(a, b) for a, b in zip(got, OPS.gelu_new_and_mul_quantize(x, u, gs)))


def test_gelu_new_coef_tensor():
    check_gelu_new_coef_tensor("cpu", "cpu")


def test_not_differentiable():
    x = torch.randn(2, 32, dtype=torch.bfloat16, requires_grad=True)
    xq, sf = OPS.silu_quantize(x, torch.tensor([1.0]))
    assert not xq.requires_grad and not sf.requires_grad


GRAD_CASES = {
    # name: (op, args after x (r: the residual, w: the weight, b: the bias), kwargs, eager norm of (x, r, w, b))
    "rms_norm": (OPS.rms_norm_quantize_with_normed, lambda r, w, b: (w, 1e-5), {},
                 lambda x, r, w, b: F.rms_norm(x, (x.shape[-1],), w, 1e-5)),
    "rms_norm_llama": (OPS.rms_norm_quantize_with_normed, lambda r, w, b: (w, 1e-6, 0.0, True), {},
                       lambda x, r, w, b: eager_rms_norm(x, w, 1e-6, 0.0, True)),
    "rms_norm_gemma_eps_tensor": (OPS.rms_norm_quantize_with_normed_eps_tensor,
                                  lambda r, w, b: (w, torch.tensor(1e-6, dtype=torch.float64), 1.0), {},
                                  lambda x, r, w, b: eager_rms_norm(x, w, 1e-6, 1.0)),
    "add_rms_norm": (OPS.add_rms_norm_quantize_with_normed, lambda r, w, b: (r, w, 1e-6), {},
                     lambda x, r, w, b: eager_rms_norm(x + r, w, 1e-6)),
    "add_rms_norm_float32_sum": (OPS.add_rms_norm_quantize_with_normed, lambda r, w, b: (r, None, 1e-6),
                                 {"sum_in_float32": True},
                                 lambda x, r, w, b: (lambda s: (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype))(x.float() + r.float())),
    "layer_norm": (OPS.layer_norm_quantize_with_normed, lambda r, w, b: (w, b, 1e-5), {},
                   lambda x, r, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)),
    # rms_norm_add_quantize's residual + norm output, last as a norm output is
    "rms_norm_add": (OPS.rms_norm_add_quantize, lambda r, w, b: (r, w, 1e-6), {},
                     lambda x, r, w, b: r + F.rms_norm(x, (x.shape[-1],), w, 1e-6)),
    "rms_norm_add_llama_eps_tensor": (OPS.rms_norm_add_quantize_eps_tensor,
                                      lambda r, w, b: (r, w, torch.tensor(1e-6, dtype=torch.float64), 0.0, True), {},
                                      lambda x, r, w, b: r + eager_rms_norm(x, w, 1e-6, 0.0, True)),
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_opcheck_with_gradients(case, device):
    """opcheck of the *_with_normed ops on inputs that require grad, and their backward under AOTAutograd
    (torch.compile's aot_eager) equal to eager's. opcheck's own AOTAutograd check is left out here: it sums
    every output into one accumulator in place, an int64 one after the uint8 codes, to which the bfloat16
    norm output cannot be added (any op returning codes before a differentiable output fails it so)."""
    op, tail, kwargs, _ = GRAD_CASES[case]
    x, r = (make_input((3, 64), torch.bfloat16, device, seed=s).requires_grad_() for s in (1, 2))
    w, b = (make_affine(64, torch.bfloat16, device, seed=s).requires_grad_() for s in (3, 4))
    args = (x, *tail(r, w, b))
    kwargs = {"global_scale": torch.tensor([50.0], device=device), **kwargs}
    torch.library.opcheck(op, args, kwargs, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))

    def loss(*args):
        out = op(*args, **kwargs)
        return sum(t.float().square().sum() for t in out[2:])  # the next residual (if any), the norm output

    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    want = torch.autograd.grad(loss(*args), inputs)
    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(*args), inputs)
    for a, e in zip(got, want, strict=True):
        assert torch.equal(a, e)


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_norm_output_gradients(case):
    """The *_with_normed norm output differentiates as the eager norm it equals (x, residual, weight, bias);
    the next residual as x + residual; the codes carry none."""
    op, tail, kwargs, eager = GRAD_CASES[case]
    dt = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(3, 64, generator=g).to(dt).requires_grad_() for _ in range(2))
    w, b = (torch.randn(64, generator=g).to(dt).requires_grad_() for _ in range(2))
    args = tail(r, w, b)
    out = op(x, *args, global_scale=torch.tensor([50.0]), **kwargs)
    assert not out[0].requires_grad and not out[1].requires_grad
    normed, want = out[-1], eager(x, r, w, b)
    dy = torch.randn(normed.shape, generator=g).to(dt)
    inputs = [x] + [t for t in (r, w, b) if any(t is a for a in args)]  # those the op was given
    loss = (normed.float() * dy.float()).sum() + (out[2].float().sum() if len(out) == 4 else 0.0)
    got = torch.autograd.grad(loss, inputs, allow_unused=True)
    loss_eager = (want.float() * dy.float()).sum() + ((x + r).float().sum() if len(out) == 4 else 0.0)
    expected = torch.autograd.grad(loss_eager, inputs, allow_unused=True)
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=2.0**-6, atol=1e-3)
    # an input modified in place before the backward is refused
    out = op(x, *args, global_scale=torch.tensor([50.0]), **kwargs)
    with torch.no_grad():
        x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        out[-1].float().sum().backward()


# ---- CUDA ------------------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NORMS)
def test_norm_matches_eager_cuda(name, dtype, recipe, layout):
    check_norm(name, dtype, recipe, layout, "cuda")


@requires_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_matches_eager_cuda(name, dtype, recipe, layout):
    check_activation(name, dtype, recipe, layout, "cuda")


# every norm kernel configuration: teams of 32..256 threads a row holding 1, 2 or 4 blocks a thread
# ((1100, 4160): a second pass with 4 of its 256 columns holding data, on 1100 rows), and K
# beyond what they keep on chip (read again from memory)
# (4500, 1024): the activations take the prefetching elementwise kernel there, the split kernel below;
# (8600, 2048): enough rows that the plain quantize takes the sector-walk kernel there; the activations
# keep the elementwise kernel (GatedSource/ActivationSource::kSectorWalk is false) and must stay exact
CUDA_SHAPES = ((3, 16 * 3), (130, 512), (9, 2048), (17, 6144), (33, 16384), (5, 20480 + 32), (2, 65536), (4500, 1024),
               (1100, 4160), (8600, 2048))


@requires_cuda
@pytest.mark.parametrize("shape", CUDA_SHAPES)
@pytest.mark.parametrize("name", NORMS + ACTIVATIONS)
def test_cuda_matches_cpu(name, shape):
    for recipe in (r for r in RECIPES if shape[1] % RECIPES[r][0] == 0):
        tally = Tally()
        for layout in LAYOUTS:
            results, gs = [], None
            for device in ("cpu", "cuda"):
                x = make_input(shape, torch.bfloat16, device, seed=3)
                if name in NORMS:
                    op, args, y_ref, _ = norm_case(name, x, 1e-6, device)
                else:
                    op, args, y_ref = act_case(name, x, device)
                gs = global_scale_of(y_ref.cpu()) if gs is None else gs  # the same scale on both devices
                kw = quantize_kwargs(recipe, layout, gs.to(device))
                results.append([t.cpu() for t in op(*args, **kw)])
            cpu, cuda = results
            if name.startswith("add_rms_norm"):
                assert torch.equal(cpu[2], cuda[2])  # the next residual
            if name.startswith("rms_norm_add"):
                assert post_norm_sums_close(cpu[2], cuda[2], args[1].cpu())
            if name.endswith(WITH_NORMED):
                # the norm output follows each device's torch kernel (RMSNorm: CUDA's rsqrtf, the CPU's
                # 1 / sqrt; LayerNorm: (x - mean) * rstd, x * rstd - rstd * mean contracted): a row's
                # statistic an ulp apart moves its elements by an ulp (two where the Llama form rounds twice)
                torch.testing.assert_close(cpu[-1], cuda[-1], rtol=2.0**-6, atol=1e-6)
            tally.add(cuda[:2], cpu[:2], shape, recipe, layout, gs)
        tally.check()


def nvcc_path():
    nvcc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    return str(nvcc) if nvcc.exists() else shutil.which("nvcc")


@requires_cuda
@pytest.mark.skipif(nvcc_path() is None, reason="needs nvcc")
def test_activation_math_every_input(tmp_path):
    """Every float16 and bfloat16 input through the kernels' activation math (tests/cuda/
    activation_exhaustive.cu): SiLU's fast path with its exact fallback, and the GELUs, equal the
    float32 value eager computes rounded once; the fast path's error stays inside its stated bound;
    gelu_new's and sigmoid_mul's paired steps equal their one-value steps, and those equal eager torch's
    CUDA ops (gelu_new, QuickGELU, SiLU written out)."""
    exe = tmp_path / "activation_exhaustive"
    source = Path(__file__).parent / "cuda" / "activation_exhaustive.cu"
    subprocess.run([nvcc_path(), "-O3", "-std=c++17", "-arch=native", "-o", str(exe), str(source)], check=True)
    written = tmp_path / "stepwise.f32"
    run = subprocess.run([str(exe), str(written)], capture_output=True, text=True, timeout=120)
    lines = run.stdout.splitlines()
    assert len(lines) == 14, run.stdout + run.stderr
    assert all(" checked 65536 mismatches 0 " in line for line in lines), run.stdout
    assert run.returncode == 0, run.stdout
    # rounded op by op: the kernels' values equal eager torch's CUDA ops on every input
    kernel = torch.from_file(str(written), size=6 * 65536, dtype=torch.float32).reshape(3, 2, 65536)
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    bits = torch.cat([bits[2**15:], bits[: 2**15]])  # bit patterns 0x0000..0xFFFF, the program's order
    for i, act in enumerate(("gelu_new", "quick_gelu", "silu_written")):
        for row, dtype in enumerate((torch.bfloat16, torch.float16)):
            eager = eager_act(act, bits.view(dtype).cuda()).float().cpu()
            got = kernel[i, row]
            same = (got == eager) | (got.isnan() & eager.isnan())
            assert same.all(), (act, dtype, bits[~same][:8].tolist(), got[~same][:8], eager[~same][:8])


@requires_cuda
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ("silu", "silu_and_mul", "gelu_new", "gelu_new_and_mul", "relu", "relu2", "relu2_and_mul",
                                 "quick_gelu", "silu_written"))
def test_every_activation_input_equals_eager_cuda(act, dtype, recipe):
    """Every float16/bfloat16 bit pattern (NaN, inf and subnormals included) as a SiLU (gelu_new, ReLU,
    squared ReLU; plain or gated) input: the fused op's bytes equal eager CUDA's ops (F.silu, ..., times
    up where gated) followed by fp4op.quantize exactly, through both the split and the elementwise kernel
    and every layout (no reduction-order allowance: the kernels round
    torch's float32 value). FP4 codes hide most one-ulp differences in the activation, so the bit-for-bit
    guarantee of the activation itself is test_activation_math_every_input's; this is the end-to-end
    check. (The ~10 bfloat16 rows of values below 2^-117, all subnormals among them, get an infinite
    per-row scale and saturate; every other row quantizes to live codes.)"""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    every = bits.view(dtype).reshape(-1, 256).cuda()  # a block: 16 neighbouring bit patterns
    # 256 rows take the split kernel (small inputs), 64 copies of them the elementwise kernel
    for x in (every, every.repeat(64, 1)):
        up = make_input(x.shape, dtype, "cuda", seed=7).clamp(-4, 4)
        gated = act.endswith("_and_mul")
        base = act.removesuffix("_and_mul")
        y = eager_act(base, x) * up if gated else eager_act(act, x)
        # per row (a row spans 2 binades of bfloat16, a quarter of one of float16), so that every row's
        # blocks quantize to live codes; finite, so that only the inf/NaN blocks saturate
        gs = fp4op.nvfp4_global_scale(torch.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0), per_row=True)
        for layout in LAYOUTS:
            kw = quantize_kwargs(recipe, layout, gs)
            if gated:
                op, args = gated_op(base, x, up)
                got = op(*args, **kw)
            elif act.startswith("relu"):
                got = OPS.relu_quantize(x, act == "relu2", **kw)
            elif act in ("quick_gelu", "silu_written"):
                got = OPS.sigmoid_mul_quantize(x, 1.702 if act == "quick_gelu" else 1.0, **kw)
            else:
                got = (OPS.gelu_new_quantize if act == "gelu_new" else OPS.silu_quantize)(x, **kw)
            want = OPS.quantize(y, **kw)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (x.shape, layout)


# K = 2096: one held block a thread, 8192: two, 16384 and 20480: read again from memory; at M <= 16 the
# rows of K = 16384-20480 (NVFP4) take the cluster kernel (a CTA a pass), the batch of 512 norm_kernel
@requires_cuda
@pytest.mark.parametrize("k", (2096, 8192, 16384, 20480))
@pytest.mark.parametrize("name", NORMS)
def test_cuda_decode_rows_match_batch_rows(name, k):
    """A row's result does not depend on how many rows are quantized with it (launch geometry, grid-stride
    loop, padding CTAs): a decode-size call's bytes equal the same rows' bytes in a batch of 512, and its
    sf padding is zero."""
    m_batch = 512
    for recipe in (r for r in RECIPES if k % RECIPES[r][0] == 0):
        vec = RECIPES[recipe][0]
        x = make_input((m_batch, k), torch.bfloat16, "cuda", seed=11)
        op, args, y_ref, _ = norm_case(name, x, 1e-6, "cuda")
        gs = global_scale_of(y_ref)
        for layout in LAYOUTS:
            kw = quantize_kwargs(recipe, layout, gs)
            batch = op(*args, **kw)
            for m in (1, 5, 16):
                rows = tuple(a[:m] if torch.is_tensor(a) and a.dim() == 2 else a for a in args)
                small = op(*rows, **kw)
                assert torch.equal(small[0], batch[0][:m]), (recipe, layout, m)
                sf_small = layouts.unswizzle(small[1], m, k // vec, layout)
                assert torch.equal(sf_small, layouts.unswizzle(batch[1], m_batch, k // vec, layout)[:m])
                assert torch.equal(small[1].flatten(), layouts.swizzle(sf_small, layout).flatten())
                for extra_small, extra_batch in zip(small[2:], batch[2:]):
                    assert torch.equal(extra_small, extra_batch[:m])


@requires_cuda
@pytest.mark.parametrize("eps_device", ["cpu", "cuda"])
def test_eps_tensor_overloads_cuda(eps_device):
    check_eps_tensor_overloads("cuda", eps_device)


@requires_cuda
@pytest.mark.parametrize("coef_device", ["cpu", "cuda"])
def test_gelu_new_coef_tensor_cuda(coef_device):
    check_gelu_new_coef_tensor("cuda", coef_device)


@requires_cuda
def test_gelu_new_coef_on_device_in_cuda_graph():
    """A sqrt_2_over_pi tensor on x's device is read by the kernel: a captured graph follows its value."""
    x, gs = make_input((33, 128), torch.bfloat16, "cuda"), torch.tensor([30.0], device="cuda")
    coef = torch.tensor(0.5, device="cuda")

    def fn():
        return OPS.gelu_new_quantize(x, gs, sqrt_2_over_pi=coef)

    graph, graph_out = capture_cuda_graph(fn)
    for value in (0.5, math.sqrt(2.0 / math.pi), 2.0):
        coef.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        want = OPS.quantize(gelu_new_with(x, float(coef.item())), gs)
        assert all(torch.equal(a, b) for a, b in zip(graph_out, want)), value


@requires_cuda
def test_eps_tensor_on_device_in_cuda_graph():
    """An eps tensor on x's device is read by the kernel: a captured graph follows its value."""
    x, w = make_input((33, 128), torch.bfloat16, "cuda"), make_affine(128, torch.bfloat16, "cuda")
    gs, eps = torch.tensor([30.0], device="cuda"), torch.tensor(1e-6, device="cuda")

    def fn():
        return OPS.rms_norm_quantize_eps_tensor(x, w, eps, 0.0, True, gs)

    graph, graph_out = capture_cuda_graph(fn)
    for value in (1e-6, 0.5, 4.0):
        eps.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        want = OPS.rms_norm_quantize(x, w, float(eps.item()), 0.0, True, gs)
        assert all(torch.equal(a, b) for a, b in zip(graph_out, want)), value


@requires_cuda
def test_cuda_strided_halves_and_stream():
    h = 4096
    t = make_input((9, 2 * h), torch.bfloat16, "cuda")
    kw = quantize_kwargs("nvfp4", "128x4", torch.tensor([20.0], device="cuda"))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = OPS.silu_and_mul_quantize(t[:, :h], t[:, h:], **kw)
    stream.synchronize()
    want = OPS.silu_and_mul_quantize(t[:, :h].contiguous(), t[:, h:].contiguous(), **kw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # a view at an address that is not 16-byte aligned falls back to an aligned copy
    odd = make_input((4, 16 * 65 + 4), torch.float16, "cuda")[:, 4:]  # 8-byte aligned rows
    got = OPS.gelu_quantize(odd, **kw)
    want = OPS.gelu_quantize(odd.contiguous(), **kw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
