// Schemas of the fused "norm/activation + FP4 quantize" ops (issue 4). Each returns (x_q, sf) exactly
// as fp4op::quantize of the norm/activation output computed in the input's dtype; add_rms_norm_quantize
// also returns x + residual (the next residual), the *_with_normed norms the norm output. Kernels:
// csrc/cpu/fused.cpp, csrc/cuda/fused_cuda.cpp (the norm ops' entry points of both: csrc/norm_ops.h);
// fakes: fp4op/fused_ops.py; autograd: csrc/autograd.cpp.
#include <torch/library.h>

// The quantize arguments, as in fp4op::quantize, except that global_scale defaults to None: it follows
// arguments with defaults in some schemas (and MXFP4 ignores it).
#define FP4OP_QUANTIZE_ARGS                                                                     \
  "Tensor? global_scale=None, int sf_vec_size=16, bool sf_use_ue8m0=False, "                        \
  "bool is_sf_swizzled_layout=True, bool is_sf_8x4_layout=False, bool is_global_scale_inversed=False"

TORCH_LIBRARY_FRAGMENT(fp4op, m) {
  m.def("rms_norm_quantize(Tensor x, Tensor? weight, float eps, float weight_offset=0.0, "
        "bool weight_in_input_dtype=False, " FP4OP_QUANTIZE_ARGS ") -> (Tensor, Tensor)");
  // sum_in_float32 (last, so that the positional calls above it keep their meaning): vLLM's form, the
  // sum x + residual in float32 normalized as it is, the next residual its rounding to the input dtype
  m.def("add_rms_norm_quantize(Tensor x, Tensor residual, Tensor? weight, float eps, float weight_offset=0.0, "
        "bool weight_in_input_dtype=False, " FP4OP_QUANTIZE_ARGS ", bool sum_in_float32=False) -> "
        "(Tensor, Tensor, Tensor)");
  // eps as a one-element tensor: under torch.compile(dynamic=True) Dynamo passes a module's float eps
  // attribute used in tensor arithmetic (`variance + self.variance_epsilon`) as a 0-d tensor graph input
  m.def("rms_norm_quantize_eps_tensor(Tensor x, Tensor? weight, Tensor eps, float weight_offset=0.0, "
        "bool weight_in_input_dtype=False, " FP4OP_QUANTIZE_ARGS ") -> (Tensor, Tensor)");
  m.def("add_rms_norm_quantize_eps_tensor(Tensor x, Tensor residual, Tensor? weight, Tensor eps, "
        "float weight_offset=0.0, bool weight_in_input_dtype=False, " FP4OP_QUANTIZE_ARGS
        ", bool sum_in_float32=False) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_quantize(Tensor x, Tensor? weight, Tensor? bias, float eps, " FP4OP_QUANTIZE_ARGS
        ") -> (Tensor, Tensor)");
  // The norms that also return their output (x_q, sf, normed): normed is the norm's output in x's dtype,
  // contiguous, exactly what the op quantizes; for a norm output the model also reads elsewhere (post-LN
  // residual streams, MoE routers), so that the fused op replaces the norm instead of leaving it.
  m.def("rms_norm_quantize_with_normed(Tensor x, Tensor? weight, float eps, float weight_offset=0.0, "
        "bool weight_in_input_dtype=False, " FP4OP_QUANTIZE_ARGS ") -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_quantize_with_normed_eps_tensor(Tensor x, Tensor? weight, Tensor eps, float weight_offset=0.0, "
        "bool weight_in_input_dtype=False, " FP4OP_QUANTIZE_ARGS ") -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_quantize_with_normed(Tensor x, Tensor? weight, Tensor? bias, float eps, " FP4OP_QUANTIZE_ARGS
        ") -> (Tensor, Tensor, Tensor)");
  // (x_q, sf, next residual, normed): the residual add + RMSNorm whose norm output is also read elsewhere (an
  // MoE router's gate quantized, the experts reading the rows)
  m.def("add_rms_norm_quantize_with_normed(Tensor x, Tensor residual, Tensor? weight, float eps, "
        "float weight_offset=0.0, bool weight_in_input_dtype=False, " FP4OP_QUANTIZE_ARGS
        ", bool sum_in_float32=False) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("add_rms_norm_quantize_with_normed_eps_tensor(Tensor x, Tensor residual, Tensor? weight, Tensor eps, "
        "float weight_offset=0.0, bool weight_in_input_dtype=False, " FP4OP_QUANTIZE_ARGS
        ", bool sum_in_float32=False) -> (Tensor, Tensor, Tensor, Tensor)");
  // residual + rms_norm(x), each rounded to x's dtype as eager rounds them, quantized: (x_q, sf, that sum). The
  // post-norm residual stream (OLMo2: `h = residual + post_norm(x)`, then h feeds the next projections and the
  // next residual add)
  m.def("rms_norm_add_quantize(Tensor x, Tensor residual, Tensor? weight, float eps, float weight_offset=0.0, "
        "bool weight_in_input_dtype=False, " FP4OP_QUANTIZE_ARGS ") -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_add_quantize_eps_tensor(Tensor x, Tensor residual, Tensor? weight, Tensor eps, "
        "float weight_offset=0.0, bool weight_in_input_dtype=False, " FP4OP_QUANTIZE_ARGS
        ") -> (Tensor, Tensor, Tensor)");
  // layer_norm(x) * multiplier + shift, each op rounded to x's dtype as eager rounds it, quantized: the adaLN
  // modulation of diffusion transformers (DiT, PixArt, SD3, FLUX: `norm(x) * (1 + scale[:, None]) +
  // shift[:, None]`, multiplier = 1 + scale). multiplier and shift broadcast to x per sample: shape
  // [*x.shape[:j], 1, ..., 1, K] for some j, e.g. [B, 1, K] (or [B, K] unsqueezed) for x [B, T, K]
  m.def("layer_norm_modulate_quantize(Tensor x, Tensor? weight, Tensor? bias, float eps, Tensor multiplier, "
        "Tensor shift, " FP4OP_QUANTIZE_ARGS ") -> (Tensor, Tensor)");
  m.def("silu_and_mul_quantize(Tensor gate, Tensor up, " FP4OP_QUANTIZE_ARGS ") -> (Tensor, Tensor)");
  m.def("gelu_and_mul_quantize(Tensor gate, Tensor up, str approximate=\"none\", " FP4OP_QUANTIZE_ARGS
        ") -> (Tensor, Tensor)");
  // gelu_new(gate) * up (T5 v1.1 / Flan-T5's gated-gelu) and F.relu(gate) * up (or squared) * up
  m.def("gelu_new_and_mul_quantize(Tensor gate, Tensor up, " FP4OP_QUANTIZE_ARGS
        ", Tensor? sqrt_2_over_pi=None) -> (Tensor, Tensor)");
  m.def("relu_and_mul_quantize(Tensor gate, Tensor up, bool squared=False, " FP4OP_QUANTIZE_ARGS
        ") -> (Tensor, Tensor)");
  m.def("silu_quantize(Tensor x, " FP4OP_QUANTIZE_ARGS ") -> (Tensor, Tensor)");
  m.def("gelu_quantize(Tensor x, str approximate=\"none\", " FP4OP_QUANTIZE_ARGS ") -> (Tensor, Tensor)");
  // Hugging Face's gelu_new (GPT-2): the tanh GELU written out, each op rounded to the model dtype as eager.
  // sqrt_2_over_pi: its factor math.sqrt(2.0 / math.pi) as a one-element tensor (torch.compile(dynamic=True)
  // lifts math.pi into a graph input and computes the factor in the graph); None: that constant.
  m.def("gelu_new_quantize(Tensor x, " FP4OP_QUANTIZE_ARGS ", Tensor? sqrt_2_over_pi=None) -> (Tensor, Tensor)");
  // x * torch.sigmoid(alpha * x), each op rounded as eager: QuickGELU (CLIP, OpenCLIP; alpha=1.702) and
  // SiLU written out (`x * torch.sigmoid(x)`, alpha=1.0), which eager rounds twice where F.silu rounds once
  m.def("sigmoid_mul_quantize(Tensor x, float alpha=1.0, " FP4OP_QUANTIZE_ARGS ") -> (Tensor, Tensor)");
  // F.relu(x), or with `squared` F.relu(x) ** 2 (the squared ReLU of Primer / Nemotron / modded-nanogpt)
  m.def("relu_quantize(Tensor x, bool squared=False, " FP4OP_QUANTIZE_ARGS ") -> (Tensor, Tensor)");
}
