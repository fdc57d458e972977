// The launcher API between the torch bindings (C++) and the CUDA kernels. No torch headers here, so
// that .cu files build with plain nvcc in seconds.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fp4op::cuda {

// Where a kernel is launched: the stream, and whether it uses Programmatic Dependent Launch (sm_90+).
// With pdl the kernel may start while the previous kernel on the stream is still running (its launch
// latency hides behind that kernel's tail); its threads wait for that kernel to complete
// (griddepcontrol.wait) before they touch global memory, so the results are the same.
struct LaunchStream {
  cudaStream_t stream;
  bool pdl;
};

// What every quantizing kernel (plain and fused) writes, and with which recipe.
struct QuantizeTarget {
  int64_t m;
  int64_t k;
  bool sf_use_ue8m0;            // MXFP4 (32-element blocks, UE8M0) or NVFP4 (16, E4M3)
  const float* global_scale;    // 1 or m floats; nullptr for MXFP4
  bool global_scale_per_row;
  bool is_global_scale_inversed;
  int sf_layout;                // fp4op::SfLayout
  uint8_t* x_q;                 // [m, k/2]
  uint8_t* sf;                  // sf_rows x sf_cols, padding written by the kernel
  int num_sms;
};

struct QuantizeLaunch {
  const void* input;            // [m, k] contiguous, 16-byte aligned
  int input_dtype;              // fp4op::InputDtype
  QuantizeTarget out;
};

// Quantizes on `stream`; returns the launch's error code.
cudaError_t launch_quantize(const QuantizeLaunch& args, const LaunchStream& stream);

struct DequantizeLaunch {
  const uint8_t* x_q;           // [m, k/2]
  const uint8_t* sf;
  const float* global_scale;    // 1 or m floats; nullptr for MXFP4
  bool global_scale_per_row;
  bool is_global_scale_inversed;
  int64_t m;
  int64_t k;
  int sf_vec_size;
  bool sf_use_ue8m0;
  int sf_layout;
  void* out;                    // [m, k]
  int output_dtype;             // 0 float32, 1 bfloat16, 2 float16
  int num_sms;
};

cudaError_t launch_dequantize(const DequantizeLaunch& args, const LaunchStream& stream);

}  // namespace fp4op::cuda
