// Every float16 and bfloat16 input through the fused kernels' activation math (csrc/fused_math.h):
// activation_pair, which the kernels call, against round_to(activation_unrounded(x)), the float32 value
// as eager torch computes it rounded once to the model dtype (gelu_new, sigmoid_mul: against
// gelu_new_rounded / sigmoid_mul_rounded, their steps one value at a time; with a file argument the
// program also writes activation_pair's gelu_new, sigmoid_mul with alpha 1.702 (QuickGELU) and with
// alpha 1 (SiLU written out), each of every bfloat16 and then every float16 input, 6 x 65536 float32
// values, which the test compares with eager torch on the GPU). silu_pair's fast path decides most
// roundings without that value (its comment gives the bounds); this checks that it never decides one
// wrongly, and that its measured error is inside the bound it relies on. Built in CI (.ci/run) and run
// by tests/test_fused_ops.py::test_activation_math_every_input on a GPU (nvcc, no torch headers); prints
// one line per (activation, dtype) and exits 1 on a mismatch, 2 on a CUDA error.
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "../../csrc/fused_math.h"

using fp4op::InputDtype;
using fp4op::fused::Activation;

struct Counts {
  unsigned long long checked;    // inputs compared (every one of the 65536)
  unsigned long long mismatches;
  unsigned long long slow;       // silu: values whose fast interval crossed a rounding boundary
  unsigned int max_rel_error;    // silu, x >= kSiluFastMin: max |y - silu_f32| / |silu_f32|, float bits
  unsigned int first_mismatch;   // input bits (0xFFFFFFFF: none)
};

__device__ float widen(uint32_t bits, InputDtype dtype) {
  return dtype == InputDtype::kBFloat16 ? fp4op::bf16_bits_to_float(uint16_t(bits))
                                        : fp4op::fp16_bits_to_float(uint16_t(bits));
}

__device__ bool same(float a, float b) { return (a != a && b != b) || __float_as_uint(a) == __float_as_uint(b); }

// Thread i takes the inputs 2i and 2i + 1 as one pair, as the kernels pair neighbouring elements.
constexpr float kQuickGeluAlpha = 1.702f;

// the factor activation_pair takes for `act`
__host__ __device__ float coef_of(Activation act) {
  return act == Activation::kSigmoidMul ? kQuickGeluAlpha : fp4op::fused::kGeluNewCoef;
}

__global__ void check(Activation act, InputDtype dtype, Counts* counts) {
  const uint32_t first = 2 * (blockIdx.x * blockDim.x + threadIdx.x);
  if (first >= 65536) return;
  const float x[2] = {widen(first, dtype), widen(first + 1, dtype)};
  float got[2] = {x[0], x[1]};
  fp4op::fused::activation_pair(got[0], got[1], act, dtype, coef_of(act));
  for (int e = 0; e < 2; ++e) {
    atomicAdd(&counts->checked, 1ull);
    const float exact = act == Activation::kGeluNew      ? fp4op::fused::gelu_new_rounded(x[e], dtype)
                        : act == Activation::kSigmoidMul ? fp4op::fused::sigmoid_mul_rounded(x[e], kQuickGeluAlpha, dtype)
                                                         : fp4op::fused::activation_unrounded(x[e], act);
    const float want = fp4op::fused::round_to(exact, dtype);
    if (!same(got[e], want)) {
      atomicAdd(&counts->mismatches, 1ull);
      atomicMin(&counts->first_mismatch, first + e);
    }
    if (act != Activation::kSilu || !(x[e] >= fp4op::fused::kSiluFastMin) || !isfinite(exact)) continue;
    const float y = fp4op::fused::silu_fast(x[e]);
    const float below = fp4op::fused::round_to(y * (1.0f - fp4op::fused::kSiluFastError), dtype);
    const float above = fp4op::fused::round_to(y * (1.0f + fp4op::fused::kSiluFastError), dtype);
    if (!same(below, above)) atomicAdd(&counts->slow, 1ull);
    if (exact != 0.0f) {
      const double rel = fabs((double(y) - double(exact)) / double(exact));
      atomicMax(&counts->max_rel_error, __float_as_uint(float(rel)));
    }
  }
}

__global__ void values(Activation act, float coef, InputDtype dtype, float* out) {
  const uint32_t first = 2 * (blockIdx.x * blockDim.x + threadIdx.x);
  if (first >= 65536) return;
  float v[2] = {widen(first, dtype), widen(first + 1, dtype)};
  fp4op::fused::activation_pair(v[0], v[1], act, dtype, coef);
  out[first] = v[0];
  out[first + 1] = v[1];
}

// activation_pair's gelu_new, QuickGELU and SiLU written out, each of every bfloat16, then every
// float16 input, to `path`.
int write_values(const char* path) {
  static float host[6 * 65536];
  float* out = nullptr;
  if (cudaMalloc(&out, sizeof(host)) != cudaSuccess) return 2;
  const struct {
    Activation act;
    float coef;
  } kinds[] = {{Activation::kGeluNew, fp4op::fused::kGeluNewCoef},
               {Activation::kSigmoidMul, kQuickGeluAlpha},
               {Activation::kSigmoidMul, 1.0f}};
  float* next = out;
  for (const auto& kind : kinds) {
    for (InputDtype dtype : {InputDtype::kBFloat16, InputDtype::kFloat16}) {
      values<<<128, 256>>>(kind.act, kind.coef, dtype, next);
      next += 65536;
    }
  }
  if (cudaGetLastError() != cudaSuccess || cudaMemcpy(host, out, sizeof(host), cudaMemcpyDeviceToHost) != cudaSuccess) {
    return 2;
  }
  cudaFree(out);
  FILE* f = std::fopen(path, "wb");
  const bool written = f != nullptr && std::fwrite(host, sizeof(float), 6 * 65536, f) == 6 * 65536;
  if (f != nullptr) std::fclose(f);
  return written ? 0 : 2;
}

int main(int argc, char** argv) {
  int failures = 0;
  const struct {
    Activation act;
    const char* name;
  } acts[] = {{Activation::kSilu, "silu"},
              {Activation::kGeluErf, "gelu"},
              {Activation::kGeluTanh, "gelu_tanh"},
              {Activation::kGeluNew, "gelu_new"},
              {Activation::kRelu, "relu"},
              {Activation::kReluSquared, "relu_squared"},
              {Activation::kSigmoidMul, "quick_gelu"}};
  for (const auto& a : acts) {
    for (InputDtype dtype : {InputDtype::kBFloat16, InputDtype::kFloat16}) {
      const Counts start{0, 0, 0, 0, 0xFFFFFFFFu};
      Counts host = start, *counts = nullptr;
      if (cudaMalloc(&counts, sizeof(Counts)) != cudaSuccess ||
          cudaMemcpy(counts, &start, sizeof(Counts), cudaMemcpyHostToDevice) != cudaSuccess) {
        return 2;
      }
      check<<<128, 256>>>(a.act, dtype, counts);
      if (cudaGetLastError() != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess ||
          cudaMemcpy(&host, counts, sizeof(Counts), cudaMemcpyDeviceToHost) != cudaSuccess) {
        std::printf("failed: %s\n", cudaGetErrorString(cudaGetLastError()));
        return 2;
      }
      std::printf("%s %s checked %llu mismatches %llu first 0x%04x slow %llu max_rel_error %.3g\n", a.name,
                  dtype == InputDtype::kBFloat16 ? "bfloat16" : "float16", host.checked, host.mismatches,
                  host.first_mismatch == 0xFFFFFFFFu ? 0u : host.first_mismatch, host.slow,
                  double(fp4op::bits_to_float(host.max_rel_error)));
      failures += host.mismatches != 0 || host.checked != 65536;
      // the fallback must have been exercised (a boundary-crossing interval is common enough)
      if (a.act == Activation::kSilu && host.slow == 0) ++failures;
      // the bound silu_pair's comment derives (2^-19.36), inside the margin it tests with (2^-19)
      if (a.act == Activation::kSilu && fp4op::bits_to_float(host.max_rel_error) > std::exp2(-19.36f)) ++failures;
      cudaFree(counts);
    }
  }
  if (argc > 1 && write_values(argv[1]) != 0) return 2;
  return failures == 0 ? 0 : 1;
}
