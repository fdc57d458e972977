"""NVIDIA's own host conversion functions (cuda_fp4.h / cuda_fp8.h of the CUDA toolkit) as the oracle
of the narrowing conversions of SPEC.md: fp4op's C++ numerics (csrc/numerics.h, used by the CPU and
CUDA kernels) and fp4op.reference must equal them on every fp16 and bf16 value times many scales, on
a strided sweep of all float32 bit patterns, and on the special values and midpoints."""

import hashlib
import math
import os
import pathlib
import shutil
import tempfile

import pytest
import torch

from fp4op import reference

CUDA_INCLUDE = pathlib.Path("/usr/local/cuda/include")
CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc"

pytestmark = pytest.mark.skipif(
    not (CUDA_INCLUDE / "cuda_fp4.h").exists(), reason="needs the CUDA toolkit headers (cuda_fp4.h)"
)

# Rows of the result: the oracle and ours for each conversion.
ORACLE_SOURCE = r"""
#include <cuda_fp8.h>
#include <cuda_fp4.h>
#include "numerics.h"

// For float32 x [N]: int32 [7, N] with rows
// 0 NVIDIA e2m1, 1 fp4op::e2m1_code_software, 2 low and 3 high nibble of fp4op::e2m1x2,
// 4 NVIDIA e4m3 vs 5 fp4op::float_to_e4m3, 6 NVIDIA e8m0 vs 7 fp4op::float_to_ue8m0_ceil.
torch::Tensor convert(torch::Tensor x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.device().is_cpu());
  const int64_t n = x.numel();
  torch::Tensor out = torch::empty({8, n}, x.options().dtype(torch::kInt));
  const float* v = x.data_ptr<float>();
  int32_t* o = out.data_ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i) {
    const float f = v[i];
    const float g = v[n - 1 - i];  // another value for the high nibble
    o[0 * n + i] = int32_t(__nv_cvt_float_to_fp4(f, __NV_E2M1, cudaRoundNearest));
    o[1 * n + i] = int32_t(fp4op::e2m1_code_software(f));
    const uint32_t packed = fp4op::e2m1x2(f, g);
    o[2 * n + i] = int32_t(packed & 0xFu);
    o[3 * n + (n - 1 - i)] = int32_t(packed >> 4);
    o[4 * n + i] = int32_t(__nv_cvt_float_to_fp8(f, __NV_SATFINITE, __NV_E4M3));
    o[5 * n + i] = int32_t(fp4op::float_to_e4m3(f));
    o[6 * n + i] = int32_t(__nv_cvt_float_to_e8m0(f, __NV_SATFINITE, cudaRoundPosInf));
    o[7 * n + i] = int32_t(fp4op::float_to_ue8m0_ceil(f));
  }
  return out;
}
"""


@pytest.fixture(scope="module")
def oracle():
    from torch.utils.cpp_extension import is_ninja_available, load_inline

    if not is_ninja_available() or not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("building the oracle needs ninja and a C++ compiler")

    numerics = (CSRC / "numerics.h").read_bytes()
    # the build directory is keyed by the sources, so an edited numerics.h rebuilds and a rerun doesn't
    key = hashlib.sha256(ORACLE_SOURCE.encode() + numerics).hexdigest()[:16]
    build_dir = pathlib.Path(tempfile.gettempdir()) / f"fp4op_numerics_oracle_{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    module = load_inline(
        name=f"fp4op_numerics_oracle_{key}",
        cpp_sources=ORACLE_SOURCE,
        functions=["convert"],
        extra_include_paths=[str(CUDA_INCLUDE), str(CSRC)],
        # the same IEEE rules as the fp4op build: no contraction, no fast math
        extra_cflags=["-O1", "-ffp-contract=off"],
        build_directory=str(build_dir),
        verbose=False,
    )
    return module.convert


def f32_from_bits(bits):
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


def all_16bit_values(dtype):
    v = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    return v.to(torch.float32)


def special_values():
    """Zeros, infinities, NaNs (payloads, signs), denormals, FLT_MAX, the E2M1 / E4M3 midpoints and
    UE8M0 boundaries with their float32 neighbours."""
    vals = [0.0, -0.0, math.inf, -math.inf, 3.4028234663852886e38, 1.1754943508222875e-38, 1e-45]
    e2m1_mid = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 7.0, 8.0]
    e4m3 = torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
    e4m3_mid = ((e4m3[1:] + e4m3[:-1]) / 2).tolist() + [448.0, 464.0, 480.0, 2.0**-10, 3 * 2.0**-11]
    pow2 = [2.0**e for e in range(-149, 128)] + [2.0**-127 * 1.5, 2.0**-126 * 1.5]
    base = torch.tensor(vals + e2m1_mid + e4m3_mid + pow2, dtype=torch.float32)
    bits = base.view(torch.int32)
    # the float32 neighbours: exact midpoints and values one ulp to either side
    around = torch.cat([bits, bits + 1, bits - 1]).clamp(min=0).view(torch.float32)
    around = torch.cat([around, -around])
    nans = f32_from_bits([0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0xFFC00000, 0xFF800001, 0x7FA00000])
    return torch.cat([around, nans])


def scaled_16bit_values():
    """Every fp16 and bf16 value times scales like those the kernels apply: powers of two, RN(1/6),
    448 * 6 / amax-style global scales, and scales that put the E2M1 grid on midpoints."""
    base = torch.cat([all_16bit_values(torch.float16), all_16bit_values(torch.bfloat16)])
    scales = [2.0**e for e in range(-140, 131, 10)] + [
        reference.RCP6,
        1 / 3,
        0.1,
        448 * 6 / 3.0,
        448 * 6 / 1000.0,
        448 * 6 / 65504.0,
        448 * 6 / 0.0123,
        2688.0 / 7.0,
        0.25 * 3,
        1.25,
    ]
    return torch.cat([base * torch.tensor(s, dtype=torch.float32) for s in scales])


def float32_bit_sweep():
    """Every 4099th float32 bit pattern: all exponents, signs, NaNs and mantissa patterns."""
    return torch.arange(0, 2**32, 4099, dtype=torch.int64).to(torch.int32).view(torch.float32)


INPUTS = {"special": special_values, "scaled_fp16_bf16": scaled_16bit_values, "float32_sweep": float32_bit_sweep}


def assert_equal_codes(got, want, x, what):
    bad = (got != want).nonzero().flatten()
    if bad.numel():
        i = bad[:6]
        raise AssertionError(
            f"{what}: {bad.numel()} of {x.numel()} differ; first (x, x bits, got, want): "
            + str(list(zip(x[i].tolist(), [hex(b & 0xFFFFFFFF) for b in x[i].view(torch.int32).tolist()],
                           got[i].tolist(), want[i].tolist())))
        )


@pytest.mark.parametrize("inputs", list(INPUTS))
def test_cpp_numerics_equal_nvidia(oracle, inputs):
    x = INPUTS[inputs]().contiguous()
    r = oracle(x)
    assert_equal_codes(r[1], r[0], x, "fp4op::e2m1_code_software vs __nv_cvt_float_to_fp4")
    assert_equal_codes(r[2], r[0], x, "fp4op::e2m1x2 low nibble vs __nv_cvt_float_to_fp4")
    assert_equal_codes(r[3], r[0], x, "fp4op::e2m1x2 high nibble vs __nv_cvt_float_to_fp4")
    assert_equal_codes(r[5], r[4], x, "fp4op::float_to_e4m3 vs __nv_cvt_float_to_fp8(satfinite, e4m3)")
    assert_equal_codes(r[7], r[6], x, "fp4op::float_to_ue8m0_ceil vs __nv_cvt_float_to_e8m0(satfinite, rp)")


@pytest.mark.parametrize("inputs", list(INPUTS))
def test_reference_equals_nvidia(oracle, inputs):
    x = INPUTS[inputs]().contiguous()
    r = oracle(x)
    assert_equal_codes(reference.float_to_e2m1(x).to(torch.int32), r[0], x, "reference.float_to_e2m1")
    assert_equal_codes(reference.float_to_e4m3(x).to(torch.int32), r[4], x, "reference.float_to_e4m3")
    assert_equal_codes(reference.float_to_ue8m0_ceil(x).to(torch.int32), r[6], x, "reference.float_to_ue8m0_ceil")


def test_oracle_sanity(oracle):
    # the oracle itself on SPEC.md's stated facts, so a mis-built oracle cannot pass vacuously
    x = torch.tensor([0.75, -0.1, math.nan, 7.0, 500.0, math.nan, 1.0, 1.5, 2.0**-130], dtype=torch.float32)
    r = oracle(x)
    assert r[0, :4].tolist() == [0x2, 0x8, 0x7, 0x7]
    assert r[4, 4].item() == 0x7E and r[4, 5].item() == 0x7F
    assert r[6, 6].item() == 127 and r[6, 7].item() == 128 and r[6, 8].item() == 0
