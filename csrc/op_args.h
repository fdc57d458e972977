// Argument checking and output allocation shared by the CPU and CUDA bindings of the ops.
// Errors use the Python exception classes of SPEC.md: TORCH_CHECK_VALUE -> ValueError,
// TORCH_CHECK_NOT_IMPLEMENTED -> NotImplementedError.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>

#include <optional>

#include "numerics.h"

namespace fp4op {

// Error messages format numbers with std::to_string, not ostream: an ostream number insertion
// compiled into the extension crashed (SIGSEGV in std::num_put) on the GPU machine's torch 2.11.
inline std::string num(int64_t v) { return std::to_string(v); }

inline std::string shape(c10::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

// A tensor argument given as None reaches the kernels as an undefined tensor.
inline void check_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), "fp4op: ", name, " must be a tensor, got None");
}

// A tensor with elements must hold its data: a storage freed or shrunk in place (FSDP's resize_(0) of a
// parameter's storage) leaves tensors whose data pointer is null or whose elements lie past the storage.
inline void check_allocated(const at::Tensor& t, const char* name) {
  if (t.numel() == 0) return;
  const size_t needed = at::detail::computeStorageNbytes(t.sizes(), t.strides(), t.itemsize(), t.storage_offset());
  const bool allocated = t.has_storage() && t.storage().data() != nullptr && t.storage().nbytes() >= needed;
  TORCH_CHECK_VALUE(allocated, "fp4op: ", name, " has ", num(t.numel()), " elements but its storage holds ",
                    num(t.has_storage() ? int64_t(t.storage().nbytes()) : 0), " of the ", num(int64_t(needed)),
                    " bytes they need (freed or resized in place)");
}

inline InputDtype input_dtype_of(const at::Tensor& t, const char* name) {
  check_defined(t, name);
  switch (t.scalar_type()) {
    case at::kHalf: return InputDtype::kFloat16;
    case at::kBFloat16: return InputDtype::kBFloat16;
    case at::kFloat8_e4m3fn: return InputDtype::kFloat8E4M3;
    default:
      TORCH_CHECK_NOT_IMPLEMENTED(false, "fp4op: ", name,
                                  " must be float16, bfloat16 or float8_e4m3fn, got ", t.scalar_type());
  }
  return InputDtype::kFloat16;
}

inline SfLayout sf_layout_of(bool is_sf_swizzled_layout, bool is_sf_8x4_layout) {
  if (!is_sf_swizzled_layout) return SfLayout::kLinear;
  return is_sf_8x4_layout ? SfLayout::kSwizzled8x4 : SfLayout::kSwizzled128x4;
}

// The recipe arguments: NVFP4 is (16, E4M3 scales), MXFP4 is (32, UE8M0 scales).
inline void check_recipe(int64_t sf_vec_size, bool sf_use_ue8m0) {
  TORCH_CHECK_NOT_IMPLEMENTED(sf_vec_size == 16 || sf_vec_size == 32,
                              "fp4op: sf_vec_size must be 16 (NVFP4) or 32 (MXFP4), got ", num(sf_vec_size));
  TORCH_CHECK_VALUE(!(sf_use_ue8m0 && sf_vec_size != 32),
                    "fp4op: sf_use_ue8m0=True (MXFP4) requires sf_vec_size=32, got ", num(sf_vec_size));
  TORCH_CHECK_VALUE(!(!sf_use_ue8m0 && sf_vec_size != 16),
                    "fp4op: sf_use_ue8m0=False (NVFP4) requires sf_vec_size=16, got ", num(sf_vec_size));
}

// The global scale as the kernels read it: float32, contiguous, 1 or M elements, on `device`.
// Returns an undefined tensor for MXFP4, which ignores it.
inline at::Tensor checked_global_scale(const std::optional<at::Tensor>& global_scale, bool sf_use_ue8m0,
                                       int64_t m, const at::Device& device) {
  if (sf_use_ue8m0) {
    // Ignored, but a CUDA scale with a CPU input sends the call to the CUDA kernel: reject that one.
    TORCH_CHECK_VALUE(!(global_scale.has_value() && global_scale->defined()) || global_scale->device() == device ||
                          global_scale->is_cpu(),
                      "fp4op: global_scale is on ", global_scale->device(), " but the input is on ", device);
    return at::Tensor();
  }
  TORCH_CHECK_VALUE(global_scale.has_value() && global_scale->defined(),
                    "fp4op: global_scale is required for NVFP4 (sf_use_ue8m0=False); "
                    "the usual value is 448 * 6 / amax(input), see fp4op.nvfp4_global_scale");
  const at::Tensor& gs = *global_scale;
  // (float4_e2m1fn_x2 is a floating type holding packed pairs, which nothing converts to float32)
  TORCH_CHECK_VALUE(at::isFloatingType(gs.scalar_type()) && gs.scalar_type() != at::ScalarType::Float4_e2m1fn_x2,
                    "fp4op: global_scale must have a floating dtype, got ", gs.scalar_type());
  TORCH_CHECK_VALUE(gs.numel() == 1 || gs.numel() == m,
                    "fp4op: global_scale must have 1 element or one per row (", num(m), "), got shape ",
                    shape(gs.sizes()));
  TORCH_CHECK_VALUE(gs.device() == device, "fp4op: global_scale is on ", gs.device(),
                    " but the input is on ", device);
  check_allocated(gs, "global_scale");
  // convert, never reinterpret, a scale of another floating dtype
  return gs.to(at::kFloat).contiguous().view({-1});
}

// Shape facts of a quantize problem: input [..., K] -> M rows of K elements.
struct QuantizeShape {
  int64_t m;
  int64_t k;
  int64_t nk;  // K / sf_vec_size
  SfLayout layout;
};

// `name`: the tensor quantized, as the op calls it (input; a fused op's x or gate).
inline QuantizeShape check_quantize_shape(const at::Tensor& input, int64_t sf_vec_size,
                                          bool is_sf_swizzled_layout, bool is_sf_8x4_layout,
                                          const char* name = "input") {
  TORCH_CHECK_VALUE(input.dim() >= 1, "fp4op: ", name, " must have at least 1 dimension, got a 0-d tensor");
  check_allocated(input, name);
  const int64_t k = input.size(-1);
  TORCH_CHECK_VALUE(k % sf_vec_size == 0, "fp4op: the last dimension of ", name, " (K = ", num(k),
                    ") must be a multiple of sf_vec_size = ", num(sf_vec_size));
  const int64_t m = c10::multiply_integers(input.sizes().begin(), input.sizes().end() - 1);
  return QuantizeShape{m, k, k / sf_vec_size, sf_layout_of(is_sf_swizzled_layout, is_sf_8x4_layout)};
}

// x_q [..., K/2] uint8 and the 2-D sf tensor of the layout.
inline std::tuple<at::Tensor, at::Tensor> empty_quantize_outputs(const at::Tensor& input,
                                                                 const QuantizeShape& s) {
  auto xq_sizes = input.sizes().vec();
  xq_sizes.back() = s.k / 2;
  auto opts = input.options().dtype(at::kByte);
  at::Tensor xq = at::empty(xq_sizes, opts);
  at::Tensor sf = at::empty({sf_rows(s.m, s.layout), sf_cols(s.nk, s.layout)}, opts);
  return {xq, sf};
}

// Shape facts of a dequantize problem: x_q [..., K/2] with its sf tensor.
struct DequantizeShape {
  int64_t m;
  int64_t k;
  SfLayout layout;
  at::ScalarType output_dtype;
};

inline DequantizeShape check_dequantize_args(const at::Tensor& x_q, const at::Tensor& sf, int64_t sf_vec_size,
                                             bool sf_use_ue8m0, bool is_sf_swizzled_layout,
                                             bool is_sf_8x4_layout,
                                             std::optional<at::ScalarType> output_dtype) {
  check_recipe(sf_vec_size, sf_use_ue8m0);
  check_defined(x_q, "x_q");
  check_defined(sf, "sf");
  TORCH_CHECK_VALUE(x_q.scalar_type() == at::kByte, "fp4op: x_q must be uint8 (two E2M1 codes a byte), got ",
                    x_q.scalar_type());
  TORCH_CHECK_VALUE(sf.scalar_type() == at::kByte, "fp4op: sf must be uint8, got ", sf.scalar_type());
  TORCH_CHECK_VALUE(x_q.dim() >= 1, "fp4op: x_q must have at least 1 dimension");
  TORCH_CHECK_VALUE(sf.device() == x_q.device(), "fp4op: sf is on ", sf.device(), " but x_q is on ",
                    x_q.device());
  check_allocated(x_q, "x_q");
  check_allocated(sf, "sf");
  const int64_t k = 2 * x_q.size(-1);
  TORCH_CHECK_VALUE(k % sf_vec_size == 0, "fp4op: 2 * x_q.size(-1) (K = ", num(k),
                    ") must be a multiple of sf_vec_size = ", num(sf_vec_size));
  const int64_t m = c10::multiply_integers(x_q.sizes().begin(), x_q.sizes().end() - 1);
  const SfLayout layout = sf_layout_of(is_sf_swizzled_layout, is_sf_8x4_layout);
  const int64_t rows = sf_rows(m, layout), cols = sf_cols(k / sf_vec_size, layout);
  // the layout's 2-D shape, or flattened; a transposed sf (same count) would be read as garbage
  const bool sf_shape_ok = sf.dim() == 2 ? sf.size(0) == rows && sf.size(1) == cols
                                         : sf.dim() == 1 && sf.numel() == rows * cols;
  TORCH_CHECK_VALUE(sf_shape_ok, "fp4op: sf must have shape [", num(rows), ", ", num(cols),
                    "] (or those elements flattened) for this x_q and layout, got shape ", shape(sf.sizes()));
  const at::ScalarType out = output_dtype.value_or(at::kFloat);
  TORCH_CHECK_VALUE(out == at::kFloat || out == at::kBFloat16 || out == at::kHalf,
                    "fp4op: output_dtype must be float32, bfloat16 or float16, got ", out);
  return DequantizeShape{m, k, layout, out};
}

inline at::Tensor empty_dequantize_output(const at::Tensor& x_q, const DequantizeShape& d) {
  auto sizes = x_q.sizes().vec();
  sizes.back() = d.k;
  return at::empty(sizes, x_q.options().dtype(d.output_dtype));
}

}  // namespace fp4op
