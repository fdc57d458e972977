// CUDA kernels of the fused "norm/activation + FP4 quantize" ops (plain CUDA; see fused_launch.h).
//
// A row is handled by RT threads (a warp for K <= 1024, the 256 threads of a CTA otherwise); thread
// `lane` of a row owns the 16-byte chunks lane, lane + RT, ... (8 float16/bfloat16 elements each), so
// the 2 (NVFP4) or 4 (MXFP4) chunks of a scale block sit in adjacent lanes of one warp and reduce
// their amax with shuffles, as in quantize.cu. Norms make a first pass that reduces the row in
// float32 (warp shuffles, then shared memory across warps), keeping up to HELD chunks a thread in
// registers (K <= 16384); larger rows are read again from global memory in the second pass.
// Elementwise ops load their row share (K <= 16384) into registers first too, for loads in flight. The second
// pass computes the rounded outputs (fused_math.h), quantizes them with the shared numerics and
// writes x_q (4-byte stores) and the scale bytes. Lanes past the row's last block write the zero
// padding columns of the swizzled layouts, and the CTAs past the row CTAs zero the padding rows, so
// one launch writes every output byte.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "../fused_math.h"
#include "fused_launch.h"

namespace fp4op::cuda {
namespace {

using fused::Activation;
using fused::RmsWeight;

constexpr int kThreads = 256;
constexpr int kChunk = 8;  // elements of a 16-byte chunk
constexpr unsigned kFullMask = 0xffffffffu;

template <InputDtype D>
__device__ __forceinline__ void widen8(const uint4& v, float (&f)[kChunk]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (D == InputDtype::kBFloat16) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    } else {
      __half2_raw raw;
      raw.x = uint16_t(w[i] & 0xFFFFu);
      raw.y = uint16_t(w[i] >> 16);
      const float2 p = __half22float2(__half2(raw));
      f[2 * i] = p.x;
      f[2 * i + 1] = p.y;
    }
  }
}

// Two floats that hold values of the model dtype, packed as its bits (exact).
template <InputDtype D>
__device__ __forceinline__ uint32_t narrow2(float lo, float hi) {
  if constexpr (D == InputDtype::kBFloat16) {
    return (__float_as_uint(lo) >> 16) | (__float_as_uint(hi) & 0xFFFF0000u);
  } else {
    const __half2_raw raw = static_cast<__half2_raw>(__floats2half2_rn(lo, hi));
    return uint32_t(raw.x) | (uint32_t(raw.y) << 16);
  }
}

template <InputDtype D>
__device__ __forceinline__ uint4 narrow8(const float (&f)[kChunk]) {
  return make_uint4(narrow2<D>(f[0], f[1]), narrow2<D>(f[2], f[3]), narrow2<D>(f[4], f[5]), narrow2<D>(f[6], f[7]));
}

__device__ __forceinline__ const uint4* chunk_ptr(const void* base, int64_t row, int64_t row_stride, int64_t chunk) {
  return reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(base) + row * row_stride + chunk * kChunk);
}

// Sum of `v` over the RT threads of a row (RT = 32: the warp; RT = kThreads: the CTA). Every thread of
// the CTA calls it; the result is the same on all of them (a fixed reduction order).
template <int RT>
__device__ __forceinline__ float row_sum(float v, float* smem) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = add_rn(v, __shfl_xor_sync(kFullMask, v, offset));
  if constexpr (RT == 32) {
    return v;
  } else {
    static_assert(RT == kThreads, "a row is a warp or the whole CTA");
    __syncthreads();  // the previous reduction has read smem
    if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = v;
    __syncthreads();
    float total = smem[0];
#pragma unroll
    for (int w = 1; w < kThreads / 32; ++w) total = add_rn(total, smem[w]);
    return total;
  }
}

struct Geometry {
  int64_t chunks;         // K / 8
  int64_t padded_chunks;  // chunks of the scale columns including the swizzled layouts' padding
  int iters;              // chunks a thread visits: ceil(padded_chunks / RT)
  int64_t row_groups;     // ceil(M / rows per CTA)
  int64_t row_ctas;       // CTAs working on rows; the CTAs after them zero the padding rows
};

constexpr bool is_norm(FusedOp op) {
  return op == FusedOp::kRmsNorm || op == FusedOp::kAddRmsNorm || op == FusedOp::kLayerNorm;
}

// The rounded outputs of one chunk of a row: `v` is the chunk of x (activations), gate, or the
// normalized input (x, or x + residual, for norms); `u` the chunk of up (gated activations).
template <FusedOp OP, InputDtype D>
__device__ __forceinline__ void chunk_outputs(const FusedLaunch& a, int64_t chunk, const uint4& v, const uint4& u,
                                              float stat_a, float stat_b, float (&out)[kChunk]) {
  float x[kChunk];
  widen8<D>(v, x);
  if constexpr (OP == FusedOp::kActivation) {
    const Activation act = Activation(a.activation);
#pragma unroll
    for (int i = 0; i < kChunk; ++i) out[i] = fused::activation_element(x[i], act, D);
  } else if constexpr (OP == FusedOp::kGatedActivation) {
    float up[kChunk];
    widen8<D>(u, up);
    const Activation act = Activation(a.activation);
#pragma unroll
    for (int i = 0; i < kChunk; ++i) out[i] = fused::gated_element(x[i], up[i], act, D);
  } else {
    float w[kChunk] = {}, b[kChunk] = {};
    if (a.weight != nullptr) widen8<D>(__ldg(chunk_ptr(a.weight, 0, 0, chunk)), w);
    if constexpr (OP == FusedOp::kLayerNorm) {
      if (a.bias != nullptr) widen8<D>(__ldg(chunk_ptr(a.bias, 0, 0, chunk)), b);
      const bool has_w = a.weight != nullptr, has_b = a.bias != nullptr;
#pragma unroll
      for (int i = 0; i < kChunk; ++i) out[i] = fused::layer_norm_element(x[i], stat_a, stat_b, w[i], has_w, b[i], has_b, D);
    } else {
      const RmsWeight form = RmsWeight(a.rms_weight);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) out[i] = fused::rms_norm_element(x[i], stat_a, w[i], a.weight_offset, form, D);
    }
  }
}

// Quantizes one chunk's outputs: the lanes of a scale block share their amax through shuffles (every
// lane of the warp must call this), the block's first lane writes the scale byte (or the padding 0).
template <bool UE8M0>
__device__ __forceinline__ void quantize_chunk(const FusedLaunch& a, const float (&f)[kChunk], bool has_data,
                                               bool is_pad_col, int64_t row, int64_t chunk, Nvfp4RowScale rs) {
  constexpr int kVec = UE8M0 ? 32 : 16;
  constexpr int kLanesPerBlock = kVec / kChunk;
  float amax = fabsf(f[0]);
#pragma unroll
  for (int i = 1; i < kChunk; ++i) amax = amax_fold(amax, f[i]);
#pragma unroll
  for (int lanes = 1; lanes < kLanesPerBlock; lanes <<= 1) {
    amax = amax_fold(amax, __shfl_xor_sync(kFullMask, amax, lanes));
  }
  const BlockScale s = UE8M0 ? mxfp4_block_scale(amax) : nvfp4_block_scale(amax, rs);
  if (has_data) {
    uint32_t word = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      word |= e2m1x2(mul_rn(f[2 * i], s.out_scale), mul_rn(f[2 * i + 1], s.out_scale)) << (8 * i);
    }
    *reinterpret_cast<uint32_t*>(a.x_q + row * (a.k / 2) + chunk * (kChunk / 2)) = word;
  }
  if (chunk % kLanesPerBlock == 0 && (has_data || is_pad_col)) {
    a.sf[sf_offset(row, chunk / kLanesPerBlock, a.k / kVec, SfLayout(a.sf_layout))] = has_data ? s.sf : uint8_t(0);
  }
}

// First-pass chunk of a norm: the chunk that is normalized (for add_rms_norm, x + residual rounded to
// the model dtype, also written to sum_out), and its contribution to the row sum.
template <FusedOp OP, InputDtype D>
__device__ __forceinline__ uint4 load_norm_chunk(const FusedLaunch& a, int64_t row, int64_t chunk) {
  const uint4 xv = __ldg(chunk_ptr(a.x, row, a.x_row_stride, chunk));
  if constexpr (OP != FusedOp::kAddRmsNorm) {
    return xv;
  } else {
    float x[kChunk], r[kChunk];
    widen8<D>(xv, x);
    widen8<D>(__ldg(chunk_ptr(a.y, row, a.y_row_stride, chunk)), r);
#pragma unroll
    for (int i = 0; i < kChunk; ++i) x[i] = fused::round_to(add_rn(x[i], r[i]), D);
    const uint4 sum = narrow8<D>(x);
    *reinterpret_cast<uint4*>(static_cast<uint16_t*>(a.sum_out) + row * a.k + chunk * kChunk) = sum;
    return sum;
  }
}

// The chunk to normalize in the second pass when it is not held in registers: x, or the sum this
// thread wrote in the first pass (a plain load: the data was written by this kernel).
template <FusedOp OP>
__device__ __forceinline__ uint4 reload_norm_chunk(const FusedLaunch& a, int64_t row, int64_t chunk) {
  if constexpr (OP == FusedOp::kAddRmsNorm) {
    return *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(a.sum_out) + row * a.k + chunk * kChunk);
  } else {
    return __ldg(chunk_ptr(a.x, row, a.x_row_stride, chunk));
  }
}

template <InputDtype D>
__device__ __forceinline__ float chunk_sum(const uint4& v, float center, bool squares) {
  float f[kChunk];
  widen8<D>(v, f);
  float acc = 0.0f;
#pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    const float d = add_rn(f[i], -center);
    acc = add_rn(acc, squares ? mul_rn(d, d) : d);
  }
  return acc;
}

template <FusedOp OP, InputDtype D, bool UE8M0, int RT, int HELD>
__global__ void __launch_bounds__(kThreads) fused_kernel(const FusedLaunch a, const Geometry g) {
  constexpr int kRowsPerCta = kThreads / RT;
  constexpr int kSlots = HELD > 0 ? HELD : 1;
  const SfLayout layout = SfLayout(a.sf_layout);

  if (blockIdx.x >= g.row_ctas) {
    // zero the padding rows [m, sf_rows) of a swizzled layout, one 4-byte word (4 block columns) each
    const int64_t nk = a.k / (UE8M0 ? 32 : 16);
    const int64_t words_per_row = sf_cols(nk, layout) / 4;
    const int64_t words = (sf_rows(a.m, layout) - a.m) * words_per_row;
    const int64_t stride = int64_t(gridDim.x - g.row_ctas) * kThreads;
    for (int64_t i = int64_t(blockIdx.x - g.row_ctas) * kThreads + threadIdx.x; i < words; i += stride) {
      const int64_t row = a.m + i / words_per_row;
      *reinterpret_cast<uint32_t*>(a.sf + sf_offset(row, (i % words_per_row) * 4, nk, layout)) = 0u;
    }
    return;
  }

  __shared__ float smem[kThreads / 32];
  const int lane = threadIdx.x % RT;
  // the trip counts below depend on blockIdx.x and g only: every thread reaches every shuffle/barrier
  for (int64_t group = blockIdx.x; group < g.row_groups; group += g.row_ctas) {
    const int64_t row_or_past = group * kRowsPerCta + threadIdx.x / RT;
    const bool row_ok = row_or_past < a.m;
    const int64_t row = row_ok ? row_or_past : 0;  // rows past M only take part in the shuffles

    uint4 held[kSlots];
    uint4 held_up[OP == FusedOp::kGatedActivation ? kSlots : 1];
    float stat_a = 0.0f, stat_b = 0.0f;  // rms: rstd; layer norm: mean, rstd
    if constexpr (!is_norm(OP) && HELD > 0) {
      // load the whole row share first: HELD loads (two per chunk for gated ops) in flight a thread
#pragma unroll
      for (int c = 0; c < HELD; ++c) {
        const int64_t chunk = lane + int64_t(c) * RT;
        held[c] = make_uint4(0u, 0u, 0u, 0u);
        if constexpr (OP == FusedOp::kGatedActivation) held_up[c] = make_uint4(0u, 0u, 0u, 0u);
        if (row_ok && c < g.iters && chunk < g.chunks) {
          held[c] = __ldg(chunk_ptr(a.x, row, a.x_row_stride, chunk));
          if constexpr (OP == FusedOp::kGatedActivation) held_up[c] = __ldg(chunk_ptr(a.y, row, a.y_row_stride, chunk));
        }
      }
    }
    if constexpr (is_norm(OP)) {
      float acc = 0.0f;
      if constexpr (HELD > 0) {
#pragma unroll
        for (int c = 0; c < HELD; ++c) {
          const int64_t chunk = lane + int64_t(c) * RT;
          held[c] = make_uint4(0u, 0u, 0u, 0u);
          if (row_ok && c < g.iters && chunk < g.chunks) {
            held[c] = load_norm_chunk<OP, D>(a, row, chunk);
            acc = add_rn(acc, chunk_sum<D>(held[c], 0.0f, OP != FusedOp::kLayerNorm));
          }
        }
      } else {
        for (int c = 0; c < g.iters; ++c) {
          const int64_t chunk = lane + int64_t(c) * RT;
          if (row_ok && chunk < g.chunks) {
            acc = add_rn(acc, chunk_sum<D>(load_norm_chunk<OP, D>(a, row, chunk), 0.0f, OP != FusedOp::kLayerNorm));
          }
        }
      }
      const float kf = float(a.k);
      const float total = row_sum<RT>(acc, smem);
      if constexpr (OP == FusedOp::kLayerNorm) {
        // biased variance in a second reduction over the centered values
        const float mean = div_rn(total, kf);
        float acc2 = 0.0f;
        if constexpr (HELD > 0) {
#pragma unroll
          for (int c = 0; c < HELD; ++c) {
            const int64_t chunk = lane + int64_t(c) * RT;
            if (row_ok && c < g.iters && chunk < g.chunks) acc2 = add_rn(acc2, chunk_sum<D>(held[c], mean, true));
          }
        } else {
          for (int c = 0; c < g.iters; ++c) {
            const int64_t chunk = lane + int64_t(c) * RT;
            if (row_ok && chunk < g.chunks) {
              acc2 = add_rn(acc2, chunk_sum<D>(reload_norm_chunk<OP>(a, row, chunk), mean, true));
            }
          }
        }
        const float var = div_rn(row_sum<RT>(acc2, smem), kf);
        stat_a = mean;
        stat_b = fused::torch_rsqrt(add_rn(fmaxf(var, 0.0f), a.eps));
      } else {
        stat_a = fused::torch_rsqrt(add_rn(div_rn(total, kf), a.eps));
      }
    }

    Nvfp4RowScale rs{0.0f, 0.0f};
    if constexpr (!UE8M0) {
      rs = nvfp4_row_scale(a.global_scale[a.global_scale_per_row ? row : 0], a.is_global_scale_inversed);
    }
    auto second_pass_chunk = [&](int64_t chunk, const uint4& v, const uint4& u) {
      const bool has_data = row_ok && chunk < g.chunks;
      const bool is_pad_col = row_ok && !has_data && chunk < g.padded_chunks;
      float f[kChunk] = {};
      if (has_data) chunk_outputs<OP, D>(a, chunk, v, u, stat_a, stat_b, f);
      quantize_chunk<UE8M0>(a, f, has_data, is_pad_col, row, chunk, rs);
    };
    if constexpr (HELD > 0) {
#pragma unroll
      for (int c = 0; c < HELD; ++c) {
        if (c < g.iters) {
          second_pass_chunk(lane + int64_t(c) * RT, held[c],
                            OP == FusedOp::kGatedActivation ? held_up[c] : make_uint4(0u, 0u, 0u, 0u));
        }
      }
    } else {
      for (int c = 0; c < g.iters; ++c) {
        const int64_t chunk = lane + int64_t(c) * RT;
        uint4 v = make_uint4(0u, 0u, 0u, 0u), u = make_uint4(0u, 0u, 0u, 0u);
        if (row_ok && chunk < g.chunks) {
          if constexpr (is_norm(OP)) {
            v = reload_norm_chunk<OP>(a, row, chunk);
          } else {
            v = __ldg(chunk_ptr(a.x, row, a.x_row_stride, chunk));
            if constexpr (OP == FusedOp::kGatedActivation) u = __ldg(chunk_ptr(a.y, row, a.y_row_stride, chunk));
          }
        }
        second_pass_chunk(chunk, v, u);
      }
    }
  }
}

// Rows of up to this many chunks (K <= 1024) are handled by one warp, keeping 4 chunks a thread.
constexpr int64_t kWarpRowChunks = 32 * 4;
// Rows of up to this many chunks (K <= 16384) take an unrolled loop of 8 chunks a thread of the CTA;
// norms keep them in registers between their passes.
constexpr int kHeldPerThread = 8;

template <FusedOp OP, InputDtype D, bool UE8M0, int RT, int HELD>
cudaError_t launch_config(const FusedLaunch& a, Geometry g, cudaStream_t stream) {
  constexpr int kRowsPerCta = kThreads / RT;
  g.iters = int((g.padded_chunks + RT - 1) / RT);
  g.row_groups = (a.m + kRowsPerCta - 1) / kRowsPerCta;
  g.row_ctas = std::min<int64_t>(g.row_groups, int64_t(a.num_sms) * 64);
  const SfLayout layout = SfLayout(a.sf_layout);
  const int64_t pad_words = (sf_rows(a.m, layout) - a.m) * (sf_cols(a.k / (UE8M0 ? 32 : 16), layout) / 4);
  const int64_t pad_ctas = std::min<int64_t>((pad_words + kThreads - 1) / kThreads, 1024);
  fused_kernel<OP, D, UE8M0, RT, HELD><<<unsigned(g.row_ctas + pad_ctas), kThreads, 0, stream>>>(a, g);
  return cudaGetLastError();
}

template <FusedOp OP, InputDtype D, bool UE8M0>
cudaError_t launch_typed(const FusedLaunch& a, cudaStream_t stream) {
  constexpr int kLanesPerBlock = (UE8M0 ? 32 : 16) / kChunk;
  Geometry g{};
  g.chunks = a.k / kChunk;
  g.padded_chunks = sf_cols(a.k / (UE8M0 ? 32 : 16), SfLayout(a.sf_layout)) * kLanesPerBlock;
  if (g.padded_chunks <= kWarpRowChunks) return launch_config<OP, D, UE8M0, 32, 4>(a, g, stream);
  if (g.padded_chunks <= int64_t(kThreads) * kHeldPerThread) {
    return launch_config<OP, D, UE8M0, kThreads, kHeldPerThread>(a, g, stream);
  }
  return launch_config<OP, D, UE8M0, kThreads, 0>(a, g, stream);
}

template <FusedOp OP>
cudaError_t launch_op(const FusedLaunch& a, cudaStream_t stream) {
  const bool bf16 = InputDtype(a.input_dtype) == InputDtype::kBFloat16;
  if (a.sf_use_ue8m0) {
    return bf16 ? launch_typed<OP, InputDtype::kBFloat16, true>(a, stream)
                : launch_typed<OP, InputDtype::kFloat16, true>(a, stream);
  }
  return bf16 ? launch_typed<OP, InputDtype::kBFloat16, false>(a, stream)
              : launch_typed<OP, InputDtype::kFloat16, false>(a, stream);
}

}  // namespace

cudaError_t launch_fused(const FusedLaunch& a, cudaStream_t stream) {
  if (InputDtype(a.input_dtype) != InputDtype::kBFloat16 && InputDtype(a.input_dtype) != InputDtype::kFloat16) {
    return cudaErrorInvalidValue;
  }
  switch (a.op) {
    case FusedOp::kRmsNorm: return launch_op<FusedOp::kRmsNorm>(a, stream);
    case FusedOp::kAddRmsNorm: return launch_op<FusedOp::kAddRmsNorm>(a, stream);
    case FusedOp::kLayerNorm: return launch_op<FusedOp::kLayerNorm>(a, stream);
    case FusedOp::kActivation: return launch_op<FusedOp::kActivation>(a, stream);
    case FusedOp::kGatedActivation: return launch_op<FusedOp::kGatedActivation>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fp4op::cuda
