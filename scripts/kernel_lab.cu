// Kernel lab: times the quantize and fused launchers of csrc/cuda (plain CUDA, no torch) against a
// device copy of the same bytes, and small-M quantize under CUDA-graph replay against an empty kernel,
// in one process that builds in seconds. Build settings of the kernels (e.g. -DFP4OP_RING_BYTES=N) are compared by building the lab
// once per setting (scripts/gpu_check.sh, stage `lab`); every build prints a checksum of each case's
// outputs, which must not change with the setting.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o /tmp/kernel_lab scripts/kernel_lab.cu
//   /tmp/kernel_lab [--quick] [--no-pdl] [--fused-only] [--decode-only] [--quantize-only] [--big MxK]... [--once]
//                   [--clean-flush]
// (--fused-only: the fused ops' throughput rows alone; --decode-only: the graph-replay sections alone;
// --quantize-only: the quantize throughput rows alone; --big MxK, repeatable: these quantize shapes instead
// of the default ones; --once: each quantize case launched once, untimed, e.g. under ncu; --clean-flush: the L2
// flush's buffer read back after it is written, so that the timed kernel finds clean lines in L2)
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <vector>

#include "../csrc/cuda/fused.cu"
#include "../csrc/cuda/quantize.cu"

#ifndef LAB_SETTINGS
#define LAB_SETTINGS "default"
#endif

using fp4op::InputDtype;
using fp4op::SfLayout;

#define CHECK(x)                                                                                  \
  do {                                                                                            \
    cudaError_t e_ = (x);                                                                         \
    if (e_ != cudaSuccess) {                                                                      \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));     \
      std::exit(1);                                                                               \
    }                                                                                             \
  } while (0)

namespace {

// Deterministic test data: normal-range values of a few magnitudes, as 16-bit or 8-bit patterns.
__global__ void fill_kernel(uint8_t* p, int64_t bytes, int element_bytes) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < bytes / element_bytes;
       i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ uint32_t(i >> 32) * 40503u;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    if (element_bytes == 2) {  // bf16 / fp16 with exponents near 1.0
      reinterpret_cast<uint16_t*>(p)[i] = uint16_t((h & 0x807Fu) | ((0x3C00u + ((h >> 8) & 0x07u) * 0x80u)));
    } else {  // e4m3, no NaN
      uint8_t b = uint8_t(h);
      if ((b & 0x7F) == 0x7F) b ^= 1;
      p[i] = b;
    }
  }
}

__global__ void empty_like_add_kernel(float* x) {
  if (threadIdx.x == 0) x[0] += 1.0f;
}

// The same launched as the fp4op kernels are (kThreads threads, PDL when on): the floor of a call.
__global__ void empty_like_fp4op_kernel(float* x) {
  fp4op::cuda::wait_for_previous_kernel();
  if (threadIdx.x == 0) x[0] += 1.0f;
}

// The least a small-M quantize does, launched like fp4op's kernels: each of `threads` threads loads 16
// bytes and stores 8. Its graph-replay time against the CTA count separates launch/drain cost from
// the quantize arithmetic.
__global__ void __launch_bounds__(128) load_store_probe_kernel(const uint4* in, uint2* out, uint32_t threads) {
  fp4op::cuda::wait_for_previous_kernel();
  const uint32_t t = blockIdx.x * 128 + threadIdx.x;
  if (t < threads) {
    const uint4 v = __ldg(in + t);
    out[t] = make_uint2(v.x ^ v.y, v.z ^ v.w);
  }
}

__global__ void flush_kernel(uint4* p, int64_t n, uint32_t v) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    p[i] = make_uint4(v, v, v, v);
}

// Reads the flush buffer after flush_kernel wrote it, so that the L2 holds clean lines (--clean-flush): a
// timed kernel then does not write back the flush's dirty lines as it evicts them.
__global__ void read_flush_kernel(const uint4* p, int64_t n, uint32_t* sink) {
  uint32_t acc = 0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const uint4 v = __ldcg(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9E3779B9u) *sink = acc;  // never true for the flush pattern; keeps the loads
}

bool clean_flush = false;
uint32_t* flush_sink = nullptr;

uint64_t fnv(const std::vector<uint8_t>& b, uint64_t h = 1469598103934665603ull) {
  for (uint8_t c : b) h = (h ^ c) * 1099511628211ull;
  return h;
}

struct Case {
  InputDtype dtype;
  bool mxfp4;
  SfLayout layout;
  int64_t m, k;
};

const char* dtype_name(InputDtype d) {
  return d == InputDtype::kBFloat16 ? "bf16" : d == InputDtype::kFloat16 ? "fp16" : "fp8";
}
const char* layout_name(SfLayout l) {
  return l == SfLayout::kSwizzled128x4 ? "128x4" : l == SfLayout::kSwizzled8x4 ? "8x4" : "linear";
}

struct Buffers {
  void* input = nullptr;
  uint8_t* x_q = nullptr;
  uint8_t* sf = nullptr;
  float* gs = nullptr;
  int64_t in_bytes = 0, xq_bytes = 0, sf_bytes = 0;
};

Buffers make_buffers(const Case& c) {
  Buffers b;
  const int eb = c.dtype == InputDtype::kFloat8E4M3 ? 1 : 2;
  const int vec = c.mxfp4 ? 32 : 16;
  b.in_bytes = c.m * c.k * eb;
  b.xq_bytes = c.m * c.k / 2;
  b.sf_bytes = fp4op::sf_rows(c.m, c.layout) * fp4op::sf_cols(c.k / vec, c.layout);
  CHECK(cudaMalloc(&b.input, b.in_bytes));
  CHECK(cudaMalloc(&b.x_q, b.xq_bytes));
  CHECK(cudaMalloc(&b.sf, b.sf_bytes));
  CHECK(cudaMalloc(&b.gs, sizeof(float)));
  const float gs = 448.0f * 6.0f / 17.0f;
  CHECK(cudaMemcpy(b.gs, &gs, sizeof(float), cudaMemcpyHostToDevice));
  fill_kernel<<<1024, 256>>>(static_cast<uint8_t*>(b.input), b.in_bytes, eb);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());  // the kernels run on a non-blocking stream
  return b;
}

void free_buffers(Buffers& b) {
  cudaFree(b.input);
  cudaFree(b.x_q);
  cudaFree(b.sf);
  cudaFree(b.gs);
}

fp4op::cuda::QuantizeLaunch launch_args(const Case& c, const Buffers& b, int num_sms) {
  fp4op::cuda::QuantizeLaunch a{};
  a.input = b.input;
  a.input_dtype = int(c.dtype);
  a.out.m = c.m;
  a.out.k = c.k;
  a.out.sf_use_ue8m0 = c.mxfp4;
  a.out.global_scale = c.mxfp4 ? nullptr : b.gs;
  a.out.global_scale_per_row = false;
  a.out.is_global_scale_inversed = false;
  a.out.sf_layout = int(c.layout);
  a.out.x_q = b.x_q;
  a.out.sf = b.sf;
  a.out.num_sms = num_sms;
  return a;
}

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Time per call (us) of `calls` launches of `fn` captured in one graph, median of `replays`.
template <class F>
float time_graph(F&& fn, cudaStream_t s, int calls, int replays) {
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < calls; ++i) fn();
  CHECK(cudaStreamEndCapture(s, &g));
  CHECK(cudaGraphInstantiate(&ge, g, 0));
  CHECK(cudaGraphLaunch(ge, s));
  CHECK(cudaStreamSynchronize(s));
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  std::vector<float> t;
  for (int r = 0; r < replays; ++r) {
    CHECK(cudaEventRecord(e0, s));
    CHECK(cudaGraphLaunch(ge, s));
    CHECK(cudaEventRecord(e1, s));
    CHECK(cudaEventSynchronize(e1));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    t.push_back(ms * 1000.0f / calls);
  }
  cudaGraphExecDestroy(ge);
  cudaGraphDestroy(g);
  return median(t);
}

}  // namespace

// Median time (us) of 50 runs of `fn` on `s`, each after an L2 flush.
template <class F>
float time_flushed(F&& fn, cudaStream_t s, uint4* flush, int64_t flush_bytes) {
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  std::vector<float> t;
  for (int i = 0; i < 53; ++i) {
    flush_kernel<<<1024, 256, 0, s>>>(flush, flush_bytes / 16, uint32_t(i));
    if (clean_flush) read_flush_kernel<<<1024, 256, 0, s>>>(flush, flush_bytes / 16, flush_sink);
    CHECK(cudaEventRecord(e0, s));
    fn();
    CHECK(cudaEventRecord(e1, s));
    CHECK(cudaEventSynchronize(e1));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    if (i >= 3) t.push_back(ms * 1000.0f);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return median(t);
}

uint64_t device_fnv(const void* p, int64_t bytes, uint64_t h = 1469598103934665603ull) {
  std::vector<uint8_t> host(bytes);
  CHECK(cudaMemcpy(host.data(), p, bytes, cudaMemcpyDeviceToHost));
  return fnv(host, h);
}

// The checksum of a case's outputs: x_q, then sf.
uint64_t outputs_fnv(const Buffers& b) { return device_fnv(b.sf, b.sf_bytes, device_fnv(b.x_q, b.xq_bytes)); }

// The launch of a bf16 fused op on case c's buffers (x: its input): y the residual or the up half,
// weight and bias (or null), sum the add_rms_norm sum; eps 1e-6, RMSNorm's float32 weight form, SiLU.
fp4op::cuda::FusedLaunch fused_launch(fp4op::cuda::FusedOp op, const Case& c, const Buffers& b, void* y,
                                      const void* weight, const void* bias, void* sum, int num_sms) {
  fp4op::cuda::FusedLaunch f{};
  f.op = op;
  f.input_dtype = int(InputDtype::kBFloat16);
  f.x = b.input;
  f.x_row_stride = c.k;
  f.y = y;
  f.y_row_stride = c.k;
  f.weight = weight;
  f.bias = bias;
  f.sum_out = sum;
  f.eps = 1e-6f;
  f.rms_weight = int(fp4op::fused::RmsWeight::kFloat32);
  f.activation = int(fp4op::fused::Activation::kSilu);
  f.out = launch_args(c, b, num_sms).out;
  return f;
}

// The fused ops (bf16 input, 128x4 scales) against a copy of the bytes each reads and writes.
void fused_section(const cudaDeviceProp& prop, cudaStream_t stream, bool pdl, uint4* flush, int64_t flush_bytes,
                   uint8_t* copy_src, uint8_t* copy_dst) {
  using fp4op::cuda::FusedOp;
  struct Op {
    const char* name;
    FusedOp op;
    int streams;  // [m, k] inputs read
    bool sum_out, weight, bias;
    bool input_dtype_weight;  // RMSNorm's HF Llama weight form instead of the float32 one
  };
  const Op ops[] = {{"rms_norm", FusedOp::kRmsNorm, 1, false, true, false, false},
                    {"rms_llama", FusedOp::kRmsNorm, 1, false, true, false, true},
                    {"add_rms_norm", FusedOp::kAddRmsNorm, 2, true, true, false, false},
                    {"layer_norm", FusedOp::kLayerNorm, 1, false, true, true, false},
                    {"silu_and_mul", FusedOp::kGatedActivation, 2, false, false, false, false},
                    {"silu", FusedOp::kActivation, 1, false, false, false, false}};
  std::printf("\nfused ops, bf16, 128x4 scales\n%-13s %-6s %6s %6s %9s %9s %7s %s\n", "op", "recipe", "M", "K",
              "fused us", "copy us", "%copy", "checksum");
  for (auto [m, k] : {std::pair<int64_t, int64_t>{8192, 4096}, {8192, 8192}, {8192, 16384}}) {
    for (bool mx : {false, true}) {
      for (const Op& o : ops) {
        const Case c{InputDtype::kBFloat16, mx, SfLayout::kSwizzled128x4, m, k};
        Buffers b = make_buffers(c);  // input: x (or gate)
        void *y = nullptr, *sum = nullptr, *w = nullptr;
        CHECK(cudaMalloc(&y, b.in_bytes));
        CHECK(cudaMalloc(&w, 4 * k));
        fill_kernel<<<1024, 256>>>(static_cast<uint8_t*>(y), b.in_bytes, 2);
        fill_kernel<<<64, 256>>>(static_cast<uint8_t*>(w), 4 * k, 2);  // weight, then bias
        if (o.sum_out) CHECK(cudaMalloc(&sum, b.in_bytes));
        CHECK(cudaDeviceSynchronize());
        fp4op::cuda::FusedLaunch f =
            fused_launch(o.op, c, b, y, o.weight ? w : nullptr, o.bias ? static_cast<uint8_t*>(w) + 2 * k : nullptr,
                         sum, prop.multiProcessorCount);
        if (o.input_dtype_weight) f.rms_weight = int(fp4op::fused::RmsWeight::kInputDtype);
        const fp4op::cuda::LaunchStream ls{stream, pdl};
        auto run = [&] { CHECK(fp4op::cuda::launch_fused(f, ls)); };
        const int64_t eff = b.in_bytes * (o.streams + (o.sum_out ? 1 : 0)) + b.xq_bytes + b.sf_bytes;
        auto copy = [&] { CHECK(cudaMemcpyAsync(copy_dst, copy_src, eff / 2, cudaMemcpyDeviceToDevice, stream)); };
        CHECK(cudaMemset(b.x_q, 0xAB, b.xq_bytes));
        CHECK(cudaMemset(b.sf, 0xCD, b.sf_bytes));
        CHECK(cudaDeviceSynchronize());  // the memsets run on the legacy stream, the op on `stream`
        run();
        CHECK(cudaStreamSynchronize(stream));
        uint64_t sum_hash = outputs_fnv(b);
        if (o.sum_out) sum_hash = device_fnv(sum, b.in_bytes, sum_hash);
        const float t_f = time_flushed(run, stream, flush, flush_bytes);
        const float t_c = time_flushed(copy, stream, flush, flush_bytes);
        std::printf("%-13s %-6s %6ld %6ld %9.1f %9.1f %6.1f%% %016llx\n", o.name, mx ? "mxfp4" : "nvfp4", long(m),
                    long(k), t_f, t_c, 100.0f * t_c / t_f, (unsigned long long)sum_hash);
        cudaFree(y);
        cudaFree(w);
        cudaFree(sum);
        free_buffers(b);
      }
    }
  }
}

int main(int argc, char** argv) {
  bool quick = false, pdl = true, fused_only = false, decode_only = false, quantize_only = false, once = false;
  std::vector<std::pair<int64_t, int64_t>> big_shapes;
  for (int i = 1; i < argc; ++i) {
    long m = 0, k = 0;
    if (std::strcmp(argv[i], "--big") == 0 && i + 1 < argc && std::sscanf(argv[i + 1], "%ldx%ld", &m, &k) == 2) {
      big_shapes.emplace_back(m, k);
      ++i;
      continue;
    }
    once |= std::strcmp(argv[i], "--once") == 0;
    quick |= std::strcmp(argv[i], "--quick") == 0;
    pdl &= std::strcmp(argv[i], "--no-pdl") != 0;
    fused_only |= std::strcmp(argv[i], "--fused-only") == 0;
    decode_only |= std::strcmp(argv[i], "--decode-only") == 0;
    quantize_only |= std::strcmp(argv[i], "--quantize-only") == 0;
    clean_flush |= std::strcmp(argv[i], "--clean-flush") == 0;
  }
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device %s, %d SMs, build settings: %s\n", prop.name, prop.multiProcessorCount, LAB_SETTINGS);
  const int64_t flush_bytes = int64_t(256) << 20;
  uint4* flush;
  CHECK(cudaMalloc(&flush, flush_bytes));
  CHECK(cudaMalloc(&flush_sink, sizeof(uint32_t)));
  if (clean_flush) std::printf("L2 flush: written, then read (clean lines)\n");
  uint8_t *copy_src, *copy_dst;
  const int64_t copy_max = int64_t(1) << 30;
  CHECK(cudaMalloc(&copy_src, copy_max));
  CHECK(cudaMalloc(&copy_dst, copy_max));
  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  if (!decode_only && !quantize_only) fused_section(prop, stream, pdl, flush, flush_bytes, copy_src, copy_dst);
  if (fused_only) return 0;

  std::vector<Case> cases;
  const std::vector<std::pair<int64_t, int64_t>> big =
      decode_only             ? std::vector<std::pair<int64_t, int64_t>>{}
      : !big_shapes.empty() ? big_shapes
      : quick ? std::vector<std::pair<int64_t, int64_t>>{{128, 8192}, {1024, 2048}, {8192, 4096}, {8192, 16384}}
            : std::vector<std::pair<int64_t, int64_t>>{{8192, 4096}, {8192, 8192}, {8192, 16384}, {32768, 2048},
                                                       {32768, 4096}, {32768, 16384}};
  for (auto [m, k] : big) {
    for (InputDtype d : {InputDtype::kBFloat16, InputDtype::kFloat8E4M3}) {
      for (bool mx : {false, true}) {
        for (SfLayout l : {SfLayout::kSwizzled128x4, SfLayout::kSwizzled8x4, SfLayout::kLinear}) {
          cases.push_back({d, mx, l, m, k});
        }
      }
    }
    cases.push_back({InputDtype::kFloat16, false, SfLayout::kSwizzled128x4, m, k});
  }
  std::printf("\n%-5s %-6s %-7s %6s %6s %9s %9s %7s %s\n", "dtype", "recipe", "layout", "M", "K", "fp4op us",
              "copy us", "%copy", "checksum");
  for (const Case& c : cases) {
    Buffers b = make_buffers(c);
    const auto a = launch_args(c, b, prop.multiProcessorCount);
    const fp4op::cuda::LaunchStream ls{stream, pdl};
    auto run = [&] { CHECK(fp4op::cuda::launch_quantize(a, ls)); };
    const int64_t eff = b.in_bytes + b.xq_bytes + b.sf_bytes;
    auto copy = [&] { CHECK(cudaMemcpyAsync(copy_dst, copy_src, eff / 2, cudaMemcpyDeviceToDevice, stream)); };
    CHECK(cudaMemset(b.x_q, 0xAB, b.xq_bytes));
    CHECK(cudaMemset(b.sf, 0xCD, b.sf_bytes));
    CHECK(cudaDeviceSynchronize());
    run();
    CHECK(cudaStreamSynchronize(stream));
    const uint64_t sum = outputs_fnv(b);
    const float t_q = once ? 0.0f : time_flushed(run, stream, flush, flush_bytes);
    const float t_c = once ? 0.0f : time_flushed(copy, stream, flush, flush_bytes);
    std::printf("%-5s %-6s %-7s %6ld %6ld %9.1f %9.1f %6.1f%% %016llx\n", dtype_name(c.dtype), c.mxfp4 ? "mxfp4" : "nvfp4",
                layout_name(c.layout), long(c.m), long(c.k), t_q, t_c, t_q > 0.0f ? 100.0f * t_c / t_q : 0.0f, (unsigned long long)sum);
    free_buffers(b);
  }
  if (quantize_only) return 0;

  // small M under graph replay
  float* tiny;
  CHECK(cudaMalloc(&tiny, sizeof(float)));
  const float t_empty = time_graph([&] { empty_like_add_kernel<<<1, 128, 0, stream>>>(tiny); }, stream, 50, 20);
  const fp4op::cuda::LaunchStream empty_ls{stream, pdl};
  const float t_empty_fp4op = time_graph(
      [&] { CHECK(fp4op::cuda::launch_kernel(empty_like_fp4op_kernel, dim3(1), empty_ls, tiny)); }, stream, 50, 20);
  std::printf("\ngraph replay, 50 calls: empty kernel %.2f us per call; launched like fp4op's kernels %.2f us\n",
              t_empty, t_empty_fp4op);
  {
    uint4* probe_in;
    uint2* probe_out;
    CHECK(cudaMalloc(&probe_in, 16 * 128 * 1024));
    CHECK(cudaMalloc(&probe_out, 8 * 128 * 1024));
    std::printf("load/store probe (128-thread CTAs, PDL as fp4op), us per call:");
    for (uint32_t ctas : {1u, 2u, 4u, 8u, 16u, 32u, 64u, 132u, 320u, 1024u}) {
      const float t = time_graph(
          [&] {
            CHECK(fp4op::cuda::launch_kernel_with(load_store_probe_kernel, dim3(ctas), 128, empty_ls,
                                                  static_cast<const uint4*>(probe_in), probe_out, ctas * 128));
          },
          stream, 50, 20);
      std::printf(" %u:%.2f", ctas, t);
    }
    std::printf("\n");
    cudaFree(probe_in);
    cudaFree(probe_out);
  }
  std::printf("%-5s %-6s %-7s %6s %6s %9s %7s %s\n", "dtype", "recipe", "layout", "M", "K", "us/call", "x empty",
              "checksum");
  for (int64_t m : {1, 16}) {
    for (int64_t k : {2048, 4096, 8192, 16384}) {
      for (bool mx : {false, true}) {
        for (SfLayout l : {SfLayout::kSwizzled128x4, SfLayout::kSwizzled8x4, SfLayout::kLinear}) {
          const Case c{InputDtype::kBFloat16, mx, l, m, k};
          Buffers b = make_buffers(c);
          const auto a = launch_args(c, b, prop.multiProcessorCount);
          const fp4op::cuda::LaunchStream ls{stream, pdl};
          CHECK(cudaMemset(b.sf, 0xCD, b.sf_bytes));
          CHECK(cudaDeviceSynchronize());
          const float t = time_graph([&] { CHECK(fp4op::cuda::launch_quantize(a, ls)); }, stream, 50, 20);
          std::printf("%-5s %-6s %-7s %6ld %6ld %9.2f %7.2f %016llx\n", dtype_name(c.dtype), mx ? "mxfp4" : "nvfp4",
                      layout_name(l), long(m), long(k), t, t / t_empty, (unsigned long long)outputs_fnv(b));
          free_buffers(b);
        }
      }
    }
  }
  // fused RMSNorm (weight, float32 form), add + RMSNorm, LayerNorm (weight and bias) and SiLU-and-mul at decode sizes
  // under graph replay
  std::printf("\nfused, graph replay, 50 calls (us a call; x the empty kernel)\n");
  using fp4op::cuda::FusedOp;
  for (int64_t m : {1, 4, 16, 128}) {
    for (int64_t k : {2048, 4096, 8192, 16384}) {
      for (FusedOp op : {FusedOp::kRmsNorm, FusedOp::kAddRmsNorm, FusedOp::kLayerNorm, FusedOp::kGatedActivation}) {
        const Case c{InputDtype::kBFloat16, false, SfLayout::kSwizzled128x4, m, k};
        Buffers b = make_buffers(c);
        void *y = nullptr, *w = nullptr, *sum = nullptr;
        CHECK(cudaMalloc(&y, b.in_bytes));
        CHECK(cudaMalloc(&w, 4 * k));
        if (op == FusedOp::kAddRmsNorm) CHECK(cudaMalloc(&sum, b.in_bytes));
        fill_kernel<<<64, 256>>>(static_cast<uint8_t*>(y), b.in_bytes, 2);
        fill_kernel<<<64, 256>>>(static_cast<uint8_t*>(w), 4 * k, 2);  // weight, then bias
        CHECK(cudaDeviceSynchronize());
        const bool gated = op == FusedOp::kGatedActivation;
        const fp4op::cuda::FusedLaunch f =
            fused_launch(op, c, b, y, gated ? nullptr : w,
                         op == FusedOp::kLayerNorm ? static_cast<uint8_t*>(w) + 2 * k : nullptr, sum,
                         prop.multiProcessorCount);
        const fp4op::cuda::LaunchStream ls{stream, pdl};
        const float t = time_graph([&] { CHECK(fp4op::cuda::launch_fused(f, ls)); }, stream, 50, 20);
        const char* name = gated                          ? "silu_and_mul"
                           : op == FusedOp::kLayerNorm    ? "layer_norm"
                           : op == FusedOp::kAddRmsNorm   ? "add_rms_norm"
                                                          : "rms_norm";
        std::printf("%-13s nvfp4  128x4 %6ld %6ld %9.2f %7.2f %016llx\n", name, long(m), long(k), t, t / t_empty,
                    (unsigned long long)outputs_fnv(b));
        cudaFree(y);
        cudaFree(w);
        cudaFree(sum);
        free_buffers(b);
      }
    }
  }
  return 0;
}
