// Helpers shared by the CUDA bindings (quantize_cuda.cpp, fused_cuda.cpp): C++ with torch headers,
// never included by .cu files.
#pragma once

#include <ATen/ATen.h>

#include "../op_args.h"
#include "launch.h"

namespace fp4op::cuda {

// The multiprocessor count of the current device (the kernels size their grids with it).
int num_sms();

// The current stream of the current device, with Programmatic Dependent Launch where `enable_pdl` asks
// for it (unset: wherever the device has it, sm_90+; devices without it always launch without).
LaunchStream launch_stream(std::optional<bool> enable_pdl = std::nullopt);

// The quantize half of a launch: shape, recipe, global scale and the (x_q, sf) outputs.
QuantizeTarget quantize_target(const QuantizeShape& s, bool sf_use_ue8m0, const at::Tensor& global_scale,
                               bool is_global_scale_inversed, const at::Tensor& x_q, const at::Tensor& sf);

// The kernels read 16-byte vectors: `t` contiguous, copied when its storage offset leaves it unaligned.
at::Tensor aligned_contiguous(const at::Tensor& t);

// Raises with the launch's error, if any.
void check_launch(cudaError_t err, const char* what);

}  // namespace fp4op::cuda
