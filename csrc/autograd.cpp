// Autograd kernels of the fp4op ops. The quantized outputs are integer codes and scales, which carry no
// gradient. The one floating output that a model computes anyway, add_rms_norm_quantize's next residual
// x + residual, gets the add's gradient (both inputs receive it unchanged), so a fused graph
// differentiates as the unfused one does. dequantize's values, the only other floating output, get a
// grad_fn that raises a clear error if a backward reaches it.
// In C++ rather than torch.library.register_autograd: a Python autograd kernel runs on every call, grad
// mode or not (no_grad included), and cost each quantize about 10 us of host time.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
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

// The op's tensor arguments that require grad (none outside grad mode).
std::vector<at::Tensor> requiring_grad(const torch::jit::Stack& stack, size_t num_arguments) {
  std::vector<at::Tensor> tensors;
  if (!at::GradMode::is_enabled()) return tensors;
  for (auto it = stack.end() - int64_t(num_arguments); it != stack.end(); ++it) {
    if (it->isTensor() && it->toTensor().defined() && it->toTensor().requires_grad()) {
      tensors.push_back(it->toTensor());
    }
  }
  return tensors;
}

void run_below_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

void not_differentiable(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const std::vector<at::Tensor> inputs = requiring_grad(*stack, schema.arguments().size());
  run_below_autograd(op, keys, stack);
  if (inputs.empty()) return;
  const std::string message = "fp4op." + schema.name().substr(schema.name().find("::") + 2) +
                              " is not differentiable: quantization has no useful gradient. For "
                              "quantization-aware training, use a straight-through estimator around the op "
                              "explicitly.";
  const NodePtr node = make_node<torch::autograd::Error>(message, torch::autograd::collect_next_edges(inputs));
  const size_t num_returns = schema.returns().size();
  for (auto it = stack->end() - int64_t(num_returns); it != stack->end(); ++it) {
    if (!it->isTensor()) continue;
    at::Tensor output = it->toTensor();
    if (output.defined() && torch::autograd::isDifferentiableType(output.scalar_type())) {
      torch::autograd::set_history(output, node);
    }
  }
}

// add_rms_norm_quantize(x, residual, ...) -> (x_q, sf, next residual): only the next residual, x +
// residual, is differentiable, in x and residual.
void residual_sum_differentiable(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const size_t num_arguments = op.schema().arguments().size();
  const auto args = stack->end() - int64_t(num_arguments);
  const at::Tensor x = args[0].toTensor(), residual = args[1].toTensor();
  const bool track = at::GradMode::is_enabled() && (x.requires_grad() || residual.requires_grad());
  run_below_autograd(op, keys, stack);
  if (!track) return;
  const NodePtr node = make_node<ResidualSumBackward>(torch::autograd::collect_next_edges(x, residual));
  torch::autograd::set_history(stack->back().toTensor(), node);
}

}  // namespace

TORCH_LIBRARY_IMPL(fp4op, Autograd, m) {
  for (const char* name :
       {"quantize", "dequantize", "rms_norm_quantize", "rms_norm_quantize_eps_tensor", "layer_norm_quantize",
        "silu_and_mul_quantize", "gelu_and_mul_quantize", "silu_quantize", "gelu_quantize", "gelu_new_quantize",
        "relu_quantize"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&not_differentiable>());
  }
  for (const char* name : {"add_rms_norm_quantize", "add_rms_norm_quantize_eps_tensor"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&residual_sum_differentiable>());
  }
}

}  // namespace fp4op
