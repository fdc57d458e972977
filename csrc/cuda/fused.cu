// CUDA kernels of the fused "norm/activation + FP4 quantize" ops (plain CUDA; see fused_launch.h).
//
// Activations (plain and gated) are elementwise: they run the quantize kernels of block_quantize.cuh
// (elementwise or split) with a source that applies the activation.
//
// Norms need a row statistic before the first block of a row can be quantized. A row is owned by a team
// of T threads (a multiple of 32, so teams are whole warps), thread t of the team owning the block
// columns t, t + T, ... (BPT of them held in registers, BPT = 0: rows too long to hold, read again
// from memory). The team reduces the row in float32 (shuffles, then shared memory across its warps),
// then every thread normalizes and quantizes its blocks as the quantize kernel does. Columns t..t+3 of
// a team sit in adjacent lanes, so the scale bytes go out as words like in the quantize kernel. A few
// long rows (decode) take norm_cluster_kernel instead: the team's passes spread over a cluster of CTAs,
// with the same reduction order, so the same bits.
#include <cooperative_groups.h>

#include <atomic>

#include "../fused_math.h"
#include "block_quantize.cuh"
#include "fused_launch.h"

namespace fp4op::cuda {
namespace {

using fused::Activation;
using fused::RmsWeight;

// ---- activations: elementwise sources ----------------------------------------------------------------

// The activation's factor as the op was given it (read after the PDL wait, as the sources run after it).
__device__ __forceinline__ float activation_coef(const ActivationArgs& act) {
  return act.coef_device != nullptr ? __ldg(act.coef_device) : act.coef;
}

// sigmoid_mul (QuickGELU) in a kernel of its own: its unpaired steps in the others' kernel took bf16
// MXFP4 from 80 to 89 registers.
template <InputDtype D, bool kSigmoidMul>
struct ActivationSource {
  static constexpr int kStreams = 1;
  // the activation's arithmetic in 8 unrolled row tiles takes 64-128 registers and spills: elementwise_kernel
  static constexpr bool kSectorWalk = false;
  static constexpr int kElementBytes = 2;
  template <int L, int V>
  __device__ __forceinline__ static void produce(const uint4 (&v)[1][L], const ActivationArgs& act, float (&f)[V]) {
#pragma unroll
    for (int i = 0; i < L; ++i) Input<D>::widen(v[0][i], f + 8 * i);
    if constexpr (kSigmoidMul) {
      apply(f, Activation::kSigmoidMul, activation_coef(act));
    } else {
      // one branch per block on the (uniform) activation, not one per element
      switch (Activation(act.kind)) {
        case Activation::kSilu: apply(f, Activation::kSilu); break;
        case Activation::kGeluErf: apply(f, Activation::kGeluErf); break;
        case Activation::kGeluNew: apply(f, Activation::kGeluNew, activation_coef(act)); break;
        case Activation::kRelu: apply(f, Activation::kRelu); break;
        case Activation::kReluSquared: apply(f, Activation::kReluSquared); break;
        default: apply(f, Activation::kGeluTanh); break;
      }
    }
  }
  template <int L, int V>
  __device__ __forceinline__ static float block_amax(const uint4 (&)[1][L], const float (&f)[V]) {
    return amax_of(f);
  }
  template <int V>
  __device__ __forceinline__ static void apply(float (&f)[V], Activation act, float coef = fused::kGeluNewCoef) {
    fused::activation_elements(f, act, D, coef);
  }
};

// Two gated kernels a dtype: SwiGLU / GeGLU's (silu_and_mul, gelu_and_mul) and the others'
// (gelu_new_and_mul, relu_and_mul). A kernel's registers are those of its heaviest branch: gelu_new's
// steps in the SwiGLU kernel took it from 64 to 76 registers (bfloat16 NVFP4), 4 CTAs an SM to 3.
template <InputDtype D, bool kOtherActivations>
struct GatedSource {
  static constexpr int kStreams = 2;
  static constexpr bool kSectorWalk = false;  // as ActivationSource
  static constexpr int kElementBytes = 2;
  template <int L, int V>
  __device__ __forceinline__ static void produce(const uint4 (&v)[2][L], const ActivationArgs& act, float (&f)[V]) {
    float up[V];
#pragma unroll
    for (int i = 0; i < L; ++i) {
      Input<D>::widen(v[0][i], f + 8 * i);
      Input<D>::widen(v[1][i], up + 8 * i);
    }
    if constexpr (kOtherActivations) {
      switch (Activation(act.kind)) {
        case Activation::kGeluNew: apply(f, up, Activation::kGeluNew, activation_coef(act)); break;
        case Activation::kRelu: apply(f, up, Activation::kRelu); break;
        default: apply(f, up, Activation::kReluSquared); break;
      }
    } else {
      switch (Activation(act.kind)) {
        case Activation::kSilu: apply(f, up, Activation::kSilu); break;
        case Activation::kGeluErf: apply(f, up, Activation::kGeluErf); break;
        default: apply(f, up, Activation::kGeluTanh); break;
      }
    }
  }
  template <int L, int V>
  __device__ __forceinline__ static float block_amax(const uint4 (&)[2][L], const float (&f)[V]) {
    return amax_of(f);
  }
  template <int V>
  __device__ __forceinline__ static void apply(float (&f)[V], const float (&up)[V], Activation act,
                                               float coef = fused::kGeluNewCoef) {
    fused::gated_elements(f, up, act, D, coef);
  }
};

template <InputDtype D>
cudaError_t launch_activation(const FusedLaunch& a, const LaunchStream& stream) {
  ElementwiseArgs e{};
  e.in[0] = a.x;
  e.row_stride[0] = a.x_row_stride;
  e.in[1] = a.y;
  e.row_stride[1] = a.y_row_stride;
  e.activation = {a.activation, a.activation_coef, a.activation_coef_device};
  e.out = a.out;
  if (a.op != FusedOp::kGatedActivation) {
    return Activation(a.activation) == Activation::kSigmoidMul ? launch_elementwise<ActivationSource<D, true>>(e, stream)
                                                               : launch_elementwise<ActivationSource<D, false>>(e, stream);
  }
  switch (Activation(a.activation)) {
    case Activation::kSilu:
    case Activation::kGeluErf:
    case Activation::kGeluTanh: return launch_elementwise<GatedSource<D, false>>(e, stream);
    default: return launch_elementwise<GatedSource<D, true>>(e, stream);
  }
}

// ---- norms: a team of threads per row -------------------------------------------------------------------

constexpr int kChunk = 8;  // elements of a 16-byte vector

struct NormGeometry {
  int team;               // threads per row: 32, 64, 128 or 256
  int team_shift;         // log2(team)
  int64_t row_groups;     // ceil(M / rows per CTA)
  int64_t row_ctas;       // CTAs working on rows; the CTAs after them zero the padding rows
};

template <InputDtype D>
__device__ __forceinline__ uint4 narrow8(const float (&f)[kChunk]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (D == InputDtype::kBFloat16) {
      // values already rounded to bfloat16: the high halves are exact
      w[i] = (__float_as_uint(f[2 * i]) >> 16) | (__float_as_uint(f[2 * i + 1]) & 0xFFFF0000u);
    } else {
      const __half2_raw raw = static_cast<__half2_raw>(__floats2half2_rn(f[2 * i], f[2 * i + 1]));
      w[i] = uint32_t(raw.x) | (uint32_t(raw.y) << 16);
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Sum of `v` over the team of the calling thread; every thread of the CTA calls it (barriers) and gets
// its team's total, reduced in a fixed order.
__device__ __forceinline__ float team_sum(float v, int team, float* smem) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = add_rn(v, __shfl_xor_sync(kFullMask, v, offset));
  if (team == 32) return v;
  __syncthreads();  // the previous reduction has read smem
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = v;
  __syncthreads();
  // team is a power of two: the team's first warp by a mask, not an integer division
  const int first = int(threadIdx.x & ~unsigned(team - 1)) / 32;
  float total = smem[first];
  for (int w = 1; w < team / 32; ++w) total = add_rn(total, smem[first + w]);
  return total;
}

// add_rms_norm, the sum rounded or in float32
template <FusedOp OP>
constexpr bool kAddsResidual = OP == FusedOp::kAddRmsNorm || OP == FusedOp::kAddRmsNormFloat32Sum;

// LayerNorm's statistics (the mean, then the centred squares), and its weight and bias
template <FusedOp OP>
constexpr bool kIsLayerNorm = OP == FusedOp::kLayerNorm || OP == FusedOp::kLayerNormModulate;

template <FusedOp OP, InputDtype D, int VEC>
struct NormRow {
  static constexpr int kLoads = VEC / kChunk;
  // A block's words as the kernels hold them: x, or add_rms_norm's rounded sum; kAddRmsNormFloat32Sum
  // holds x and the residual, whose float32 sum is what it normalizes
  static constexpr int kStreams = OP == FusedOp::kAddRmsNormFloat32Sum ? 2 : 1;
  using Block = uint4[kStreams][kLoads];
  const FusedLaunch& a;
  int64_t row;

  // Chunk i (8 values) of a block in float32: x, the rounded sum, or the float32 sum x + residual.
  __device__ __forceinline__ static void widen_chunk(const Block& v, int i, float* f) {
    Input<D>::widen(v[0][i], f);
    if constexpr (kStreams == 2) {
      float r[kChunk];
      Input<D>::widen(v[1][i], r);
#pragma unroll
      for (int e = 0; e < kChunk; ++e) f[e] = add_rn(f[e], r[e]);
    }
  }

  __device__ __forceinline__ const uint4* x_block(int64_t col) const {
    return reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(a.x) + row * a.x_row_stride + col * VEC);
  }
  __device__ __forceinline__ uint4* sum_block(int64_t col) const {
    return reinterpret_cast<uint4*>(static_cast<uint16_t*>(a.sum_out) + row * a.out.k + col * VEC);
  }

  __device__ __forceinline__ const uint4* residual_block(int64_t col) const {
    return reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(a.y) + row * a.y_row_stride + col * VEC);
  }

  // a = round(a + r) for a chunk and the 8 model-dtype values of r (a residual add, rounded as eager rounds
  // it); returns the sum's words.
  __device__ __forceinline__ static uint4 add_rounded(float (&a)[kChunk], uint4 r) {
    float rf[kChunk];
    Input<D>::widen(r, rf);
#pragma unroll
    for (int e = 0; e < kChunk; e += 2) {
      a[e] = add_rn(a[e], rf[e]);
      a[e + 1] = add_rn(a[e + 1], rf[e + 1]);
      fused::round_pair(a[e], a[e + 1], D);
    }
    return narrow8<D>(a);
  }

  // The block that is normalized (see Block); add_rms_norm's also store round(x + residual) to sum_out.
  __device__ __forceinline__ void load(int64_t col, Block& v) const {
    const uint4* x = x_block(col);
#pragma unroll
    for (int i = 0; i < kLoads; ++i) v[0][i] = __ldg(x + i);
    if constexpr (kAddsResidual<OP>) {
      const uint4* r = residual_block(col);
      uint4 rv[kLoads];
#pragma unroll
      for (int i = 0; i < kLoads; ++i) rv[i] = __ldg(r + i);
      uint4* out = sum_block(col);
#pragma unroll
      for (int i = 0; i < kLoads; ++i) {
        float xf[kChunk];
        Input<D>::widen(v[0][i], xf);
        const uint4 sum = add_rounded(xf, rv[i]);
        out[i] = sum;
        if constexpr (kStreams == 2) {
          v[1][i] = rv[i];
        } else {
          v[0][i] = sum;
        }
      }
    }
  }

  // Reads the block to normalize again (rows not held in registers): x, the sum this thread wrote, or x
  // and the residual.
  __device__ __forceinline__ void reload(int64_t col, Block& v) const {
    if constexpr (OP == FusedOp::kAddRmsNorm) {
      const uint4* s = sum_block(col);
#pragma unroll
      for (int i = 0; i < kLoads; ++i) v[0][i] = s[i];
    } else {
      const uint4* x = x_block(col);
#pragma unroll
      for (int i = 0; i < kLoads; ++i) v[0][i] = __ldg(x + i);
      if constexpr (kStreams == 2) {
        const uint4* r = residual_block(col);
#pragma unroll
        for (int i = 0; i < kLoads; ++i) v[1][i] = __ldg(r + i);
      }
    }
  }

  // The block's share of a row statistic: the sum of x (LayerNorm's mean), of x^2 (RMSNorm) or of
  // (x - mean)^2 (LayerNorm's variance).
  enum class Statistic { kSum, kSquares, kCenteredSquares };
  template <Statistic S>
  __device__ __forceinline__ static float partial(const Block& v, float mean = 0.0f) {
    float acc = 0.0f;
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      float f[kChunk];
      widen_chunk(v, i, f);
#pragma unroll
      for (int e = 0; e < kChunk; ++e) {
        const float d = S == Statistic::kCenteredSquares ? add_rn(f[e], -mean) : f[e];
        acc = S == Statistic::kSum ? add_rn(acc, d) : __fmaf_rn(d, d, acc);
      }
    }
    return acc;
  }

  // The row statistics from the team's totals, as torch computes them: RMSNorm's rsqrt(mean(x^2) + eps)
  // and LayerNorm's rsqrt(var + eps) of the biased variance (a NaN variance, a row with inf/NaN, stays
  // NaN as in torch; fmaxf would drop it).
  __device__ __forceinline__ static float rms_rstd(float sum_squares, float k, float eps) {
    return fused::torch_rsqrt(add_rn(div_rn(sum_squares, k), eps));
  }
  __device__ __forceinline__ static float layer_norm_rstd(float centered_squares, float k, float eps) {
    const float var = div_rn(centered_squares, k);
    return fused::torch_rsqrt(add_rn(var < 0.0f ? 0.0f : var, eps));
  }

  // The row's codes in x_q.
  __device__ __forceinline__ uint8_t* codes() const { return a.out.x_q + row * (a.out.k / 2); }

  // Normalizes block `col` (its bits `v`) and quantizes it into the row's codes `xq_row` (codes());
  // returns its scale byte. NORMED: also stores the normalized block to normed_out.
  template <bool UE8M0, bool NORMED>
  __device__ __forceinline__ uint32_t quantize(int64_t col, const Block& v, float stat_a, float stat_b,
                                               Nvfp4RowScale rs, uint8_t* xq_row) const {
    uint4 affine[kAffine][kLoads];
    load_affine(col, affine);
    float f[VEC];
    normalize(v, affine, stat_a, stat_b, f);
    if constexpr (NORMED) {
      uint4* out = reinterpret_cast<uint4*>(static_cast<uint16_t*>(a.normed_out) + row * a.out.k + col * VEC);
#pragma unroll
      for (int i = 0; i < kLoads; ++i) out[i] = narrow8<D>(*reinterpret_cast<const float(*)[kChunk]>(f + i * kChunk));
    }
    if constexpr (OP == FusedOp::kRmsNormAdd) add_residual_after(col, f);
    if constexpr (OP == FusedOp::kLayerNormModulate) modulate(col, f);
    return quantize_block<VEC, UE8M0>(f, amax_of(f), rs, xq_row + col * (VEC / 2));
  }

  // rms_norm_add: f = round(f + residual), the block of the sum, which is stored to sum_out and quantized.
  __device__ __forceinline__ void add_residual_after(int64_t col, float (&f)[VEC]) const {
    const uint4* r = residual_block(col);
    uint4* out = sum_block(col);
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      out[i] = add_rounded(*reinterpret_cast<float(*)[kChunk]>(f + i * kChunk), __ldg(r + i));
    }
  }

  // layer_norm_modulate: f = round(round(f * multiplier) + shift), the operands' rows of this row's sample.
  __device__ __forceinline__ void modulate(int64_t col, float (&f)[VEC]) const {
    const uint4* mul = sample_block(a.multiplier, col);
    const uint4* add = sample_block(a.shift, col);
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      float m[kChunk], s[kChunk];
      Input<D>::widen(__ldg(mul + i), m);
      Input<D>::widen(__ldg(add + i), s);
      float* g = f + i * kChunk;
#pragma unroll
      for (int e = 0; e < kChunk; e += 2) {
        g[e] = mul_rn(g[e], m[e]);
        g[e + 1] = mul_rn(g[e + 1], m[e + 1]);
        fused::round_pair(g[e], g[e + 1], D);
        g[e] = add_rn(g[e], s[e]);
        g[e + 1] = add_rn(g[e + 1], s[e + 1]);
        fused::round_pair(g[e], g[e + 1], D);
      }
    }
  }
  // The sample's row divided out at every block: the row offsets kept as members of the row (one division
  // a row) or the operands loaded before the norm measured slower (more registers; fused_h100.md, adaLN).
  __device__ __forceinline__ const uint4* sample_block(const SampleOperand& o, int64_t col) const {
    return reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(o.data) + (row / o.rows_per_sample) * o.row_stride +
                                          col * VEC);
  }

  // The block's weight and bias (layer norm), zero where absent: [0] weight, [1] bias.
  static constexpr int kAffine = kIsLayerNorm<OP> ? 2 : 1;
  __device__ __forceinline__ void load_affine(int64_t col, uint4 (&p)[kAffine][kLoads]) const {
    const void* src[2] = {a.weight, a.bias};
#pragma unroll
    for (int j = 0; j < kAffine; ++j) {
      const uint4* v = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(src[j]) + col * VEC);
#pragma unroll
      for (int i = 0; i < kLoads; ++i) p[j][i] = src[j] != nullptr ? __ldg(v + i) : make_uint4(0u, 0u, 0u, 0u);
    }
  }

  // The normalized block, rounded to the model dtype as eager rounds it.
  __device__ __forceinline__ void normalize(const Block& v, const uint4 (&affine)[kAffine][kLoads],
                                            float stat_a, float stat_b, float (&f)[VEC]) const {
    float w[VEC], b[VEC];
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      widen_chunk(v, i, f + i * kChunk);
      Input<D>::widen(affine[0][i], w + i * kChunk);
      Input<D>::widen(affine[kAffine - 1][i], b + i * kChunk);
    }
    // one branch per block on the (uniform) affine form, with the element loop specialized to it
    if constexpr (kIsLayerNorm<OP>) {
      const bool has_w = a.weight != nullptr, has_b = a.bias != nullptr;
      if (has_w && has_b) {
        layer_norm_block<true, true>(stat_a, stat_b, w, b, f);
      } else if (has_w) {
        layer_norm_block<true, false>(stat_a, stat_b, w, b, f);
      } else if (has_b) {
        layer_norm_block<false, true>(stat_a, stat_b, w, b, f);
      } else {
        layer_norm_block<false, false>(stat_a, stat_b, w, b, f);
      }
    } else {
      switch (RmsWeight(a.rms_weight)) {
        case RmsWeight::kNone: rms_norm_block<RmsWeight::kNone>(stat_a, w, f); break;
        case RmsWeight::kFloat32: rms_norm_block<RmsWeight::kFloat32>(stat_a, w, f); break;
        default:
          if (a.weight_offset == 0.0f) {
            rms_norm_input_dtype_block<false>(stat_a, affine[0], w, f);
          } else {
            rms_norm_input_dtype_block<true>(stat_a, affine[0], w, f);
          }
          break;
      }
    }
  }

  template <bool HAS_W, bool HAS_B>
  __device__ __forceinline__ static void layer_norm_block(float mean, float rstd, const float (&w)[VEC],
                                                          const float (&b)[VEC], float (&f)[VEC]) {
    fused::layer_norm_elements(f, mean, rstd, w, HAS_W, b, HAS_B, D);
  }

  template <RmsWeight FORM>
  __device__ __forceinline__ void rms_norm_block(float rstd, const float (&w)[VEC], float (&f)[VEC]) const {
    static_assert(FORM != RmsWeight::kInputDtype, "rms_norm_input_dtype_block");
    // a literal 0 takes the offset test out of the element loop (one branch a block)
    if (a.weight_offset == 0.0f) {
      fused::rms_norm_elements(f, rstd, w, 0.0f, FORM, D);
    } else {
      fused::rms_norm_elements(f, rstd, w, a.weight_offset, FORM, D);
    }
  }

  // The kInputDtype form (HF Llama) in packed pairs (fused::rms_norm_input_dtype_pair): the weight
  // words as loaded, or with OFFSET round(offset + w) packed.
  template <bool OFFSET>
  __device__ __forceinline__ void rms_norm_input_dtype_block(float rstd, const uint4 (&w_words)[kLoads],
                                                             const float (&w)[VEC], float (&f)[VEC]) const {
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const uint32_t words[4] = {w_words[i].x, w_words[i].y, w_words[i].z, w_words[i].w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int e = i * kChunk + 2 * j;
        const uint32_t w2 =
            OFFSET ? fused::pack_pair(add_rn(a.weight_offset, w[e]), add_rn(a.weight_offset, w[e + 1]), D) : words[j];
        fused::rms_norm_input_dtype_pair(f[e], f[e + 1], rstd, w2, D);
      }
    }
  }
};

// Stores the scale byte of (row, col) in a layout known at run time (uniform over the CTA): see
// store_sf; every lane of the warp must call this.
__device__ __forceinline__ void store_sf_any(const QuantizeTarget& q, int64_t row, int64_t col, int64_t nk,
                                             uint32_t sf_byte, bool row_ok, bool in_sf, bool has_data) {
  switch (SfLayout(q.sf_layout)) {
    case SfLayout::kSwizzled128x4:
      return store_sf<SfLayout::kSwizzled128x4>(q.sf, row, col, nk, sf_byte, row_ok, in_sf, has_data);
    case SfLayout::kSwizzled8x4:
      return store_sf<SfLayout::kSwizzled8x4>(q.sf, row, col, nk, sf_byte, row_ok, in_sf, has_data);
    default: return store_sf<SfLayout::kLinear>(q.sf, row, col, nk, sf_byte, row_ok, in_sf, has_data);
  }
}

// zero_padding_rows in the swizzled layout known at run time (nothing to zero in the linear one).
__device__ __forceinline__ void zero_padding_rows_any(const QuantizeTarget& q, int64_t nk, uint32_t first,
                                                      uint32_t count) {
  switch (SfLayout(q.sf_layout)) {
    case SfLayout::kSwizzled128x4: return zero_padding_rows<SfLayout::kSwizzled128x4>(q, nk, first, count);
    case SfLayout::kSwizzled8x4: return zero_padding_rows<SfLayout::kSwizzled8x4>(q, nk, first, count);
    default: return;
  }
}

// The CTAs an SM that norm_kernel's registers are bounded for (__launch_bounds__; 0: no bound). bf16
// RMSNorm and LayerNorm holding one MXFP4 block a thread fit 64 registers (4 CTAs) without spilling and
// ran faster so: 8192x8192 RMSNorm 81.2 -> 73.3 us, LayerNorm 107.9 -> 100.6 us (H200, kernel lab run
// 22). The others measured no faster or spill (float16's widening takes more registers), and a bound
// of 1, unlike none, let ptxas raise their register counts (bf16 RMSNorm NVFP4 64 -> 80: 88 -> 98 us).
// The kernels that also store the norm output (NORMED) spill under that bound: none.
template <FusedOp OP, InputDtype D, bool UE8M0, int BPT, bool NORMED>
constexpr int kNormMinCtasPerSm =
    D == InputDtype::kBFloat16 && UE8M0 && BPT == 1 && (OP == FusedOp::kRmsNorm || OP == FusedOp::kLayerNorm) &&
            !NORMED
        ? 4
        : 0;

// BPT > 0: each thread holds up to BPT blocks of its row in registers (loaded once); BPT = 0: any K,
// the blocks are read from memory in every pass. NORMED: the norm output is also stored (normed_out).
template <FusedOp OP, InputDtype D, bool UE8M0, int BPT, bool NORMED>
__global__ void __launch_bounds__(kThreads, (kNormMinCtasPerSm<OP, D, UE8M0, BPT, NORMED>))
    norm_kernel(const FusedLaunch a, const NormGeometry g) {
  constexpr int VEC = Recipe<UE8M0>::kVec;
  using Row = NormRow<OP, D, VEC>;
  constexpr int kLoads = Row::kLoads;
  wait_for_previous_kernel();
  const QuantizeTarget& q = a.out;
  const SfLayout layout = SfLayout(q.sf_layout);
  const int64_t nk = q.k / VEC;
  const int64_t cols = sf_cols(nk, layout);
  if (blockIdx.x >= g.row_ctas) {
    const uint32_t first = (blockIdx.x - g.row_ctas) * kThreads + threadIdx.x;
    const uint32_t count = (gridDim.x - g.row_ctas) * kThreads;
    zero_padding_rows_any(q, nk, first, count);
    return;
  }

  __shared__ float smem[kThreads / 32];
  const float eps = a.eps_device != nullptr ? *a.eps_device : a.eps;
  // team: a power of two (team_for), so masks and shifts instead of integer divisions; the streaming
  // kernel's is the CTA (a constant). The shift read from the launch, not computed: a register less
  // (LayerNorm bf16 MXFP4, bounded to 64 registers, took a stack frame otherwise). Also the streaming
  // kernel's: a constant shift let nvcc keep more in registers (bf16 NVFP4 RMSNorm 48 -> 64, one CTA an
  // SM less), 8-9% slower at 8192x16384 (H100, kernel lab run 43)
  const int team = BPT > 0 ? g.team : kThreads;
  const int team_shift = g.team_shift;
  const int lane = int(threadIdx.x & unsigned(team - 1));
  const int rows_per_cta = kThreads >> team_shift;
  // the passes depend on g only: every thread reaches every shuffle and barrier
  const int passes = BPT > 0 ? BPT : int((cols + team - 1) / team);
  auto each_pass = [&](auto&& body) {
    if constexpr (BPT > 0) {
#pragma unroll
      for (int p = 0; p < BPT; ++p) body(p);
    } else {
      for (int p = 0; p < passes; ++p) body(p);
    }
  };
  Nvfp4RowScale rs{};
  for (int64_t group = blockIdx.x; group < g.row_groups; group += g.row_ctas) {
    const int64_t row_or_past = group * rows_per_cta + (threadIdx.x >> team_shift);
    const bool row_ok = row_or_past < q.m;  // uniform over a warp: teams are whole warps
    const Row r{a, row_ok ? row_or_past : 0};

    typename Row::Block held[BPT > 0 ? BPT : 1];
    // the block of pass p to normalize: held, or read again
    auto block = [&](int p, int64_t col, typename Row::Block& v) {
      if constexpr (BPT > 0) {
#pragma unroll
        for (int s = 0; s < Row::kStreams; ++s) {
#pragma unroll
          for (int i = 0; i < kLoads; ++i) v[s][i] = held[p][s][i];
        }
      } else {
        r.reload(col, v);
      }
    };
    float acc = 0.0f;
    each_pass([&](int p) {
      const int64_t col = lane + int64_t(p) * team;
      if (!row_ok || col >= nk) return;
      typename Row::Block v;
      r.load(col, v);
      acc = add_rn(acc, Row::template partial<kIsLayerNorm<OP> ? Row::Statistic::kSum : Row::Statistic::kSquares>(v));
      if constexpr (BPT > 0) {
#pragma unroll
        for (int s = 0; s < Row::kStreams; ++s) {
#pragma unroll
          for (int i = 0; i < kLoads; ++i) held[p][s][i] = v[s][i];
        }
      }
    });
    // one global scale: read with the CTA's first row only
    if (!UE8M0 && row_ok && (q.global_scale_per_row || group == blockIdx.x)) rs = row_scale_of(q, r.row);
    const float kf = float(q.k);
    const float total = team_sum(acc, team, smem);
    float stat_a, stat_b = 0.0f;  // rms: rstd; layer norm: mean, rstd
    if constexpr (kIsLayerNorm<OP>) {
      // biased variance in a second reduction over the centered values
      const float mean = div_rn(total, kf);
      float acc2 = 0.0f;
      each_pass([&](int p) {
        const int64_t col = lane + int64_t(p) * team;
        if (!row_ok || col >= nk) return;
        typename Row::Block v;
        block(p, col, v);
        acc2 = add_rn(acc2, Row::template partial<Row::Statistic::kCenteredSquares>(v, mean));
      });
      stat_a = mean;
      stat_b = Row::layer_norm_rstd(team_sum(acc2, team, smem), kf, eps);
    } else {
      stat_a = Row::rms_rstd(total, kf, eps);
    }

    uint8_t* xq_row = r.codes();
    each_pass([&](int p) {
      const int64_t col = lane + int64_t(p) * team;
      const bool has_data = row_ok && col < nk;
      uint32_t sf_byte = 0u;  // the padding value
      if (has_data) {
        typename Row::Block v;
        block(p, col, v);
        sf_byte = r.template quantize<UE8M0, NORMED>(col, v, stat_a, stat_b, rs, xq_row);
      }
      store_sf_any(q, r.row, col, nk, sf_byte, row_ok, col < cols, has_data);
    });
  }
}

// Few rows (a decode step): norm_kernel gives a row to one CTA, whose 256 threads walk the row's
// `passes` = ceil(cols / 256) block columns one after another (2-4 at K = 8192-16384, NVFP4), so a call
// takes 3-6 us for 1-16 rows. Here a row is a cluster of `passes` CTAs, CTA c holding the blocks of pass c
// (column threadIdx.x + 256 c) in registers. The row statistic is norm_kernel's, bit for bit: thread t's
// partial sums of the passes, read from the cluster's shared memories, are added in pass order, then
// team_sum over the 256 threads; so a row's bytes do not depend on which kernel ran it.
// Grid: (passes, rows + padding rows); clusters of (passes, 1, 1); the clusters past the last row
// zero the swizzled layouts' padding rows.
template <FusedOp OP, InputDtype D, bool UE8M0, bool NORMED>
__global__ void __launch_bounds__(kThreads) norm_cluster_kernel(const FusedLaunch a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int VEC = Recipe<UE8M0>::kVec;
  using Row = NormRow<OP, D, VEC>;
  wait_for_previous_kernel();
  const QuantizeTarget& q = a.out;
  const SfLayout layout = SfLayout(q.sf_layout);
  const int64_t nk = q.k / VEC;
  if (blockIdx.y >= q.m) {  // a whole cluster: no cluster barrier is skipped
    const uint32_t first = ((blockIdx.y - uint32_t(q.m)) * gridDim.x + blockIdx.x) * kThreads + threadIdx.x;
    const uint32_t count = (gridDim.y - uint32_t(q.m)) * gridDim.x * kThreads;
    zero_padding_rows_any(q, nk, first, count);
    return;
  }
  cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  // this CTA's partial sums of each reduction (LayerNorm: two), read by the whole cluster
  __shared__ float partials[kIsLayerNorm<OP> ? 2 : 1][kThreads];
  __shared__ float smem[kThreads / 32];
  const float eps = a.eps_device != nullptr ? *a.eps_device : a.eps;
  const int passes = int(gridDim.x);
  const Row r{a, int64_t(blockIdx.y)};
  const int64_t col = threadIdx.x + int64_t(blockIdx.x) * kThreads;
  const bool has_data = col < nk;
  typename Row::Block v;
  if (has_data) r.load(col, v);
  // norm_kernel's team total of the threads' partial sums (pass order, then team_sum)
  auto row_total = [&](int reduction, float partial) {
    partials[reduction][threadIdx.x] = partial;
    cluster.sync();
    float acc = 0.0f;
    for (int c = 0; c < passes; ++c) {
      if (threadIdx.x + int64_t(c) * kThreads < nk) {
        acc = add_rn(acc, *cluster.map_shared_rank(&partials[reduction][threadIdx.x], c));
      }
    }
    return team_sum(acc, kThreads, smem);
  };
  const float kf = float(q.k);
  float stat_a, stat_b = 0.0f;  // as in norm_kernel
  if constexpr (kIsLayerNorm<OP>) {
    const float mean = div_rn(row_total(0, has_data ? Row::template partial<Row::Statistic::kSum>(v) : 0.0f), kf);
    const float centered = has_data ? Row::template partial<Row::Statistic::kCenteredSquares>(v, mean) : 0.0f;
    stat_a = mean;
    stat_b = Row::layer_norm_rstd(row_total(1, centered), kf, eps);
  } else {
    stat_a = Row::rms_rstd(row_total(0, has_data ? Row::template partial<Row::Statistic::kSquares>(v) : 0.0f), kf, eps);
  }
  // Shared memory must outlive the cluster's reads of it: arrive once this CTA's reads are done, wait
  // before exiting (the quantization in between).
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
  Nvfp4RowScale rs{};
  if (!UE8M0) rs = row_scale_of(q, r.row);
  const uint32_t sf_byte = has_data ? r.template quantize<UE8M0, NORMED>(col, v, stat_a, stat_b, rs, r.codes()) : 0u;
  store_sf_any(q, r.row, col, nk, sf_byte, true, col < sf_cols(nk, layout), has_data);
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#else
  __trap();  // never launched: see cluster_kernel_runs
#endif
}

// The smallest team that covers a row's scale columns with at most BPT blocks a thread: a power of two
// (norm_kernel relies on it).
template <int BPT>
int team_for(int64_t cols) {
  int team = 32;
  while (team < kThreads && int64_t(team) * BPT < cols) team *= 2;
  return team;
}

template <FusedOp OP, InputDtype D, bool UE8M0, int BPT, bool NORMED>
cudaError_t launch_norm_config(const FusedLaunch& a, int64_t cols, int64_t pad_items, const LaunchStream& stream) {
  const QuantizeTarget& q = a.out;
  NormGeometry g{};
  g.team = BPT > 0 ? team_for<BPT>(cols) : kThreads;
  while ((1 << g.team_shift) < g.team) ++g.team_shift;
  const int rows_per_cta = kThreads / g.team;
  g.row_groups = (q.m + rows_per_cta - 1) / rows_per_cta;
  const int ctas_per_sm = resident_ctas_per_sm<norm_kernel<OP, D, UE8M0, BPT, NORMED>>();
  // up to 8 waves of CTAs, each taking rows with a grid stride (H100, kernel lab run 39: 1, 2 or 4 waves,
  // fewer rows' prologues, were no faster for RMSNorm and up to 8% slower for add_rms_norm)
  g.row_ctas = std::min<int64_t>(g.row_groups, int64_t(q.num_sms) * ctas_per_sm * 8);
  const int64_t pad_ctas = std::min<int64_t>((pad_items + kThreads - 1) / kThreads, 4096);
  return launch_kernel(norm_kernel<OP, D, UE8M0, BPT, NORMED>, dim3(unsigned(g.row_ctas + pad_ctas)), stream, a, g);
}

constexpr int64_t kMaxClusterCtas = 8;  // the portable cluster size

// Whether norm_cluster_kernel<OP, D, UE8M0, NORMED> runs on the current device: it launches thread block
// clusters (sm_90 and later) and the kernel's code there was compiled for sm_90 or later (a GPU that
// JIT-compiles the compute_80 PTX of the default build gets the empty body). Cached per device.
template <FusedOp OP, InputDtype D, bool UE8M0, bool NORMED>
bool cluster_kernel_runs() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> known[kMaxDevices];  // 0 unknown, 1 yes, -1 no
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) {
    (void)cudaGetLastError();
    return false;
  }
  if (known[device].load(std::memory_order_relaxed) == 0) {
    int supported = 0;
    cudaFuncAttributes attributes{};
    const bool ok = cudaDeviceGetAttribute(&supported, cudaDevAttrClusterLaunch, device) == cudaSuccess &&
                    cudaFuncGetAttributes(&attributes, norm_cluster_kernel<OP, D, UE8M0, NORMED>) == cudaSuccess;
    if (!ok) (void)cudaGetLastError();
    known[device].store(ok && supported != 0 && attributes.ptxVersion >= 90 ? 1 : -1, std::memory_order_relaxed);
  }
  return known[device].load(std::memory_order_relaxed) == 1;
}

template <FusedOp OP, InputDtype D, bool UE8M0, bool NORMED>
cudaError_t launch_norm_cluster(const FusedLaunch& a, int64_t passes, int64_t pad_items, const LaunchStream& stream) {
  // padding rows in whole clusters of `passes` CTAs
  const int64_t pad_rows = std::min<int64_t>((pad_items + passes * kThreads - 1) / (passes * kThreads), 1024);
  const dim3 grid(unsigned(passes), unsigned(a.out.m + pad_rows));
  return launch_kernel_in_clusters(norm_cluster_kernel<OP, D, UE8M0, NORMED>, grid, kThreads, unsigned(passes), stream, a);
}

template <FusedOp OP, InputDtype D, bool UE8M0, bool NORMED>
cudaError_t launch_norm_recipe(const FusedLaunch& a, const LaunchStream& stream) {
  const SfLayout layout = SfLayout(a.out.sf_layout);
  const int64_t nk = a.out.k / Recipe<UE8M0>::kVec;
  const int64_t cols = sf_cols(nk, layout);
  const int64_t pad_items = padding_items(a.out, nk, layout);
  if (pad_items < 0) return cudaErrorInvalidValue;
  // Rows held in registers save the second read of x, but holding 4 blocks a thread (and RMSNorm's 2
  // MXFP4 blocks) takes 100-128 registers, 2 CTAs an SM, where RMSNorm and LayerNorm measured faster
  // reading the row twice, the second time from L2 (H100, kernel lab run 16, 8192x16384: RMSNorm NVFP4
  // 226 -> 163 us, LayerNorm NVFP4 253 -> 219 us, RMSNorm MXFP4 172 -> 156 us; same bits, the same team
  // reduces the row). add_rms_norm holds them: streaming reads back the sum it wrote (323 vs 337 us).
  // kAddRmsNormFloat32Sum holds x and the residual: two MXFP4 blocks of both take 172-190 registers (one
  // CTA an SM), four 240-254, so MXFP4 rows of more than 256 blocks are read twice (8192x16384: 375 us,
  // the rounded sum held 317 us); four NVFP4 blocks take 128 (8192x16384 bf16 NVFP4: read twice 470 us,
  // held 343 us, the rounded sum 322 us; H100, CUDA events, L2 flushed)
  constexpr bool kHoldTwo = !(UE8M0 && (OP == FusedOp::kRmsNorm || OP == FusedOp::kRmsNormAdd ||
                                        OP == FusedOp::kAddRmsNormFloat32Sum));
  constexpr bool kHoldFour = OP == FusedOp::kAddRmsNorm || (OP == FusedOp::kAddRmsNormFloat32Sum && !UE8M0);
  if (cols <= kThreads) return launch_norm_config<OP, D, UE8M0, 1, NORMED>(a, cols, pad_items, stream);
  // Few rows of 3-8 passes take the cluster kernel, while its CTAs fit one an SM (H100, bf16 NVFP4, kernel
  // lab runs 31, 34, 35: K = 12288-16384 at M = 1-44, e.g. 1x16384 RMSNorm 5.6 -> 3.4 us, LayerNorm 6.9
  // -> 4.4 us, 33x16384 RMSNorm 5.8 -> 4.4 us). At 2 passes it gained 0.1-0.3 us at 1-16x8192 but lost
  // 0.1-0.6 us at M = 64-66 and at K = 5120-6144 (a part-filled second pass), and LayerNorm lost at
  // 1-16x8192; more than one CTA an SM (M = 128) was 0.2-2.7 us slower than norm_kernel.
  const int64_t passes = (cols + kThreads - 1) / kThreads;
  constexpr int64_t kMinClusterPasses = 3;
  if (passes >= kMinClusterPasses && passes <= kMaxClusterCtas && a.out.m * passes <= a.out.num_sms &&
      cluster_kernel_runs<OP, D, UE8M0, NORMED>()) {
    return launch_norm_cluster<OP, D, UE8M0, NORMED>(a, passes, pad_items, stream);
  }
  if constexpr (kHoldTwo) {
    if (cols <= 2 * kThreads) return launch_norm_config<OP, D, UE8M0, 2, NORMED>(a, cols, pad_items, stream);
  }
  if constexpr (kHoldFour) {
    if (cols <= 4 * kThreads) return launch_norm_config<OP, D, UE8M0, 4, NORMED>(a, cols, pad_items, stream);
  }
  return launch_norm_config<OP, D, UE8M0, 0, NORMED>(a, cols, pad_items, stream);
}

template <FusedOp OP, InputDtype D, bool NORMED>
cudaError_t launch_norm_kernels(const FusedLaunch& a, const LaunchStream& stream) {
  return a.out.sf_use_ue8m0 ? launch_norm_recipe<OP, D, true, NORMED>(a, stream)
                            : launch_norm_recipe<OP, D, false, NORMED>(a, stream);
}

// The norms' kernels that also store the norm output (the *_with_normed ops), and those that do not.
template <FusedOp OP, InputDtype D>
cudaError_t launch_norm(const FusedLaunch& a, const LaunchStream& stream) {
  return a.normed_out != nullptr ? launch_norm_kernels<OP, D, true>(a, stream) : launch_norm_kernels<OP, D, false>(a, stream);
}

template <InputDtype D>
cudaError_t launch_typed(const FusedLaunch& a, const LaunchStream& stream) {
  switch (a.op) {
    case FusedOp::kRmsNorm: return launch_norm<FusedOp::kRmsNorm, D>(a, stream);
    case FusedOp::kAddRmsNorm: return launch_norm<FusedOp::kAddRmsNorm, D>(a, stream);
    case FusedOp::kAddRmsNormFloat32Sum: return launch_norm<FusedOp::kAddRmsNormFloat32Sum, D>(a, stream);
    // no norm output besides the sum: the kernels without NORMED
    case FusedOp::kRmsNormAdd: return launch_norm_kernels<FusedOp::kRmsNormAdd, D, false>(a, stream);
    case FusedOp::kLayerNorm: return launch_norm<FusedOp::kLayerNorm, D>(a, stream);
    case FusedOp::kLayerNormModulate: return launch_norm_kernels<FusedOp::kLayerNormModulate, D, false>(a, stream);
    case FusedOp::kActivation:
    case FusedOp::kGatedActivation: return launch_activation<D>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_fused(const FusedLaunch& a, const LaunchStream& stream) {
  switch (InputDtype(a.input_dtype)) {
    case InputDtype::kBFloat16: return launch_typed<InputDtype::kBFloat16>(a, stream);
    case InputDtype::kFloat16: return launch_typed<InputDtype::kFloat16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fp4op::cuda
