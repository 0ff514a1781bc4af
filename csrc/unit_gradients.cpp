// The autograd node of the Triton kernels' eager sum / mean steps
// (kernels/logitnorm.py, kernels/elogitnorm.py). Its kernels reduce the loss and, in the same
// forward, write each input's gradient for an upstream gradient of one; the loss is linear in
// its upstream gradient g, so the backward is those gradients times g. Here that backward is
// C++: autograd runs it on its device thread without Python (no GIL, no Python frames, no
// kernel launch through triton's launcher), which matters in a host-bound step.
// Device-agnostic: one multiply per gradient (a foreach multiply when both inputs get one and
// no target is given), any device.
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "first_derivative.h"

TORCH_LIBRARY_FRAGMENT(elogitnorm_fast, m) {
  // Returns `loss` itself as the node's output (not a view); its backward gives `logits` the gradient
  // `logits_grad * g` and `weight` the gradient `(weight_grad * g).to(weight.dtype)`, where
  // g is the loss's upstream gradient (`loss` must be 0-d). An absent gradient gives none.
  // `backend` and `loss_name` name the refusal of create_graph=True. With `target` (N,), the
  // rows where `target == ignore_index` get 0 whatever g is (a NaN / inf upstream gradient
  // included, as F.cross_entropy's backward): g is masked per row, an (N, 1) factor of the same
  // single multiply, and the weight's factor is 0 when no row is valid.
  m.def(
      "unit_gradient_node(Tensor loss, Tensor? logits, Tensor? weight, Tensor? logits_grad, "
      "Tensor? weight_grad, str backend, str loss_name, Tensor? target=None, "
      "int ignore_index=-100) -> Tensor");
}

namespace elogitnorm_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;
using OptionalTensor = std::optional<Tensor>;

class UnitGradientNode : public torch::autograd::Function<UnitGradientNode> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& loss, const OptionalTensor& logits,
                        const OptionalTensor& weight, const OptionalTensor& logits_grad,
                        const OptionalTensor& weight_grad, c10::string_view backend,
                        c10::string_view loss_name, const OptionalTensor& target,
                        int64_t ignore_index) {
    TORCH_CHECK(loss.dim() == 0, "unit_gradient_node: loss must be 0-d, got shape ",
                loss.sizes());
    ctx->save_for_backward({logits_grad.value_or(Tensor()), weight_grad.value_or(Tensor()),
                            target.value_or(Tensor())});
    ctx->saved_data["ignore_index"] = ignore_index;
    if (weight.has_value() && weight->defined()) {
      ctx->saved_data["weight_dtype"] = static_cast<int64_t>(weight->scalar_type());
    }
    ctx->saved_data["backend"] = std::string(backend);
    ctx->saved_data["loss_name"] = std::string(loss_name);
    // Marked as modified, the input comes back as this node's output itself; a returned input
    // would otherwise be a view, on which autograd refuses in-place ops (`loss /= steps`).
    ctx->mark_dirty({loss});
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_first_derivative(ctx->saved_data["backend"].toStringRef(),
                           ctx->saved_data["loss_name"].toStringRef());
    variable_list out(9);
    const Tensor& upstream = grads[0];
    if (!upstream.defined()) return out;
    const variable_list saved = ctx->get_saved_variables();
    const bool logits_wanted = saved[0].defined() && ctx->needs_input_grad(1);
    const bool weight_wanted = saved[1].defined() && ctx->needs_input_grad(2);
    if (saved[2].defined()) {
      // Ignored rows get 0 even for a NaN / inf upstream gradient (not 0 x NaN).
      const Tensor valid = saved[2].ne(ctx->saved_data["ignore_index"].toInt());
      if (logits_wanted) {
        // Into the gradient's dtype, computed in fp32 as the 0-d multiply below is.
        out[1] = at::empty_like(saved[0]);
        at::mul_out(out[1], saved[0], at::where(valid.unsqueeze(1), upstream, 0));
      }
      if (weight_wanted) {
        out[2] = saved[1].mul(at::where(valid.any(), upstream, 0));
      }
    } else if (logits_wanted && weight_wanted) {
      // One foreach multiply for both: on CUDA one multi-tensor launch where they share a dtype
      // (two elementwise ops' host work otherwise, the larger part of this backward's own
      // cost in a host-bound step); the same IEEE products as two multiplies.
      const std::vector<Tensor> products = at::_foreach_mul({saved[0], saved[1]}, upstream);
      out[1] = products[0];
      out[2] = products[1];
    } else if (logits_wanted) {
      out[1] = saved[0].mul(upstream);
    } else if (weight_wanted) {
      out[2] = saved[1].mul(upstream);
    }
    if (out[2].defined()) {
      out[2] = out[2].to(static_cast<at::ScalarType>(ctx->saved_data["weight_dtype"].toInt()));
    }
    return out;
  }
};

Tensor unit_gradient_node_autograd(const Tensor& loss, const OptionalTensor& logits,
                                   const OptionalTensor& weight, const OptionalTensor& logits_grad,
                                   const OptionalTensor& weight_grad, c10::string_view backend,
                                   c10::string_view loss_name, const OptionalTensor& target,
                                   int64_t ignore_index) {
  return UnitGradientNode::apply(loss, logits, weight, logits_grad, weight_grad, backend,
                                 loss_name, target, ignore_index);
}

// Below autograd (inference mode, meta tensors): the loss itself, as a view.
Tensor unit_gradient_node_plain(const Tensor& loss, const OptionalTensor&, const OptionalTensor&,
                                const OptionalTensor&, const OptionalTensor&, c10::string_view,
                                c10::string_view, const OptionalTensor&, int64_t) {
  return loss.alias();
}

}  // namespace
}  // namespace elogitnorm_fast

TORCH_LIBRARY_IMPL(elogitnorm_fast, Autograd, m) {
  m.impl("unit_gradient_node", &elogitnorm_fast::unit_gradient_node_autograd);
}

TORCH_LIBRARY_IMPL(elogitnorm_fast, CompositeExplicitAutograd, m) {
  m.impl("unit_gradient_node", &elogitnorm_fast::unit_gradient_node_plain);
}
