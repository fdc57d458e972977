// The launcher API of the fused "norm/activation + FP4 quantize" CUDA kernels (csrc/cuda/fused.cu), used
// by their torch bindings (fused_cuda.cpp). No torch headers here.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fp4op::cuda {

enum class FusedOp : int { kRmsNorm = 0, kAddRmsNorm = 1, kLayerNorm = 2, kActivation = 3, kGatedActivation = 4 };

struct FusedLaunch {
  FusedOp op;
  int input_dtype;              // fp4op::InputDtype: float16 or bfloat16
  int64_t m;
  int64_t k;
  // x (norms, activations) or gate: row r at x + r * x_row_stride elements; 16-byte aligned rows
  const void* x;
  int64_t x_row_stride;
  // residual (add_rms_norm) or up (gated): same shape as x
  const void* y;
  int64_t y_row_stride;
  const void* weight;           // [k] or nullptr, 16-byte aligned
  const void* bias;             // [k] or nullptr (layer norm), 16-byte aligned
  void* sum_out;                // add_rms_norm: x + residual, [m, k] contiguous
  float eps;
  float weight_offset;
  int rms_weight;               // fp4op::fused::RmsWeight
  int activation;               // fp4op::fused::Activation
  int sf_vec_size;              // 16 (NVFP4) or 32 (MXFP4)
  bool sf_use_ue8m0;
  const float* global_scale;    // 1 or m floats; nullptr for MXFP4
  bool global_scale_per_row;
  bool is_global_scale_inversed;
  int sf_layout;                // fp4op::SfLayout
  uint8_t* x_q;                 // [m, k/2]
  uint8_t* sf;                  // sf_rows x sf_cols, padding written by the kernel
  int num_sms;
};

// Runs the fused op on `stream`; returns the launch's error code.
cudaError_t launch_fused(const FusedLaunch& args, cudaStream_t stream);

}  // namespace fp4op::cuda
