// CPU building blocks: quantize rows held as float32 values (exact widenings of the model dtype) and
// keep the FPU in IEEE mode while doing it. Shared by the plain and the fused CPU kernels.
#pragma once

#include <cstdint>
#include <vector>

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

// What a quantize call needs besides the values: recipe, layout and the row's scale.
struct QuantizeParams {
  int64_t k;
  int sf_vec_size;
  bool sf_use_ue8m0;
  SfLayout layout;
  const float* global_scale;  // nullptr for MXFP4
  bool global_scale_per_row;
  bool is_global_scale_inversed;
};

inline Nvfp4RowScale row_scale(const QuantizeParams& p, int64_t row) {
  if (p.global_scale == nullptr) return Nvfp4RowScale{0.0f, 0.0f};
  return nvfp4_row_scale(p.global_scale[p.global_scale_per_row ? row : 0], p.is_global_scale_inversed);
}

// Quantizes row `row` given as K float values: K/2 packed bytes to `xq_row`, K/sf_vec_size scales to
// their layout offsets in `sf`.
inline void quantize_row(const float* v, int64_t row, const QuantizeParams& p, uint8_t* xq_row, uint8_t* sf) {
  const Nvfp4RowScale rs = row_scale(p, row);
  const int64_t nk = p.k / p.sf_vec_size;
  const int vec = p.sf_vec_size;
  for (int64_t b = 0; b < nk; ++b) {
    const float* blk = v + b * vec;
    // NaN-ignoring maximum (a NaN never compares greater) over four independent chains; a block of
    // NaNs keeps the -1 start and gets the NaN amax that amax_fold gives it
    float lane[4] = {-1.0f, -1.0f, -1.0f, -1.0f};
    for (int i = 0; i < vec; i += 4) {
      for (int j = 0; j < 4; ++j) {
        const float a = fabsf(blk[i + j]);
        lane[j] = a > lane[j] ? a : lane[j];
      }
    }
    float amax = lane[0];
    for (int j = 1; j < 4; ++j) amax = lane[j] > amax ? lane[j] : amax;
    if (amax < 0.0f) amax = fabsf(blk[0]);
    const BlockScale s = p.sf_use_ue8m0 ? mxfp4_block_scale(amax) : nvfp4_block_scale(amax, rs);
    // scale and convert in a flat loop the compiler vectorizes, then pack pairs of codes
    uint32_t codes[32];
    for (int i = 0; i < vec; ++i) codes[i] = e2m1_code_software(mul_rn(blk[i], s.out_scale));
    uint8_t* out = xq_row + b * (vec / 2);
    for (int i = 0; i < vec / 2; ++i) out[i] = uint8_t(codes[2 * i] | (codes[2 * i + 1] << 4));
    sf[sf_offset(row, b, nk, p.layout)] = s.sf;
  }
}

}  // namespace fp4op::cpu
