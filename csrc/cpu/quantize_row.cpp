// The row kernel of the CPU quantize, compiled twice on x86-64: for the baseline (SSE2) and for AVX2,
// picked at run time. Both run the same IEEE float32 operations (no FMA: -ffp-contract=off, and the
// AVX2 target does not enable it) on vectors of different widths, so they give the same bytes.
#include "quantize_row.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#define FP4OP_CPU_AVX2 1
#include <immintrin.h>
#else
#define FP4OP_CPU_AVX2 0
#endif

namespace fp4op::cpu {
namespace {

// A row goes through in tiles of this many elements, so that each tile's per-element scales and codes
// stay in L1 between the phases.
constexpr int kTileElements = 512;

// W float32 lanes: GCC/Clang generic vectors, lowered to the target's SIMD instructions.
template <int W>
struct Lanes {
  typedef float F __attribute__((vector_size(4 * W)));
  typedef uint32_t U __attribute__((vector_size(4 * W)));
};

// Every phase is a loop the compiler vectorizes: the block maxima (W lanes within a block, by hand,
// since the auto-vectorizer transposes blocks instead), the block scales (scalar: numerics.h), then the
// scale multiply + E2M1 conversion and the packing, flat over the tile.
template <bool kMx, int W>
__attribute__((always_inline)) inline void quantize_row_tiles(const float* v, int64_t row, const QuantizeParams& p,
                                                              uint8_t* xq_row, uint8_t* sf, BlockScaleCache& cache) {
  using F = typename Lanes<W>::F;
  using U = typename Lanes<W>::U;
  constexpr int kVec = kMx ? 32 : 16;
  constexpr int kTileBlocks = kTileElements / kVec;
  const Nvfp4RowScale rs = row_scale(p, row);
  const bool memoize = !kMx && !p.global_scale_per_row;  // the cache holds one row scale's block scales
  const int64_t nk = p.k / kVec;
  const int64_t sf_row = sf_row_offset(row, nk, p.layout);
  for (int64_t b0 = 0; b0 < nk; b0 += kTileBlocks) {
    const int nb = int(std::min<int64_t>(kTileBlocks, nk - b0));
    const float* tile = v + b0 * kVec;
    float amax[kTileBlocks];
    for (int b = 0; b < nb; ++b) {
      const float* blk = tile + b * kVec;
      // NaN-ignoring maximum as amax_fold (a NaN never compares greater); the lanes start at -1, so a
      // block of NaNs keeps -1 and takes the NaN amax that amax_fold gives it
      F m = F{} - 1.0f;
      for (int i = 0; i < kVec; i += W) {
        F x;
        std::memcpy(&x, blk + i, sizeof(x));
        const F a = F(U(x) & 0x7FFFFFFFu);
        m = a > m ? a : m;
      }
      float lane[W];
      std::memcpy(lane, &m, sizeof(m));
      for (int w = W / 2; w > 0; w /= 2) {
        for (int j = 0; j < w; ++j) lane[j] = lane[j + w] > lane[j] ? lane[j + w] : lane[j];
      }
      amax[b] = lane[0] < 0.0f ? fabsf(blk[0]) : lane[0];
    }
    alignas(32) float scale[kTileElements];
    for (int b = 0; b < nb; ++b) {
      const BlockScale s = kMx      ? mxfp4_block_scale(amax[b])
                           : memoize ? cache.get(amax[b], rs)
                                     : nvfp4_block_scale(amax[b], rs);
      sf[sf_row + sf_col_offset(b0 + b, p.layout)] = s.sf;
      for (int i = 0; i < kVec; ++i) scale[b * kVec + i] = s.out_scale;  // vectorized
    }
    const int n = nb * kVec;
    alignas(32) uint8_t codes[kTileElements];
    for (int i = 0; i < n; ++i) codes[i] = uint8_t(e2m1_code_software(mul_rn(tile[i], scale[i])));  // vectorized
    uint8_t* out = xq_row + b0 * (kVec / 2);
    for (int i = 0; i < n / 2; ++i) out[i] = uint8_t(codes[2 * i] | (codes[2 * i + 1] << 4));  // vectorized
  }
}

__attribute__((always_inline)) inline void widen_fp16_loop(const uint16_t* src, int64_t k, float* dst) {
  for (int64_t i = 0; i < k; ++i) dst[i] = fp16_bits_to_float(src[i]);  // vectorized
}

void widen_fp16_baseline(const uint16_t* src, int64_t k, float* dst) { widen_fp16_loop(src, k, dst); }

void quantize_row_baseline(const float* v, int64_t row, const QuantizeParams& p, uint8_t* xq_row, uint8_t* sf,
                           BlockScaleCache& cache) {
  if (p.sf_use_ue8m0) {
    quantize_row_tiles<true, 4>(v, row, p, xq_row, sf, cache);
  } else {
    quantize_row_tiles<false, 4>(v, row, p, xq_row, sf, cache);
  }
}

#if FP4OP_CPU_AVX2
// F16C's conversion is exact like fp16_bits_to_float; it only quiets signaling NaNs, whose
// payload no quantized byte depends on.
__attribute__((target("avx2,f16c"))) void widen_fp16_f16c(const uint16_t* src, int64_t k, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < k; ++i) dst[i] = fp16_bits_to_float(src[i]);
}

__attribute__((target("avx2"))) void quantize_row_avx2(const float* v, int64_t row, const QuantizeParams& p,
                                                       uint8_t* xq_row, uint8_t* sf, BlockScaleCache& cache) {
  if (p.sf_use_ue8m0) {
    quantize_row_tiles<true, 8>(v, row, p, xq_row, sf, cache);
  } else {
    quantize_row_tiles<false, 8>(v, row, p, xq_row, sf, cache);
  }
}
#endif

struct RowKernel {
  void (*fn)(const float*, int64_t, const QuantizeParams&, uint8_t*, uint8_t*, BlockScaleCache&);
  void (*widen_fp16)(const uint16_t*, int64_t, float*);
  const char* isa;
};

// FP4OP_CPU_BASELINE=1 forces the baseline build (the tests compare it with the reference).
RowKernel pick_row_kernel() {
#if FP4OP_CPU_AVX2
  const char* baseline = std::getenv("FP4OP_CPU_BASELINE");
  if (__builtin_cpu_supports("avx2") && !(baseline && std::strcmp(baseline, "1") == 0)) {
    return {quantize_row_avx2, __builtin_cpu_supports("f16c") ? widen_fp16_f16c : widen_fp16_baseline, "avx2"};
  }
#endif
  return {quantize_row_baseline, widen_fp16_baseline, "baseline"};
}

const RowKernel& row_kernel() {
  static const RowKernel kernel = pick_row_kernel();
  return kernel;
}

}  // namespace

void quantize_row(const float* v, int64_t row, const QuantizeParams& p, uint8_t* xq_row, uint8_t* sf,
                  BlockScaleCache& cache) {
  row_kernel().fn(v, row, p, xq_row, sf, cache);
}

void widen_fp16_row(const uint16_t* src, int64_t k, float* dst) { row_kernel().widen_fp16(src, k, dst); }

const char* quantize_row_isa() { return row_kernel().isa; }

}  // namespace fp4op::cpu
