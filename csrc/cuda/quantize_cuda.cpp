// CUDA bindings of fp4op::quantize and fp4op::dequantize: argument checks, outputs, and a launch on
// the current stream of the input's device.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "bindings.h"

namespace fp4op::cuda {

namespace {

struct DeviceInfo {
  int num_sms;
  bool has_pdl;  // sm_90+
};

// Queried once per process (attribute queries, no context creation), not on every call.
const DeviceInfo& current_device_info() {
  static const std::vector<DeviceInfo> devices = [] {
    int count = 0;
    C10_CUDA_CHECK(cudaGetDeviceCount(&count));
    std::vector<DeviceInfo> infos(size_t(count), DeviceInfo{0, false});
    for (int d = 0; d < count; ++d) {
      int major = 0;
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&infos[d].num_sms, cudaDevAttrMultiProcessorCount, d));
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, d));
      infos[d].has_pdl = major >= 9;
    }
    return infos;
  }();
  return devices.at(size_t(c10::cuda::current_device()));
}

}  // namespace

int num_sms() { return current_device_info().num_sms; }

LaunchStream launch_stream(std::optional<bool> enable_pdl) {
  return {c10::cuda::getCurrentCUDAStream(), current_device_info().has_pdl && enable_pdl.value_or(true)};
}

QuantizeTarget quantize_target(const QuantizeShape& s, bool sf_use_ue8m0, const at::Tensor& global_scale,
                               bool is_global_scale_inversed, const at::Tensor& x_q, const at::Tensor& sf) {
  QuantizeTarget q{};
  q.m = s.m;
  q.k = s.k;
  q.sf_use_ue8m0 = sf_use_ue8m0;
  q.global_scale = global_scale.defined() ? global_scale.data_ptr<float>() : nullptr;
  q.global_scale_per_row = global_scale.defined() && global_scale.numel() > 1;
  q.is_global_scale_inversed = is_global_scale_inversed;
  q.sf_layout = int(s.layout);
  q.x_q = x_q.data_ptr<uint8_t>();
  q.sf = sf.data_ptr<uint8_t>();
  q.num_sms = num_sms();
  return q;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fp4op: ", what, " kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0) return c;
  at::Tensor copy = at::empty_like(c, at::MemoryFormat::Contiguous);
  copy.copy_(c);
  return copy;
}

namespace {

std::tuple<at::Tensor, at::Tensor> quantize_cuda(const at::Tensor& input,
                                                 const std::optional<at::Tensor>& global_scale,
                                                 int64_t sf_vec_size, bool sf_use_ue8m0,
                                                 bool is_sf_swizzled_layout, bool is_sf_8x4_layout,
                                                 bool is_global_scale_inversed, std::optional<bool> enable_pdl) {
  check_recipe(sf_vec_size, sf_use_ue8m0);
  const InputDtype dtype = input_dtype_of(input, "input");
  const QuantizeShape s = check_quantize_shape(input, sf_vec_size, is_sf_swizzled_layout, is_sf_8x4_layout);
  const at::Tensor gs = checked_global_scale(global_scale, sf_use_ue8m0, s.m, input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  auto [xq, sf] = empty_quantize_outputs(input, s);
  if (s.m == 0 || s.k == 0) {
    sf.zero_();  // padding rows of an M = 0 or K = 0 problem
    return {xq, sf};
  }
  const at::Tensor x = aligned_contiguous(input);
  QuantizeLaunch a{};
  a.input = x.data_ptr();
  a.input_dtype = int(dtype);
  a.out = quantize_target(s, sf_use_ue8m0, gs, is_global_scale_inversed, xq, sf);
  check_launch(launch_quantize(a, launch_stream(enable_pdl)), "quantize");
  return {xq, sf};
}

at::Tensor dequantize_cuda(const at::Tensor& x_q, const at::Tensor& sf,
                           const std::optional<at::Tensor>& global_scale, int64_t sf_vec_size,
                           bool sf_use_ue8m0, bool is_sf_swizzled_layout, bool is_sf_8x4_layout,
                           bool is_global_scale_inversed, std::optional<at::ScalarType> output_dtype) {
  const DequantizeShape d = check_dequantize_args(x_q, sf, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout,
                                                  is_sf_8x4_layout, output_dtype);
  const at::Tensor gs = checked_global_scale(global_scale, sf_use_ue8m0, d.m, x_q.device());
  const c10::cuda::CUDAGuard guard(x_q.device());
  at::Tensor out = empty_dequantize_output(x_q, d);
  if (d.m == 0 || d.k == 0) return out;
  const at::Tensor q = x_q.contiguous();
  const at::Tensor scales = sf.contiguous();
  DequantizeLaunch a{};
  a.x_q = q.data_ptr<uint8_t>();
  a.sf = scales.data_ptr<uint8_t>();
  a.global_scale = gs.defined() ? gs.data_ptr<float>() : nullptr;
  a.global_scale_per_row = gs.defined() && gs.numel() > 1;
  a.is_global_scale_inversed = is_global_scale_inversed;
  a.m = d.m;
  a.k = d.k;
  a.sf_vec_size = int(sf_vec_size);
  a.sf_use_ue8m0 = sf_use_ue8m0;
  a.sf_layout = int(d.layout);
  a.out = out.data_ptr();
  a.output_dtype = d.output_dtype == at::kFloat ? 0 : d.output_dtype == at::kBFloat16 ? 1 : 2;
  a.num_sms = num_sms();
  check_launch(launch_dequantize(a, launch_stream()), "dequantize");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fp4op, CUDA, m) {
  m.impl("quantize", &quantize_cuda);
  m.impl("dequantize", &dequantize_cuda);
}

}  // namespace fp4op::cuda
