// The norm ops' entry points (schemas: csrc/fused.cpp), written once for both backends: each op picks
// the outputs it returns from one of its backend's two implementations. A backend supplies
//   rms_norm(x, residual?, weight?, eps, weight_offset, weight_in_input_dtype, <quantize args>,
//            sum_in_float32, with_normed, add_after_norm) -> NormOutputs
//   layer_norm(x, weight?, bias?, eps, <quantize args>, with_normed, multiplier?, shift?)
//              -> (x_q, sf, norm output or undefined); with multiplier and shift (both or neither), the
//              norm output modulated, round(round(norm * multiplier) + shift), per sample (see
//              fused::sample_rows_of)
//   eps(eps, x): the op's eps (a float, or the one-element tensor of the *_eps_tensor ops) as its rms_norm
//   takes it.
#pragma once

#include <torch/library.h>

#include <optional>
#include <tuple>

namespace fp4op::fused {

// (x_q, sf, next residual, norm output): the next residual where there is a residual (x + residual, or
// with add_after_norm residual + the norm output, which is then what is quantized), the norm output with
// `with_normed`; undefined otherwise.
using NormOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <class Backend>
struct NormOps {
  using Tensor = at::Tensor;
  using OptionalTensor = std::optional<at::Tensor>;

  template <typename Eps>
  static std::tuple<Tensor, Tensor> rms_norm_quantize(const Tensor& x, const OptionalTensor& weight, Eps eps,
                                                      double weight_offset, bool weight_in_input_dtype,
                                                      const OptionalTensor& global_scale, int64_t sf_vec_size,
                                                      bool sf_use_ue8m0, bool is_sf_swizzled_layout,
                                                      bool is_sf_8x4_layout, bool is_global_scale_inversed) {
    auto [xq, sf, sum, normed] = Backend::rms_norm(x, std::nullopt, weight, Backend::eps(eps, x), weight_offset,
                                                   weight_in_input_dtype, global_scale, sf_vec_size, sf_use_ue8m0,
                                                   is_sf_swizzled_layout, is_sf_8x4_layout, is_global_scale_inversed,
                                                   false, false, false);
    return {xq, sf};
  }

  template <typename Eps>
  static std::tuple<Tensor, Tensor, Tensor> rms_norm_quantize_with_normed(
      const Tensor& x, const OptionalTensor& weight, Eps eps, double weight_offset, bool weight_in_input_dtype,
      const OptionalTensor& global_scale, int64_t sf_vec_size, bool sf_use_ue8m0, bool is_sf_swizzled_layout,
      bool is_sf_8x4_layout, bool is_global_scale_inversed) {
    auto [xq, sf, sum, normed] = Backend::rms_norm(x, std::nullopt, weight, Backend::eps(eps, x), weight_offset,
                                                   weight_in_input_dtype, global_scale, sf_vec_size, sf_use_ue8m0,
                                                   is_sf_swizzled_layout, is_sf_8x4_layout, is_global_scale_inversed,
                                                   false, true, false);
    return {xq, sf, normed};
  }

  template <typename Eps>
  static std::tuple<Tensor, Tensor, Tensor> add_rms_norm_quantize(
      const Tensor& x, const Tensor& residual, const OptionalTensor& weight, Eps eps, double weight_offset,
      bool weight_in_input_dtype, const OptionalTensor& global_scale, int64_t sf_vec_size, bool sf_use_ue8m0,
      bool is_sf_swizzled_layout, bool is_sf_8x4_layout, bool is_global_scale_inversed, bool sum_in_float32) {
    auto [xq, sf, sum, normed] = Backend::rms_norm(x, residual, weight, Backend::eps(eps, x), weight_offset,
                                                   weight_in_input_dtype, global_scale, sf_vec_size, sf_use_ue8m0,
                                                   is_sf_swizzled_layout, is_sf_8x4_layout, is_global_scale_inversed,
                                                   sum_in_float32, false, false);
    return {xq, sf, sum};
  }

  template <typename Eps>
  static NormOutputs add_rms_norm_quantize_with_normed(const Tensor& x, const Tensor& residual,
                                                       const OptionalTensor& weight, Eps eps, double weight_offset,
                                                       bool weight_in_input_dtype, const OptionalTensor& global_scale,
                                                       int64_t sf_vec_size, bool sf_use_ue8m0,
                                                       bool is_sf_swizzled_layout, bool is_sf_8x4_layout,
                                                       bool is_global_scale_inversed, bool sum_in_float32) {
    return Backend::rms_norm(x, residual, weight, Backend::eps(eps, x), weight_offset, weight_in_input_dtype,
                             global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout,
                             is_global_scale_inversed, sum_in_float32, true, false);
  }

  // residual + rms_norm(x), rounded, quantized: (x_q, sf, that sum)
  template <typename Eps>
  static std::tuple<Tensor, Tensor, Tensor> rms_norm_add_quantize(
      const Tensor& x, const Tensor& residual, const OptionalTensor& weight, Eps eps, double weight_offset,
      bool weight_in_input_dtype, const OptionalTensor& global_scale, int64_t sf_vec_size, bool sf_use_ue8m0,
      bool is_sf_swizzled_layout, bool is_sf_8x4_layout, bool is_global_scale_inversed) {
    auto [xq, sf, sum, normed] = Backend::rms_norm(x, residual, weight, Backend::eps(eps, x), weight_offset,
                                                   weight_in_input_dtype, global_scale, sf_vec_size, sf_use_ue8m0,
                                                   is_sf_swizzled_layout, is_sf_8x4_layout, is_global_scale_inversed,
                                                   false, false, true);
    return {xq, sf, sum};
  }

  static std::tuple<Tensor, Tensor> layer_norm_quantize(const Tensor& x, const OptionalTensor& weight,
                                                        const OptionalTensor& bias, double eps,
                                                        const OptionalTensor& global_scale, int64_t sf_vec_size,
                                                        bool sf_use_ue8m0, bool is_sf_swizzled_layout,
                                                        bool is_sf_8x4_layout, bool is_global_scale_inversed) {
    auto [xq, sf, unused] = Backend::layer_norm(x, weight, bias, eps, global_scale, sf_vec_size, sf_use_ue8m0,
                                                is_sf_swizzled_layout, is_sf_8x4_layout, is_global_scale_inversed,
                                                false, std::nullopt, std::nullopt);
    return {xq, sf};
  }

  static std::tuple<Tensor, Tensor, Tensor> layer_norm_quantize_with_normed(
      const Tensor& x, const OptionalTensor& weight, const OptionalTensor& bias, double eps,
      const OptionalTensor& global_scale, int64_t sf_vec_size, bool sf_use_ue8m0, bool is_sf_swizzled_layout,
      bool is_sf_8x4_layout, bool is_global_scale_inversed) {
    return Backend::layer_norm(x, weight, bias, eps, global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout,
                               is_sf_8x4_layout, is_global_scale_inversed, true, std::nullopt, std::nullopt);
  }

  static std::tuple<Tensor, Tensor> layer_norm_modulate_quantize(
      const Tensor& x, const OptionalTensor& weight, const OptionalTensor& bias, double eps, const Tensor& multiplier,
      const Tensor& shift, const OptionalTensor& global_scale, int64_t sf_vec_size, bool sf_use_ue8m0,
      bool is_sf_swizzled_layout, bool is_sf_8x4_layout, bool is_global_scale_inversed) {
    auto [xq, sf, unused] = Backend::layer_norm(x, weight, bias, eps, global_scale, sf_vec_size, sf_use_ue8m0,
                                                is_sf_swizzled_layout, is_sf_8x4_layout, is_global_scale_inversed,
                                                false, multiplier, shift);
    return {xq, sf};
  }

  // The norm ops' kernels for the backend's dispatch key (inside its TORCH_LIBRARY_IMPL block).
  static void register_kernels(torch::Library& m) {
    m.impl("rms_norm_quantize", &rms_norm_quantize<double>);
    m.impl("rms_norm_quantize_eps_tensor", &rms_norm_quantize<at::Tensor>);
    m.impl("rms_norm_quantize_with_normed", &rms_norm_quantize_with_normed<double>);
    m.impl("rms_norm_quantize_with_normed_eps_tensor", &rms_norm_quantize_with_normed<at::Tensor>);
    m.impl("add_rms_norm_quantize", &add_rms_norm_quantize<double>);
    m.impl("add_rms_norm_quantize_eps_tensor", &add_rms_norm_quantize<at::Tensor>);
    m.impl("add_rms_norm_quantize_with_normed", &add_rms_norm_quantize_with_normed<double>);
    m.impl("add_rms_norm_quantize_with_normed_eps_tensor", &add_rms_norm_quantize_with_normed<at::Tensor>);
    m.impl("rms_norm_add_quantize", &rms_norm_add_quantize<double>);
    m.impl("rms_norm_add_quantize_eps_tensor", &rms_norm_add_quantize<at::Tensor>);
    m.impl("layer_norm_quantize", &layer_norm_quantize);
    m.impl("layer_norm_quantize_with_normed", &layer_norm_quantize_with_normed);
    m.impl("layer_norm_modulate_quantize", &layer_norm_modulate_quantize);
  }
};

}  // namespace fp4op::fused
