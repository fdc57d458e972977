// CUDA kernels of fp4op::quantize and fp4op::dequantize (plain CUDA; see launch.h).
//
// Quantize: one thread per 16-byte input chunk (8 fp16/bf16 or 16 fp8 elements), the 1, 2 or 4
// threads of a scale block reduce its amax with warp shuffles. A CTA covers a tile of
// rows_per_tile x chunks_per_tile chunks; tiles along K map to blockIdx.x and row tiles to
// blockIdx.y, so no thread divides by K. Threads past the last real block column write the zero
// padding of the swizzled sf layouts, and the CTAs of blockIdx.z == 1 zero the padding rows, so one
// launch writes every output byte.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>

#include "../numerics.h"
#include "launch.h"

namespace fp4op::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxGridY = 65535;

// Widening of the 16-byte chunk to float32 (exact for every input format).
template <InputDtype D>
struct Chunk;

template <>
struct Chunk<InputDtype::kBFloat16> {
  static constexpr int kElems = 8;
  __device__ __forceinline__ static void widen(const uint4& v, float (&f)[kElems]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
  }
};

template <>
struct Chunk<InputDtype::kFloat16> {
  static constexpr int kElems = 8;
  __device__ __forceinline__ static void widen(const uint4& v, float (&f)[kElems]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2_raw raw;
      raw.x = uint16_t(w[i] & 0xFFFFu);
      raw.y = uint16_t(w[i] >> 16);
      const float2 p = __half22float2(__half2(raw));
      f[2 * i] = p.x;
      f[2 * i + 1] = p.y;
    }
  }
};

template <>
struct Chunk<InputDtype::kFloat8E4M3> {
  static constexpr int kElems = 16;
  __device__ __forceinline__ static void widen(const uint4& v, float (&f)[kElems]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        // e4m3 pairs -> half2 is exact (every E4M3 value is an fp16 value)
        const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t((w[i] >> (16 * j)) & 0xFFFFu),
                                                         __NV_E4M3);
        const float2 p = __half22float2(__half2(h));
        f[4 * i + 2 * j] = p.x;
        f[4 * i + 2 * j + 1] = p.y;
      }
    }
  }
};

template <int N>
struct PackedCodes;
template <>
struct PackedCodes<8> {
  using type = uint32_t;
};
template <>
struct PackedCodes<16> {
  using type = uint2;
};

struct Tiling {
  int chunks_per_tile;
  int rows_per_tile;
  int64_t row_tiles;
};

template <InputDtype D, int VEC, bool UE8M0>
__global__ void __launch_bounds__(kThreads) quantize_kernel(const QuantizeLaunch a, const Tiling t,
                                                            const int64_t chunks_per_row,
                                                            const int64_t padded_chunks_per_row) {
  using C = Chunk<D>;
  constexpr int kElems = C::kElems;
  constexpr int kThreadsPerBlock = VEC / kElems;  // threads sharing one scale block: 1, 2 or 4
  const SfLayout layout = SfLayout(a.sf_layout);
  const int64_t nk = a.k / VEC;

  if (blockIdx.z == 1) {
    // zero the padding rows [m, sf_rows) of a swizzled layout, one 4-byte word (4 block columns) each
    const int64_t words_per_row = sf_cols(nk, layout) / 4;
    const int64_t words = (sf_rows(a.m, layout) - a.m) * words_per_row;
    const int64_t stride = int64_t(gridDim.x) * gridDim.y * kThreads;
    for (int64_t i = (int64_t(blockIdx.y) * gridDim.x + blockIdx.x) * kThreads + threadIdx.x; i < words;
         i += stride) {
      const int64_t row = a.m + i / words_per_row;
      const int64_t col = (i % words_per_row) * 4;
      *reinterpret_cast<uint32_t*>(a.sf + sf_offset(row, col, nk, layout)) = 0u;
    }
    return;
  }

  const int local_row = threadIdx.x / t.chunks_per_tile;
  const int64_t chunk = int64_t(blockIdx.x) * t.chunks_per_tile + threadIdx.x % t.chunks_per_tile;
  const bool leader = chunk % kThreadsPerBlock == 0;
  const uint8_t* in = static_cast<const uint8_t*>(a.input);

  // the trip count depends on blockIdx.y only, so every lane reaches the shuffles below
  for (int64_t tile = blockIdx.y; tile < t.row_tiles; tile += gridDim.y) {
    const int64_t row = tile * t.rows_per_tile + local_row;
    const bool row_ok = local_row < t.rows_per_tile && row < a.m;
    const bool has_data = row_ok && chunk < chunks_per_row;
    const bool is_pad_col = row_ok && !has_data && chunk < padded_chunks_per_row;
    const int64_t elem = row * a.k + chunk * kElems;

    float f[kElems];
    if (has_data) {
      const uint4 v = __ldcs(reinterpret_cast<const uint4*>(in + elem * (D == InputDtype::kFloat8E4M3 ? 1 : 2)));
      C::widen(v, f);
    } else {
#pragma unroll
      for (int i = 0; i < kElems; ++i) f[i] = 0.0f;
    }
    float amax = fabsf(f[0]);
#pragma unroll
    for (int i = 1; i < kElems; ++i) amax = amax_fold(amax, f[i]);
#pragma unroll
    for (int lanes = 1; lanes < kThreadsPerBlock; lanes <<= 1) {
      amax = amax_fold(amax, __shfl_xor_sync(0xffffffffu, amax, lanes));
    }

    BlockScale s;
    if constexpr (UE8M0) {
      s = mxfp4_block_scale(amax);
    } else {
      const float g = row_ok ? a.global_scale[a.global_scale_per_row ? row : 0] : 1.0f;
      s = nvfp4_block_scale(amax, nvfp4_row_scale(g, a.is_global_scale_inversed));
    }

    if (has_data) {
      typename PackedCodes<kElems>::type packed;
      uint32_t* words = reinterpret_cast<uint32_t*>(&packed);
#pragma unroll
      for (int w = 0; w < kElems / 8; ++w) {
        uint32_t word = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const uint32_t byte =
              e2m1x2(mul_rn(f[8 * w + 2 * i], s.out_scale), mul_rn(f[8 * w + 2 * i + 1], s.out_scale));
          word |= byte << (8 * i);
        }
        words[w] = word;
      }
      __stcs(reinterpret_cast<typename PackedCodes<kElems>::type*>(a.x_q + elem / 2), packed);
    }
    if (leader && (has_data || is_pad_col)) {
      a.sf[sf_offset(row, chunk / kThreadsPerBlock, nk, layout)] = has_data ? s.sf : uint8_t(0);
    }
  }
}

template <InputDtype D, int VEC, bool UE8M0>
cudaError_t launch_quantize_typed(const QuantizeLaunch& a, cudaStream_t stream) {
  constexpr int kElems = Chunk<D>::kElems;
  constexpr int kThreadsPerBlock = VEC / kElems;
  const SfLayout layout = SfLayout(a.sf_layout);
  const int64_t nk = a.k / VEC;
  const int64_t chunks_per_row = a.k / kElems;
  const int64_t padded_chunks_per_row = sf_cols(nk, layout) * kThreadsPerBlock;

  Tiling t;
  int64_t tiles_k;
  if (padded_chunks_per_row >= kThreads) {
    t.chunks_per_tile = kThreads;
    t.rows_per_tile = 1;
    tiles_k = (padded_chunks_per_row + kThreads - 1) / kThreads;
  } else {
    t.chunks_per_tile = int(padded_chunks_per_row);
    t.rows_per_tile = kThreads / t.chunks_per_tile;
    tiles_k = 1;
  }
  t.row_tiles = (a.m + t.rows_per_tile - 1) / t.rows_per_tile;
  if (tiles_k > 0x7FFFFFFF) return cudaErrorInvalidValue;
  const bool pad_rows = sf_rows(a.m, layout) > a.m;
  const dim3 grid(unsigned(tiles_k), unsigned(std::min<int64_t>(std::max<int64_t>(t.row_tiles, 1), kMaxGridY)),
                  pad_rows ? 2u : 1u);
  quantize_kernel<D, VEC, UE8M0><<<grid, kThreads, 0, stream>>>(a, t, chunks_per_row, padded_chunks_per_row);
  return cudaGetLastError();
}

template <InputDtype D>
cudaError_t launch_quantize_recipe(const QuantizeLaunch& a, cudaStream_t stream) {
  return a.sf_use_ue8m0 ? launch_quantize_typed<D, 32, true>(a, stream)
                        : launch_quantize_typed<D, 16, false>(a, stream);
}

template <typename Out>
__device__ __forceinline__ Out from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

// One thread per x_q byte (two outputs); dequantization is not on a hot path.
template <typename Out>
__global__ void dequantize_kernel(const DequantizeLaunch a) {
  const int64_t bytes_per_row = a.k / 2;
  const int64_t total = a.m * bytes_per_row;
  const int64_t nk = a.k / a.sf_vec_size;
  Out* out = static_cast<Out*>(a.out);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / bytes_per_row;
    const int64_t col = (i % bytes_per_row) * 2;
    float s = 1.0f;
    if (!a.sf_use_ue8m0) {
      const float g = a.global_scale[a.global_scale_per_row ? row : 0];
      s = a.is_global_scale_inversed ? div_rn(1.0f, g) : g;
    }
    const uint8_t sf = a.sf[sf_offset(row, col / a.sf_vec_size, nk, SfLayout(a.sf_layout))];
    const float factor = dequant_block_factor(sf, a.sf_use_ue8m0, s);
    const uint8_t q = a.x_q[i];
    out[2 * i] = from_float<Out>(mul_rn(e2m1_to_float(q & 0xFu), factor));
    out[2 * i + 1] = from_float<Out>(mul_rn(e2m1_to_float(q >> 4), factor));
  }
}

template <typename Out>
cudaError_t launch_dequantize_typed(const DequantizeLaunch& a, cudaStream_t stream) {
  const int64_t total = a.m * (a.k / 2);
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(a.num_sms) * 32);
  dequantize_kernel<Out><<<unsigned(std::max<int64_t>(blocks, 1)), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_quantize(const QuantizeLaunch& a, cudaStream_t stream) {
  switch (InputDtype(a.input_dtype)) {
    case InputDtype::kFloat16: return launch_quantize_recipe<InputDtype::kFloat16>(a, stream);
    case InputDtype::kBFloat16: return launch_quantize_recipe<InputDtype::kBFloat16>(a, stream);
    case InputDtype::kFloat8E4M3: return launch_quantize_recipe<InputDtype::kFloat8E4M3>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_dequantize(const DequantizeLaunch& a, cudaStream_t stream) {
  switch (a.output_dtype) {
    case 0: return launch_dequantize_typed<float>(a, stream);
    case 1: return launch_dequantize_typed<__nv_bfloat16>(a, stream);
    case 2: return launch_dequantize_typed<__half>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fp4op::cuda
