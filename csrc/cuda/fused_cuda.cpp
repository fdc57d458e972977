// CUDA bindings of the fused "norm/activation + FP4 quantize" ops: the argument checks shared with the
// CPU kernels (fused_args.h), outputs, and one launch on the current stream of the input's device.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../fused_args.h"
#include "../norm_ops.h"
#include "bindings.h"
#include "fused_launch.h"

namespace fp4op::cuda {
namespace {

using fused::Activation;
using fused::FusedProblem;
using fused::NormOutputs;
using fused::RmsWeight;

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The rows of a [..., K] input as the kernels read them: 16-byte aligned rows with contiguous elements;
// strided views that satisfy this (e.g. the two halves of a [M, 2H] tensor) are read in place.
fused::Rows kernel_rows(const at::Tensor& t) {
  fused::Rows rows = fused::rows_of(t);
  if (aligned16(rows.tensor.data_ptr()) && (rows.row_stride * int64_t(t.element_size())) % 16 == 0) return rows;
  at::Tensor copy = at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
  copy.copy_(t);
  return {copy, t.size(-1)};
}

// A [K] weight/bias, contiguous and 16-byte aligned (or undefined).
at::Tensor kernel_affine(const std::optional<at::Tensor>& p) {
  return fused::has(p) ? aligned_contiguous(*p) : at::Tensor();
}

// The launch arguments common to every op: the op, the model dtype and the quantize target.
FusedLaunch base_launch(FusedOp op, const FusedProblem& p, bool sf_use_ue8m0, bool is_global_scale_inversed) {
  FusedLaunch a{};
  a.op = op;
  a.input_dtype = int(p.dtype);
  a.out = quantize_target(p.shape, sf_use_ue8m0, p.global_scale, is_global_scale_inversed, p.x_q, p.sf);
  return a;
}

// Launches unless the problem is empty (then only the sf padding needs zeros).
void run(FusedLaunch& a, const FusedProblem& p) {
  if (a.out.m == 0 || a.out.k == 0) {
    p.sf.zero_();
    return;
  }
  check_launch(launch_fused(a, launch_stream()), "fused");
}

void set_rows(const at::Tensor& t, const void** ptr, int64_t* row_stride, std::vector<at::Tensor>& keep) {
  fused::Rows rows = kernel_rows(t);
  *ptr = rows.tensor.data_ptr();
  *row_stride = rows.row_stride;
  keep.push_back(rows.tensor);
}

// A float argument as the ops take it: a float, or a one-element tensor (eps of the *_eps_tensor ops,
// gelu_new's sqrt_2_over_pi), which is read on the host where it is on the CPU and by the kernel where
// it is on x's device.
struct ScalarArg {
  double value = 0.0;
  at::Tensor device;  // float32, on x's device; or undefined

  const float* device_ptr() const { return device.defined() ? device.data_ptr<float>() : nullptr; }
};

ScalarArg scalar_arg_of(const at::Tensor& t, const char* name, const at::Tensor& x) {
  fused::check_scalar_tensor(t, name, x);
  if (t.device().is_cpu()) return {fused::cpu_scalar_value(t), at::Tensor()};
  return {0.0, t.reshape({1}).to(at::kFloat).contiguous()};
}

NormOutputs rms_norm_impl(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                          const std::optional<at::Tensor>& weight, const ScalarArg& eps, double weight_offset,
                          bool weight_in_input_dtype, const std::optional<at::Tensor>& global_scale,
                          int64_t sf_vec_size, bool sf_use_ue8m0, bool is_sf_swizzled_layout, bool is_sf_8x4_layout,
                          bool is_global_scale_inversed, bool sum_in_float32, bool with_normed,
                          bool add_after_norm) {
  FusedProblem p = fused::prepare_fused(x, "x", global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout,
                                        is_sf_8x4_layout);
  if (residual) fused::check_like(*residual, "residual", x, "x");
  fused::check_affine(weight, "weight", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const FusedOp op = !residual        ? FusedOp::kRmsNorm
                     : add_after_norm ? FusedOp::kRmsNormAdd
                     : sum_in_float32 ? FusedOp::kAddRmsNormFloat32Sum
                                      : FusedOp::kAddRmsNorm;
  FusedLaunch a = base_launch(op, p, sf_use_ue8m0, is_global_scale_inversed);
  std::vector<at::Tensor> keep;
  if (a.out.m > 0 && a.out.k > 0) {
    set_rows(x, &a.x, &a.x_row_stride, keep);
    if (residual) set_rows(*residual, &a.y, &a.y_row_stride, keep);
  }
  const at::Tensor sum = residual ? fused::empty_like_rows(x) : at::Tensor();
  const at::Tensor normed = with_normed ? fused::empty_like_rows(x) : at::Tensor();
  a.sum_out = sum.defined() ? sum.data_ptr() : nullptr;
  a.normed_out = normed.defined() ? normed.data_ptr() : nullptr;
  const at::Tensor w = kernel_affine(weight);
  a.weight = w.defined() ? w.data_ptr() : nullptr;
  a.eps = float(eps.value);
  a.eps_device = eps.device_ptr();
  a.weight_offset = float(weight_offset);
  a.rms_weight = int(fused::rms_weight_form(weight, weight_in_input_dtype));
  run(a, p);
  return {p.x_q, p.sf, sum, normed};
}

// A checked modulation tensor (fused::sample_rows_of) as the kernel reads it.
SampleOperand sample_operand(const fused::SampleRows& s, std::vector<at::Tensor>& keep) {
  SampleOperand op{nullptr, 0, s.rows_per_sample};
  set_rows(s.rows, &op.data, &op.row_stride, keep);
  return op;
}

// (x_q, sf, the norm output with `with_normed`, or undefined); with multiplier and shift the modulated norm
// (layer_norm_modulate_quantize)
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_impl(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                               const std::optional<at::Tensor>& bias, double eps,
                                                               const std::optional<at::Tensor>& global_scale,
                                                               int64_t sf_vec_size, bool sf_use_ue8m0,
                                                               bool is_sf_swizzled_layout, bool is_sf_8x4_layout,
                                                               bool is_global_scale_inversed, bool with_normed,
                                                               const std::optional<at::Tensor>& multiplier,
                                                               const std::optional<at::Tensor>& shift) {
  FusedProblem p = fused::prepare_fused(x, "x", global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout,
                                        is_sf_8x4_layout);
  fused::check_affine(weight, "weight", x);
  fused::check_affine(bias, "bias", x);
  std::optional<fused::SampleRows> multiplier_rows, shift_rows;
  if (multiplier) {
    multiplier_rows = fused::sample_rows_of(*multiplier, "multiplier", x);
    shift_rows = fused::sample_rows_of(*shift, "shift", x);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  FusedLaunch a = base_launch(multiplier ? FusedOp::kLayerNormModulate : FusedOp::kLayerNorm, p, sf_use_ue8m0,
                              is_global_scale_inversed);
  std::vector<at::Tensor> keep;
  if (multiplier) {
    a.multiplier = sample_operand(*multiplier_rows, keep);
    a.shift = sample_operand(*shift_rows, keep);
  }
  if (a.out.m > 0 && a.out.k > 0) set_rows(x, &a.x, &a.x_row_stride, keep);
  const at::Tensor w = kernel_affine(weight), b = kernel_affine(bias);
  a.weight = w.defined() ? w.data_ptr() : nullptr;
  a.bias = b.defined() ? b.data_ptr() : nullptr;
  a.eps = float(eps);
  at::Tensor normed = with_normed ? fused::empty_like_rows(x) : at::Tensor();
  a.normed_out = with_normed ? normed.data_ptr() : nullptr;
  run(a, p);
  return {p.x_q, p.sf, normed};
}

// The norm ops' CUDA implementations, for fused::NormOps (csrc/norm_ops.h).
struct CudaNorms {
  static constexpr auto rms_norm = &rms_norm_impl;
  static constexpr auto layer_norm = &layer_norm_impl;
  // eps as the RMSNorm ops take it: a float, or the one-element tensor of the *_eps_tensor ops (read by
  // the kernel where it is on x's device)
  static ScalarArg eps(double eps, const at::Tensor&) { return ScalarArg{eps}; }
  static ScalarArg eps(const at::Tensor& eps, const at::Tensor& x) { return scalar_arg_of(eps, "eps", x); }
};

std::tuple<at::Tensor, at::Tensor> activation_impl(const at::Tensor& x, const at::Tensor* up, Activation act,
                                                   const std::optional<at::Tensor>& global_scale,
                                                   int64_t sf_vec_size, bool sf_use_ue8m0,
                                                   bool is_sf_swizzled_layout, bool is_sf_8x4_layout,
                                                   bool is_global_scale_inversed,
                                                   double coef = fused::kGeluNewSqrt2OverPi,
                                                   const std::optional<at::Tensor>& coef_tensor = std::nullopt) {
  const char* name = up ? "gate" : "x";
  FusedProblem p = fused::prepare_fused(x, name, global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout,
                                        is_sf_8x4_layout);
  if (up) fused::check_like(*up, "up", x, "gate");
  const c10::cuda::CUDAGuard guard(x.device());
  FusedLaunch a = base_launch(up ? FusedOp::kGatedActivation : FusedOp::kActivation, p, sf_use_ue8m0,
                              is_global_scale_inversed);
  std::vector<at::Tensor> keep;
  if (a.out.m > 0 && a.out.k > 0) {
    set_rows(x, &a.x, &a.x_row_stride, keep);
    if (up) set_rows(*up, &a.y, &a.y_row_stride, keep);
  }
  a.activation = int(act);
  // the activation's factor (gelu_new's sqrt(2 / pi), sigmoid_mul's alpha); gelu_new's may be a tensor
  const ScalarArg c = fused::has(coef_tensor) ? scalar_arg_of(*coef_tensor, "sqrt_2_over_pi", x) : ScalarArg{coef};
  a.activation_coef = float(c.value);
  a.activation_coef_device = c.device_ptr();
  run(a, p);
  return {p.x_q, p.sf};
}

Activation gelu_activation(c10::string_view approximate) {
  return fused::gelu_approx_of(std::string_view(approximate.data(), approximate.size())) ==
                 fused::GeluApprox::kNone
             ? Activation::kGeluErf
             : Activation::kGeluTanh;
}

std::tuple<at::Tensor, at::Tensor> silu_and_mul_quantize_cuda(const at::Tensor& gate, const at::Tensor& up,
                                                              const std::optional<at::Tensor>& global_scale,
                                                              int64_t sf_vec_size, bool sf_use_ue8m0,
                                                              bool is_sf_swizzled_layout, bool is_sf_8x4_layout,
                                                              bool is_global_scale_inversed) {
  return activation_impl(gate, &up, Activation::kSilu, global_scale, sf_vec_size, sf_use_ue8m0,
                         is_sf_swizzled_layout, is_sf_8x4_layout, is_global_scale_inversed);
}

std::tuple<at::Tensor, at::Tensor> gelu_and_mul_quantize_cuda(const at::Tensor& gate, const at::Tensor& up,
                                                              c10::string_view approximate,
                                                              const std::optional<at::Tensor>& global_scale,
                                                              int64_t sf_vec_size, bool sf_use_ue8m0,
                                                              bool is_sf_swizzled_layout, bool is_sf_8x4_layout,
                                                              bool is_global_scale_inversed) {
  return activation_impl(gate, &up, gelu_activation(approximate), global_scale, sf_vec_size, sf_use_ue8m0,
                         is_sf_swizzled_layout, is_sf_8x4_layout, is_global_scale_inversed);
}

std::tuple<at::Tensor, at::Tensor> gelu_new_and_mul_quantize_cuda(const at::Tensor& gate, const at::Tensor& up,
                                                                  const std::optional<at::Tensor>& global_scale,
                                                                  int64_t sf_vec_size, bool sf_use_ue8m0,
                                                                  bool is_sf_swizzled_layout, bool is_sf_8x4_layout,
                                                                  bool is_global_scale_inversed,
                                                                  const std::optional<at::Tensor>& sqrt_2_over_pi) {
  return activation_impl(gate, &up, Activation::kGeluNew, global_scale, sf_vec_size, sf_use_ue8m0,
                         is_sf_swizzled_layout, is_sf_8x4_layout, is_global_scale_inversed,
                         fused::kGeluNewSqrt2OverPi, sqrt_2_over_pi);
}

std::tuple<at::Tensor, at::Tensor> relu_and_mul_quantize_cuda(const at::Tensor& gate, const at::Tensor& up,
                                                              bool squared, const std::optional<at::Tensor>& global_scale,
                                                              int64_t sf_vec_size, bool sf_use_ue8m0,
                                                              bool is_sf_swizzled_layout, bool is_sf_8x4_layout,
                                                              bool is_global_scale_inversed) {
  return activation_impl(gate, &up, squared ? Activation::kReluSquared : Activation::kRelu, global_scale,
                         sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout, is_global_scale_inversed);
}

std::tuple<at::Tensor, at::Tensor> silu_quantize_cuda(const at::Tensor& x, const std::optional<at::Tensor>& global_scale,
                                                      int64_t sf_vec_size, bool sf_use_ue8m0,
                                                      bool is_sf_swizzled_layout, bool is_sf_8x4_layout,
                                                      bool is_global_scale_inversed) {
  return activation_impl(x, nullptr, Activation::kSilu, global_scale, sf_vec_size, sf_use_ue8m0,
                         is_sf_swizzled_layout, is_sf_8x4_layout, is_global_scale_inversed);
}

std::tuple<at::Tensor, at::Tensor> gelu_quantize_cuda(const at::Tensor& x, c10::string_view approximate,
                                                      const std::optional<at::Tensor>& global_scale,
                                                      int64_t sf_vec_size, bool sf_use_ue8m0,
                                                      bool is_sf_swizzled_layout, bool is_sf_8x4_layout,
                                                      bool is_global_scale_inversed) {
  return activation_impl(x, nullptr, gelu_activation(approximate), global_scale, sf_vec_size, sf_use_ue8m0,
                         is_sf_swizzled_layout, is_sf_8x4_layout, is_global_scale_inversed);
}

std::tuple<at::Tensor, at::Tensor> gelu_new_quantize_cuda(const at::Tensor& x,
                                                          const std::optional<at::Tensor>& global_scale,
                                                          int64_t sf_vec_size, bool sf_use_ue8m0,
                                                          bool is_sf_swizzled_layout, bool is_sf_8x4_layout,
                                                          bool is_global_scale_inversed,
                                                          const std::optional<at::Tensor>& sqrt_2_over_pi) {
  return activation_impl(x, nullptr, Activation::kGeluNew, global_scale, sf_vec_size, sf_use_ue8m0,
                         is_sf_swizzled_layout, is_sf_8x4_layout, is_global_scale_inversed,
                         fused::kGeluNewSqrt2OverPi, sqrt_2_over_pi);
}

std::tuple<at::Tensor, at::Tensor> sigmoid_mul_quantize_cuda(const at::Tensor& x, double alpha,
                                                             const std::optional<at::Tensor>& global_scale,
                                                             int64_t sf_vec_size, bool sf_use_ue8m0,
                                                             bool is_sf_swizzled_layout, bool is_sf_8x4_layout,
                                                             bool is_global_scale_inversed) {
  return activation_impl(x, nullptr, Activation::kSigmoidMul, global_scale, sf_vec_size, sf_use_ue8m0,
                         is_sf_swizzled_layout, is_sf_8x4_layout, is_global_scale_inversed, alpha);
}

std::tuple<at::Tensor, at::Tensor> relu_quantize_cuda(const at::Tensor& x, bool squared,
                                                      const std::optional<at::Tensor>& global_scale,
                                                      int64_t sf_vec_size, bool sf_use_ue8m0,
                                                      bool is_sf_swizzled_layout, bool is_sf_8x4_layout,
                                                      bool is_global_scale_inversed) {
  return activation_impl(x, nullptr, squared ? Activation::kReluSquared : Activation::kRelu, global_scale,
                         sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout, is_global_scale_inversed);
}

}  // namespace

TORCH_LIBRARY_IMPL(fp4op, CUDA, m) {
  fused::NormOps<CudaNorms>::register_kernels(m);
  m.impl("silu_and_mul_quantize", &silu_and_mul_quantize_cuda);
  m.impl("gelu_and_mul_quantize", &gelu_and_mul_quantize_cuda);
  m.impl("gelu_new_and_mul_quantize", &gelu_new_and_mul_quantize_cuda);
  m.impl("relu_and_mul_quantize", &relu_and_mul_quantize_cuda);
  m.impl("silu_quantize", &silu_quantize_cuda);
  m.impl("gelu_quantize", &gelu_quantize_cuda);
  m.impl("gelu_new_quantize", &gelu_new_quantize_cuda);
  m.impl("sigmoid_mul_quantize", &sigmoid_mul_quantize_cuda);
  m.impl("relu_quantize", &relu_quantize_cuda);
}

}  // namespace fp4op::cuda
