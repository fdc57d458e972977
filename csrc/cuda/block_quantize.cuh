// Device building blocks shared by the plain (quantize.cu) and fused (fused.cu) quantize kernels: the
// exact widening of the input formats, the quantization of one scale block held by one thread, the
// scale-factor stores, the zeroing of the swizzled layouts' padding rows, and the two kernels that the
// plain quantize and the fused activations share: the elementwise kernel (a thread per scale block,
// prefetching row tiles) and, for small inputs, the split kernel (a scale block over 1-4 lanes).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <utility>

#include "../numerics.h"
#include "launch.h"

namespace fp4op::cuda {

constexpr int kThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- Programmatic Dependent Launch (see LaunchStream) ----------------------------------------------

// Every kernel calls this before it touches global memory: waits until the previous kernel on the stream
// has completed and its writes are visible (a no-op when the kernel was launched without PDL), then lets
// the next kernel start launching. Nothing before it may read or write global memory: that includes
// this kernel's outputs, which the previous kernel may still be reading if the allocator reused their
// memory. Arithmetic on the launch arguments may come first (it overlaps the wait).
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// wait_for_previous_kernel once `a` and `b` (values below 2^31) are computed: the wait is predicated on
// them, so the compiler cannot schedule their arithmetic after it (it moves plain arithmetic past the
// wait otherwise). The predicate is always true.
__device__ __forceinline__ void wait_for_previous_kernel_after(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n\t.reg .pred p;\n\tor.b32 %0, %0, %1;\n\tsetp.lt.u32 p, %0, 0x80000000;\n\t@p griddepcontrol.wait;\n\t}"
      : "+r"(a)
      : "r"(b)
      : "memory");
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// kernel<<<grid, threads, 0, stream>>>(args...), with the PDL attribute when stream.pdl, in thread block
// clusters of cluster_x CTAs along x when cluster_x > 0 (sm_90+).
template <class... Params, class... Args>
cudaError_t launch_kernel_in_clusters(void (*kernel)(Params...), dim3 grid, unsigned threads, unsigned cluster_x,
                                      const LaunchStream& stream, Args&&... args) {
  cudaLaunchAttribute attributes[2]{};
  attributes[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attributes[0].val.programmaticStreamSerializationAllowed = stream.pdl ? 1 : 0;
  attributes[1].id = cudaLaunchAttributeClusterDimension;
  attributes[1].val.clusterDim.x = cluster_x;
  attributes[1].val.clusterDim.y = 1;
  attributes[1].val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = 0;
  config.stream = stream.stream;
  config.attrs = attributes;
  config.numAttrs = cluster_x > 0 ? 2 : 1;
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  return err != cudaSuccess ? err : cudaGetLastError();
}

template <class... Params, class... Args>
cudaError_t launch_kernel_with(void (*kernel)(Params...), dim3 grid, unsigned threads, const LaunchStream& stream,
                               Args&&... args) {
  return launch_kernel_in_clusters(kernel, grid, threads, 0, stream, std::forward<Args>(args)...);
}

template <class... Params, class... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, const LaunchStream& stream, Args&&... args) {
  return launch_kernel_with(kernel, grid, kThreads, stream, std::forward<Args>(args)...);
}

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

// The e4m3 pair in 16-bit half `j` of `word` as half2: exact (every E4M3 value is an fp16 value).
__device__ __forceinline__ __half2 e4m3_pair(uint32_t word, int j) {
  return __half2(__nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t((word >> (16 * j)) & 0xFFFFu), __NV_E4M3));
}

template <>
struct Input<InputDtype::kFloat8E4M3> {
  static constexpr int kPerVector = 16;
  __device__ __forceinline__ static void widen(const uint4& v, float* f) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const float2 p = __half22float2(e4m3_pair(w[i], j));
        f[4 * i + 2 * j] = p.x;
        f[4 * i + 2 * j + 1] = p.y;
      }
    }
  }
};

// amax_of the widened values of 16 e4m3 values (one fp8 NVFP4 block), computed on their e4m3_pair
// conversions (those that Input::widen makes too) as a tree of half2 maxima, two values an
// instruction where amax_of takes one: the quantize kernels are limited by the ALU pipe that runs
// both. Widening is exact and monotone, so the maximum is the same value (a NaN where amax_of gives
// one: maxNum drops NaNs unless both are). (For bf16/fp16 inputs and for fp8 MXFP4 the same measured
// slower: H100 kernel lab run 12.)
__device__ __forceinline__ float e4m3_abs_max(const uint4& v) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  __half2 m[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) m[i] = __hmax2(__habs2(e4m3_pair(w[i], 0)), __habs2(e4m3_pair(w[i], 1)));
  const __half2 r = __hmax2(__hmax2(m[0], m[1]), __hmax2(m[2], m[3]));
  return fmaxf(__low2float(r), __high2float(r));
}

// The packed codes of 8, 16 or 32 elements: 4, 8 or 16 bytes.
template <int VEC>
struct PackedBlock;
template <>
struct PackedBlock<8> {
  using type = uint32_t;
};
template <>
struct PackedBlock<16> {
  using type = uint2;
};
template <>
struct PackedBlock<32> {
  using type = uint4;
};

template <bool UE8M0>
struct Recipe {
  static constexpr int kVec = UE8M0 ? 32 : 16;
};

__device__ __forceinline__ Nvfp4RowScale row_scale_of(const QuantizeTarget& q, int64_t row) {
  return nvfp4_row_scale(q.global_scale[q.global_scale_per_row ? row : 0], q.is_global_scale_inversed);
}

// The NaN-ignoring maximum of |f| (a block of NaNs gives NaN) as a tree: log2(N) dependent steps, not
// N - 1. maxNum is associative and commutative, so any grouping (also across lanes) gives these bits.
// (Steps spelled out: a loop over the step width was left rolled for N = 32, its array in local memory.)
template <int N>
__device__ __forceinline__ float amax_of(const float (&f)[N]) {
  static_assert(N == 8 || N == 16 || N == 32, "blocks of 8, 16 or 32 values");
  float m[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; ++i) m[i] = amax_fold(fabsf(f[2 * i]), f[2 * i + 1]);
  if constexpr (N == 32) {
#pragma unroll
    for (int i = 0; i < 8; ++i) m[i] = fmaxf(m[i], m[i + 8]);
  }
  if constexpr (N >= 16) {
#pragma unroll
    for (int i = 0; i < 4; ++i) m[i] = fmaxf(m[i], m[i + 4]);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) m[i] = fmaxf(m[i], m[i + 2]);
  return fmaxf(m[0], m[1]);
}

// e2m1x8 of f[i] * s where s is a power of two, 0 or 1 (the MXFP4 scales), on half2 arithmetic: two
// values an instruction where e2m1_magnitude takes one. Each a = RN(f * s) has at most 11 significant
// bits (fp16 input; bf16 8, e4m3 4), so float16 holds it exactly wherever its code can be non-zero
// (|a| >= 2^-14; below, the float16 rounding stays far below 0.25: code 0, sign kept); above 65504 it
// becomes inf and, like any a > 6, clamps to 6; NaN stays NaN (the positive canonical one) and maps
// to 6. e2m1_magnitude's pieces then run in float16 with 2^10 in place of 2^23: 1024 + code.
__device__ __forceinline__ uint32_t e2m1x8_pow2_scaled(const float* f, float s) {
  const __half2 six = __float2half2_rn(6.0f), two = __float2half2_rn(2.0f), half = __float2half2_rn(0.5f);
  const __half2 c1024 = __float2half2_rn(1024.0f), c1026 = __float2half2_rn(1026.0f),
                c1028 = __float2half2_rn(1028.0f);
  uint32_t codes[4], signs[4];  // pair p: values 2p (low half), 2p + 1 (high half)
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const __half2 h = __floats2half2_rn(mul_rn(f[2 * p], s), mul_rn(f[2 * p + 1], s));
    const __half2 a = __hmin2(__habs2(h), six);  // minNum: NaN -> 6
    const __half2 k = __hmin2(__hmin2(__hfma2(a, two, c1024), __hadd2(a, c1026)), __hfma2(a, half, c1028));
    codes[p] = *reinterpret_cast<const uint32_t*>(&k);  // bytes 0 and 2: the codes
    signs[p] = *reinterpret_cast<const uint32_t*>(&h);  // bytes 1 and 3: the signs in bit 7
  }
  // [codes of values 0, 2, 1, 3] and [4, 6, 5, 7], then the even and the odd ones; the same for signs
  const uint32_t c01 = __byte_perm(codes[0], codes[1], 0x6240), c23 = __byte_perm(codes[2], codes[3], 0x6240);
  const uint32_t s01 = __byte_perm(signs[0], signs[1], 0x7351), s23 = __byte_perm(signs[2], signs[3], 0x7351);
  const uint32_t even_codes = __byte_perm(c01, c23, 0x5410), odd_codes = __byte_perm(c01, c23, 0x7632);
  const uint32_t even_signs = __byte_perm(s01, s23, 0x5410), odd_signs = __byte_perm(s01, s23, 0x7632);
  return (even_codes + (odd_codes << 4)) | ((even_signs >> 4) & 0x08080808u) | (odd_signs & 0x80808080u);
}

// The E2M1 codes of f[i] * out_scale, N / 8 words; POW2: out_scale is an MXFP4 scale (see
// e2m1x8_pow2_scaled).
template <int N, bool POW2>
__device__ __forceinline__ void e2m1_words(const float (&f)[N], float out_scale, uint32_t* words) {
#pragma unroll
  for (int w = 0; w < N / 8; ++w) {
    if constexpr (POW2 && !FP4OP_NATIVE_E2M1) {
      words[w] = e2m1x8_pow2_scaled(f + 8 * w, out_scale);
    } else {
      float scaled[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) scaled[i] = mul_rn(f[8 * w + i], out_scale);
      words[w] = e2m1x8(scaled);
    }
  }
}

template <bool UE8M0>
__device__ __forceinline__ BlockScale block_scale(float amax, Nvfp4RowScale rs) {
  return UE8M0 ? mxfp4_block_scale(amax) : nvfp4_block_scale(amax, rs);
}

// Quantizes one block of VEC values held by this thread, whose amax_of is `amax`: writes its packed
// codes to `dst` and returns its scale byte.
template <int VEC, bool UE8M0>
__device__ __forceinline__ uint32_t quantize_block(const float (&f)[VEC], float amax, Nvfp4RowScale rs,
                                                   uint8_t* dst) {
  const BlockScale s = block_scale<UE8M0>(amax, rs);
  typename PackedBlock<VEC>::type packed;
  e2m1_words<VEC, UE8M0>(f, s.out_scale, reinterpret_cast<uint32_t*>(&packed));
  __stcs(reinterpret_cast<typename PackedBlock<VEC>::type*>(dst), packed);
  return s.sf;
}

// Stores the scale byte of block column `col` of `row`. The 4 lanes from a multiple of 4 must hold
// columns 4q..4q+3 of one row: in the swizzled layouts those four bytes are contiguous and the group's
// first lane writes them as one word (every lane of the warp must call this); `in_sf` says the column
// exists in the sf tensor (real or padding), `has_data` that it is real.
template <SfLayout LAYOUT>
__device__ __forceinline__ void store_sf(uint8_t* sf, int64_t row, int64_t col, int64_t nk, uint32_t sf_byte,
                                         bool row_ok, bool in_sf, bool has_data) {
  if constexpr (LAYOUT == SfLayout::kLinear) {
    if (has_data) sf[sf_offset(row, col, nk, LAYOUT)] = uint8_t(sf_byte);
  } else {
    uint32_t word = sf_byte;
    word |= __shfl_down_sync(kFullMask, sf_byte, 1) << 8;
    word |= __shfl_down_sync(kFullMask, sf_byte, 2) << 16;
    word |= __shfl_down_sync(kFullMask, sf_byte, 3) << 24;
    if (threadIdx.x % 4 == 0 && row_ok && in_sf) {
      *reinterpret_cast<uint32_t*>(sf + sf_offset(row, col, nk, LAYOUT)) = word;
    }
  }
}

// Zeroes the padding rows [m, sf_rows) of a swizzled layout, one padding item a thread (see
// padding_items); `first` is this thread's index among the `count` threads doing it. 32-bit index
// math: the launchers check that there are fewer than 2^32 items.
//  - 128x4: the padding rows are the last rows of the last 128-row group; an item is a 16-byte line
//    of a 512-byte tile (row j = r % 32 of rows j, j + 32, j + 64, j + 96 at 4 block columns), zeroed
//    with one store where all four rows are padding (j >= m % 128), else word by word for the padding
//    rows among them. A small M has most of its sf bytes here (M = 1: 127 of 128 rows).
//  - 8x4: at most 7 padding rows; an item is a 4-byte word (4 block columns of a row).
template <SfLayout LAYOUT>
__device__ void zero_padding_rows(const QuantizeTarget& q, int64_t nk, uint32_t first, uint32_t count) {
  const uint32_t col_groups = uint32_t(sf_cols(nk, LAYOUT) / 4);
  if constexpr (LAYOUT == SfLayout::kSwizzled128x4) {
    const uint32_t rows_in_group = uint32_t(q.m % 128);
    if (rows_in_group == 0) return;
    const int64_t group_row = q.m - rows_in_group;
    for (uint32_t i = first; i < 32 * col_groups; i += count) {
      const uint32_t j = i % 32;  // consecutive threads: consecutive lines of a tile
      uint8_t* line = q.sf + sf_offset(group_row + j, int64_t(i / 32) * 4, nk, LAYOUT);
      if (j >= rows_in_group) {
        *reinterpret_cast<uint4*>(line) = make_uint4(0u, 0u, 0u, 0u);
      } else {
#pragma unroll
        for (uint32_t g = 1; g < 4; ++g) {
          if (j + 32 * g >= rows_in_group) reinterpret_cast<uint32_t*>(line)[g] = 0u;
        }
      }
    }
  } else {
    const uint32_t words = uint32_t(sf_rows(q.m, LAYOUT) - q.m) * col_groups;
    for (uint32_t i = first; i < words; i += count) {
      const int64_t row = q.m + i / col_groups;
      const int64_t col = int64_t(i % col_groups) * 4;
      *reinterpret_cast<uint32_t*>(q.sf + sf_offset(row, col, nk, LAYOUT)) = 0u;
    }
  }
}

// The items of zero_padding_rows (threads that zero the padding rows); -1 where there are 2^32 or
// more (its 32-bit index math), which the launchers refuse.
inline int64_t padding_items(const QuantizeTarget& q, int64_t nk, SfLayout layout) {
  const int64_t col_groups = sf_cols(nk, layout) / 4;
  int64_t items = 0;
  if (layout == SfLayout::kSwizzled128x4) items = q.m % 128 != 0 ? 32 * col_groups : 0;
  if (layout == SfLayout::kSwizzled8x4) items = (sf_rows(q.m, layout) - q.m) * col_groups;
  return items < (int64_t(1) << 32) ? items : -1;
}

// Resident CTAs of `KERNEL` (kThreads threads each) a multiprocessor, at least 1; queried once.
template <auto KERNEL>
int resident_ctas_per_sm() {
  static const int n = [] {
    int count = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&count, KERNEL, kThreads, 0) != cudaSuccess) {
      (void)cudaGetLastError();
      count = 0;
    }
    return std::max(count, 1);
  }();
  return n;
}

// ---- the elementwise kernel -------------------------------------------------------------------------

// What the fused activations' sources read (the plain quantize's ignores it).
struct ActivationArgs {
  int kind;                  // fp4op::fused::Activation
  float coef;                // the activation's factor: gelu_new's sqrt(2 / pi), sigmoid_mul's alpha
  const float* coef_device;  // or that factor read by the kernel (a float32 tensor), or nullptr
};

// The inputs of an elementwise quantize: up to two row-major streams (x, or gate and up) of the same
// shape; row r of stream s starts at in[s] + r * row_stride[s] elements, rows are 16-byte aligned.
struct ElementwiseArgs {
  const void* in[2];
  int64_t row_stride[2];
  ActivationArgs activation;
  QuantizeTarget out;
};

// A CTA covers rows_per_tile rows x cols_per_tile scale-block columns, one thread per block.
// Row-major tiles hold consecutive rows, a warp 32 columns of a row: its 8 scale words land in 8
// sectors of a swizzled layout, which cost 4-8 points of copy bandwidth on the H100. Sector tiles
// (swizzled layouts, large M) hold 4 columns x 64 rows, warp w 8 rows chosen so that its 8 scale
// words fill one 32-byte sector: in the 8x4 layout 8 consecutive rows; in the 128x4 layout (16 bytes
// a row r % 32 of a 128-row group, holding rows r, r + 32, r + 64, r + 96) rows 2w, 2w + 1 of each
// 32-row quarter, with the two halves of the group (r % 32 < 16, >= 16) in consecutive tiles.
// (8 rows x 32 columns, the warps side by side, was measured only in a build with inflated register
// counts, where it beat this shape for bf16 MXFP4: to measure again.) Where row tiles hold 1 or 2 rows
// and there are enough rows, sector_walk_kernel takes both places (see launch_elementwise_layout).

// Sector tiles from this many rows up; below, a row-major tile of up to 256 columns keeps the few
// rows in few CTAs.
constexpr int64_t kSectorTileMinRows = 128;
// The sf bytes from which fp8 NVFP4 128x4 takes sector tiles too (see launch_elementwise_layout).
constexpr int64_t kSectorTileMinSfBytes = int64_t(16) << 20;

struct Tiling {
  int cols_per_tile;
  int rows_per_tile;
  bool sector_tiles;
  int64_t row_tiles;
  unsigned data_rows_y;  // gridDim.y of the quantizing CTAs (even with 128x4 sector tiles, unless each
                         // CTA has one tile); the CTAs above zero the padding rows
};

// The row of `local_row` (threadIdx.x / cols_per_tile) in row tile `tile`. Advancing `tile` by
// data_rows_y advances the row by data_rows_y * rows_per_tile.
template <SfLayout LAYOUT>
__device__ __forceinline__ int64_t tile_row(const Tiling& t, int64_t tile, int local_row) {
  if (LAYOUT == SfLayout::kSwizzled128x4 && t.sector_tiles) {
    const int warp = local_row >> 3, lane_row = local_row & 7;
    return (tile >> 1) * 128 + (tile & 1) * 16 + 2 * warp + (lane_row & 1) + 32 * (lane_row >> 1);
  }
  return tile * t.rows_per_tile + local_row;
}

// One thread per scale block: VEC elements of each stream read with 16-byte loads (the loads of a
// warp cover whole 32-byte sectors), turned into VEC floats by SRC::produce, quantized and written
// with one 8- or 16-byte store. Each thread walks row tiles with a stride of data_rows_y and loads the
// next tile's block before converting the current one, so that memory traffic overlaps arithmetic.
// (A shared-memory ring filled by cp.async a few tiles ahead was measured: 58% of copy bandwidth
// against 84%, its fills stall on the MIO queue. Loading two tiles ahead in registers was no faster.)
// SRC: kStreams, kElementBytes, produce(const uint4 (&)[kStreams][kLoads], activation, float (&)[VEC]),
// block_amax(the same loads, the produced values): their amax_of; kSectorWalk: whether the launcher may
// take sector_walk_kernel instead.
template <class SRC, int VEC, bool UE8M0, SfLayout LAYOUT>
__global__ void __launch_bounds__(kThreads) elementwise_kernel(const ElementwiseArgs a, const Tiling t) {
  constexpr int kStreams = SRC::kStreams;
  constexpr int kLoads = VEC * SRC::kElementBytes / 16;
  // the thread's place in the tile before the wait (see split_kernel)
  const int local_row = threadIdx.x / t.cols_per_tile, tile_col = threadIdx.x % t.cols_per_tile;
  wait_for_previous_kernel_after(local_row, tile_col);
  const QuantizeTarget& q = a.out;
  const int64_t nk = q.k / VEC;
  if (blockIdx.y >= t.data_rows_y) {
    if constexpr (LAYOUT != SfLayout::kLinear) {
      zero_padding_rows<LAYOUT>(q, nk, ((blockIdx.y - t.data_rows_y) * gridDim.x + blockIdx.x) * kThreads + threadIdx.x,
                                gridDim.x * (gridDim.y - t.data_rows_y) * kThreads);
    }
    return;
  }

  const int64_t col = int64_t(blockIdx.x) * t.cols_per_tile + tile_col;
  const bool col_has_data = local_row < t.rows_per_tile && col < nk;
  const bool col_in_sf = local_row < t.rows_per_tile && col < sf_cols(nk, LAYOUT);

  // per-iteration pointer steps instead of 64-bit index products in the loop
  const int64_t row_step = int64_t(t.data_rows_y) * t.rows_per_tile;
  int64_t row = tile_row<LAYOUT>(t, blockIdx.y, local_row);
  const uint4* src[kStreams];
  int64_t src_step[kStreams];
#pragma unroll
  for (int s = 0; s < kStreams; ++s) {
    src[s] = static_cast<const uint4*>(a.in[s]) + (row * a.row_stride[s] + col * VEC) * SRC::kElementBytes / 16;
    src_step[s] = row_step * a.row_stride[s] * SRC::kElementBytes / 16;
  }
  // Loads this thread's block of the next row tile (nothing past the last row) into `next`.
  uint4 next[kStreams][kLoads];
  int64_t next_row = row;
  auto load_next = [&] {
    if (col_has_data && next_row < q.m) {
#pragma unroll
      for (int s = 0; s < kStreams; ++s) {
#pragma unroll
        for (int i = 0; i < kLoads; ++i) next[s][i] = __ldg(src[s] + i);
      }
    }
#pragma unroll
    for (int s = 0; s < kStreams; ++s) src[s] += src_step[s];
    next_row += row_step;
  };
  load_next();
  // after the first loads, so that a single-tile (small M) launch does not wait for the scale first
  Nvfp4RowScale rs{};
  if (!UE8M0 && !q.global_scale_per_row) rs = row_scale_of(q, 0);
  uint8_t* dst = q.x_q + (row * q.k + col * VEC) / 2;
  const int64_t dst_step = row_step * q.k / 2;
  // the trip count depends on blockIdx.y only, so every lane reaches the shuffles of store_sf
  for (int64_t tile = blockIdx.y; tile < t.row_tiles; tile += t.data_rows_y, row += row_step, dst += dst_step) {
    const bool row_ok = local_row < t.rows_per_tile && row < q.m;
    const bool has_data = row_ok && col_has_data;
    uint4 v[kStreams][kLoads];
#pragma unroll
    for (int s = 0; s < kStreams; ++s) {
#pragma unroll
      for (int i = 0; i < kLoads; ++i) v[s][i] = next[s][i];
    }
    load_next();
    uint32_t sf_byte = 0u;  // the padding value
    if (has_data) {
      if (!UE8M0 && q.global_scale_per_row) rs = row_scale_of(q, row);
      float f[VEC];
      SRC::produce(v, a.activation, f);
      sf_byte = quantize_block<VEC, UE8M0>(f, SRC::block_amax(v, f), rs, dst);
    }
    store_sf<LAYOUT>(q.sf, row, col, nk, sf_byte, row_ok, col_in_sf, has_data);
  }
}

// ---- the sector-walk kernel (row tiles, swizzled layouts) ---------------------------------------------

// The rows of a sector group: the 8 rows whose scale words at 4 block columns fill one 32-byte sector of
// a swizzled layout, the word of slot s (0..7) at byte 4s. 8x4: 8 consecutive rows. 128x4: the 16-byte
// lines of rows 2h and 2h + 1 of a 128-row group (h = group % 16), each holding the words of that row
// and of the rows 32, 64 and 96 below it.
template <SfLayout LAYOUT>
__device__ __forceinline__ int64_t sector_group_row(uint32_t group) {
  if constexpr (LAYOUT == SfLayout::kSwizzled128x4) {
    return int64_t(group >> 4) * 128 + (group & 15) * 2;
  } else {
    return int64_t(group) * 8;
  }
}
template <SfLayout LAYOUT>
__host__ __device__ constexpr int sector_slot_row(int slot) {
  return LAYOUT == SfLayout::kSwizzled128x4 ? (slot >> 2) + 32 * (slot & 3) : slot;
}

// Transposes a 4x4 byte matrix across the 4 lanes of an aligned group: lane c holds row c (M[c][j] in
// byte j) and gets column c (M[i][c] in byte i). `odd_lane`, `high_pair`: c & 1, c & 2.
__device__ __forceinline__ uint32_t transpose_bytes_4x4(uint32_t row, bool odd_lane, bool high_pair) {
  // [M[2a][b], M[2a+1][b], M[2a][b+2], M[2a+1][b+2]] for lane 2a + b
  const uint32_t z = __byte_perm(row, __shfl_xor_sync(kFullMask, row, 1), odd_lane ? 0x3715 : 0x6240);
  return __byte_perm(z, __shfl_xor_sync(kFullMask, z, 2), high_pair ? 0x3276 : 0x5410);
}

// The elementwise kernel's row tiles (a warp reads whole rows of its 32 block columns) with the scale
// bytes written a 32-byte sector at a time. A CTA walks the 8 rows of a sector group in WALK row tiles
// of 8 / WALK rows (thread row r takes slots r * WALK ..), one after another, each thread keeping its
// scale bytes in registers; then the 4 lanes of a block-column group transpose them into the sector's
// words and store them. The slots' rows are constants from the group's first row (no per-tile index
// math), and the walk covers the padding rows too (zero scale bytes), so no CTA zeroes them separately.
template <class SRC, int VEC, bool UE8M0, SfLayout LAYOUT, int WALK>
__global__ void __launch_bounds__(kThreads) sector_walk_kernel(const ElementwiseArgs a, const Tiling t) {
  static_assert(LAYOUT != SfLayout::kLinear && (WALK == 4 || WALK == 8), "swizzled layouts, 1 or 2 rows a tile");
  constexpr int kStreams = SRC::kStreams;
  constexpr int kLoads = VEC * SRC::kElementBytes / 16;
  const int local_row = threadIdx.x / t.cols_per_tile, tile_col = threadIdx.x % t.cols_per_tile;
  wait_for_previous_kernel_after(local_row, tile_col);
  const QuantizeTarget& q = a.out;
  const int64_t nk = q.k / VEC;
  const int64_t col = int64_t(blockIdx.x) * t.cols_per_tile + tile_col;
  const bool in_tile = local_row < 8 / WALK;
  const bool col_has_data = in_tile && col < nk;
  const bool col_in_sf = in_tile && col < sf_cols(nk, LAYOUT);
  // this thread's slots in a group: first_slot + i, i < WALK, at rows group_row + slot_row + delta(i)
  const int first_slot = in_tile ? local_row * WALK : 0;
  const int slot_row = sector_slot_row<LAYOUT>(first_slot);
  constexpr auto delta = [](int i) { return sector_slot_row<LAYOUT>(i) - sector_slot_row<LAYOUT>(0); };

  // strides below 2^25 (the launcher checks), so that a slot's offsets from its group's first row (at most
  // 97 rows) are 32-bit
  const uint32_t src_stride[2] = {uint32_t(a.row_stride[0] * SRC::kElementBytes / 16),
                                  uint32_t(a.row_stride[kStreams - 1] * SRC::kElementBytes / 16)};
  const uint32_t dst_stride = uint32_t(q.k / 2);
  const uint4* group_src[kStreams];
  uint8_t* group_dst = nullptr;
  int rows_left = 0;  // rows from the group's first row of this thread to M, at most 128
  auto start_group = [&](uint32_t group) {
    const int64_t row = sector_group_row<LAYOUT>(group) + slot_row;
#pragma unroll
    for (int s = 0; s < kStreams; ++s) {
      group_src[s] = static_cast<const uint4*>(a.in[s]) + (row * a.row_stride[s] + col * VEC) * SRC::kElementBytes / 16;
    }
    group_dst = q.x_q + (row * q.k + col * VEC) / 2;
    const int64_t left = q.m - row;
    rows_left = left <= 0 ? 0 : left >= 128 ? 128 : int(left);
  };
  uint4 next[kStreams][kLoads];
  auto load = [&](int d) {  // this thread's block at `d` rows past its group's first row, into `next`
    if (col_has_data && d < rows_left) {
#pragma unroll
      for (int s = 0; s < kStreams; ++s) {
#pragma unroll
        for (int j = 0; j < kLoads; ++j) next[s][j] = __ldg(group_src[s] + d * src_stride[s] + j);
      }
    }
  };
  uint32_t group = blockIdx.y;
  start_group(group);
  load(0);
  Nvfp4RowScale rs{};
  if (!UE8M0 && !q.global_scale_per_row) rs = row_scale_of(q, 0);
  const uint32_t lane = uint32_t(tile_col) & 3u;  // in its group of 4 block columns
  // the trip count depends on blockIdx.y only, so every lane reaches the shuffles
  for (; group < uint32_t(t.row_tiles); group += t.data_rows_y) {
    uint32_t bytes[2] = {0u, 0u};  // the scale bytes of slots first_slot + i in byte i % 4 of bytes[i / 4]
    uint8_t* dst = group_dst;
    const int rows = rows_left;
#pragma unroll
    for (int i = 0; i < WALK; ++i) {
      uint4 v[kStreams][kLoads];
#pragma unroll
      for (int s = 0; s < kStreams; ++s) {
#pragma unroll
        for (int j = 0; j < kLoads; ++j) v[s][j] = next[s][j];
      }
      if (i + 1 < WALK) {
        load(delta(i + 1));
      } else {
        start_group(group + t.data_rows_y);  // past the last group: rows_left 0, nothing loaded
        load(0);
      }
      if (col_has_data && delta(i) < rows) {
        if (!UE8M0 && q.global_scale_per_row) {
          rs = row_scale_of(q, sector_group_row<LAYOUT>(group) + slot_row + delta(i));
        }
        float f[VEC];
        SRC::produce(v, a.activation, f);
        const uint32_t sf_byte = quantize_block<VEC, UE8M0>(f, SRC::block_amax(v, f), rs, dst + delta(i) * dst_stride);
        bytes[i / 4] |= sf_byte << (8 * (i % 4));
      }
    }
    // lane c's bytes of slots first_slot + 4h .. + 4h + 3 -> the word of slot first_slot + 4h + c
    uint8_t* sector = q.sf + sf_offset(sector_group_row<LAYOUT>(group), col & ~int64_t(3), nk, LAYOUT);
    uint32_t* words = reinterpret_cast<uint32_t*>(sector) + first_slot;
#pragma unroll
    for (int h = 0; h < WALK / 4; ++h) {
      const uint32_t word = transpose_bytes_4x4(bytes[h], lane & 1u, lane & 2u);
      if (col_in_sf) words[4 * h + lane] = word;
    }
  }
}

// ---- the split kernel (small inputs) ------------------------------------------------------------------

// Small inputs (a decode step's few rows) take a kernel whose time is latency, not bandwidth: one
// 16-byte load of each stream a thread, so a scale block is shared by kLanes adjacent lanes (2 for
// bf16 NVFP4, 4 for bf16 MXFP4) that combine their maxima with shuffles, compute the block scale
// each and store their own codes. A thread's dependent chain is 1/kLanes of the elementwise kernel's.
// H100, CUDA-graph replay (scripts/kernel_lab.cu): M = 1 and 16 at K = 4096 and 16384 went from
// 1.29-1.82x to 1.08-1.43x the time of an empty kernel; CTAs of 128 threads measured better than 64.
// With its index math moved before the PDL wait (kernel lab run 17): 0.93-1.16 us a call at M = 1 and
// M = 16, K <= 2048 (an empty kernel: 1.14 us), 1.1-1.6 us at M = 16, K = 4096-16384, where 2-3 CTAs
// an SM issue ~250 instructions a thread; the elementwise kernel measured slower there too.
constexpr int kSplitThreads = 128;
// Inputs of up to this many 16-byte loads (a stream) an SM take the split kernel (the H100 holds 2048
// threads an SM): up to a few MiB, where it also beat the elementwise kernel (128 x 8192: 6.2 vs
// 6.5 us, 1024 x 2048: 7.4 vs 7.8 us); above, the elementwise kernel's prefetching loop.
constexpr int64_t kSplitMaxLoadsPerSm = 2048;

template <class SRC, int VEC>
struct Split {
  static constexpr int kPer = 16 / SRC::kElementBytes;  // elements of one 16-byte load
  static constexpr int kLanes = VEC / kPer;             // lanes of a scale block: 1, 2 or 4
};

// Thread t: row t / (cols * kLanes), block column (t / kLanes) % cols, part t % kLanes of that block's
// elements. Columns of a swizzled layout past the last block (cols > nk) store zero scale bytes; the
// CTAs from data_ctas on zero the padding rows.
template <class SRC, int VEC, bool UE8M0, SfLayout LAYOUT>
__global__ void __launch_bounds__(kSplitThreads) split_kernel(const ElementwiseArgs a, const uint32_t data_ctas) {
  constexpr int kPer = Split<SRC, VEC>::kPer;
  constexpr int kLanes = Split<SRC, VEC>::kLanes;
  const QuantizeTarget& q = a.out;
  const int64_t nk = q.k / VEC;
  const int64_t cols = sf_cols(nk, LAYOUT);
  // The thread's block and every offset before the wait: index math reads no memory, so under PDL it
  // overlaps the previous kernel's tail instead of delaying this kernel's loads (H100, CUDA-graph
  // replay: the block, M = 1 1.22-1.46 -> 0.94-1.16 us a call, kernel lab run 17; the offsets, ~30
  // instructions a thread, another 0.05-0.12 us at M = 16 and in the linear layout, run 26). 32-bit
  // divisions: the launcher takes this kernel for fewer than 2^31 threads.
  const uint32_t t = blockIdx.x * kSplitThreads + threadIdx.x;
  const uint32_t row_threads = uint32_t(cols) * kLanes;
  const uint32_t row32 = t / row_threads, col32 = (t % row_threads) / kLanes;
  const int64_t row = row32, col = col32;
  const int part = int(t % kLanes);
  // The wait's predicate reads the offsets, so that ptxas keeps them above it (offsets >> 33 is below
  // 2^31 whatever the offsets).
  int64_t in_offset[SRC::kStreams];  // in 16-byte loads
  uint64_t any_offset = 0;
#pragma unroll
  for (int s = 0; s < SRC::kStreams; ++s) {
    in_offset[s] = (row * a.row_stride[s] + col * VEC + part * kPer) * SRC::kElementBytes / 16;
    any_offset |= uint64_t(in_offset[s]);
  }
  const int64_t xq_offset = (row * q.k + col * VEC + part * kPer) / 2;
  const int64_t sf_byte_offset = sf_offset(row, col, nk, LAYOUT);
  any_offset |= uint64_t(xq_offset) | uint64_t(sf_byte_offset);
  wait_for_previous_kernel_after(row32 | col32, uint32_t(any_offset >> 33));
  if (blockIdx.x >= data_ctas) {
    if constexpr (LAYOUT != SfLayout::kLinear) {
      zero_padding_rows<LAYOUT>(q, nk, (blockIdx.x - data_ctas) * kSplitThreads + threadIdx.x,
                                (gridDim.x - data_ctas) * kSplitThreads);
    }
    return;
  }
  const bool row_ok = row < q.m;
  const bool has_data = row_ok && col < nk;
  uint4 v[SRC::kStreams][1];
  Nvfp4RowScale rs{};
  float f[kPer];
  if (has_data) {
#pragma unroll
    for (int s = 0; s < SRC::kStreams; ++s) v[s][0] = __ldg(static_cast<const uint4*>(a.in[s]) + in_offset[s]);
    if (!UE8M0) rs = row_scale_of(q, row);
    SRC::produce(v, a.activation, f);
  } else {
#pragma unroll
    for (int i = 0; i < kPer; ++i) f[i] = 0.0f;
  }
  // every lane reaches the shuffles (a block's lanes are adjacent, kLanes-aligned)
  float amax = has_data ? SRC::block_amax(v, f) : 0.0f;
#pragma unroll
  for (int offset = 1; offset < kLanes; offset *= 2) amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, offset));
  uint32_t sf_byte = 0u;  // the padding value
  if (has_data) {
    const BlockScale s = block_scale<UE8M0>(amax, rs);
    typename PackedBlock<kPer>::type packed;
    e2m1_words<kPer, UE8M0>(f, s.out_scale, reinterpret_cast<uint32_t*>(&packed));
    __stcs(reinterpret_cast<typename PackedBlock<kPer>::type*>(q.x_q + xq_offset), packed);
    sf_byte = s.sf;
  }
  // A byte a block from its first lane, in every layout (as fast as gathering the swizzled layouts'
  // words with shuffles, run 26). The lanes of padding columns (col >= nk) store zeros.
  if (row_ok && part == 0) q.sf[sf_byte_offset] = uint8_t(sf_byte);
}

template <class SRC, int VEC, bool UE8M0, SfLayout LAYOUT>
cudaError_t launch_split(const ElementwiseArgs& a, int64_t threads, int64_t pad_items, const LaunchStream& stream) {
  const int64_t data_ctas = (threads + kSplitThreads - 1) / kSplitThreads;
  const int64_t pad_ctas = std::min<int64_t>((pad_items + kSplitThreads - 1) / kSplitThreads, 4096);
  return launch_kernel_with(split_kernel<SRC, VEC, UE8M0, LAYOUT>, dim3(unsigned(data_ctas + pad_ctas)),
                            kSplitThreads, stream, a, uint32_t(data_ctas));
}

template <class SRC, int VEC, bool UE8M0, SfLayout LAYOUT>
cudaError_t launch_elementwise_layout(const ElementwiseArgs& a, const LaunchStream& stream) {
  constexpr int kMaxGridY = 65535;
  const QuantizeTarget& q = a.out;
  const int64_t nk = q.k / VEC;
  const int64_t cols = sf_cols(nk, LAYOUT);
  const int64_t split_threads = q.m * cols * Split<SRC, VEC>::kLanes;
  if (split_threads <= int64_t(q.num_sms) * kSplitMaxLoadsPerSm) {
    const int64_t pad_items = padding_items(q, nk, LAYOUT);
    if (pad_items < 0) return cudaErrorInvalidValue;
    return launch_split<SRC, VEC, UE8M0, LAYOUT>(a, split_threads, pad_items, stream);
  }
  Tiling t;
  // Row tiles: up to 256 block columns of a row, or as many rows of all columns as fit.
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
  t.row_tiles = (q.m + t.rows_per_tile - 1) / t.rows_per_tile;
  if (tiles_k > 0x7FFFFFFF) return cudaErrorInvalidValue;
  if constexpr (LAYOUT != SfLayout::kLinear && SRC::kSectorWalk) {
    // Row tiles of 1 or 2 rows walk the sector groups (sector_walk_kernel) when the groups fill a wave of
    // CTAs; a CTA's share is rounded so that every CTA walks as many (32-bit group indices and offsets).
    // H100, kernel lab run 25: fp8 NVFP4 128x4 73-79% -> 84-90% of copy, 8x4 81-83% -> 85-90%; bf16
    // NVFP4 128x4 87.0 -> 88.3% at 8192x4096 (against sector tiles), 95.6 -> 98.8% at 32768x16384.
    const int64_t groups = sf_rows(q.m, LAYOUT) / 8;
    const int64_t narrow_stride = int64_t(1) << 25;
    const bool narrow = groups < (int64_t(1) << 31) && q.k / 2 < narrow_stride &&
                        a.row_stride[0] * SRC::kElementBytes / 16 < narrow_stride &&
                        a.row_stride[SRC::kStreams - 1] * SRC::kElementBytes / 16 < narrow_stride;
    if (t.rows_per_tile <= 2 && narrow) {
      constexpr auto kWalk8 = sector_walk_kernel<SRC, VEC, UE8M0, LAYOUT, 8>;
      constexpr auto kWalk4 = sector_walk_kernel<SRC, VEC, UE8M0, LAYOUT, 4>;
      const bool one_row = t.rows_per_tile == 1;
      const int64_t wave =
          int64_t(q.num_sms) * (one_row ? resident_ctas_per_sm<kWalk8>() : resident_ctas_per_sm<kWalk4>());
      if (groups * tiles_k >= wave) {
        t.row_tiles = groups;
        const int64_t per_cta = (groups * tiles_k + wave - 1) / wave;
        t.data_rows_y = unsigned(std::min<int64_t>((groups + per_cta - 1) / per_cta, kMaxGridY));
        return launch_kernel(one_row ? kWalk8 : kWalk4, dim3(unsigned(tiles_k), t.data_rows_y), stream, a, t);
      }
    }
  }
  // Otherwise sector tiles from kSectorTileMinRows rows where a warp reads 4 blocks a row of each stream
  // of at least 32 bytes a block (a 128-byte line): fp8 NVFP4's 16-byte blocks (64 bytes a row) read
  // slower than the scale stores gain, except in the 128x4 layout once its sf tensor is large (H100,
  // kernel lab: 58% -> 68% of copy at 32768x16384, sf 32 MiB; 72% -> 67-70% at 8 MiB, and the 8x4
  // layout loses at every size).
  const bool wide_blocks = VEC * SRC::kElementBytes >= 32;
  const bool large_128x4_sf = LAYOUT == SfLayout::kSwizzled128x4 && sf_rows(q.m, LAYOUT) * cols >= kSectorTileMinSfBytes;
  t.sector_tiles = LAYOUT != SfLayout::kLinear && q.m >= kSectorTileMinRows && (wide_blocks || large_128x4_sf);
  if (t.sector_tiles) {
    t.cols_per_tile = 4;
    t.rows_per_tile = kThreads / 4;
    tiles_k = cols / 4;
    // 128x4: a 128-row group is two tiles (sf_rows is a multiple of 128)
    t.row_tiles = LAYOUT == SfLayout::kSwizzled128x4 ? sf_rows(q.m, LAYOUT) / t.rows_per_tile
                                                     : (q.m + t.rows_per_tile - 1) / t.rows_per_tile;
  }
  const int64_t pad_items = padding_items(q, nk, LAYOUT);
  if (pad_items < 0) return cudaErrorInvalidValue;
  // one wave of resident CTAs; each walks row tiles with stride data_rows_y
  const int ctas_per_sm = resident_ctas_per_sm<elementwise_kernel<SRC, VEC, UE8M0, LAYOUT>>();
  const int64_t target_y = std::max<int64_t>(1, int64_t(q.num_sms) * ctas_per_sm / tiles_k);
  int64_t grid_y = std::min<int64_t>(std::min<int64_t>(t.row_tiles, target_y), kMaxGridY / 2);
  if (LAYOUT == SfLayout::kSwizzled128x4 && t.sector_tiles && grid_y < t.row_tiles) {
    grid_y = std::max<int64_t>(2, grid_y & ~int64_t(1));  // see tile_row
  }
  t.data_rows_y = unsigned(grid_y);
  const int64_t pad_y = std::min<int64_t>((pad_items + tiles_k * kThreads - 1) / (tiles_k * kThreads), kMaxGridY / 2);
  const dim3 grid(unsigned(tiles_k), unsigned(grid_y + pad_y));
  return launch_kernel(elementwise_kernel<SRC, VEC, UE8M0, LAYOUT>, grid, stream, a, t);
}

template <class SRC>
cudaError_t launch_elementwise(const ElementwiseArgs& a, const LaunchStream& stream) {
  const bool ue8m0 = a.out.sf_use_ue8m0;
  switch (SfLayout(a.out.sf_layout)) {
    case SfLayout::kSwizzled128x4:
      return ue8m0 ? launch_elementwise_layout<SRC, 32, true, SfLayout::kSwizzled128x4>(a, stream)
                   : launch_elementwise_layout<SRC, 16, false, SfLayout::kSwizzled128x4>(a, stream);
    case SfLayout::kSwizzled8x4:
      return ue8m0 ? launch_elementwise_layout<SRC, 32, true, SfLayout::kSwizzled8x4>(a, stream)
                   : launch_elementwise_layout<SRC, 16, false, SfLayout::kSwizzled8x4>(a, stream);
    case SfLayout::kLinear:
      return ue8m0 ? launch_elementwise_layout<SRC, 32, true, SfLayout::kLinear>(a, stream)
                   : launch_elementwise_layout<SRC, 16, false, SfLayout::kLinear>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fp4op::cuda
