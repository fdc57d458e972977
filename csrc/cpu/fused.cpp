// CPU kernels of the fused "norm/activation + FP4 quantize" ops: rows in parallel (at::parallel_for);
// each row is widened to float32, normalized with the shared element math (fused_math.h, rounded to
// the model dtype as eager PyTorch rounds; the activations come from torch's own kernels, see
// eager_activation) and quantized with quantize_row, the same code as fp4op::quantize.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../fused_args.h"
#include "../norm_ops.h"
#include "quantize_row.h"

namespace fp4op::cpu {
namespace {

using fused::Activation;
using fused::FusedProblem;
using fused::NormOutputs;
using fused::RmsWeight;
using fused::Rows;

// At least this many elements per parallel task, so that small inputs stay on one thread.
constexpr int64_t kElementsPerTask = 1 << 15;

// Calls f(std::integral_constant<InputDtype, D>{}) with the model dtype D as a compile-time constant:
// element loops written in it have no dtype branches, and GCC vectorizes them.
template <typename F>
void with_model_dtype(InputDtype dtype, F&& f) {
  if (dtype == InputDtype::kBFloat16) {
    f(std::integral_constant<InputDtype, InputDtype::kBFloat16>{});
  } else {
    f(std::integral_constant<InputDtype, InputDtype::kFloat16>{});
  }
}

float widen(uint16_t bits, InputDtype dtype) {
  return dtype == InputDtype::kBFloat16 ? bf16_bits_to_float(bits) : fp16_bits_to_float(bits);
}

// The bits of a float that already holds a value of the model dtype.
uint16_t narrow_exact(float v, InputDtype dtype) {
  return dtype == InputDtype::kBFloat16 ? uint16_t(float_to_bits(v) >> 16) : fused::float_to_fp16_bits(v);
}

const uint16_t* row_ptr(const Rows& rows, int64_t r) {
  return static_cast<const uint16_t*>(rows.tensor.data_ptr()) + r * rows.row_stride;
}

// float32 sum with 8 interleaved accumulators (close to torch's vectorized reductions in accuracy).
template <typename Term>
float lane_sum(int64_t k, Term term) {
  constexpr int kLanes = 8;
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= k; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] = add_rn(acc[l], term(i + l));
  }
  for (; i < k; ++i) acc[0] = add_rn(acc[0], term(i));
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) acc[l] = add_rn(acc[l], acc[l + width]);
  }
  return acc[0];
}

QuantizeParams quantize_params(const FusedProblem& p, bool sf_use_ue8m0, bool is_global_scale_inversed) {
  return QuantizeParams{p.shape.k,
                        sf_use_ue8m0,
                        p.shape.layout,
                        p.global_scale.defined() ? p.global_scale.data_ptr<float>() : nullptr,
                        p.global_scale.defined() && p.global_scale.numel() > 1,
                        is_global_scale_inversed};
}

// Runs `row_values(r, values)` for every row (it fills `values` with the K rounded outputs of row r)
// and quantizes them. Zeroes the sf padding first.
template <typename RowValues>
void quantize_rows(FusedProblem& p, const QuantizeParams& qp, RowValues row_values) {
  if (p.shape.layout != SfLayout::kLinear) p.sf.zero_();
  const int64_t m = p.shape.m, k = p.shape.k;
  if (m == 0 || k == 0) return;
  uint8_t* xq = p.x_q.data_ptr<uint8_t>();
  uint8_t* sf = p.sf.data_ptr<uint8_t>();
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / k);
  at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
    IeeeDenormalsScope ieee;
    std::vector<float> values(k);
    BlockScaleCache cache;
    for (int64_t r = begin; r < end; ++r) {
      row_values(r, values.data());
      quantize_row(values.data(), r, qp, xq + r * (k / 2), sf, cache);
    }
  });
}

// Writes the K rounded values `v` of row r to `normed` ([M, K] contiguous, x's dtype) when given.
void store_normed_row(uint16_t* normed, int64_t r, int64_t k, const float* v, InputDtype dtype) {
  if (normed == nullptr) return;
  with_model_dtype(dtype, [&](auto model_dtype) {
    constexpr InputDtype D = decltype(model_dtype)::value;
    uint16_t* row = normed + r * k;
    for (int64_t i = 0; i < k; ++i) row[i] = narrow_exact(v[i], D);  // vectorized
  });
}

// The data of an optional [M, K] output (the next residual, the norm output), or nullptr.
uint16_t* bits_of(at::Tensor* out) { return out ? static_cast<uint16_t*>(out->data_ptr()) : nullptr; }

// RMSNorm of the rows of x (+ residual, whose sum is written to `sum_out` when given; sum_in_float32:
// the float32 sum is normalized, not its rounding), quantized; the rounded norm output also written to
// `normed_out` when given. add_after_norm: the residual is added to the norm output instead (rounded),
// and that sum is written to `sum_out` and quantized.
void rms_norm_rows(FusedProblem& p, const QuantizeParams& qp, const at::Tensor& x,
                   const std::optional<at::Tensor>& residual, at::Tensor* sum_out, at::Tensor* normed_out,
                   const std::optional<at::Tensor>& weight, double eps, double weight_offset,
                   bool weight_in_input_dtype, bool sum_in_float32, bool add_after_norm) {
  const Rows xr = fused::rows_of(x);
  const Rows rr = residual ? fused::rows_of(*residual) : Rows{};
  const at::Tensor w = fused::has(weight) ? weight->contiguous() : at::Tensor();
  const uint16_t* w_bits = w.defined() ? static_cast<const uint16_t*>(w.data_ptr()) : nullptr;
  uint16_t* sum_bits = bits_of(sum_out);
  uint16_t* normed_bits = bits_of(normed_out);
  const RmsWeight form = fused::rms_weight_form(weight, weight_in_input_dtype);
  const InputDtype dtype = p.dtype;
  const int64_t k = p.shape.k;
  const float eps_f = float(eps), offset = float(weight_offset);
  quantize_rows(p, qp, [&](int64_t r, float* v) {
    widen_row(row_ptr(xr, r), dtype, k, v);
    with_model_dtype(dtype, [&](auto model_dtype) {
      constexpr InputDtype D = decltype(model_dtype)::value;
      if (residual && !add_after_norm) {
        // x + residual rounded to the model dtype: the next residual stream, and what is normalized
        // (sum_in_float32: the float32 sum is)
        const uint16_t* res = row_ptr(rr, r);
        uint16_t* sum_row = sum_bits + r * k;
        for (int64_t i = 0; i < k; ++i) {  // vectorized
          const float sum = add_rn(v[i], widen(res[i], D));
          const float rounded = fused::round_to(sum, D);
          sum_row[i] = narrow_exact(rounded, D);
          v[i] = sum_in_float32 ? sum : rounded;
        }
      }
      const float mean_sq = div_rn(lane_sum(k, [&](int64_t i) { return mul_rn(v[i], v[i]); }), float(k));
      const float rs = fused::torch_rsqrt(add_rn(mean_sq, eps_f));
      // one loop a weight form, the form a compile-time constant (a branch-free body)
      auto normalize = [&](auto weight_form) {
        constexpr RmsWeight F = decltype(weight_form)::value;
        for (int64_t i = 0; i < k; ++i) {  // vectorized
          const float wi = F == RmsWeight::kNone ? 0.0f : widen(w_bits[i], D);
          v[i] = fused::rms_norm_element(v[i], rs, wi, offset, F, D);
        }
      };
      switch (form) {
        case RmsWeight::kNone: normalize(std::integral_constant<RmsWeight, RmsWeight::kNone>{}); break;
        case RmsWeight::kFloat32: normalize(std::integral_constant<RmsWeight, RmsWeight::kFloat32>{}); break;
        case RmsWeight::kInputDtype: normalize(std::integral_constant<RmsWeight, RmsWeight::kInputDtype>{}); break;
      }
      if (residual && add_after_norm) {
        // residual + the rounded norm output, rounded (a post-norm residual stream): stored and quantized
        const uint16_t* res = row_ptr(rr, r);
        uint16_t* sum_row = sum_bits + r * k;
        for (int64_t i = 0; i < k; ++i) {  // vectorized
          v[i] = fused::round_to(add_rn(widen(res[i], D), v[i]), D);
          sum_row[i] = narrow_exact(v[i], D);
        }
      }
    });
    store_normed_row(normed_bits, r, k, v, dtype);
  });
}

NormOutputs rms_norm_impl(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                          const std::optional<at::Tensor>& weight, double eps, double weight_offset,
                          bool weight_in_input_dtype, const std::optional<at::Tensor>& global_scale,
                          int64_t sf_vec_size, bool sf_use_ue8m0, bool is_sf_swizzled_layout, bool is_sf_8x4_layout,
                          bool is_global_scale_inversed, bool sum_in_float32, bool with_normed,
                          bool add_after_norm) {
  FusedProblem p = fused::prepare_fused(x, "x", global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout,
                                        is_sf_8x4_layout);
  if (residual) fused::check_like(*residual, "residual", x, "x");
  fused::check_affine(weight, "weight", x);
  at::Tensor sum = residual ? fused::empty_like_rows(x) : at::Tensor();
  at::Tensor normed = with_normed ? fused::empty_like_rows(x) : at::Tensor();
  const QuantizeParams qp = quantize_params(p, sf_use_ue8m0, is_global_scale_inversed);
  rms_norm_rows(p, qp, x, residual, residual ? &sum : nullptr, with_normed ? &normed : nullptr, weight, eps,
                weight_offset, weight_in_input_dtype, sum_in_float32, add_after_norm);
  return {p.x_q, p.sf, sum, normed};
}

// Whether torch's CPU kernels, as dispatched here, are its vectorized builds (AVX2/AVX512 on x86:
// FMA-contracted multiply-adds, fused::layer_norm_element_cpu) rather than x86's DEFAULT build, which
// ATEN_CPU_CAPABILITY=default or a CPU without AVX2 selects.
bool torch_cpu_kernels_vectorized() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool vectorized = at::get_cpu_capability() != "DEFAULT";
  return vectorized;
#else
  return true;
#endif
}

// The rows of layer_norm_modulate_quantize's multiplier and shift (fused::sample_rows_of).
struct ModulationRows {
  Rows multiplier, shift;
  int64_t multiplier_rows_per_sample = 1, shift_rows_per_sample = 1;

  ModulationRows(const at::Tensor& multiplier_t, const at::Tensor& shift_t, const at::Tensor& x) {
    const fused::SampleRows m = fused::sample_rows_of(multiplier_t, "multiplier", x);
    const fused::SampleRows s = fused::sample_rows_of(shift_t, "shift", x);
    multiplier = fused::rows_of(m.rows);
    shift = fused::rows_of(s.rows);
    multiplier_rows_per_sample = m.rows_per_sample;
    shift_rows_per_sample = s.rows_per_sample;
  }

  // v = round(round(v * multiplier) + shift) over row r's K values, each op rounded to D as eager rounds it
  template <InputDtype D>
  void apply(int64_t r, int64_t k, float* v) const {
    const uint16_t* mul = row_ptr(multiplier, r / multiplier_rows_per_sample);
    const uint16_t* add = row_ptr(shift, r / shift_rows_per_sample);
    for (int64_t i = 0; i < k; ++i) {  // vectorized
      const float scaled = fused::round_to(mul_rn(v[i], widen(mul[i], D)), D);
      v[i] = fused::round_to(add_rn(scaled, widen(add[i], D)), D);
    }
  }
};

// layer_norm_quantize, and with `with_normed` its norm output as well (undefined otherwise); with
// `multiplier` and `shift`, layer_norm_modulate_quantize.
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
  const std::optional<ModulationRows> modulation =
      multiplier ? std::optional<ModulationRows>(std::in_place, *multiplier, *shift, x) : std::nullopt;
  const Rows xr = fused::rows_of(x);
  const at::Tensor w = fused::has(weight) ? weight->contiguous() : at::Tensor();
  const at::Tensor b = fused::has(bias) ? bias->contiguous() : at::Tensor();
  const uint16_t* w_bits = w.defined() ? static_cast<const uint16_t*>(w.data_ptr()) : nullptr;
  const uint16_t* b_bits = b.defined() ? static_cast<const uint16_t*>(b.data_ptr()) : nullptr;
  const InputDtype dtype = p.dtype;
  const int64_t k = p.shape.k;
  const float eps_f = float(eps), kf = float(k);
  const bool contracted = torch_cpu_kernels_vectorized();
  at::Tensor normed = with_normed ? fused::empty_like_rows(x) : at::Tensor();
  uint16_t* normed_bits = bits_of(with_normed ? &normed : nullptr);
  const QuantizeParams qp = quantize_params(p, sf_use_ue8m0, is_global_scale_inversed);
  quantize_rows(p, qp, [&](int64_t r, float* v) {
    widen_row(row_ptr(xr, r), dtype, k, v);
    // biased variance, two passes (torch uses Welford; both are exact up to reduction order)
    const float mean = div_rn(lane_sum(k, [&](int64_t i) { return v[i]; }), kf);
    const float var = div_rn(lane_sum(k, [&](int64_t i) {
                               const float d = add_rn(v[i], -mean);
                               return mul_rn(d, d);
                             }),
                             kf);
    // std::max keeps a NaN variance (a row with inf/NaN), as torch's layer norm does; fmaxf would drop it
    const float rstd = fused::torch_rsqrt(add_rn(std::max(var, 0.0f), eps_f));
    for (int64_t i = 0; i < k; ++i) {
      const float wi = w_bits ? widen(w_bits[i], dtype) : 1.0f;
      const float bi = b_bits ? widen(b_bits[i], dtype) : 0.0f;
      v[i] = fused::layer_norm_element_cpu(v[i], mean, rstd, wi, bi, contracted, dtype);
    }
    if (modulation) {
      with_model_dtype(dtype, [&](auto model_dtype) { modulation->apply<decltype(model_dtype)::value>(r, k, v); });
    }
    store_normed_row(normed_bits, r, k, v, dtype);
  });
  return {p.x_q, p.sf, normed};
}

// The norm ops' CPU implementations, for fused::NormOps (csrc/norm_ops.h).
struct CpuNorms {
  static constexpr auto rms_norm = &rms_norm_impl;
  static constexpr auto layer_norm = &layer_norm_impl;
  // eps as the RMSNorm ops take it: a float, or the one-element tensor of the *_eps_tensor ops, read on
  // the host
  static double eps(double eps, const at::Tensor&) { return eps; }
  static double eps(const at::Tensor& eps, const at::Tensor& x) {
    fused::check_eps_tensor(eps, x);
    return fused::cpu_scalar_value(eps);
  }
};

// F.silu(x) / F.gelu(x) computed by torch's own CPU kernel, on the tensor (the same view) the model
// passes: the same bits as the eager model on every CPU build, which no copy of the formulas can
// promise (AVX2 and AVX512 builds vectorize erf, tanh and exp with different polynomials, their scalar
// tails use the C library, and the DEFAULT build rounds every step). The quantize then reads the
// activation back from memory: on CPU the fusion saves the graph's other kernels, not this pass.
at::Tensor eager_activation(const at::Tensor& x, Activation act, double coef) {
  at::NoGradGuard no_grad;  // a temporary: no autograd graph for it
  switch (act) {
    case Activation::kSilu: return at::silu(x);
    case Activation::kGeluErf: return at::gelu(x, "none");
    case Activation::kGeluTanh: return at::gelu(x, "tanh");
    case Activation::kGeluNew: {
      // the ops of `0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))`
      const at::Tensor inner = at::add(x, at::mul(at::pow(x, 3.0), fused::kGeluNewKappa));
      return at::mul(at::mul(x, 0.5), at::add(at::tanh(at::mul(inner, coef)), 1.0));
    }
    case Activation::kRelu: return at::relu(x);
    case Activation::kReluSquared: return at::pow(at::relu(x), 2);
    // `x * torch.sigmoid(alpha * x)`; alpha = 1 (SiLU written out) has no `1.0 * x` op, an exact product
    case Activation::kSigmoidMul: return at::mul(x, at::sigmoid(at::mul(x, coef)));
  }
  TORCH_CHECK(false, "unknown activation");
}

// gelu_new's sqrt(2 / pi): the tensor the op was given (checked, on the CPU here), or the constant
double gelu_new_coef_of(const std::optional<at::Tensor>& sqrt_2_over_pi, const at::Tensor& x) {
  if (!fused::has(sqrt_2_over_pi)) return fused::kGeluNewSqrt2OverPi;
  fused::check_scalar_tensor(*sqrt_2_over_pi, "sqrt_2_over_pi", x);
  return fused::cpu_scalar_value(*sqrt_2_over_pi);
}

std::tuple<at::Tensor, at::Tensor> activation_quantize(const at::Tensor& x, Activation act,
                                                       const std::optional<at::Tensor>& global_scale,
                                                       int64_t sf_vec_size, bool sf_use_ue8m0,
                                                       bool is_sf_swizzled_layout, bool is_sf_8x4_layout,
                                                       bool is_global_scale_inversed,
                                                       double coef = fused::kGeluNewSqrt2OverPi) {
  FusedProblem p = fused::prepare_fused(x, "x", global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout,
                                        is_sf_8x4_layout);
  const Rows yr = fused::rows_of(eager_activation(x, act, coef));
  const InputDtype dtype = p.dtype;
  const int64_t k = p.shape.k;
  const QuantizeParams qp = quantize_params(p, sf_use_ue8m0, is_global_scale_inversed);
  quantize_rows(p, qp, [&](int64_t r, float* v) { widen_row(row_ptr(yr, r), dtype, k, v); });
  return {p.x_q, p.sf};
}

// act(gate) * up as the eager model computes it: act by torch's kernel (eager_activation), the
// product in float32 rounded to the model dtype (exact in either order, as torch's mul is).
std::tuple<at::Tensor, at::Tensor> gated_quantize(const at::Tensor& gate, const at::Tensor& up, Activation act,
                                                  const std::optional<at::Tensor>& global_scale, int64_t sf_vec_size,
                                                  bool sf_use_ue8m0, bool is_sf_swizzled_layout,
                                                  bool is_sf_8x4_layout, bool is_global_scale_inversed,
                                                  double coef = fused::kGeluNewSqrt2OverPi) {
  FusedProblem p = fused::prepare_fused(gate, "gate", global_scale, sf_vec_size, sf_use_ue8m0,
                                        is_sf_swizzled_layout, is_sf_8x4_layout);
  fused::check_like(up, "up", gate, "gate");
  const Rows ar = fused::rows_of(eager_activation(gate, act, coef));
  const Rows ur = fused::rows_of(up);
  const InputDtype dtype = p.dtype;
  const int64_t k = p.shape.k;
  const QuantizeParams qp = quantize_params(p, sf_use_ue8m0, is_global_scale_inversed);
  quantize_rows(p, qp, [&](int64_t r, float* v) {
    const uint16_t* a = row_ptr(ar, r);
    const uint16_t* u = row_ptr(ur, r);
    with_model_dtype(dtype, [&](auto model_dtype) {
      constexpr InputDtype D = decltype(model_dtype)::value;
      for (int64_t i = 0; i < k; ++i) {  // vectorized
        v[i] = fused::round_to(mul_rn(widen(a[i], D), widen(u[i], D)), D);
      }
    });
  });
  return {p.x_q, p.sf};
}

std::tuple<at::Tensor, at::Tensor> silu_and_mul_quantize_cpu(const at::Tensor& gate, const at::Tensor& up,
                                                             const std::optional<at::Tensor>& global_scale,
                                                             int64_t sf_vec_size, bool sf_use_ue8m0,
                                                             bool is_sf_swizzled_layout, bool is_sf_8x4_layout,
                                                             bool is_global_scale_inversed) {
  return gated_quantize(gate, up, Activation::kSilu, global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout,
                        is_sf_8x4_layout, is_global_scale_inversed);
}

Activation gelu_activation(c10::string_view approximate) {
  return fused::gelu_approx_of(std::string_view(approximate.data(), approximate.size())) ==
                 fused::GeluApprox::kNone
             ? Activation::kGeluErf
             : Activation::kGeluTanh;
}

std::tuple<at::Tensor, at::Tensor> gelu_and_mul_quantize_cpu(const at::Tensor& gate, const at::Tensor& up,
                                                             c10::string_view approximate,
                                                             const std::optional<at::Tensor>& global_scale,
                                                             int64_t sf_vec_size, bool sf_use_ue8m0,
                                                             bool is_sf_swizzled_layout, bool is_sf_8x4_layout,
                                                             bool is_global_scale_inversed) {
  return gated_quantize(gate, up, gelu_activation(approximate), global_scale, sf_vec_size, sf_use_ue8m0,
                        is_sf_swizzled_layout, is_sf_8x4_layout, is_global_scale_inversed);
}

std::tuple<at::Tensor, at::Tensor> gelu_new_and_mul_quantize_cpu(const at::Tensor& gate, const at::Tensor& up,
                                                                 const std::optional<at::Tensor>& global_scale,
                                                                 int64_t sf_vec_size, bool sf_use_ue8m0,
                                                                 bool is_sf_swizzled_layout, bool is_sf_8x4_layout,
                                                                 bool is_global_scale_inversed,
                                                                 const std::optional<at::Tensor>& sqrt_2_over_pi) {
  return gated_quantize(gate, up, Activation::kGeluNew, global_scale, sf_vec_size, sf_use_ue8m0,
                        is_sf_swizzled_layout, is_sf_8x4_layout, is_global_scale_inversed,
                        gelu_new_coef_of(sqrt_2_over_pi, gate));
}

std::tuple<at::Tensor, at::Tensor> relu_and_mul_quantize_cpu(const at::Tensor& gate, const at::Tensor& up, bool squared,
                                                             const std::optional<at::Tensor>& global_scale,
                                                             int64_t sf_vec_size, bool sf_use_ue8m0,
                                                             bool is_sf_swizzled_layout, bool is_sf_8x4_layout,
                                                             bool is_global_scale_inversed) {
  return gated_quantize(gate, up, squared ? Activation::kReluSquared : Activation::kRelu, global_scale, sf_vec_size,
                        sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout, is_global_scale_inversed);
}

std::tuple<at::Tensor, at::Tensor> silu_quantize_cpu(const at::Tensor& x, const std::optional<at::Tensor>& global_scale,
                                                     int64_t sf_vec_size, bool sf_use_ue8m0, bool is_sf_swizzled_layout,
                                                     bool is_sf_8x4_layout, bool is_global_scale_inversed) {
  return activation_quantize(x, Activation::kSilu, global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout,
                             is_sf_8x4_layout, is_global_scale_inversed);
}

std::tuple<at::Tensor, at::Tensor> gelu_quantize_cpu(const at::Tensor& x, c10::string_view approximate,
                                                     const std::optional<at::Tensor>& global_scale,
                                                     int64_t sf_vec_size, bool sf_use_ue8m0, bool is_sf_swizzled_layout,
                                                     bool is_sf_8x4_layout, bool is_global_scale_inversed) {
  return activation_quantize(x, gelu_activation(approximate), global_scale, sf_vec_size, sf_use_ue8m0,
                             is_sf_swizzled_layout, is_sf_8x4_layout, is_global_scale_inversed);
}

std::tuple<at::Tensor, at::Tensor> gelu_new_quantize_cpu(const at::Tensor& x, const std::optional<at::Tensor>& global_scale,
                                                         int64_t sf_vec_size, bool sf_use_ue8m0,
                                                         bool is_sf_swizzled_layout, bool is_sf_8x4_layout,
                                                         bool is_global_scale_inversed,
                                                         const std::optional<at::Tensor>& sqrt_2_over_pi) {
  return activation_quantize(x, Activation::kGeluNew, global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout,
                             is_sf_8x4_layout, is_global_scale_inversed, gelu_new_coef_of(sqrt_2_over_pi, x));
}

std::tuple<at::Tensor, at::Tensor> sigmoid_mul_quantize_cpu(const at::Tensor& x, double alpha,
                                                            const std::optional<at::Tensor>& global_scale,
                                                            int64_t sf_vec_size, bool sf_use_ue8m0,
                                                            bool is_sf_swizzled_layout, bool is_sf_8x4_layout,
                                                            bool is_global_scale_inversed) {
  return activation_quantize(x, Activation::kSigmoidMul, global_scale, sf_vec_size, sf_use_ue8m0,
                             is_sf_swizzled_layout, is_sf_8x4_layout, is_global_scale_inversed, alpha);
}

std::tuple<at::Tensor, at::Tensor> relu_quantize_cpu(const at::Tensor& x, bool squared,
                                                     const std::optional<at::Tensor>& global_scale,
                                                     int64_t sf_vec_size, bool sf_use_ue8m0, bool is_sf_swizzled_layout,
                                                     bool is_sf_8x4_layout, bool is_global_scale_inversed) {
  return activation_quantize(x, squared ? Activation::kReluSquared : Activation::kRelu, global_scale, sf_vec_size,
                             sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout, is_global_scale_inversed);
}

}  // namespace

TORCH_LIBRARY_IMPL(fp4op, CPU, m) {
  fused::NormOps<CpuNorms>::register_kernels(m);
  m.impl("silu_and_mul_quantize", &silu_and_mul_quantize_cpu);
  m.impl("gelu_and_mul_quantize", &gelu_and_mul_quantize_cpu);
  m.impl("gelu_new_and_mul_quantize", &gelu_new_and_mul_quantize_cpu);
  m.impl("relu_and_mul_quantize", &relu_and_mul_quantize_cpu);
  m.impl("silu_quantize", &silu_quantize_cpu);
  m.impl("gelu_quantize", &gelu_quantize_cpu);
  m.impl("gelu_new_quantize", &gelu_new_quantize_cpu);
  m.impl("sigmoid_mul_quantize", &sigmoid_mul_quantize_cpu);
  m.impl("relu_quantize", &relu_quantize_cpu);
}

}  // namespace fp4op::cpu
