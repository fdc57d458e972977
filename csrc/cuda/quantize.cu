// CUDA kernels of fp4op::quantize and fp4op::dequantize (plain CUDA; see launch.h).
//
// Quantize: the elementwise or split kernel of block_quantize.cuh with the input widened as it is.
// Threads past the last real block column write the zero padding columns of the swizzled sf layouts
// and the CTAs past the quantizing ones zero the padding rows: one launch writes every output byte.
#include "block_quantize.cuh"

namespace fp4op::cuda {
namespace {

// The input quantized as it is: one stream, widened exactly.
template <InputDtype D>
struct PlainSource {
  static constexpr int kStreams = 1;
  static constexpr bool kSectorWalk = true;  // swizzled layouts: sector_walk_kernel where it applies
  static constexpr int kElementBytes = D == InputDtype::kFloat8E4M3 ? 1 : 2;
  template <int L, int V>
  __device__ __forceinline__ static void produce(const uint4 (&v)[1][L], const ActivationArgs&, float (&f)[V]) {
#pragma unroll
    for (int i = 0; i < L; ++i) Input<D>::widen(v[0][i], f + i * Input<D>::kPerVector);
  }
  template <int L, int V>
  __device__ __forceinline__ static float block_amax(const uint4 (&v)[1][L], const float (&f)[V]) {
    if constexpr (D == InputDtype::kFloat8E4M3 && V == 16) {
      return e4m3_abs_max(v[0][0]);
    } else {
      return amax_of(f);
    }
  }
};

template <InputDtype D>
cudaError_t launch_quantize_typed(const QuantizeLaunch& a, const LaunchStream& stream) {
  ElementwiseArgs e{};
  e.in[0] = a.input;
  e.row_stride[0] = a.out.k;
  e.out = a.out;
  return launch_elementwise<PlainSource<D>>(e, stream);
}

// ---- dequantize ---------------------------------------------------------------------------------------
//
// A lane per 16 bytes of output (8 values of a 16-bit dtype, 4 of float32), so that a warp's loads and
// stores are contiguous; the kLanes lanes of a scale block share its 8 magnitudes, those of codes 0..7,
// each lane evaluating dequant_value for 8 / kLanes of them and converting them to the output dtype. A
// code then takes its magnitude's bits (16-bit outputs: every magnitude shuffled to every lane, then
// byte permutes, one a byte plane per 4 codes; float32: shuffles from the lane holding it) and flips
// the sign bit for codes 8..15: the same bits as dequant_value of the signed code (the formula is odd in
// the code's sign; a NaN's sign is no part of the contract), a few instructions a value instead of a
// division.

// NVFP4 magnitude c from q1 = RN(sf_dec / S) and q3 = RN(1.5 sf_dec / S): E2M1 value c is 0.5, or 1 or 1.5
// times 2^(e - 1) (e = bits 1..2 of c), and a power-of-two multiple of a quotient is the quotient of the
// multiple, RN(2^j v) = 2^j RN(v), wherever neither leaves float32's normal range: dequant_value's bits
// for 2^-124 <= |q1|, |q3| < 2^124 (the caller checks) from two divisions a block instead of eight.
// Code 0 is 0 * q1, the sign of 0 * sf_dec / S.
__device__ __forceinline__ float nvfp4_magnitude(uint32_t c, float q1, float q3) {
  const uint32_t e = (c >> 1) & 3u;
  if (e == 0u) return c == 0u ? 0.0f * q1 : 0.5f * q1;
  const float pow2 = __uint_as_float((126u + e) << 23);  // 2^(e - 1)
  return pow2 * ((c & 1u) ? q3 : q1);
}

__device__ __forceinline__ bool scales_exactly(float q) {
  const float a = fabsf(q);
  return a >= 0x1p-124f && a < 0x1p124f;  // false for NaN
}

// The output dtype's bits of v (float32 -> W-byte value, round to nearest even).
template <int W>
__device__ __forceinline__ uint32_t output_bits(float v, int output_dtype);
template <>
__device__ __forceinline__ uint32_t output_bits<4>(float v, int) {
  return __float_as_uint(v);
}
template <>
__device__ __forceinline__ uint32_t output_bits<2>(float v, int output_dtype) {
  return output_dtype == 1 ? uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(v)))
                           : uint32_t(__half_as_ushort(__float2half_rn(v)));
}

// The 2 byte planes of the 8 magnitudes' 16-bit output bits: plane p holds byte p of magnitude c in
// byte c (c < 4: word [p][0], else [p][1]).
__device__ __forceinline__ void magnitude_planes(const uint32_t (&bits)[8], uint32_t (&plane)[2][2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint32_t* b = bits + 4 * h;
    const uint32_t e01 = b[0] | (b[1] << 16), e23 = b[2] | (b[3] << 16);
    plane[0][h] = __byte_perm(e01, e23, 0x6420);
    plane[1][h] = __byte_perm(e01, e23, 0x7531);
  }
}

// The 16-bit output bits of the 4 codes in the low 16 bits of `codes` (code e in bits 4e..4e+3): 2 words.
__device__ __forceinline__ void dequantize4(uint32_t codes, const uint32_t (&plane)[2][2], uint32_t* out) {
  const uint32_t sel = codes & 0x7777u;  // magnitudes (a selector nibble's bit 3 would replicate signs)
  const uint32_t lo = __byte_perm(plane[0][0], plane[0][1], sel);  // byte e: value e's low byte
  const uint32_t hi = __byte_perm(plane[1][0], plane[1][1], sel);
  out[0] = __byte_perm(lo, hi, 0x5140) ^ (((codes & 0x8u) << 12) | ((codes & 0x80u) << 24));
  out[1] = __byte_perm(lo, hi, 0x7362) ^ (((codes & 0x800u) << 4) | ((codes & 0x8000u) << 16));
}

template <int VEC, int W>
struct DequantizeLanes {
  static constexpr int kCodes = 16 / W;          // values of a lane: 16 output bytes
  static constexpr int kLanes = VEC / kCodes;    // lanes of a scale block: 2, 4 or 8
  static constexpr int kEntries = 8 / kLanes;    // magnitudes a lane evaluates
};

// The kCodes codes of a lane at `src` (kCodes / 2 bytes: 4 or 2) in the low bits: one load where x_q is
// aligned to that (ALIGNED: its data pointer, and so every lane's part), bytes otherwise.
template <int CODES, bool ALIGNED>
__device__ __forceinline__ uint32_t load_lane_codes(const uint8_t* src) {
  if constexpr (ALIGNED) {
    return CODES == 8 ? __ldg(reinterpret_cast<const uint32_t*>(src))
                      : uint32_t(__ldg(reinterpret_cast<const uint16_t*>(src)));
  } else {
    uint32_t codes = 0u;
#pragma unroll
    for (int b = 0; b < CODES / 2; ++b) codes |= uint32_t(__ldg(src + b)) << (8 * b);
    return codes;
  }
}

template <int VEC, int W, bool ALIGNED>
__global__ void __launch_bounds__(kThreads) dequantize_kernel(const DequantizeLaunch a) {
  using L = DequantizeLanes<VEC, W>;
  const int64_t nk = a.k / VEC;
  const int64_t lanes_total = a.m * nk * L::kLanes;
  const int64_t stride = int64_t(gridDim.x) * kThreads;  // a multiple of 32, and so of kLanes
  const int64_t stride_blocks = stride / L::kLanes;
  const int64_t stride_rows = stride_blocks / nk, stride_cols = stride_blocks % nk;
  const int part = int(threadIdx.x % L::kLanes);
  const int group_first = int(threadIdx.x % 32) - part;  // the block's first lane in the warp
  int64_t t = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  int64_t row = (t / L::kLanes) / nk, col = (t / L::kLanes) % nk;
  const SfLayout layout = SfLayout(a.sf_layout);
  wait_for_previous_kernel();
  float s = 1.0f;
  auto row_scale = [&](int64_t r) {
    return global_scale_s(a.global_scale[a.global_scale_per_row ? r : 0], a.is_global_scale_inversed);
  };
  if (!a.sf_use_ue8m0 && !a.global_scale_per_row) s = row_scale(0);
  // the loop test reads the warp's first lane, so every lane of a warp reaches the shuffles
  for (int64_t warp_first = t - threadIdx.x % 32; warp_first < lanes_total; warp_first += stride, t += stride) {
    const bool valid = t < lanes_total;  // the same for all lanes of a block
    uint32_t codes = 0u;
    uint8_t sf = 0;
    float q = 0.0f;  // NVFP4: RN(sf_dec / S) on a block's even lanes, RN(1.5 sf_dec / S) on its odd ones
    if (valid) {
      codes = load_lane_codes<L::kCodes, ALIGNED>(a.x_q + t * (L::kCodes / 2));
      sf = a.sf[sf_offset(row, col, nk, layout)];
      if (!a.sf_use_ue8m0) {
        if (a.global_scale_per_row) s = row_scale(row);
        q = div_rn(mul_rn(part % 2 ? 1.5f : 1.0f, e4m3_bits_to_float(sf)), s);
      }
    }
    const float q_other = __shfl_xor_sync(kFullMask, q, 1);
    uint32_t own[L::kEntries] = {};
    if (valid) {
      const float q1 = part % 2 ? q_other : q, q3 = part % 2 ? q : q_other;
      const bool scaled = !a.sf_use_ue8m0 && scales_exactly(q1) && scales_exactly(q3);
#pragma unroll
      for (int j = 0; j < L::kEntries; ++j) {
        const uint32_t c = uint32_t(part + j * L::kLanes);
        own[j] = output_bits<W>(scaled ? nvfp4_magnitude(c, q1, q3) : dequant_value(c, sf, a.sf_use_ue8m0, s),
                                a.output_dtype);
      }
    }
    // magnitude c is entry c / kLanes of lane c % kLanes of the block's lanes
    uint32_t out[4];
    if constexpr (W == 2) {
      // every magnitude to every lane, then byte-plane selection, 8 values a lane
      uint32_t bits[8];
#pragma unroll
      for (int c = 0; c < 8; ++c) bits[c] = __shfl_sync(kFullMask, own[c / L::kLanes], group_first + c % L::kLanes);
      uint32_t plane[2][2];
      magnitude_planes(bits, plane);
      dequantize4(codes & 0xFFFFu, plane, out);
      dequantize4(codes >> 16, plane, out + 2);
    } else {
      // float32, 4 values a lane: each value's magnitude fetched by a shuffle from the lane holding it
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const uint32_t c = (codes >> (4 * e)) & 7u;
        const int src = group_first + int(c % L::kLanes);
        uint32_t v = __shfl_sync(kFullMask, own[0], src);
        if constexpr (L::kEntries == 2) {
          const uint32_t v1 = __shfl_sync(kFullMask, own[1], src);
          v = c >= uint32_t(L::kLanes) ? v1 : v;
        }
        out[e] = v ^ (((codes >> (4 * e + 3)) & 1u) << 31);
      }
    }
    if (valid) reinterpret_cast<uint4*>(a.out)[t] = make_uint4(out[0], out[1], out[2], out[3]);
    row += stride_rows;
    col += stride_cols;
    if (col >= nk) {
      col -= nk;
      ++row;
    }
  }
}

template <int VEC, int W>
cudaError_t launch_dequantize_typed(const DequantizeLaunch& a, const LaunchStream& stream) {
  constexpr auto kAligned = dequantize_kernel<VEC, W, true>;
  constexpr auto kUnaligned = dequantize_kernel<VEC, W, false>;
  const bool aligned = reinterpret_cast<uintptr_t>(a.x_q) % (DequantizeLanes<VEC, W>::kCodes / 2) == 0;
  // one wave of resident CTAs at most; each walks the lanes with a grid stride
  const int64_t wave = int64_t(a.num_sms) * (aligned ? resident_ctas_per_sm<kAligned>() : resident_ctas_per_sm<kUnaligned>());
  const int64_t lanes = a.m * (a.k / VEC) * DequantizeLanes<VEC, W>::kLanes;
  const dim3 grid(unsigned(std::max<int64_t>(std::min<int64_t>((lanes + kThreads - 1) / kThreads, wave), 1)));
  return launch_kernel(aligned ? kAligned : kUnaligned, grid, stream, a);
}

}  // namespace

cudaError_t launch_quantize(const QuantizeLaunch& a, const LaunchStream& stream) {
  switch (InputDtype(a.input_dtype)) {
    case InputDtype::kFloat16: return launch_quantize_typed<InputDtype::kFloat16>(a, stream);
    case InputDtype::kBFloat16: return launch_quantize_typed<InputDtype::kBFloat16>(a, stream);
    case InputDtype::kFloat8E4M3: return launch_quantize_typed<InputDtype::kFloat8E4M3>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_dequantize(const DequantizeLaunch& a, const LaunchStream& stream) {
  if (a.output_dtype < 0 || a.output_dtype > 2 || (a.sf_vec_size != 16 && a.sf_vec_size != 32)) {
    return cudaErrorInvalidValue;
  }
  const bool wide = a.output_dtype == 0;  // float32: 4 bytes a value, else 2
  if (a.sf_vec_size == 16) {
    return wide ? launch_dequantize_typed<16, 4>(a, stream) : launch_dequantize_typed<16, 2>(a, stream);
  }
  return wide ? launch_dequantize_typed<32, 4>(a, stream) : launch_dequantize_typed<32, 2>(a, stream);
}

}  // namespace fp4op::cuda
