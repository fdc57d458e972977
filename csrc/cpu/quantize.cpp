// CPU kernels of fp4op::quantize and fp4op::dequantize: rows in parallel (at::parallel_for), each row
// widened to float32 and quantized with the shared numerics.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../op_args.h"
#include "quantize_row.h"

namespace fp4op::cpu {
namespace {

// At least this many elements per parallel task, so that small inputs stay on one thread.
constexpr int64_t kElementsPerTask = 1 << 15;

std::tuple<at::Tensor, at::Tensor> quantize_cpu(const at::Tensor& input,
                                                const std::optional<at::Tensor>& global_scale,
                                                int64_t sf_vec_size, bool sf_use_ue8m0,
                                                bool is_sf_swizzled_layout, bool is_sf_8x4_layout,
                                                bool is_global_scale_inversed,
                                                std::optional<bool> /*enable_pdl: a CUDA launch option*/) {
  check_recipe(sf_vec_size, sf_use_ue8m0);
  const InputDtype dtype = input_dtype_of(input, "input");
  const QuantizeShape s = check_quantize_shape(input, sf_vec_size, is_sf_swizzled_layout, is_sf_8x4_layout);
  const at::Tensor gs = checked_global_scale(global_scale, sf_use_ue8m0, s.m, input.device());
  auto [xq, sf] = empty_quantize_outputs(input, s);
  if (s.layout != SfLayout::kLinear) sf.zero_();  // padding rows/columns are 0
  if (s.m == 0 || s.k == 0) return {xq, sf};

  const at::Tensor x = input.contiguous();
  const uint8_t* in = static_cast<const uint8_t*>(x.data_ptr());
  const int64_t in_row_bytes = s.k * x.element_size();
  uint8_t* xq_ptr = xq.data_ptr<uint8_t>();
  uint8_t* sf_ptr = sf.data_ptr<uint8_t>();
  const QuantizeParams p{s.k,
                         sf_use_ue8m0,
                         s.layout,
                         gs.defined() ? gs.data_ptr<float>() : nullptr,
                         gs.defined() && gs.numel() > 1,
                         is_global_scale_inversed};

  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / s.k);
  at::parallel_for(0, s.m, grain, [&](int64_t begin, int64_t end) {
    IeeeDenormalsScope ieee;
    std::vector<float> row(s.k);
    BlockScaleCache cache;
    for (int64_t r = begin; r < end; ++r) {
      widen_row(in + r * in_row_bytes, dtype, s.k, row.data());
      quantize_row(row.data(), r, p, xq_ptr + r * (s.k / 2), sf_ptr, cache);
    }
  });
  return {xq, sf};
}

// A scale byte's 16 dequantized code values (dequant_value), for decoding by lookup: the 8 magnitudes'
// values, the negative codes their negations (IEEE rounding is symmetric; a NaN stays the NaN that
// dequant_value gives for every code).
struct BlockValues {
  float v[16];
  void fill(uint8_t sf, bool ue8m0, float s) {
    for (uint32_t c = 0; c < 8; ++c) v[c] = dequant_value(c, sf, ue8m0, s);
    for (uint32_t c = 0; c < 8; ++c) v[c + 8] = v[c] != v[c] ? v[c] : -v[c];
  }
};

// A row of float32 values converted to the output dtype as static_cast<Out> converts them.
template <typename Out>
void narrow_row(const float* v, int64_t k, Out* out) {
  for (int64_t i = 0; i < k; ++i) out[i] = static_cast<Out>(v[i]);
}

// c10::BFloat16's rounding (to nearest even; every NaN to 0x7FC0) without branches, so that the loop
// vectorizes.
template <>
void narrow_row<c10::BFloat16>(const float* v, int64_t k, c10::BFloat16* out) {
  uint16_t* bits = reinterpret_cast<uint16_t*>(out);
  for (int64_t i = 0; i < k; ++i) {
    const uint32_t u = float_to_bits(v[i]);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const uint32_t is_nan = 0u - uint32_t((u & 0x7FFFFFFFu) > 0x7F800000u);
    bits[i] = uint16_t((rounded & ~is_nan) | (0x7FC0u & is_nan));
  }
}

template <typename Out>
void dequantize_rows(const uint8_t* xq, const uint8_t* sf, const float* gs, bool gs_per_row, bool inversed,
                     int64_t m, int64_t k, int vec, bool ue8m0, SfLayout layout, Out* out) {
  const int64_t nk = k / vec;
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / k);
  at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
    IeeeDenormalsScope ieee;
    std::vector<float> row(k);
    const bool shared_scale = ue8m0 || !gs_per_row;
    auto row_scale = [&](int64_t r) {
      if (ue8m0) return 1.0f;
      return global_scale_s(gs[gs_per_row ? r : 0], inversed);
    };
    // with one scale for every row, each scale byte's values once, when the byte first occurs
    std::vector<BlockValues> shared(shared_scale ? 256 : 0);
    bool filled[256] = {};
    const float shared_s = shared_scale ? row_scale(0) : 0.0f;
    BlockValues own;
    for (int64_t r = begin; r < end; ++r) {
      const float s = shared_scale ? 0.0f : row_scale(r);
      const uint8_t* q = xq + r * (k / 2);
      for (int64_t b = 0; b < nk; ++b) {
        const uint8_t sf_byte = sf[sf_offset(r, b, nk, layout)];
        if (shared_scale && !filled[sf_byte]) {
          shared[sf_byte].fill(sf_byte, ue8m0, shared_s);
          filled[sf_byte] = true;
        }
        if (!shared_scale) own.fill(sf_byte, ue8m0, s);
        const float* values = shared_scale ? shared[sf_byte].v : own.v;
        float* v = row.data() + b * vec;
        for (int i = 0; i < vec / 2; ++i) {
          const uint8_t byte = q[b * (vec / 2) + i];
          v[2 * i] = values[byte & 0xFu];
          v[2 * i + 1] = values[byte >> 4];
        }
      }
      narrow_row(row.data(), k, out + r * k);
    }
  });
}

at::Tensor dequantize_cpu(const at::Tensor& x_q, const at::Tensor& sf,
                          const std::optional<at::Tensor>& global_scale, int64_t sf_vec_size,
                          bool sf_use_ue8m0, bool is_sf_swizzled_layout, bool is_sf_8x4_layout,
                          bool is_global_scale_inversed, std::optional<at::ScalarType> output_dtype) {
  const DequantizeShape d = check_dequantize_args(x_q, sf, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout,
                                                  is_sf_8x4_layout, output_dtype);
  const at::Tensor gs = checked_global_scale(global_scale, sf_use_ue8m0, d.m, x_q.device());
  at::Tensor out = empty_dequantize_output(x_q, d);
  if (d.m == 0 || d.k == 0) return out;
  const at::Tensor q = x_q.contiguous();
  const at::Tensor scales = sf.contiguous();
  const float* gs_ptr = gs.defined() ? gs.data_ptr<float>() : nullptr;
  const bool per_row = gs.defined() && gs.numel() > 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fp4op_dequantize_cpu", [&] {
    dequantize_rows<scalar_t>(q.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(), gs_ptr, per_row,
                              is_global_scale_inversed, d.m, d.k, int(sf_vec_size), sf_use_ue8m0, d.layout,
                              out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fp4op, CPU, m) {
  m.impl("quantize", &quantize_cpu);
  m.impl("dequantize", &dequantize_cpu);
}

}  // namespace fp4op::cpu
