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

// `offset + w`, the factor of an RMSNorm weight form. Without an offset the module multiplies by the
// weight itself: 0 + w would turn a -0 weight into +0 and flip the sign of the zero it produces (E2M1
// code 8 vs 0).
FP4OP_HD float rms_weight_scale(float w, float offset) { return offset == 0.0f ? w : add_rn(offset, w); }

// One RMSNorm output element in the model dtype. `x`: the input element, `r`: rsqrt(mean(x^2) + eps),
// `w`: the weight element in the model dtype (0 for kNone). The GPU kernels compute whole blocks with
// rms_norm_elements and rms_norm_input_dtype_pair, the same results with the roundings paired.
FP4OP_HD float rms_norm_element(float x, float r, float w, float offset, RmsWeight form, InputDtype dtype) {
  const float normed = mul_rn(x, r);
  const float scale = rms_weight_scale(w, offset);
  switch (form) {
    case RmsWeight::kNone: return round_to(normed, dtype);
    case RmsWeight::kFloat32: return round_to(mul_rn(normed, scale), dtype);
    default: return round_to(mul_rn(round_to(scale, dtype), round_to(normed, dtype)), dtype);
  }
}

// F.layer_norm as torch's CUDA kernels compute it before the rounding to the model dtype:
// w * ((x - mean) * rstd) + b in float32 (a weight-only or bias-only layer norm leaves the missing term
// out). The CPU form differs: layer_norm_element_cpu.
FP4OP_HD float layer_norm_unrounded(float x, float mean, float rstd, float w, bool has_w, float b, bool has_b) {
  const float normed = mul_rn(add_rn(x, -mean), rstd);
  if (has_w && has_b) return torch_mul_add(w, normed, b);
  return has_w ? mul_rn(normed, w) : has_b ? add_rn(normed, b) : normed;
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

// kGeluNew: Hugging Face's gelu_new (GPT-2, minGPT's NewGELU), the tanh GELU written out op by op;
// each op of a float16/bfloat16 tensor rounds (gelu_new_rounded). kSigmoidMul: x * sigmoid(alpha * x),
// also op by op (sigmoid_mul_rounded). Neither is an activation_unrounded.
enum class Activation : int {
  kSilu = 0,
  kGeluErf = 1,
  kGeluTanh = 2,
  kGeluNew = 3,
  kRelu = 4,
  kReluSquared = 5,
  kSigmoidMul = 6
};

// torch.relu as its CUDA kernel computes it: a NaN stays NaN, -0 becomes +0. (torch's CPU kernel keeps
// -0; the CPU op calls it, at::relu.)
FP4OP_HD float relu_f32(float x) { return x <= 0.0f ? 0.0f : x; }

// gelu_new's constants as the model code writes them, Python floats (the CPU op passes them to torch's
// ops as such; the CUDA kernels' float32 opmath narrows them, as torch's CUDA kernels do).
constexpr double kGeluNewSqrt2OverPi = 0.7978845608028654;  // math.sqrt(2.0 / math.pi)
constexpr double kGeluNewKappa = 0.044715;
// sqrt(2 / pi) as the kernels multiply by it (float32 opmath). The ops also take it as a tensor: under
// torch.compile(dynamic=True) Dynamo lifts math.pi into a graph input and computes the factor in the graph.
constexpr float kGeluNewCoef = float(kGeluNewSqrt2OverPi);

// `0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))` as eager
// CUDA computes it for a float16/bfloat16 x: every op one kernel, float32 opmath rounded to the model
// dtype at its end. torch's CUDA pow kernel for exponent 3 multiplies in the tensor's dtype,
// (x * x) * x with two roundings; the scalars multiply as float32; tanh is CUDA's tanhf. (The CPU op
// calls the same ATen ops instead: eager_activation in csrc/cpu/fused.cpp.)
FP4OP_HD float gelu_new_rounded(float x, InputDtype dtype) {
  const float half_x = round_to(mul_rn(x, 0.5f), dtype);
  const float cube = round_to(mul_rn(round_to(mul_rn(x, x), dtype), x), dtype);
  const float inner = round_to(add_rn(x, round_to(mul_rn(cube, float(kGeluNewKappa)), dtype)), dtype);
  const float t = round_to(tanhf(round_to(mul_rn(inner, float(kGeluNewSqrt2OverPi)), dtype)), dtype);
  return round_to(mul_rn(half_x, round_to(add_rn(t, 1.0f), dtype)), dtype);
}

// torch.sigmoid as torch's CUDA kernel computes it, 1 / (1 + exp(-x)) in float32 (the CPU op calls
// torch's own kernel).
FP4OP_HD float sigmoid_f32(float x) { return div_rn(1.0f, add_rn(1.0f, expf(-x))); }

// `x * torch.sigmoid(alpha * x)` as eager CUDA computes it for a float16/bfloat16 x, each op rounded to
// the model dtype: QuickGELU (CLIP, OpenCLIP, Hugging Face's QuickGELUActivation) with alpha = 1.702,
// SiLU written out (`x * torch.sigmoid(x)`: alpha = 1, whose product is exact) with 1. alpha multiplies
// as float32, as a Python float scalar does.
FP4OP_HD float sigmoid_mul_rounded(float x, float alpha, InputDtype dtype) {
  const float s = round_to(sigmoid_f32(round_to(mul_rn(x, alpha), dtype)), dtype);
  return round_to(mul_rn(x, s), dtype);
}

// act(x) in float32, before the rounding to the model dtype: F.silu / F.gelu / F.relu (squared) of a
// float16/bfloat16 tensor rounds this once.
FP4OP_HD float activation_unrounded(float x, Activation act) {
  switch (act) {
    case Activation::kSilu: return silu_f32(x);
    case Activation::kGeluErf: return gelu_f32(x, GeluApprox::kNone);
    case Activation::kRelu: return relu_f32(x);
    // F.relu(x) ** 2 / torch.square: pow's exponent-2 kernel, x * x rounded once (exact in float32)
    case Activation::kReluSquared: return mul_rn(relu_f32(x), relu_f32(x));
    default: return gelu_f32(x, GeluApprox::kTanh);
  }
}

#if defined(__CUDACC__)
// ---- whole blocks on the GPU ----------------------------------------------------------------------
// The GPU kernels compute a scale block's elements two at a time, so that the roundings to the model
// dtype pair up: one packing conversion (F2FP) rounds two values, where round_to spends one on each.
// (Pairs, not whole blocks, step by step: a block-wide array of weights lived in registers across the
// steps and cost the BPT = 4 RMSNorm kernel a CTA an SM.)

// The model-dtype bits of (lo, hi) rounded to nearest even, lo in the low half.
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi, InputDtype dtype) {
  if (dtype == InputDtype::kBFloat16) {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&pair);
  }
  const __half2 pair = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&pair);
}

// unpacks pack_pair's bits into (lo, hi).
__device__ __forceinline__ void unpack_pair(uint32_t bits, float& lo, float& hi, InputDtype dtype) {
  if (dtype == InputDtype::kBFloat16) {
    lo = __uint_as_float(bits << 16);
    hi = __uint_as_float(bits & 0xFFFF0000u);
  } else {
    const float2 pair = __half22float2(*reinterpret_cast<const __half2*>(&bits));
    lo = pair.x;
    hi = pair.y;
  }
}

// round_to of both values.
__device__ __forceinline__ void round_pair(float& lo, float& hi, InputDtype dtype) {
  unpack_pair(pack_pair(lo, hi, dtype), lo, hi, dtype);
}

// Packed products and sums of two model-dtype pairs (one instruction for both values). Equal to eager's
// float32 operation rounded to the model dtype: a product of two float16/bfloat16 values is exact in
// float32 (also below float32's subnormal grid: rms_norm_input_dtype_pair), and a sum is inexact in
// float32 only when the operands' exponents lie 14 (float16) / 17 (bfloat16) or more apart, where the
// smaller one is far below half an ulp of the larger, which both roundings return.
template <typename Op>
__device__ __forceinline__ uint32_t on_pairs(uint32_t a, uint32_t b, InputDtype dtype, Op op) {
  if (dtype == InputDtype::kBFloat16) {
    const __nv_bfloat162 r = op(*reinterpret_cast<const __nv_bfloat162*>(&a), *reinterpret_cast<const __nv_bfloat162*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  const __half2 r = op(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
  return *reinterpret_cast<const uint32_t*>(&r);
}

__device__ __forceinline__ uint32_t mul_pair(uint32_t a, uint32_t b, InputDtype dtype) {
  return on_pairs(a, b, dtype, [](auto x, auto y) { return __hmul2(x, y); });
}

__device__ __forceinline__ uint32_t add_pair(uint32_t a, uint32_t b, InputDtype dtype) {
  return on_pairs(a, b, dtype, [](auto x, auto y) { return __hadd2(x, y); });
}

// rms_norm_element's kInputDtype form of a pair, round(round(x * r) * w), with the weight factors
// round(offset + w) given as the packed pair `w2`: one packed multiply in the model dtype instead of
// widening both factors, a float32 product and a second rounding. The same bits: a product of two
// float16 values is exact in float32, and so is one of two bfloat16 values unless it falls below
// float32's subnormal grid (2^-149), where the float32 rounding could only change the bfloat16 one by
// landing exactly on a bfloat16 midpoint, which takes a significand product of 2^16 - 1 = 255 * 257,
// more than two 8-bit significands make.
__device__ __forceinline__ void rms_norm_input_dtype_pair(float& lo, float& hi, float r, uint32_t w2,
                                                          InputDtype dtype) {
  unpack_pair(mul_pair(w2, pack_pair(mul_rn(lo, r), mul_rn(hi, r), dtype), dtype), lo, hi, dtype);
}

// rms_norm_element of each of `x` (replaced by the outputs), forms kNone and kFloat32 (kInputDtype:
// rms_norm_input_dtype_pair). The kernels pass a literal 0 offset where the module has none, which
// takes the offset test out of the element loop.
template <int N>
__device__ __forceinline__ void rms_norm_elements(float (&x)[N], float r, const float (&w)[N], float offset,
                                                  RmsWeight form, InputDtype dtype) {
  static_assert(N % 2 == 0, "pairs");
#pragma unroll
  for (int e = 0; e < N; e += 2) {
    float lo = mul_rn(x[e], r), hi = mul_rn(x[e + 1], r);
    if (form == RmsWeight::kFloat32) {
      lo = mul_rn(lo, rms_weight_scale(w[e], offset));
      hi = mul_rn(hi, rms_weight_scale(w[e + 1], offset));
    }
    round_pair(lo, hi, dtype);
    x[e] = lo;
    x[e + 1] = hi;
  }
}

// F.layer_norm (layer_norm_unrounded, rounded) of each of `x` (replaced by the outputs).
template <int N>
__device__ __forceinline__ void layer_norm_elements(float (&x)[N], float mean, float rstd, const float (&w)[N],
                                                    bool has_w, const float (&b)[N], bool has_b, InputDtype dtype) {
  static_assert(N % 2 == 0, "pairs");
#pragma unroll
  for (int e = 0; e < N; e += 2) {
    x[e] = layer_norm_unrounded(x[e], mean, rstd, w[e], has_w, b[e], has_b);
    x[e + 1] = layer_norm_unrounded(x[e + 1], mean, rstd, w[e + 1], has_w, b[e + 1], has_b);
    round_pair(x[e], x[e + 1], dtype);
  }
}

// The bounds of silu_pair's fast path: relative error of its y against silu_f32 below kSiluFastError,
// for x >= kSiluFastMin.
constexpr float kSiluFastMin = -8.0f;
constexpr float kSiluFastError = 0x1p-19f;

// 2^a by the bare ex2.approx.ftz instruction (2 ulps, as CUDA documents exp2f, which adds subnormal
// handling around it: 3 more instructions; here a result below 2^-126 flushes to 0, no matter: silu_pair
// adds it to 1).
__device__ __forceinline__ float ex2_approx_ftz(float a) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(a));
  return r;
}

// silu_pair's fast value of F.silu. silu_pair gives round_to(silu_f32(x)) of both values, the same
// bits, mostly without silu_f32's exponential (9 instructions) and IEEE division (8, and a slow-path
// branch): y = x * rcp.approx(1 + t) (__fdividef), t = ex2.approx(RN(-x * RN(log2 e))). For x >= -8,
// t is within 8.3e-7 of e^-x relatively (the exponent's error, |x| 1.05e-7 from the rounded constant
// and product, makes 5.9e-7 at |x| = 8; ex2.approx's 2 ulps 2.4e-7), which 1 / (1 + t) carries at most
// whole; the sum (0.6e-7) and __fdividef (2 ulps, 2.4e-7) add 3e-7: y is within 1.13e-6 of
// x / (1 + e^-x), and silu_f32(x) within 3.6e-7 of it (expf's 2 ulps, two roundings): 1.49e-6 =
// 2^-19.36 apart in all. So silu_f32(x) lies between y (1 - 2^-19) and y (1 + 2^-19) (each rounded to
// float32: 2^-24 less, 1.85e-6 left), and where those two round to the same model-dtype value, so does
// silu_f32(x): rounding is monotonic. Where they do not (a rounding boundary within 2^-19 of y: 259 of
// the ~49,300 finite bfloat16 inputs from -8 up, 231 of the ~50,200 float16 ones), and for x < -8 or
// NaN, silu_pair takes silu_f32 itself. (A float32-subnormal y comes only from a float32-subnormal x,
// where y = x / 2 exactly on both paths.) tests/cuda/activation_exhaustive.cu checks every float16 and
// bfloat16 input, and that the measured error stays inside the 2^-19.36.
__device__ __forceinline__ float silu_fast(float x) {
  constexpr float kLog2e = 1.44269504088896340736f;
  return __fdividef(x, 1.0f + ex2_approx_ftz(-x * kLog2e));
}

__device__ __forceinline__ void silu_pair(float& lo, float& hi, InputDtype dtype) {
  const float y_lo = silu_fast(lo), y_hi = silu_fast(hi);
  const uint32_t below = pack_pair(y_lo * (1.0f - kSiluFastError), y_hi * (1.0f - kSiluFastError), dtype);
  const uint32_t above = pack_pair(y_lo * (1.0f + kSiluFastError), y_hi * (1.0f + kSiluFastError), dtype);
  uint32_t bits = below;
  if (below != above || !(lo >= kSiluFastMin && hi >= kSiluFastMin)) {
    bits = pack_pair(silu_f32(lo), silu_f32(hi), dtype);
  }
  unpack_pair(bits, lo, hi, dtype);
}

// gelu_new_rounded of both values: the products and sums of two model-dtype values packed (mul_pair,
// add_pair), the products by float32 constants and tanh in float32 with paired roundings; `coef` is
// sqrt(2 / pi) (kGeluNewCoef, or the value the op was given).
__device__ __forceinline__ void gelu_new_pair(float& lo, float& hi, InputDtype dtype, float coef) {
  const uint32_t x = pack_pair(lo, hi, dtype);  // exact: lo and hi are model-dtype values
  const uint32_t half = pack_pair(0.5f, 0.5f, dtype), one = pack_pair(1.0f, 1.0f, dtype);
  const uint32_t half_x = mul_pair(x, half, dtype);
  const uint32_t cube = mul_pair(mul_pair(x, x, dtype), x, dtype);
  float a, b;
  unpack_pair(cube, a, b, dtype);
  constexpr float kappa = float(kGeluNewKappa);
  const uint32_t inner = add_pair(x, pack_pair(mul_rn(a, kappa), mul_rn(b, kappa), dtype), dtype);
  unpack_pair(inner, a, b, dtype);
  unpack_pair(pack_pair(mul_rn(a, coef), mul_rn(b, coef), dtype), a, b, dtype);
  const uint32_t t = pack_pair(tanhf(a), tanhf(b), dtype);
  unpack_pair(mul_pair(half_x, add_pair(t, one, dtype), dtype), lo, hi, dtype);
}

// act of both values rounded to the model dtype: round_to(activation_unrounded(x, act)), or
// gelu_new_rounded (with coef its sqrt(2 / pi)), or sigmoid_mul_rounded (coef its alpha).
__device__ __forceinline__ void activation_pair(float& lo, float& hi, Activation act, InputDtype dtype,
                                                float coef) {
  if (act == Activation::kSilu) return silu_pair(lo, hi, dtype);
  if (act == Activation::kGeluNew) return gelu_new_pair(lo, hi, dtype, coef);
  if (act == Activation::kSigmoidMul) {
    lo = sigmoid_mul_rounded(lo, coef, dtype);
    hi = sigmoid_mul_rounded(hi, coef, dtype);
    return;
  }
  lo = activation_unrounded(lo, act);
  hi = activation_unrounded(hi, act);
  round_pair(lo, hi, dtype);
}

// act(x) in the model dtype for each of `x` (replaced by the outputs).
template <int N>
__device__ __forceinline__ void activation_elements(float (&x)[N], Activation act, InputDtype dtype,
                                                    float coef) {
  static_assert(N % 2 == 0, "pairs");
#pragma unroll
  for (int e = 0; e < N; e += 2) activation_pair(x[e], x[e + 1], act, dtype, coef);
}

// F.silu(gate) * up (or GELU) in the model dtype, round(round(act(gate)) * up), for each of `gate`
// (replaced by the outputs). (The product as rms_norm_input_dtype_pair's packed multiply of the loaded
// up words measured 4% faster at 8192x8192 and 9% slower at 8192x16384, bf16 NVFP4: kernel lab run 33.
// The activations of the whole block first, then the products: bf16 NVFP4 SiLU-and-mul kernels 64
// registers instead of 78, 4 CTAs an SM instead of 3; kernel lab run 38.)
template <int N>
__device__ __forceinline__ void gated_elements(float (&gate)[N], const float (&up)[N], Activation act,
                                               InputDtype dtype, float coef) {
  static_assert(N % 2 == 0, "pairs");
  activation_elements(gate, act, dtype, coef);
#pragma unroll
  for (int e = 0; e < N; e += 2) {
    float lo = mul_rn(gate[e], up[e]), hi = mul_rn(gate[e + 1], up[e + 1]);
    round_pair(lo, hi, dtype);
    gate[e] = lo;
    gate[e + 1] = hi;
  }
}
#endif  // __CUDACC__

}  // namespace fp4op::fused
