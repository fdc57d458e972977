"""The CPU fused ops against the exact operation order of torch's CPU kernels, on the inputs where that
order shows: LayerNorm rows whose mean is large next to their spread (torch's CPU kernel computes
x * rstd + (-rstd * mean), FMA-contracted in its AVX2/AVX512 builds, not (x - mean) * rstd), zero
weights (torch's CPU kernel adds a zero bias when there is none, so a weight-only -0 comes out +0),
GELU of every float16/bfloat16 value (torch's vectorized erf and tanh are not std::erf / std::tanh, and
differ between its AVX2 and AVX512 builds: the CPU ops call torch's activation kernel) and activations
of non-finite gates. The same kernels run in torch 2.11 and 2.14; the DEFAULT (no AVX) build of torch's
kernels is checked in a child process."""

import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fusion_helpers import assert_fp4_close
from fp4op import layouts
from test_fused_ops import RECIPES, quantize_kwargs

OPS = torch.ops.fp4op
DTYPES = (torch.float16, torch.bfloat16)
M, K = 64, 256
AFFINES = ("weight,bias", "weight", "bias", "none")
CONSTANT_ROWS = slice(1, None, 4)
# set in the child process of test_layer_norm_default_cpu_build
CHILD_ENV = "FP4OP_TEST_CPU_CAPABILITY_CHILD"


def layer_norm_inputs(dtype, affine):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, K, generator=g) * 3
    x[::2] += 40.0  # mean >> spread: the normalization's rounding order decides many elements
    # constant rows: mean and variance (0) are exact in any reduction order, and x * rstd - rstd * mean
    # is the rounding error of rstd * mean where the kernel contracts it, 0 where it does not
    x[CONSTANT_ROWS] = torch.linspace(-50.0, 50.0, len(range(M)[CONSTANT_ROWS])).round().unsqueeze(1) + 0.25
    w = torch.randn(K, generator=g) * 0.5 + 1
    w[::17] = 0.0
    w[5::17] = -0.0
    b = torch.randn(K, generator=g) * 0.1
    w = w.to(dtype) if "weight" in affine else None
    b = b.to(dtype) if "bias" in affine else None
    return x.to(dtype), w, b


def check_layer_norm(dtype, affine, recipe):
    x, w, b = layer_norm_inputs(dtype, affine)
    kw = quantize_kwargs(recipe, layouts.SWIZZLED_128x4, torch.tensor([2.0]))
    got = OPS.layer_norm_quantize(x, w, b, 1e-5, **kw)
    want = OPS.quantize(F.layer_norm(x, (K,), w, b, 1e-5), **kw)
    vec = RECIPES[recipe][0]
    assert_fp4_close(got, want, vec)
    # the constant rows bit for bit
    assert torch.equal(got[0][CONSTANT_ROWS], want[0][CONSTANT_ROWS])
    scales = [layouts.unswizzle(sf, M, K // vec, layouts.SWIZZLED_128x4)[CONSTANT_ROWS] for sf in (got[1], want[1])]
    assert torch.equal(*scales)
    if affine == "weight":
        # w * normed + 0 in torch's CPU kernel: exactly +0 (E2M1 code 0, not 8) where the weight is +-0
        codes = torch.stack((got[0] & 0xF, got[0] >> 4), -1).reshape(M, K)
        assert (codes[:, w == 0] == 0).all()


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_like_torch_cpu(dtype, affine, recipe):
    check_layer_norm(dtype, affine, recipe)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86's DEFAULT kernel build")
@pytest.mark.skipif(os.environ.get(CHILD_ENV) == "1", reason="runs in the child process only")
def test_layer_norm_default_cpu_build():
    """torch's DEFAULT (no AVX) CPU kernels round every step and call std::erf / std::tanh: the ops follow
    ATEN_CPU_CAPABILITY=default, which torch reads once per process, hence the child process."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", **{CHILD_ENV: "1"})
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-p", "no:cacheprovider", __file__],
        cwd=os.path.dirname(__file__),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout, result.stdout[-3000:]


def non_finite_gate(dtype):
    """Zeros (whose activation is exact) with +inf, -inf and NaN in some blocks."""
    gate = torch.zeros(8, K)
    gate[1, 3], gate[2, 70], gate[3, 200] = float("inf"), float("-inf"), float("nan")
    gate[5, 0:3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    return gate.to(dtype)


def assert_activations_like_eager(gate, up, approximate, kw):
    """Every fused activation op on (gate, up) == fp4op.quantize of the eager composition, bit for bit."""
    cases = (
        (OPS.gelu_and_mul_quantize(gate, up, approximate, **kw), F.gelu(gate, approximate=approximate) * up),
        (OPS.gelu_quantize(gate, approximate, **kw), F.gelu(gate, approximate=approximate)),
        (OPS.silu_and_mul_quantize(gate, up, **kw), F.silu(gate) * up),
        (OPS.silu_quantize(gate, **kw), F.silu(gate)),
        (OPS.silu_quantize(up, **kw), F.silu(up)),
    )
    for got, y in cases:
        want = OPS.quantize(y.reshape(-1, y.shape[-1]), **kw)
        assert torch.equal(got[0].reshape(want[0].shape), want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("approximate", ("none", "tanh"))
@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_activations_of_non_finite_like_torch_cpu(dtype, recipe, approximate):
    gate = non_finite_gate(dtype)
    up = torch.full_like(gate, 1.5)
    kw = quantize_kwargs(recipe, layouts.SWIZZLED_128x4, torch.tensor([2.0]))
    assert_activations_like_eager(gate, up, approximate, kw)


@pytest.mark.parametrize("approximate", ("none", "tanh"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gelu_of_every_value_like_torch_cpu(dtype, approximate):
    """F.gelu of every finite float16/bfloat16 value (torch's vectorized CPU erf is a polynomial, its
    tanh saturates early), times a random up, quantized: every block as the eager composition."""
    gate = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(-1, K)
    gate = torch.where(gate.isfinite(), gate, torch.zeros_like(gate))
    up = torch.randn(gate.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    kw = quantize_kwargs("mxfp4", layouts.SWIZZLED_128x4)
    got = OPS.gelu_and_mul_quantize(gate, up, approximate, **kw)
    want = OPS.quantize(F.gelu(gate, approximate=approximate) * up, **kw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("approximate", ("none", "tanh"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_activations_of_views_with_tails_like_torch_cpu(dtype, approximate):
    """gate and up as the halves of one tensor, 272 columns (torch's vectorized loop leaves a scalar
    tail in each row), and a rank-3 input: bit for bit the eager composition on the same views."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 9, 2 * 272, generator=g) * 3).to(dtype)
    gate, up = x.chunk(2, dim=-1)
    kw = quantize_kwargs("nvfp4", layouts.SWIZZLED_128x4, torch.tensor([3.0]))
    assert_activations_like_eager(gate, up, approximate, kw)
