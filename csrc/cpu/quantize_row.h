// CPU building blocks: quantize rows held as float32 values (exact widenings of the model dtype) and
// keep the FPU in IEEE mode while doing it. Shared by the plain and the fused CPU kernels.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#endif

#include "../numerics.h"

namespace fp4op::cpu {

// SPEC.md requires IEEE denormals; torch.set_flush_denormal(True) sets FTZ/DAZ on the calling thread.
// Clears them for the scope of a kernel chunk and restores the caller's mode.
class IeeeDenormalsScope {
 public:
#if defined(__SSE__) || defined(__x86_64__)
  IeeeDenormalsScope() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ & ~0x8040u); }
  ~IeeeDenormalsScope() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

// Every E4M3 byte's float32 value (e4m3_bits_to_float), for widening by lookup.
inline const float* e4m3_values() {
  static const struct Table {
    float v[256];
    Table() {
      for (int i = 0; i < 256; ++i) v[i] = e4m3_bits_to_float(uint8_t(i));
    }
  } table;
  return table.v;
}

// A row of float16 values widened to float32 (fp16_bits_to_float), in the build of the row
// kernel (quantize_row.cpp: AVX2 where the CPU has it).
void widen_fp16_row(const uint16_t* src, int64_t k, float* dst);

// A row of the input dtype widened to float32 (exact), in loops the compiler vectorizes.
inline void widen_row(const void* src, InputDtype dtype, int64_t k, float* dst) {
  switch (dtype) {
    case InputDtype::kFloat16: widen_fp16_row(static_cast<const uint16_t*>(src), k, dst); break;
    case InputDtype::kBFloat16: {
      const uint16_t* b = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < k; ++i) dst[i] = bf16_bits_to_float(b[i]);  // vectorized
      break;
    }
    case InputDtype::kFloat8E4M3: {
      const uint8_t* e = static_cast<const uint8_t*>(src);
      const float* values = e4m3_values();
      for (int64_t i = 0; i < k; ++i) dst[i] = values[e[i]];
      break;
    }
  }
}

// What a quantize call needs besides the values: recipe, layout and the row's scale.
struct QuantizeParams {
  int64_t k;
  bool sf_use_ue8m0;  // MXFP4 (blocks of 32, UE8M0 scales), else NVFP4 (16, E4M3)
  SfLayout layout;
  const float* global_scale;  // nullptr for MXFP4
  bool global_scale_per_row;
  bool is_global_scale_inversed;
};

inline Nvfp4RowScale row_scale(const QuantizeParams& p, int64_t row) {
  if (p.global_scale == nullptr) return Nvfp4RowScale{0.0f, 0.0f};
  return nvfp4_row_scale(p.global_scale[p.global_scale_per_row ? row : 0], p.is_global_scale_inversed);
}

// nvfp4_block_scale memoized on the bits of the block maximum (direct-mapped), for rows that share one
// global scale: values of a model dtype give the blocks of a tensor few distinct maxima, and computed
// each time the (scalar) scale took as long as the rest of an NVFP4 block. One per kernel chunk.
class BlockScaleCache {
 public:
  // 0xFFFFFFFF, a negative NaN, is never a block maximum (the maxima are absolute values)
  BlockScaleCache() { std::memset(keys_, 0xFF, sizeof(keys_)); }

  BlockScale get(float amax, const Nvfp4RowScale& rs) {
    const uint32_t bits = float_to_bits(amax);
    const uint32_t i = (bits * 0x9E3779B1u) >> (32 - kBits);  // multiplicative hash: uses the high bits
    if (keys_[i] != bits) {
      keys_[i] = bits;
      scales_[i] = nvfp4_block_scale(amax, rs);
    }
    return scales_[i];
  }

 private:
  static constexpr int kBits = 10;
  uint32_t keys_[1 << kBits];
  BlockScale scales_[1 << kBits];
};

// Quantizes row `row` given as K float values: K/2 packed bytes to `xq_row`, one scale a block to
// its layout offset in `sf` (quantize_row.cpp). Call it inside an IeeeDenormalsScope, with a cache used
// only for the rows of one call.
void quantize_row(const float* v, int64_t row, const QuantizeParams& p, uint8_t* xq_row, uint8_t* sf,
                  BlockScaleCache& cache);

// The instruction set quantize_row runs with: "avx2" or "baseline".
const char* quantize_row_isa();

}  // namespace fp4op::cpu
