// The FP4 numerics of SPEC.md, shared by the CPU and CUDA kernels (host and device), so that both
// backends agree bit for bit by construction. Plain C++/CUDA: no torch headers.
//
// Every float operation here is IEEE float32 with round-to-nearest-even; on the device the _rn
// intrinsics pin that down (no FMA contraction, no approximate reciprocal), on the host the build
// uses -ffp-contract=off and the CPU kernel clears FTZ/DAZ.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#define FP4OP_HD __host__ __device__ __forceinline__
#else
#define FP4OP_HD inline
#endif

// Blackwell (sm_100a family and later family-specific targets) converts to E2M1 in hardware with
// exactly the rounding below; every other target uses the software conversion.
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 1000) && \
    (defined(__CUDA_ARCH_FAMILY_SPECIFIC__) || defined(__CUDA_ARCH_SPECIFIC__))
#define FP4OP_NATIVE_E2M1 1
#else
#define FP4OP_NATIVE_E2M1 0
#endif

namespace fp4op {

// Scale-factor layouts (the values are part of the kernel API, keep in sync with fp4op/layouts.py).
enum class SfLayout : int { kSwizzled128x4 = 0, kSwizzled8x4 = 1, kLinear = 2 };

// Input dtypes as the kernels know them.
enum class InputDtype : int { kFloat16 = 0, kBFloat16 = 1, kFloat8E4M3 = 2 };

// RN(1/6) as float32: 0x3E2AAAAB.
constexpr float kRcp6 = 0.16666667163372039794921875f;

FP4OP_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

FP4OP_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

FP4OP_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

FP4OP_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

FP4OP_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// Correctly rounded 1/x (the same value as div_rn(1, x), cheaper on the device).
FP4OP_HD float rcp_rn(float x) {
#if defined(__CUDA_ARCH__)
  return __frcp_rn(x);
#else
  return 1.0f / x;
#endif
}

// ---- exact widening of the input formats -------------------------------------------------------

FP4OP_HD float bf16_bits_to_float(uint16_t b) { return bits_to_float(uint32_t(b) << 16); }

// Exact, without branches (so that a CPU loop of it vectorizes): normal values move their exponent
// and mantissa into place and scale by 2^-112 (exact); subnormals build 0.5 + m * 2^-24 in float32 and
// subtract 0.5 (exact); infinities and NaNs keep their bits (NaN payloads included).
FP4OP_HD float fp16_bits_to_float(uint16_t h) {
  const uint32_t rest = uint32_t(h & 0x7FFFu);
  const float normal = mul_rn(bits_to_float((rest << 13) + (224u << 23)), 0x1p-112f);
  const float subnormal = add_rn(bits_to_float(rest | (126u << 23)), -0.5f);
  const uint32_t special = (rest & 0x3FFu) << 13 | 0x7F800000u;
  // selects as masks (no control flow for the vectorizer)
  const uint32_t exponent = rest & 0x7C00u;
  const uint32_t is_subnormal = 0u - uint32_t(exponent == 0);
  const uint32_t is_special = 0u - uint32_t(exponent == 0x7C00u);
  const uint32_t magnitude = (float_to_bits(subnormal) & is_subnormal) | (special & is_special) |
                             (float_to_bits(normal) & ~(is_subnormal | is_special));
  return bits_to_float((uint32_t(h & 0x8000u) << 16) | magnitude);
}

// E4M3 conversions run in hardware on sm_89 and later (cvt ... e4m3x2), with the rounding and
// saturation of the software paths below, which the other targets and the host use.
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 890)
#define FP4OP_HARDWARE_E4M3 1
#else
#define FP4OP_HARDWARE_E4M3 0
#endif

// E4M3 (float8_e4m3fn): bias 7, no infinities, 0x7F/0xFF are NaN.
FP4OP_HD float e4m3_bits_to_float(uint8_t b) {
#if FP4OP_HARDWARE_E4M3
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(b, __NV_E4M3)));
#endif
  const uint32_t sign = uint32_t(b & 0x80u) << 24;
  const uint32_t exp = (b >> 3) & 0xFu;
  const uint32_t mant = b & 0x7u;
  if ((b & 0x7Fu) == 0x7Fu) return bits_to_float(0x7FC00000u);
  if (exp == 0) {
    const float mag = mul_rn(float(mant), 0.001953125f);  // mant * 2^-9
    return bits_to_float(float_to_bits(mag) | sign);
  }
  return bits_to_float(sign | ((exp + 120u) << 23) | (mant << 20));
}

// ---- narrowing conversions -----------------------------------------------------------------------

// float -> E2M1, round to nearest even, satfinite, NaN -> +6 (0x7), sign of zero kept:
// __nv_cvt_float_to_fp4(x, __NV_E2M1, cudaRoundNearest) / cvt.rn.satfinite.e2m1x2.f32.
//
// The magnitude code of a = min(|x|, 6) (NaN -> 6) is RN(g(a)) with the concave map
// g(a) = min(2a, a + 2, a/2 + 4): on [0, 2] the grid has spacing 0.5 and code = RN(2a); on [2, 4]
// spacing 1 and code = RN(a) + 2; on [4, 6] spacing 2 and code = RN(a / 2) + 4, ties to the even
// code in each. RN is monotone, so RN(min(...)) = min(RN(...)), and each RN(piece) is one float op
// with an exact product: adding 2^23 makes the adder round to an integer. The result is the float
// 2^23 + code. The pieces are FMA-pipe work; the minima run on Hopper's ALU pipe (half the width),
// so the device takes them as one three-way integer minimum and a clamp (below). Checked against the
// previous integer formulation on all 2^32 floats.
#if !defined(__CUDA_ARCH__)
// a < b ? a : b as a bit select of an unconditional compare: GCC does not if-convert a float
// ternary under -ftrapping-math (its default), which kept the CPU row kernel's code loop scalar
// (3-4x slower); the select vectorizes.
inline float less_or_second(float a, float b) {
  const uint32_t take_a = 0u - uint32_t(a < b);
  return bits_to_float((float_to_bits(a) & take_a) | (float_to_bits(b) & ~take_a));
}
#endif

FP4OP_HD float e2m1_magnitude(float x) {
#if defined(__CUDA_ARCH__)
  // The pieces of |x| unclamped (|x| is an operand modifier of FFMA/FADD), then their minimum and the
  // clamp to code 7 as unsigned integers: the pieces are positive floats (>= 2^23), inf or NaN, whose
  // bits order like their values, and inf, NaN and the pieces of |x| > 6 lie above 2^23 + 7 (or give
  // 7). One three-way integer minimum (VIMNMX3 on sm_90) and one clamp take the place of the clamp of
  // |x| and two float minima. Equal to the form below on all 2^32 floats.
  const uint32_t k0 = __float_as_uint(__fmaf_rn(fabsf(x), 2.0f, 8388608.0f));
  const uint32_t k1 = __float_as_uint(__fadd_rn(fabsf(x), 8388610.0f));
  const uint32_t k2 = __float_as_uint(__fmaf_rn(fabsf(x), 0.5f, 8388612.0f));
  return __uint_as_float(min(__vimin3_u32(k0, k1, k2), 0x4B000007u));
#else
  const float a = less_or_second(fabsf(x), 6.0f);  // NaN -> 6 (a compare, not libm's fminf)
  const float k0 = add_rn(mul_rn(a, 2.0f), 8388608.0f);
  const float k1 = add_rn(a, 8388610.0f);
  // a * 0.5 rounds for subnormal a, where k0 is the minimum anyway
  const float k2 = add_rn(mul_rn(a, 0.5f), 8388612.0f);
  return less_or_second(less_or_second(k0, k1), k2);
#endif
}

// 1 when the E2M1 code of x carries a sign: sign bit set and x not NaN. On the GPU the products fed
// here carry no NaN sign (arithmetic returns the canonical, positive NaN).
FP4OP_HD uint32_t e2m1_sign(float x) {
  const uint32_t bits = float_to_bits(x);
#if defined(__CUDA_ARCH__)
  return bits >> 31;
#else
  return (bits & 0x7FFFFFFFu) > 0x7F800000u ? 0u : bits >> 31;
#endif
}

FP4OP_HD uint32_t e2m1_code_software(float x) {
  return (float_to_bits(e2m1_magnitude(x)) & 7u) | (e2m1_sign(x) << 3);
}

// Two E2M1 codes packed in one byte: `lo` in bits 0..3, `hi` in bits 4..7.
FP4OP_HD uint32_t e2m1x2(float lo, float hi) {
#if FP4OP_NATIVE_E2M1
  uint16_t packed;
  asm("{ .reg .b8 b;\n cvt.rn.satfinite.e2m1x2.f32 b, %2, %1;\n mov.b16 %0, {b, 0};\n}\n"
      : "=h"(packed)
      : "f"(lo), "f"(hi));
  return packed;
#else
  return e2m1_code_software(lo) | (e2m1_code_software(hi) << 4);
#endif
}

// Eight values -> one word of E2M1 codes, value i in bits 4i..4i+3.
FP4OP_HD uint32_t e2m1x8(const float* v) {
#if FP4OP_NATIVE_E2M1
  return e2m1x2(v[0], v[1]) | (e2m1x2(v[2], v[3]) << 8) | (e2m1x2(v[4], v[5]) << 16) | (e2m1x2(v[6], v[7]) << 24);
#elif defined(__CUDA_ARCH__)
  // The codes as on the host: bits(magnitude) * 16^i summed in wrapping arithmetic, less the 2^23
  // exponent bits (0xFB000000): multiply-adds, which issue on the FMA pipe, where byte permutes
  // would load the ALU pipe that limits these kernels. The signs (bit 31 of each value: no NaN
  // signs on the GPU) by byte permutes: [sign bytes of values 0, 2, 4, 6] and [... 1, 3, 5, 7],
  // their top bits then at 8j+7, shifted 4 down for the even values.
  uint32_t codes = 0u - 0xFB000000u;
#pragma unroll
  for (int i = 0; i < 8; ++i) codes += float_to_bits(e2m1_magnitude(v[i])) * (1u << (4 * i));
  uint32_t pair[4];  // pair p: [sign byte 2p', sign byte 2p'+2, -, -]
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const int a = (p & 1) + 4 * (p >> 1), b = a + 2;  // (0, 2), (1, 3), (4, 6), (5, 7)
    pair[p] = __byte_perm(float_to_bits(v[a]), float_to_bits(v[b]), 0x0073);
  }
  const uint32_t even_signs = __byte_perm(pair[0], pair[2], 0x5410);
  const uint32_t odd_signs = __byte_perm(pair[1], pair[3], 0x5410);
  return codes | ((even_signs >> 4) & 0x08080808u) | (odd_signs & 0x80808080u);
#else
  // (bits(magnitude) + 8 * sign) * 16^i summed in wrapping 32-bit arithmetic, less the 2^23 exponent
  // bits: the sum of 0x4B000000 * 16^i is 0xFB000000 mod 2^32.
  uint32_t word = 0u - 0xFB000000u;
  uint32_t weight = 1u;
  for (int i = 0; i < 8; ++i, weight <<= 4) {
    word += float_to_bits(e2m1_magnitude(v[i])) * weight + e2m1_sign(v[i]) * (8u * weight);
  }
  return word;
#endif
}

// float -> E4M3 byte, round to nearest even, saturate to +-448 (satfinite, infinities included),
// NaN -> 0x7F: __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3).
FP4OP_HD uint8_t float_to_e4m3(float x) {
#if FP4OP_HARDWARE_E4M3
  return __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
#endif
  const uint32_t bits = float_to_bits(x);
  const uint32_t abs_bits = bits & 0x7FFFFFFFu;
  const uint32_t sign = (bits >> 24) & 0x80u;
  if (abs_bits > 0x7F800000u) return 0x7Fu;
  if (abs_bits >= 0x43E00000u) return uint8_t(sign | 0x7Eu);  // >= 448, inf included
  uint32_t mag;
  if (abs_bits >= 0x3C800000u) {
    // normal E4M3 (>= 2^-6): keep 3 mantissa bits with round-to-nearest-even, rebias 127 -> 7
    const uint32_t rounded = abs_bits + 0x7FFFFu + ((abs_bits >> 20) & 1u);
    mag = (rounded >> 20) - (120u << 3);
  } else {
    // subnormal E4M3: multiples of 2^-9; scaling by 2^9 is exact, the integer add rounds RNE
    const float scaled = mul_rn(bits_to_float(abs_bits), 512.0f);
    mag = float_to_bits(add_rn(scaled, 8388608.0f)) - 0x4B000000u;  // 0..8 (8 is 2^-6, code 0x08)
  }
  return uint8_t(sign | mag);
}

// float -> UE8M0 byte rounding up: the exponent of the smallest power of two >= |x|, biased by 127,
// saturated to 254 (254 = 2^127); NaN -> 0xFF; |x| <= 2^-127 -> 0.
// __nv_cvt_float_to_e8m0(x, __NV_SATFINITE, cudaRoundPosInf).
FP4OP_HD uint8_t float_to_ue8m0_ceil(float x) {
  const uint32_t abs_bits = float_to_bits(x) & 0x7FFFFFFFu;
  if (abs_bits > 0x7F800000u) return 0xFFu;
  uint32_t exp = abs_bits >> 23;
  if ((abs_bits & 0x7FFFFFu) != 0 && abs_bits > 0x00400000u) exp += 1;  // 0x00400000 is 2^-127
  return uint8_t(exp > 254u ? 254u : exp);
}

// 2^(127 - b) for b in 1..255 (2^-127 and 2^-128 are float subnormals).
FP4OP_HD float ue8m0_reciprocal(uint32_t b) {
  const int e = 127 - int(b);
  return e >= -126 ? bits_to_float(uint32_t(e + 127) << 23) : bits_to_float(1u << (e + 149));
}

// ---- per-block scale ------------------------------------------------------------------------------

// The per-row constants of the NVFP4 scale computation, derived from the global scale.
struct Nvfp4RowScale {
  float s_rcp6;  // S * RN(1/6)
  float inv_s;   // 1 / S
};

// SPEC.md's S from the global scale as given: the value itself, or its reciprocal when it is given inversed.
FP4OP_HD float global_scale_s(float global_scale, bool is_inversed) {
  return is_inversed ? rcp_rn(global_scale) : global_scale;
}

FP4OP_HD Nvfp4RowScale nvfp4_row_scale(float global_scale, bool is_inversed) {
  const float s = global_scale_s(global_scale, is_inversed);
  return Nvfp4RowScale{mul_rn(s, kRcp6), rcp_rn(s)};
}

struct BlockScale {
  uint8_t sf;       // the stored scale byte
  float out_scale;  // the multiplier applied to each element before E2M1 conversion
};

FP4OP_HD BlockScale nvfp4_block_scale(float amax, Nvfp4RowScale row) {
  if (amax == 0.0f) return BlockScale{0, 0.0f};
  const uint8_t sf = float_to_e4m3(mul_rn(amax, row.s_rcp6));
  const float sf_dec = e4m3_bits_to_float(sf);
  const float q = rcp_rn(mul_rn(sf_dec, row.inv_s));
  // fminf(q, FLT_MAX): FLT_MAX when q is NaN or inf (IEEE minNum); on the host a compare, since libm's
  // fminf is a call that keeps the CPU loops from vectorizing
#if defined(__CUDA_ARCH__)
  return BlockScale{sf, fminf(q, FLT_MAX)};
#else
  return BlockScale{sf, q < FLT_MAX ? q : FLT_MAX};
#endif
}

FP4OP_HD BlockScale mxfp4_block_scale(float amax) {
  if (amax == 0.0f) return BlockScale{0, 0.0f};
  const uint8_t sf = float_to_ue8m0_ceil(mul_rn(amax, kRcp6));
  return BlockScale{sf, sf == 0 ? 1.0f : ue8m0_reciprocal(sf)};
}

// NaN-ignoring running maximum of |x| (IEEE maxNum, like CUDA's fmaxf): a block of NaNs only keeps a
// NaN amax because the fold starts from its first element.
// On the host the comparison is spelled out: libm's fmaxf returns NaN for a signaling NaN operand
// (fp16/bf16 NaNs widen to signaling float NaNs), where the GPU's maxNum ignores every NaN.
FP4OP_HD float amax_fold(float acc, float x) {
#if defined(__CUDA_ARCH__)
  return fmaxf(acc, fabsf(x));
#else
  const float a = fabsf(x);
  return (a > acc || acc != acc) ? a : acc;
#endif
}

// ---- dequantization --------------------------------------------------------------------------------

// The value of E2M1 code `code` (0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives), built from its bits
// (a table indexed by a code known only at run time would live in the GPU's local memory): exponent
// field e = bits 1..2, mantissa m = bit 0; e > 0 is (1 + m / 2) * 2^(e - 1), e = 0 the subnormal m / 2.
FP4OP_HD float e2m1_to_float(uint32_t code) {
  const uint32_t e = (code >> 1) & 3u, m = code & 1u;
  const uint32_t magnitude = e != 0u ? ((126u + e) << 23) | (m << 22) : m * 0x3F000000u;
  return bits_to_float(magnitude | ((code & 8u) << 28));
}

// The value of E2M1 code `code` in a block of scale byte `sf`, SPEC.md's formulas evaluated as written:
// e2m1(q) * sf_dec / S (NVFP4, S as in nvfp4_row_scale: the product is exact, so one rounding, the
// quotient's) or e2m1(q) * 2^(sf - 127) (MXFP4, exact unless it overflows to inf; 0xFF is NaN).
FP4OP_HD float dequant_value(uint32_t code, uint8_t sf, bool sf_use_ue8m0, float s) {
  const float e2m1 = e2m1_to_float(code);
  if (sf_use_ue8m0) {
    if (sf == 0xFFu) return bits_to_float(0x7FC00000u);
    return mul_rn(e2m1, sf == 0 ? bits_to_float(1u << 22) : bits_to_float(uint32_t(sf) << 23));
  }
  return div_rn(mul_rn(e2m1, e4m3_bits_to_float(sf)), s);
}

// ---- scale-factor layouts -------------------------------------------------------------------------

FP4OP_HD int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Offset of scale (row m, block column k) in the flattened sf tensor; nk = K / sf_vec_size. Each
// layout's offset is a sum of a row part and a column part, so kernels can hoist either.
// Unsigned arithmetic: the divisions by powers of two are shifts.
FP4OP_HD int64_t sf_row_offset(int64_t m, int64_t nk, SfLayout layout) {
  const uint64_t um = uint64_t(m), nk4 = (uint64_t(nk) + 3) / 4;
  switch (layout) {
    case SfLayout::kSwizzled128x4: return int64_t((um / 128) * nk4 * 512 + (um % 32) * 16 + ((um % 128) / 32) * 4);
    case SfLayout::kSwizzled8x4: return int64_t((um / 8) * nk4 * 32 + (um % 8) * 4);
    default: return int64_t(um * uint64_t(nk));
  }
}

FP4OP_HD int64_t sf_col_offset(int64_t k, SfLayout layout) {
  const uint64_t uk = uint64_t(k);
  switch (layout) {
    case SfLayout::kSwizzled128x4: return int64_t((uk / 4) * 512 + uk % 4);
    case SfLayout::kSwizzled8x4: return int64_t((uk / 4) * 32 + uk % 4);
    default: return k;
  }
}

FP4OP_HD int64_t sf_offset(int64_t m, int64_t k, int64_t nk, SfLayout layout) {
  return sf_row_offset(m, nk, layout) + sf_col_offset(k, layout);
}

// Rows of the sf tensor: M padded to the layout's row tile.
FP4OP_HD int64_t sf_rows(int64_t m, SfLayout layout) {
  return layout == SfLayout::kSwizzled128x4 ? round_up(m, 128)
         : layout == SfLayout::kSwizzled8x4 ? round_up(m, 8)
                                            : m;
}

// Columns of the sf tensor: K / sf_vec_size padded to 4 for the swizzled layouts.
FP4OP_HD int64_t sf_cols(int64_t nk, SfLayout layout) {
  return layout == SfLayout::kLinear ? nk : round_up(nk, 4);
}

}  // namespace fp4op
