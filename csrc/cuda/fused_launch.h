// The launcher API of the fused "norm/activation + FP4 quantize" CUDA kernels (csrc/cuda/fused.cu), used
// by their torch bindings (fused_cuda.cpp). No torch headers here.
#pragma once

#include "launch.h"

namespace fp4op::cuda {

// kAddRmsNormFloat32Sum: add_rms_norm normalizing the float32 sum x + residual (sum_out its rounding);
// kRmsNormAdd: residual + RMSNorm(x) rounded (a post-norm residual stream, OLMo2), quantized and stored to sum_out;
// kLayerNormModulate: round(round(LayerNorm(x) * multiplier) + shift) (adaLN), quantized
enum class FusedOp : int {
  kRmsNorm = 0,
  kAddRmsNorm = 1,
  kLayerNorm = 2,
  kActivation = 3,
  kGatedActivation = 4,
  kAddRmsNormFloat32Sum = 5,
  kRmsNormAdd = 6,
  kLayerNormModulate = 7
};

// A per-sample [S, K] operand (layer_norm_modulate's multiplier and shift): row r of x reads row
// r / rows_per_sample, at data + that * row_stride elements; 16-byte aligned rows.
struct SampleOperand {
  const void* data;
  int64_t row_stride;
  int64_t rows_per_sample;
};

struct FusedLaunch {
  FusedOp op;
  int input_dtype;              // fp4op::InputDtype: float16 or bfloat16
  // x (norms, activations) or gate: row r at x + r * x_row_stride elements; 16-byte aligned rows
  const void* x;
  int64_t x_row_stride;
  // residual (add_rms_norm, rms_norm_add) or up (gated): same shape as x
  const void* y;
  int64_t y_row_stride;
  const void* weight;           // [k] or nullptr, 16-byte aligned
  const void* bias;             // [k] or nullptr (layer norm), 16-byte aligned
  void* sum_out;                // add_rms_norm: x + residual rounded to the input dtype; rms_norm_add: residual +
                                // the norm output, rounded; [m, k] contiguous
  void* normed_out;             // RMSNorm, LayerNorm: the norm output (what is quantized), [m, k] contiguous;
                                // or nullptr
  float eps;
  const float* eps_device;      // RMSNorm: eps read on the device instead (a float32 tensor), or nullptr
  float weight_offset;
  int rms_weight;               // fp4op::fused::RmsWeight
  int activation;               // fp4op::fused::Activation
  float activation_coef;        // the activation's factor: gelu_new's sqrt(2 / pi), sigmoid_mul's alpha
  const float* activation_coef_device;  // or that factor read on the device (a float32 tensor), or nullptr
  SampleOperand multiplier, shift;      // kLayerNormModulate
  QuantizeTarget out;
};

// Runs the fused op on `stream`; returns the launch's error code.
cudaError_t launch_fused(const FusedLaunch& args, const LaunchStream& stream);

}  // namespace fp4op::cuda
