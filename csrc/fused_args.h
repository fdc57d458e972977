// Argument checking and output allocation of the fused "norm/activation + FP4 quantize" ops, shared by
// their CPU and CUDA bindings. Errors: TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK_NOT_IMPLEMENTED ->
// NotImplementedError, as for fp4op::quantize.
#pragma once

#include <algorithm>
#include <optional>
#include <string_view>

#include "fused_math.h"
#include "op_args.h"

namespace fp4op::fused {

// The fused ops compute the norm/activation in the model dtype, which is float16 or bfloat16.
inline InputDtype model_dtype_of(const at::Tensor& t, const char* name) {
  check_defined(t, name);
  if (t.scalar_type() == at::kHalf) return InputDtype::kFloat16;
  if (t.scalar_type() == at::kBFloat16) return InputDtype::kBFloat16;
  TORCH_CHECK_NOT_IMPLEMENTED(false, "fp4op: ", name,
                              " of a fused norm/activation + quantize op must be float16 or bfloat16 (the "
                              "model dtype the norm/activation is computed in), got ",
                              t.scalar_type(), "; quantize other dtypes with fp4op.quantize");
  return InputDtype::kFloat16;
}

// A second tensor input (residual, up) must match the first one exactly in dtype, shape and device.
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& x, const char* x_name) {
  check_defined(t, name);
  TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type(), "fp4op: ", name, " must have the dtype of ", x_name,
                    " (", x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), "fp4op: ", name, " must have the shape of ", x_name, " ",
                    shape(x.sizes()), ", got ", shape(t.sizes()));
  TORCH_CHECK_VALUE(t.device() == x.device(), "fp4op: ", name, " is on ", t.device(), " but ", x_name,
                    " is on ", x.device());
  check_allocated(t, name);
}

// A norm's weight/bias: shape [K], the dtype and device of x.
inline void check_affine(const std::optional<at::Tensor>& p, const char* name, const at::Tensor& x) {
  if (!p.has_value() || !p->defined()) return;
  TORCH_CHECK_VALUE(x.dim() >= 1 && p->dim() == 1 && p->size(0) == x.size(-1), "fp4op: ", name,
                    " must have shape [K] = [", num(x.dim() >= 1 ? x.size(-1) : 0), "], got ", shape(p->sizes()));
  TORCH_CHECK_VALUE(p->scalar_type() == x.scalar_type(), "fp4op: ", name, " must have the dtype of x (",
                    x.scalar_type(), "), got ", p->scalar_type());
  TORCH_CHECK_VALUE(p->device() == x.device(), "fp4op: ", name, " is on ", p->device(), " but x is on ",
                    x.device());
  check_allocated(*p, name);
}

// A float argument given as a tensor (Dynamo passes Python floats as 0-d tensors under dynamic=True):
// the eps of the *_eps_tensor RMSNorm ops, gelu_new's sqrt_2_over_pi. One floating-point element, on
// the CPU or on x's device; its value is its float32 rounding, as float32 opmath takes it.
inline void check_scalar_tensor(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.numel() == 1, "fp4op: ", name, " must have one element, got shape ", shape(t.sizes()));
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), "fp4op: ", name, " must be a floating-point tensor, got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu() || t.device() == x.device(), "fp4op: ", name, " is on ", t.device(),
                    " but x is on ", x.device(), " (", name, " must be on the CPU or on x's device)");
}

inline void check_eps_tensor(const at::Tensor& eps, const at::Tensor& x) { check_scalar_tensor(eps, "eps", x); }

// The value of a checked scalar tensor on the CPU (its float32 rounding is taken where it is used).
inline double cpu_scalar_value(const at::Tensor& t) { return t.item<double>(); }

inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The RMSNorm weight form of the ops' (weight, weight_in_input_dtype) arguments.
inline RmsWeight rms_weight_form(const std::optional<at::Tensor>& weight, bool weight_in_input_dtype) {
  if (!has(weight)) return RmsWeight::kNone;
  return weight_in_input_dtype ? RmsWeight::kInputDtype : RmsWeight::kFloat32;
}

// An output shaped like x, contiguous (add_rms_norm's next residual, the *_with_normed norm output).
inline at::Tensor empty_like_rows(const at::Tensor& x) {
  return at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
}

inline GeluApprox gelu_approx_of(std::string_view approximate) {
  if (approximate == "none") return GeluApprox::kNone;
  if (approximate == "tanh") return GeluApprox::kTanh;
  TORCH_CHECK_VALUE(false, "fp4op: approximate must be 'none' or 'tanh', got '", approximate, "'");
  return GeluApprox::kNone;
}

// The rows of a [..., K] tensor as the kernels read them: row r starts at data + r * row_stride
// elements, elements of a row are contiguous. Views whose leading dimensions flatten to one stride
// (e.g. t[..., :H] and t[..., H:] of a [M, 2H] tensor) are read in place; others are copied.
struct Rows {
  at::Tensor tensor;   // holds the storage
  int64_t row_stride;  // in elements
};

inline Rows rows_of(const at::Tensor& t) {
  if (t.dim() >= 1 && (t.size(-1) <= 1 || t.stride(-1) == 1)) {
    int64_t row_stride = t.size(-1);
    int64_t next = -1;  // the stride that the next outer (non-size-1) dimension must have
    bool flat = true;
    for (int64_t d = t.dim() - 2; d >= 0 && flat; --d) {
      if (t.size(d) == 1) continue;
      if (next < 0) {
        row_stride = t.stride(d);
      } else {
        flat = t.stride(d) == next;
      }
      next = t.stride(d) * t.size(d);
    }
    if (flat) return {t, row_stride};
  }
  at::Tensor c = t.contiguous();
  return {c, c.size(-1)};
}

// A per-sample modulation tensor of layer_norm_modulate_quantize (multiplier, shift) as the kernels read
// it: `rows` [S, K] (row s for x's rows s * rows_per_sample .. (s + 1) * rows_per_sample - 1).
struct SampleRows {
  at::Tensor rows;
  int64_t rows_per_sample;
};

// Checks a modulation tensor `t` of x [..., K]: x's dtype and device, and a shape that broadcasts to x's
// per sample, [*x.shape[:j], 1, ..., 1, K] for some j once padded with leading ones (DiT's
// `scale[:, None]` of x [B, T, K] is [B, 1, K]: j = 1; one vector for every row: j = 0; one a row:
// j = x.dim() - 1). S = prod(x.shape[:j]).
inline SampleRows sample_rows_of(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_defined(t, name);
  TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type(), "fp4op: ", name, " must have the dtype of x (",
                    x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), "fp4op: ", name, " is on ", t.device(), " but x is on ", x.device());
  const int64_t n = x.dim();
  bool per_sample = n >= 1 && t.dim() >= 1 && t.dim() <= n && t.size(-1) == x.size(-1);
  int64_t samples = 1;
  if (per_sample) {
    // t's size at x's dim d (1 where padded); j: one past the last of x's row dims where it is not 1
    auto size_at = [&](int64_t d) { return d < n - t.dim() ? int64_t(1) : t.size(d - (n - t.dim())); };
    int64_t j = 0;
    for (int64_t d = 0; d < n - 1; ++d) {
      if (size_at(d) != 1) j = d + 1;
    }
    for (int64_t d = 0; d < j; ++d) {
      per_sample = per_sample && size_at(d) == x.size(d);
      samples *= x.size(d);
    }
  }
  TORCH_CHECK_VALUE(per_sample, "fp4op: ", name, " must broadcast to x ", shape(x.sizes()),
                    " per sample: shape [*x.shape[:j], 1, ..., 1, K] for some j (e.g. [B, 1, K] for x [B, T, K]), got ",
                    shape(t.sizes()));
  check_allocated(t, name);
  int64_t m = 1;
  for (int64_t d = 0; d < n - 1; ++d) m *= x.size(d);
  return {t.reshape({samples, x.size(-1)}), samples > 0 ? std::max<int64_t>(m / samples, 1) : 1};
}

// The quantize half of a fused op: recipe, shape (of `x`, named `name`), global scale and the
// (x_q, sf) outputs, exactly as fp4op::quantize of a tensor shaped like x.
struct FusedProblem {
  InputDtype dtype;
  QuantizeShape shape;
  at::Tensor global_scale;  // float32, 1 or M elements; undefined for MXFP4
  at::Tensor x_q;
  at::Tensor sf;
};

inline FusedProblem prepare_fused(const at::Tensor& x, const char* name,
                                  const std::optional<at::Tensor>& global_scale, int64_t sf_vec_size,
                                  bool sf_use_ue8m0, bool is_sf_swizzled_layout, bool is_sf_8x4_layout) {
  check_recipe(sf_vec_size, sf_use_ue8m0);
  const InputDtype dtype = model_dtype_of(x, name);
  const QuantizeShape s = check_quantize_shape(x, sf_vec_size, is_sf_swizzled_layout, is_sf_8x4_layout, name);
  at::Tensor gs = checked_global_scale(global_scale, sf_use_ue8m0, s.m, x.device());
  auto [xq, sf] = empty_quantize_outputs(x, s);
  return FusedProblem{dtype, s, gs, xq, sf};
}

}  // namespace fp4op::fused
