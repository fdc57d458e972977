// Element math of the fused "norm/activation + FP4 quantize" ops, shared by the CPU and CUDA kernels
// (host and device). Each formula reproduces what eager PyTorch computes for a float16/bfloat16
// tensor: float32 "opmath" in the same operation order as torch's kernels, then one rounding to the
// model dtype where eager rounds. The rounded values are what fp4op::quantize then sees.
// Plain C++/CUDA: no torch headers.
#pragma once

#include "numerics.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace fp4op::fused {

// ---- rounding to the model dtype (round to nearest even), as float32 ------------------------------

// float32 -> bfloat16 -> float32. NaN stays NaN (its payload is irrelevant to quantization).
FP4OP_HD float round_to_bf16(float x) {
#if defined(__CUDA_ARCH__)
  // the packing conversion (one F2FP) instead of the scalar one, which issues on the slow conversion
  // pipe; the same rounding
  const __nv_bfloat162 pair = __floats2bfloat162_rn(x, x);
  return __uint_as_float(*reinterpret_cast<const uint32_t*>(&pair) & 0xFFFF0000u);
#else
  // selects by mask (no control flow: the CPU loops that call this vectorize)
  const uint32_t u = float_to_bits(x);
  const uint32_t is_nan = 0u - uint32_t((u & 0x7FFFFFFFu) > 0x7F800000u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  return bits_to_float((u & is_nan) | (rounded & ~is_nan));
#endif
}

// float32 -> float16 bits, round to nearest even, overflow to +-inf, NaN -> quiet NaN. Every case is
// computed and one selected by masks (no control flow: the CPU loops that call this vectorize).
FP4OP_HD uint16_t float_to_fp16_bits(float x) {
  const uint32_t u = float_to_bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  // below 2^-14: a float16 subnormal, a multiple of 2^-24; adding 0.5 (ulp 2^-24) rounds RNE
  const uint32_t subnormal = float_to_bits(add_rn(bits_to_float(a), 0.5f)) - 0x3F000000u;
  const uint32_t normal = (a + 0xFFFu + ((a >> 13) & 1u) - (112u << 23)) >> 13;  // rebias 127 -> 15
  const uint32_t is_nan = 0u - uint32_t(a > 0x7F800000u);
  const uint32_t is_inf = ~is_nan & (0u - uint32_t(a >= 0x477FF000u));  // >= 65520 rounds to inf
  const uint32_t is_subnormal = 0u - uint32_t(a < 0x38800000u);
  const uint32_t finite = (subnormal & is_subnormal) | (normal & ~is_subnormal);
  const uint32_t code = (0x7E00u & is_nan) | (0x7C00u & is_inf) | (finite & ~(is_nan | is_inf));
  return uint16_t(sign | (code & 0xFFFFu));
}

FP4OP_HD float round_to_fp16(float x) {
#if defined(__CUDA_ARCH__)
  return __low2float(__floats2half2_rn(x, x));  // see round_to_bf16
#else
  return fp16_bits_to_float(float_to_fp16_bits(x));
#endif
}

FP4OP_HD float round_to(float x, InputDtype dtype) {
  return dtype == InputDtype::kBFloat16 ? round_to_bf16(x) : round_to_fp16(x);
}

// a * b + c where torch's CUDA kernels compute it with FMA contraction (nvcc's default). On the host
// the product is rounded: this build does not contract (-ffp-contract=off), and the CPU forms that
// torch's vectorized builds contract are spelled out with explicit FMAs (layer_norm_element_cpu).
FP4OP_HD float torch_mul_add(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return add_rn(mul_rn(a, b), c);
#endif
}

// ---- normalization ------------------------------------------------------------------------------

// 1/sqrt(v) as torch computes it: CPU kernels divide by the IEEE square root, CUDA kernels use the
// rsqrtf instruction (approximate but deterministic).
FP4OP_HD float torch_rsqrt(float v) {
#if defined(__CUDA_ARCH__)
  return rsqrtf(v);
#else
  return div_rn(1.0f, sqrtf(v));
#endif
}

// The weight forms of the RMSNorm variants.
enum class RmsWeight : int {
  kNone = 0,         // y = x * r
  kFloat32 = 1,      // y = x * r * (offset + w), weight upcast, float32 math (F.rms_norm, HF Gemma)
  kInputDtype = 2,   // y = round(x * r) * round(offset + w), product in the input dtype (HF Llama)
};

// One RMSNorm output element before its final rounding is applied by `rms_norm_element`.
// `x`: the input element, `r`: rsqrt(mean(x^2) + eps), `w`: the weight element (0 for kNone).
FP4OP_HD float rms_norm_element(float x, float r, float w, float offset, RmsWeight form, InputDtype dtype) {
  const float normed = mul_rn(x, r);
  // without an offset the module multiplies by the weight itself: 0 + w would turn a -0 weight into +0
  // and flip the sign of the zero it produces (E2M1 code 8 vs 0)
  const float scale = offset == 0.0f ? w : add_rn(offset, w);
  switch (form) {
    case RmsWeight::kNone: return round_to(normed, dtype);
    case RmsWeight::kFloat32: return round_to(mul_rn(normed, scale), dtype);
    default: {
      const float w_dtype = round_to(scale, dtype);  // offset + weight in the input dtype
      return round_to(mul_rn(w_dtype, round_to(normed, dtype)), dtype);
    }
  }
}

// F.layer_norm as torch's CUDA kernels compute it: w * ((x - mean) * rstd) + b in float32, one
// rounding (a weight-only or bias-only layer norm leaves the missing term out). The CPU form differs:
// layer_norm_element_cpu.
FP4OP_HD float layer_norm_element(float x, float mean, float rstd, float w, bool has_w, float b, bool has_b,
                                  InputDtype dtype) {
  const float normed = mul_rn(add_rn(x, -mean), rstd);
  float y;
  if (has_w && has_b) {
    y = torch_mul_add(w, normed, b);
  } else {
    y = has_w ? mul_rn(normed, w) : has_b ? add_rn(normed, b) : normed;
  }
  return round_to(y, dtype);
}

// F.layer_norm as torch's CPU kernel computes it (layer_norm_kernel_mixed_type in
// aten/src/ATen/native/cpu/layer_norm_kernel.cpp, the same in torch 2.11 and 2.14):
// (x * rstd + (-rstd * mean)) * w + b, with w = 1 and b = 0 standing in for a missing weight or bias
// (so a weight-only -0 comes out +0). GCC contracts both multiply-adds of that kernel into FMAs in
// torch's AVX2/AVX512 builds (`contracted`); its x86 DEFAULT build has no FMA and rounds every step.
inline float layer_norm_element_cpu(float x, float mean, float rstd, float w, float b, bool contracted,
                                    InputDtype dtype) {
  const float shift = -mul_rn(rstd, mean);
  if (contracted) return round_to(fmaf(fmaf(x, rstd, shift), w, b), dtype);
  return round_to(add_rn(mul_rn(add_rn(mul_rn(x, rstd), shift), w), b), dtype);
}

// ---- activations (float32 opmath, torch's operation order) ----------------------------------------

// F.silu: x / (1 + exp(-x)).
FP4OP_HD float silu_f32(float x) { return div_rn(x, add_rn(1.0f, expf(-x))); }

// GELU constants exactly as torch's kernels form them (double expressions narrowed to float).
constexpr float kGeluErfAlpha = float(0.70710678118654752440);                        // M_SQRT1_2
constexpr float kGeluTanhBeta = float(1.41421356237309504880 * 1.12837916709551257390 * 0.5);  // M_SQRT2 * M_2_SQRTPI / 2
constexpr float kGeluTanhKappa = float(0.044715);

enum class GeluApprox : int { kNone = 0, kTanh = 1 };

// F.gelu(approximate="none"): x * 0.5 * (1 + erf(x * M_SQRT1_2));
// approximate="tanh": 0.5 * x * (1 + tanh(beta * (x + kappa * x^3))), with erf and tanh from CUDA's
// math library as torch's CUDA kernels compute them (the CPU ops call torch's kernel instead).
FP4OP_HD float gelu_f32(float x, GeluApprox approx) {
  if (approx == GeluApprox::kNone) {
    return mul_rn(mul_rn(x, 0.5f), add_rn(1.0f, erff(mul_rn(x, kGeluErfAlpha))));
  }
  const float cube = mul_rn(mul_rn(x, x), x);
  const float inner = mul_rn(kGeluTanhBeta, torch_mul_add(kGeluTanhKappa, cube, x));
  return mul_rn(mul_rn(0.5f, x), add_rn(1.0f, tanhf(inner)));
}

enum class Activation : int { kSilu = 0, kGeluErf = 1, kGeluTanh = 2 };

// act(x) rounded to the model dtype: F.silu(x) / F.gelu(x) of a float16/bfloat16 tensor.
FP4OP_HD float activation_element(float x, Activation act, InputDtype dtype) {
  const float y = act == Activation::kSilu      ? silu_f32(x)
                  : act == Activation::kGeluErf ? gelu_f32(x, GeluApprox::kNone)
                                                : gelu_f32(x, GeluApprox::kTanh);
  return round_to(y, dtype);
}

// F.silu(gate) * up in the model dtype: round(round(act(gate)) * up).
FP4OP_HD float gated_element(float gate, float up, Activation act, InputDtype dtype) {
  return round_to(mul_rn(activation_element(gate, act, dtype), up), dtype);
}

}  // namespace fp4op::fused
