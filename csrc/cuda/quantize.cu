// CUDA kernels of fp4op::quantize and fp4op::dequantize (plain CUDA; see launch.h).
//
// Quantize: one thread per scale block (16 or 32 elements). A CTA covers a tile of
// rows_per_tile x cols_per_tile blocks; tiles along K map to blockIdx.x and row tiles to blockIdx.y,
// so no thread divides by K. Threads past the last real block column write the zero padding columns
// of the swizzled sf layouts and the CTAs past the quantizing ones zero the padding rows: one launch writes
// every output byte.
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

// The input formats: elements per 16-byte vector and their exact widening to float32.
template <InputDtype D>
struct Input;

template <>
struct Input<InputDtype::kBFloat16> {
  static constexpr int kPerVector = 8;
  __device__ __forceinline__ static void widen(const uint4& v, float* f) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
  }
};

template <>
struct Input<InputDtype::kFloat16> {
  static constexpr int kPerVector = 8;
  __device__ __forceinline__ static void widen(const uint4& v, float* f) {
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
struct Input<InputDtype::kFloat8E4M3> {
  static constexpr int kPerVector = 16;
  __device__ __forceinline__ static void widen(const uint4& v, float* f) {
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

// The packed codes of one scale block: 8 bytes (16 elements) or 16 bytes (32 elements).
template <int VEC>
struct PackedBlock;
template <>
struct PackedBlock<16> {
  using type = uint2;
};
template <>
struct PackedBlock<32> {
  using type = uint4;
};

// A CTA covers rows_per_tile rows x cols_per_tile scale-block columns, one thread per block.
struct Tiling {
  int cols_per_tile;
  int rows_per_tile;
  int64_t row_tiles;
  unsigned data_rows_y;  // gridDim.y of the quantizing CTAs; the CTAs above zero the padding rows
};

// Zeroes the padding rows [m, sf_rows) of a swizzled layout, one 4-byte word (4 block columns) a
// thread; the CTAs of blockIdx.y >= data_rows_y do this. 32-bit index math: the launcher checks that
// the padding has fewer than 2^32 words.
template <SfLayout LAYOUT>
__device__ void zero_padding_rows(const QuantizeLaunch& a, int64_t nk, unsigned data_rows_y) {
  const uint32_t words_per_row = uint32_t(sf_cols(nk, LAYOUT) / 4);
  const uint32_t words = uint32_t(sf_rows(a.m, LAYOUT) - a.m) * words_per_row;
  const uint32_t stride = gridDim.x * (gridDim.y - data_rows_y) * kThreads;
  for (uint32_t i = ((blockIdx.y - data_rows_y) * gridDim.x + blockIdx.x) * kThreads + threadIdx.x; i < words;
       i += stride) {
    const int64_t row = a.m + i / words_per_row;
    const int64_t col = int64_t(i % words_per_row) * 4;
    *reinterpret_cast<uint32_t*>(a.sf + sf_offset(row, col, nk, LAYOUT)) = 0u;
  }
}

// One thread per scale block: VEC elements read with 16-byte loads (the two or four loads of a
// thread are adjacent; the warp's loads together cover a contiguous span, served by L1), reduced,
// scaled, packed and written with one 8- or 16-byte store. Each thread walks row tiles with a
// stride of data_rows_y and loads the next tile's block before converting the current one, so that
// memory traffic overlaps the conversion arithmetic.
template <InputDtype D, int VEC, bool UE8M0, SfLayout LAYOUT>
__global__ void __launch_bounds__(kThreads) quantize_kernel(const QuantizeLaunch a, const Tiling t) {
  using In = Input<D>;
  constexpr int kLoads = VEC / In::kPerVector;
  constexpr int kElementBytes = D == InputDtype::kFloat8E4M3 ? 1 : 2;
  const int64_t nk = a.k / VEC;
  if (blockIdx.y >= t.data_rows_y) {
    if constexpr (LAYOUT != SfLayout::kLinear) zero_padding_rows<LAYOUT>(a, nk, t.data_rows_y);
    return;
  }

  const int local_row = threadIdx.x / t.cols_per_tile;
  const int64_t col = int64_t(blockIdx.x) * t.cols_per_tile + threadIdx.x % t.cols_per_tile;
  const bool col_has_data = local_row < t.rows_per_tile && col < nk;
  const bool col_in_sf = local_row < t.rows_per_tile && col < sf_cols(nk, LAYOUT);
  const int64_t sf_col = sf_col_offset(col, LAYOUT);
  const uint4* in = static_cast<const uint4*>(a.input);
  Nvfp4RowScale row_scale{};
  if (!UE8M0 && !a.global_scale_per_row) row_scale = nvfp4_row_scale(a.global_scale[0], a.is_global_scale_inversed);

  // per-iteration pointer steps instead of 64-bit index products in the loop
  const int64_t row_step = int64_t(t.data_rows_y) * t.rows_per_tile;
  int64_t row = int64_t(blockIdx.y) * t.rows_per_tile + local_row;
  const int64_t first = row * a.k + col * VEC;  // element index of this thread's first block
  const uint4* src = in + first * kElementBytes / 16;
  uint8_t* dst = a.x_q + first / 2;
  const int64_t src_step = row_step * a.k * kElementBytes / 16;
  const int64_t dst_step = row_step * a.k / 2;

  uint4 next[kLoads];
  if (col_has_data && row < a.m) {
#pragma unroll
    for (int i = 0; i < kLoads; ++i) next[i] = __ldg(src + i);
  }
  // the trip count depends on blockIdx.y only, so every lane reaches the shuffles below
  for (int64_t tile = blockIdx.y; tile < t.row_tiles;
       tile += t.data_rows_y, row += row_step, src += src_step, dst += dst_step) {
    const bool row_ok = local_row < t.rows_per_tile && row < a.m;
    const bool has_data = row_ok && col_has_data;
    uint4 v[kLoads];
#pragma unroll
    for (int i = 0; i < kLoads; ++i) v[i] = next[i];
    if (col_has_data && row + row_step < a.m) {
#pragma unroll
      for (int i = 0; i < kLoads; ++i) next[i] = __ldg(src + src_step + i);
    }

    float f[VEC];
    if (has_data) {
#pragma unroll
      for (int i = 0; i < kLoads; ++i) In::widen(v[i], f + i * In::kPerVector);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) f[i] = 0.0f;
    }
    float amax = fabsf(f[0]);
#pragma unroll
    for (int i = 1; i < VEC; ++i) amax = amax_fold(amax, f[i]);

    BlockScale s;
    if constexpr (UE8M0) {
      s = mxfp4_block_scale(amax);
    } else {
      if (a.global_scale_per_row && row_ok) {
        row_scale = nvfp4_row_scale(a.global_scale[row], a.is_global_scale_inversed);
      }
      s = nvfp4_block_scale(amax, row_scale);
    }

    if (has_data) {
      typename PackedBlock<VEC>::type packed;
      uint32_t* words = reinterpret_cast<uint32_t*>(&packed);
#pragma unroll
      for (int w = 0; w < VEC / 8; ++w) {
        uint32_t word = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int e = 8 * w + 2 * i;
          word |= e2m1x2(mul_rn(f[e], s.out_scale), mul_rn(f[e + 1], s.out_scale)) << (8 * i);
        }
        words[w] = word;
      }
      __stcs(reinterpret_cast<typename PackedBlock<VEC>::type*>(dst), packed);
    }

    const uint32_t sf_byte = has_data ? s.sf : 0u;
    if constexpr (LAYOUT == SfLayout::kLinear) {
      if (has_data) a.sf[sf_row_offset(row, nk, LAYOUT) + sf_col] = uint8_t(sf_byte);
    } else {
      // lanes 4j..4j+3 hold block columns 4q..4q+3 of one row (tiles are multiples of 4 columns):
      // lane 4j writes the four scales, contiguous in both swizzled layouts, as one word
      uint32_t word = sf_byte;
      word |= __shfl_down_sync(0xffffffffu, sf_byte, 1) << 8;
      word |= __shfl_down_sync(0xffffffffu, sf_byte, 2) << 16;
      word |= __shfl_down_sync(0xffffffffu, sf_byte, 3) << 24;
      if ((threadIdx.x & 3) == 0 && row_ok && col_in_sf) {
        *reinterpret_cast<uint32_t*>(a.sf + sf_row_offset(row, nk, LAYOUT) + sf_col) = word;
      }
    }
  }
}

template <InputDtype D, int VEC, bool UE8M0, SfLayout LAYOUT>
cudaError_t launch_quantize_typed(const QuantizeLaunch& a, cudaStream_t stream) {
  const int64_t nk = a.k / VEC;
  const int64_t cols = sf_cols(nk, LAYOUT);
  Tiling t;
  int64_t tiles_k;
  if (cols >= kThreads) {
    t.cols_per_tile = kThreads;
    t.rows_per_tile = 1;
    tiles_k = (cols + kThreads - 1) / kThreads;
  } else {
    t.cols_per_tile = int(cols);
    t.rows_per_tile = kThreads / t.cols_per_tile;
    tiles_k = 1;
  }
  t.row_tiles = (a.m + t.rows_per_tile - 1) / t.rows_per_tile;
  if (tiles_k > 0x7FFFFFFF) return cudaErrorInvalidValue;
  const int64_t pad_words = (sf_rows(a.m, LAYOUT) - a.m) * (cols / 4);
  if (pad_words >= (int64_t(1) << 32)) return cudaErrorInvalidValue;
  // one wave of resident CTAs; each walks row tiles with stride data_rows_y
  static const int ctas_per_sm = [] {
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, quantize_kernel<D, VEC, UE8M0, LAYOUT>, kThreads, 0) !=
        cudaSuccess) {
      (void)cudaGetLastError();
      n = 0;
    }
    return std::max(n, 1);
  }();
  const int64_t target_y = std::max<int64_t>(1, int64_t(a.num_sms) * ctas_per_sm / tiles_k);
  const int64_t grid_y = std::min<int64_t>(std::min<int64_t>(t.row_tiles, target_y), kMaxGridY / 2);
  t.data_rows_y = unsigned(grid_y);
  const int64_t pad_y = std::min<int64_t>((pad_words + tiles_k * kThreads - 1) / (tiles_k * kThreads), kMaxGridY / 2);
  const dim3 grid(unsigned(tiles_k), unsigned(grid_y + pad_y));
  quantize_kernel<D, VEC, UE8M0, LAYOUT><<<grid, kThreads, 0, stream>>>(a, t);
  return cudaGetLastError();
}

template <InputDtype D, int VEC, bool UE8M0>
cudaError_t launch_quantize_layout(const QuantizeLaunch& a, cudaStream_t stream) {
  switch (SfLayout(a.sf_layout)) {
    case SfLayout::kSwizzled128x4: return launch_quantize_typed<D, VEC, UE8M0, SfLayout::kSwizzled128x4>(a, stream);
    case SfLayout::kSwizzled8x4: return launch_quantize_typed<D, VEC, UE8M0, SfLayout::kSwizzled8x4>(a, stream);
    case SfLayout::kLinear: return launch_quantize_typed<D, VEC, UE8M0, SfLayout::kLinear>(a, stream);
  }
  return cudaErrorInvalidValue;
}

template <InputDtype D>
cudaError_t launch_quantize_recipe(const QuantizeLaunch& a, cudaStream_t stream) {
  return a.sf_use_ue8m0 ? launch_quantize_layout<D, 32, true>(a, stream)
                        : launch_quantize_layout<D, 16, false>(a, stream);
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
