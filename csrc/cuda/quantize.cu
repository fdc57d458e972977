// CUDA kernels of fp4op::quantize and fp4op::dequantize (plain CUDA; see launch.h).
//
// Quantize: the elementwise or split kernel of block_quantize.cuh with the input widened as it is.
// Threads past the last real block column write the zero padding columns of the swizzled sf layouts
// and the CTAs past the quantizing ones zero the padding rows: one launch writes every output byte.
#include "block_quantize.cuh"

namespace fp4op::cuda {
namespace {

// The input quantized as it is: one stream, widened exactly.
template <InputDtype D>
struct PlainSource {
  static constexpr int kStreams = 1;
  static constexpr bool kSectorWalk = true;  // swizzled layouts: sector_walk_kernel where it applies
  static constexpr int kElementBytes = D == InputDtype::kFloat8E4M3 ? 1 : 2;
  template <int L, int V>
  __device__ __forceinline__ static void produce(const uint4 (&v)[1][L], int, float (&f)[V]) {
#pragma unroll
    for (int i = 0; i < L; ++i) Input<D>::widen(v[0][i], f + i * Input<D>::kPerVector);
  }
  template <int L, int V>
  __device__ __forceinline__ static float block_amax(const uint4 (&v)[1][L], const float (&f)[V]) {
    if constexpr (D == InputDtype::kFloat8E4M3 && V == 16) {
      return e4m3_abs_max(v[0][0]);
    } else {
      return amax_of(f);
    }
  }
};

template <InputDtype D>
cudaError_t launch_quantize_typed(const QuantizeLaunch& a, const LaunchStream& stream) {
  ElementwiseArgs e{};
  e.in[0] = a.input;
  e.row_stride[0] = a.out.k;
  e.out = a.out;
  return launch_elementwise<PlainSource<D>>(e, stream);
}

template <typename Out>
__device__ __forceinline__ Out from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

// One thread per x_q byte (two outputs); dequantization is not on a hot path.
template <typename Out>
__global__ void dequantize_kernel(const DequantizeLaunch a) {
  wait_for_previous_kernel();
  const int64_t bytes_per_row = a.k / 2;
  const int64_t total = a.m * bytes_per_row;
  const int64_t nk = a.k / a.sf_vec_size;
  Out* out = static_cast<Out*>(a.out);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / bytes_per_row;
    const int64_t col = (i % bytes_per_row) * 2;
    float s = 1.0f;
    if (!a.sf_use_ue8m0) {
      const float g = a.global_scale[a.global_scale_per_row ? row : 0];
      s = a.is_global_scale_inversed ? div_rn(1.0f, g) : g;
    }
    const uint8_t sf = a.sf[sf_offset(row, col / a.sf_vec_size, nk, SfLayout(a.sf_layout))];
    const uint8_t q = a.x_q[i];
    out[2 * i] = from_float<Out>(dequant_value(q & 0xFu, sf, a.sf_use_ue8m0, s));
    out[2 * i + 1] = from_float<Out>(dequant_value(q >> 4, sf, a.sf_use_ue8m0, s));
  }
}

template <typename Out>
cudaError_t launch_dequantize_typed(const DequantizeLaunch& a, const LaunchStream& stream) {
  const int64_t total = a.m * (a.k / 2);
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(a.num_sms) * 32);
  return launch_kernel(dequantize_kernel<Out>, dim3(unsigned(std::max<int64_t>(blocks, 1))), stream, a);
}

}  // namespace

cudaError_t launch_quantize(const QuantizeLaunch& a, const LaunchStream& stream) {
  switch (InputDtype(a.input_dtype)) {
    case InputDtype::kFloat16: return launch_quantize_typed<InputDtype::kFloat16>(a, stream);
    case InputDtype::kBFloat16: return launch_quantize_typed<InputDtype::kBFloat16>(a, stream);
    case InputDtype::kFloat8E4M3: return launch_quantize_typed<InputDtype::kFloat8E4M3>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_dequantize(const DequantizeLaunch& a, const LaunchStream& stream) {
  switch (a.output_dtype) {
    case 0: return launch_dequantize_typed<float>(a, stream);
    case 1: return launch_dequantize_typed<__nv_bfloat16>(a, stream);
    case 2: return launch_dequantize_typed<__half>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fp4op::cuda
