// Autograd kernels of the fp4op ops: none is differentiable. Each call runs the op below autograd and,
// when grad mode is on and an input requires grad, gives its floating outputs (dequantize's values,
// add_rms_norm_quantize's next residual) a grad_fn that raises a clear error if a backward reaches it.
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

// Autograd nodes are held by std::shared_ptr up to some torch versions and by c10::intrusive_ptr after.
using NodePtr = decltype(torch::autograd::Edge::function);

template <typename Ptr>
Ptr make_error_node(std::string message, torch::autograd::edge_list edges) {
  if constexpr (std::is_same_v<Ptr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<torch::autograd::Error>(std::move(message), std::move(edges));
  } else {
    return c10::make_intrusive<torch::autograd::Error>(std::move(message), std::move(edges));
  }
}

void not_differentiable(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const size_t num_arguments = schema.arguments().size();
  std::vector<at::Tensor> requiring_grad;
  if (at::GradMode::is_enabled()) {
    for (auto it = stack->end() - int64_t(num_arguments); it != stack->end(); ++it) {
      if (it->isTensor() && it->toTensor().defined() && it->toTensor().requires_grad()) {
        requiring_grad.push_back(it->toTensor());
      }
    }
  }
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  if (requiring_grad.empty()) return;
  const std::string message = "fp4op." + schema.name().substr(schema.name().find("::") + 2) +
                              " is not differentiable: quantization has no useful gradient. For "
                              "quantization-aware training, use a straight-through estimator around the op "
                              "explicitly.";
  const NodePtr node = make_error_node<NodePtr>(message, torch::autograd::collect_next_edges(requiring_grad));
  const size_t num_returns = schema.returns().size();
  for (auto it = stack->end() - int64_t(num_returns); it != stack->end(); ++it) {
    if (!it->isTensor()) continue;
    at::Tensor output = it->toTensor();
    if (output.defined() && torch::autograd::isDifferentiableType(output.scalar_type())) {
      torch::autograd::set_history(output, node);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fp4op, Autograd, m) {
  for (const char* name :
       {"quantize", "dequantize", "rms_norm_quantize", "add_rms_norm_quantize", "rms_norm_quantize_eps_tensor",
        "add_rms_norm_quantize_eps_tensor", "layer_norm_quantize", "silu_and_mul_quantize", "gelu_and_mul_quantize",
        "silu_quantize", "gelu_quantize", "gelu_new_quantize", "relu_quantize"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&not_differentiable>());
  }
}

}  // namespace fp4op
