// Autograd kernels of the fp4op ops. The quantized outputs are integer codes and scales, which carry no
// gradient. The floating outputs differentiate as their formulas do: add_rms_norm_quantize's next
// residual x + residual passes the gradient to both inputs unchanged (so a fused graph differentiates as
// the unfused one does), and NVFP4 dequantize's values e2m1(q) * sf_dec / S in the global scale (a
// learned scale), and the *_with_normed norm outputs and rms_norm_add_quantize's residual + norm output as
// the eager computations they equal (NormOutputBackward). Nothing else is differentiable.
// In C++ rather than torch.library.register_autograd: a Python autograd kernel runs on every call, grad
// mode or not (no_grad included), and cost each quantize about 10 us of host time.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <string>
#include <type_traits>
#include <vector>

namespace fp4op {
namespace {

using torch::autograd::Node;
using torch::autograd::variable_list;

// Autograd nodes are held by std::shared_ptr up to some torch versions and by c10::intrusive_ptr after.
using NodePtr = decltype(torch::autograd::Edge::function);

template <typename T, typename... Args>
NodePtr make_node(Args&&... args) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<Node>>) {
    return std::make_shared<T>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  }
}

// The gradient of x + residual (also of vLLM's float32 sum rounded back, whose casts are exact in the
// backward direction) for its two inputs: the incoming gradient itself.
struct ResidualSumBackward : public Node {
  explicit ResidualSumBackward(torch::autograd::edge_list&& next_edges) : Node(std::move(next_edges)) {}
  variable_list apply(variable_list&& grads) override { return {grads[0], grads[0]}; }
  std::string name() const override { return "fp4op::ResidualSumBackward"; }
};

// NVFP4 dequantize, out = c / S with S the global scale gs (or 1 / gs when inversed), in gs: d out / d gs
// = -out / gs (out / gs inversed), summed over each row's values for a per-row scale and over all for
// one scale, in float32, returned in gs's dtype. The output and gs are kept as detached aliases (the
// output's own grad_fn holding it would be a reference cycle), with their versions checked.
struct DequantizeBackward : public Node {
  DequantizeBackward(torch::autograd::edge_list&& next_edges, const at::Tensor& out, const at::Tensor& gs,
                     bool inversed)
      : Node(std::move(next_edges)),
        out_(out.detach()),
        gs_(gs.detach()),
        out_version_(out._version()),
        gs_version_(gs._version()),
        inversed_(inversed) {}
  variable_list apply(variable_list&& grads) override {
    if (!grads[0].defined()) return {at::Tensor()};
    TORCH_CHECK(out_._version() == out_version_ && gs_._version() == gs_version_,
                "fp4op.dequantize: its output or global_scale was modified in place before the backward, "
                "which needs their values");
    // the products summed per scale value: the values grouped by gs's elements (all of them for one
    // scale, a row each for a per-row scale); sizes as SymInts, as AOTAutograd traces this with dynamic
    // shapes
    if (!gs_.unsafeGetTensorImpl()->has_symbolic_sizes_strides() && gs_.numel() == 0) {
      return {at::zeros_like(gs_)};  // a per-row scale of no rows (the reshape below cannot infer -1)
    }
    const at::Tensor products = grads[0].to(at::kFloat).mul(out_.to(at::kFloat));
    const at::Tensor per_scale = products.reshape_symint({gs_.sym_numel(), -1}).sum(-1);
    const at::Tensor grad = per_scale.div(gs_.to(at::kFloat).reshape({-1}));
    return {(inversed_ ? grad : grad.neg()).reshape_symint(gs_.sym_sizes()).to(gs_.scalar_type())};
  }
  std::string name() const override { return "fp4op::DequantizeBackward"; }

 private:
  at::Tensor out_, gs_;
  int64_t out_version_, gs_version_;
  bool inversed_;
};

// The op's arguments on the stack (its first argument; the rest follow).
torch::jit::Stack::iterator arguments(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  return stack->end() - int64_t(op.schema().arguments().size());
}

void run_below_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

// The ops whose outputs are all integer codes and scales: nothing to record.
void codes_only(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  run_below_autograd(op, keys, stack);
}

// add_rms_norm_quantize(x, residual, ...) -> (x_q, sf, next residual): only the next residual, x +
// residual, is differentiable, in x and residual.
void residual_sum_differentiable(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto args = arguments(op, stack);
  const at::Tensor x = args[0].toTensor(), residual = args[1].toTensor();
  const bool track = at::GradMode::is_enabled() && (x.requires_grad() || residual.requires_grad());
  run_below_autograd(op, keys, stack);
  if (!track) return;
  const NodePtr node = make_node<ResidualSumBackward>(torch::autograd::collect_next_edges(x, residual));
  torch::autograd::set_history(stack->back().toTensor(), node);
}

// The eager computation a *_with_normed op's norm output equals (fp4op/fused_ops.py), in ATen ops, for
// its gradient: of x, residual (add_rms_norm), weight and bias (layer_norm), undefined where absent.
struct EagerNorm {
  bool layer_norm = false;
  bool residual = false;
  bool sum_in_float32 = false;
  bool weight_in_input_dtype = false;
  double eps = 0.0;
  at::Tensor eps_tensor;  // the *_eps_tensor ops' eps (read in the backward's arithmetic, never by .item())
  double weight_offset = 0.0;
  bool add_after = false;  // rms_norm_add_quantize: r + the norm of x

  at::Tensor operator()(const at::Tensor& x, const at::Tensor& r, const at::Tensor& w, const at::Tensor& b) const {
    return add_after ? r + norm(x, r, w, b) : norm(x, r, w, b);
  }

  at::Tensor norm(const at::Tensor& x, const at::Tensor& r, const at::Tensor& w, const at::Tensor& b) const {
    const int64_t k = x.size(-1);
    if (layer_norm) return at::layer_norm(x, {k}, w, b, eps);
    at::Tensor h = !residual ? x.to(at::kFloat)
                   : sum_in_float32 ? x.to(at::kFloat) + r.to(at::kFloat)
                                    : (x + r).to(at::kFloat);
    // eps in float32 as the eager forms add it
    const at::Tensor var = h.pow(2).mean(-1, /*keepdim=*/true);
    h = h * at::rsqrt(eps_tensor.defined() ? var + eps_tensor.to(at::kFloat) : var + float(eps));
    if (!w.defined()) return h.to(x.scalar_type());
    if (weight_in_input_dtype) return (w.to(at::kFloat) + weight_offset).to(x.scalar_type()) * h.to(x.scalar_type());
    return (h * (w.to(at::kFloat) + weight_offset)).to(x.scalar_type());
  }
};

// The norm output's gradient: the eager norm recomputed under autograd from the saved inputs, then
// differentiated. Inputs are kept as detached aliases with their versions checked, as DequantizeBackward.
struct NormOutputBackward : public Node {
  NormOutputBackward(torch::autograd::edge_list&& next_edges, EagerNorm norm, std::vector<at::Tensor> inputs)
      : Node(std::move(next_edges)), norm_(norm) {
    for (const at::Tensor& t : inputs) {
      inputs_.push_back(t.defined() ? t.detach() : at::Tensor());
      versions_.push_back(t.defined() ? t._version() : 0);
    }
  }
  variable_list apply(variable_list&& grads) override {
    variable_list out(inputs_.size());
    if (!grads[0].defined()) return out;
    for (size_t i = 0; i < inputs_.size(); ++i) {
      TORCH_CHECK(!inputs_[i].defined() || inputs_[i]._version() == versions_[i],
                  "fp4op: an input of a fused norm op was modified in place before the backward, which needs it");
    }
    at::AutoGradMode grad_mode(true);
    std::vector<at::Tensor> leaves;
    variable_list wanted;
    for (size_t i = 0; i < inputs_.size(); ++i) {
      leaves.push_back(inputs_[i].defined() ? inputs_[i].detach().requires_grad_(should_compute_output(i))
                                            : at::Tensor());
      if (leaves.back().defined() && should_compute_output(i)) wanted.push_back(leaves.back());
    }
    if (wanted.empty()) return out;
    const at::Tensor y = norm_(leaves[0], leaves[1], leaves[2], leaves[3]);
    const variable_list g = torch::autograd::grad({y}, wanted, {grads[0]}, /*retain_graph=*/false,
                                                  /*create_graph=*/false, /*allow_unused=*/true);
    for (size_t i = 0, j = 0; i < inputs_.size(); ++i) {
      if (leaves[i].defined() && should_compute_output(i)) out[i] = g[j++];
    }
    return out;
  }
  std::string name() const override { return "fp4op::NormOutputBackward"; }

 private:
  EagerNorm norm_;
  std::vector<at::Tensor> inputs_;
  std::vector<int64_t> versions_;
};

// The *_with_normed norms (x, [residual,] weight, [bias,] eps, ...) -> (x_q, sf, [next residual,] norm
// output): the norm output differentiates as the eager norm (NormOutputBackward), the next residual as in
// add_rms_norm_quantize. Also rms_norm_add_quantize (x, residual, ...) -> (x_q, sf, residual + norm
// output): that sum as the eager residual + norm (NormOutputBackward).
void normed_differentiable(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto args = arguments(op, stack);
  const auto& schema = op.schema().arguments();
  EagerNorm norm;
  at::Tensor x, residual, weight, bias;
  for (size_t i = 0; i < schema.size(); ++i) {
    const std::string& name = schema[i].name();
    const c10::IValue& v = args[i];
    auto tensor = [&] { return v.isTensor() ? v.toTensor() : at::Tensor(); };
    if (name == "x") x = tensor();
    if (name == "residual") residual = tensor();
    if (name == "weight") weight = tensor();
    if (name == "bias") bias = tensor();
    if (name == "eps" && v.isTensor()) norm.eps_tensor = v.toTensor().detach();
    if (name == "eps" && !v.isTensor()) norm.eps = v.toDouble();
    if (name == "weight_offset") norm.weight_offset = v.toDouble();
    if (name == "weight_in_input_dtype") norm.weight_in_input_dtype = v.toBool();
    if (name == "sum_in_float32") norm.sum_in_float32 = v.toBool();
  }
  norm.layer_norm = op.schema().name() == "fp4op::layer_norm_quantize_with_normed";
  norm.add_after = op.schema().name().rfind("fp4op::rms_norm_add_quantize", 0) == 0;
  norm.residual = residual.defined() && !norm.add_after;
  const std::vector<at::Tensor> inputs{x, residual, weight, bias};
  bool track = false;
  for (const at::Tensor& t : inputs) track = track || (t.defined() && t.requires_grad());
  track = track && at::GradMode::is_enabled();
  run_below_autograd(op, keys, stack);
  if (!track) return;
  const size_t outputs = op.schema().returns().size();
  const at::Tensor normed = (stack->end() - 1)->toTensor();
  torch::autograd::set_history(normed, make_node<NormOutputBackward>(
                                           torch::autograd::collect_next_edges(x, residual, weight, bias), norm, inputs));
  if (norm.residual) {  // the next residual, output 2 of 4
    torch::autograd::set_history((stack->end() - int64_t(outputs) + 2)->toTensor(),
                                 make_node<ResidualSumBackward>(torch::autograd::collect_next_edges(x, residual)));
  }
}

// dequantize(x_q, sf, global_scale, sf_vec_size, sf_use_ue8m0, ..., is_global_scale_inversed, ...): x_q
// and sf are integer tensors; NVFP4 values differentiate in global_scale (DequantizeBackward), MXFP4
// values do not depend on it.
void dequantize_differentiable(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto args = arguments(op, stack);
  const at::Tensor gs = args[2].isTensor() ? args[2].toTensor() : at::Tensor();
  const bool ue8m0 = args[4].toBool(), inversed = args[7].toBool();
  const bool track = at::GradMode::is_enabled() && gs.defined() && gs.requires_grad() && !ue8m0;
  run_below_autograd(op, keys, stack);
  if (!track) return;
  const at::Tensor out = stack->back().toTensor();
  const NodePtr node = make_node<DequantizeBackward>(torch::autograd::collect_next_edges(gs), out, gs, inversed);
  torch::autograd::set_history(out, node);
}

}  // namespace

TORCH_LIBRARY_IMPL(fp4op, Autograd, m) {
  for (const char* name :
       {"quantize", "rms_norm_quantize", "rms_norm_quantize_eps_tensor", "layer_norm_quantize", "layer_norm_modulate_quantize",
        "silu_and_mul_quantize", "gelu_and_mul_quantize", "gelu_new_and_mul_quantize", "relu_and_mul_quantize",
        "silu_quantize", "gelu_quantize", "gelu_new_quantize", "sigmoid_mul_quantize", "relu_quantize"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&codes_only>());
  }
  m.impl("dequantize", torch::CppFunction::makeFromBoxedFunction<&dequantize_differentiable>());
  for (const char* name : {"add_rms_norm_quantize", "add_rms_norm_quantize_eps_tensor"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&residual_sum_differentiable>());
  }
  for (const char* name : {"rms_norm_quantize_with_normed", "rms_norm_quantize_with_normed_eps_tensor",
                           "layer_norm_quantize_with_normed", "add_rms_norm_quantize_with_normed",
                           "add_rms_norm_quantize_with_normed_eps_tensor", "rms_norm_add_quantize",
                           "rms_norm_add_quantize_eps_tensor"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&normed_differentiable>());
  }
}

}  // namespace fp4op
