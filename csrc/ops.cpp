// The loss ops: schemas (declared once, here), and their autograd, which is the same for every
// device. Device kernels are registered with TORCH_LIBRARY_IMPL in csrc/cpu/*_loss.cpp and
// csrc/cuda_loss_binding.cpp; the fake (meta) kernels live in Python
// (elogitnorm_fast/backends/compiled.py), which set_python_module names so that
// torch.compile finds them even before that module is imported.
//
// Forward ops compute the loss and, when asked, its gradient for an upstream gradient of one per
// valid row ("unit" gradient, docs/design.md); the backward ops rescale it by the real
// upstream gradient and run the weight-gradient GEMMs. So a training step is one op per
// direction. The autograd glue is in C++ rather than torch.library.register_autograd to keep
// Python out of the step's host time; the backward is still a registered op (fake kernel
// included), so torch.compile and opcheck see both directions. Other files add their own ops
// with TORCH_LIBRARY_FRAGMENT.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "first_derivative.h"

TORCH_LIBRARY(elogitnorm_fast, m) {
  m.set_python_module("elogitnorm_fast.backends.compiled");
  // Outputs: loss (logits dtype; () or (N,)), grad_unit (N, C) accumulation dtype or (0,),
  // scale_grad (N,) or (0,), sample_slot (N,) int64 (distance row of each sample, -1 = ignored;
  // the kernels keep each row's logit rescale exponent in its high bits),
  // row_class (R,) int64 (class of each distance row, -1 = unused) or (0,), distances (R, C) or
  // (0, C), valid_count () accumulation dtype. R = min(N, C); the last three and scale_grad are
  // only filled when need_weight_grad.
  m.def(
      "elogitnorm_forward(Tensor logits, Tensor weight, Tensor target, str reduction, "
      "int ignore_index, float eps, float divisor, bool need_logits_grad, "
      "bool need_weight_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Outputs: grad_logits (logits dtype, or (0,) when not needed), grad_weight (weight dtype, or
  // (0,) when not needed).
  m.def(
      "elogitnorm_backward(Tensor grad_output, Tensor logits, Tensor weight, Tensor grad_unit, "
      "Tensor scale_grad, Tensor sample_slot, Tensor row_class, Tensor distances, "
      "Tensor valid_count, str reduction, float eps, bool need_logits_grad, "
      "bool need_weight_grad) -> (Tensor, Tensor)");
  // Outputs: loss, grad_unit (N, C) accumulation dtype or (0,), valid_count ().
  m.def(
      "logitnorm_forward(Tensor logits, Tensor target, float tau, str reduction, "
      "int ignore_index, bool need_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "logitnorm_backward(Tensor grad_output, Tensor logits, Tensor target, Tensor grad_unit, "
      "Tensor valid_count, str reduction, int ignore_index) -> Tensor");
}

namespace elogitnorm_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;
using ELogitNormOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

ELogitNormOutputs call_elogitnorm_forward(const Tensor& logits, const Tensor& weight,
                                          const Tensor& target, c10::string_view reduction,
                                          int64_t ignore_index, double eps, double divisor,
                                          bool need_logits_grad, bool need_weight_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("elogitnorm_fast::elogitnorm_forward", "")
                       .typed<ELogitNormOutputs(const Tensor&, const Tensor&, const Tensor&,
                                                c10::string_view, int64_t, double, double, bool,
                                                bool)>();
  return op.call(logits, weight, target, reduction, ignore_index, eps, divisor, need_logits_grad,
                 need_weight_grad);
}

// The backend these ops ran as, for check_first_derivative's message: the device of the
// upstream gradient.
const char* backend_of(const Tensor& upstream) {
  return upstream.defined() && upstream.is_cuda() ? "cuda" : "cpu";
}

std::tuple<Tensor, Tensor> call_elogitnorm_backward(const variable_list& saved,
                                                    const Tensor& grad_output,
                                                    c10::string_view reduction, double eps,
                                                    bool need_logits_grad, bool need_weight_grad) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("elogitnorm_fast::elogitnorm_backward", "")
          .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                            const Tensor&, const Tensor&, const Tensor&,
                                            const Tensor&, const Tensor&, const Tensor&,
                                            c10::string_view, double, bool, bool)>();
  return op.call(grad_output, saved[0], saved[1], saved[2], saved[3], saved[4], saved[5],
                 saved[6], saved[7], reduction, eps, need_logits_grad, need_weight_grad);
}

class ELogitNormFunction : public torch::autograd::Function<ELogitNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& logits, const Tensor& weight,
                               const Tensor& target, c10::string_view reduction,
                               int64_t ignore_index, double eps, double divisor,
                               bool need_logits_grad, bool need_weight_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, grad_unit, scale_grad, sample_slot, row_class, distances, valid_count] =
        call_elogitnorm_forward(logits, weight, target, reduction, ignore_index, eps, divisor,
                                need_logits_grad, need_weight_grad);
    ctx->save_for_backward(
        {logits, weight, grad_unit, scale_grad, sample_slot, row_class, distances, valid_count});
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["need_logits_grad"] = need_logits_grad;
    ctx->saved_data["need_weight_grad"] = need_weight_grad;
    ctx->mark_non_differentiable(
        {grad_unit, scale_grad, sample_slot, row_class, distances, valid_count});
    ctx->set_materialize_grads(false);
    return {loss, grad_unit, scale_grad, sample_slot, row_class, distances, valid_count};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_first_derivative(backend_of(grads[0]), "ELogitNorm");
    const bool need_logits_grad = ctx->saved_data["need_logits_grad"].toBool();
    const bool need_weight_grad = ctx->saved_data["need_weight_grad"].toBool();
    variable_list out(9);
    if (!grads[0].defined() || !(need_logits_grad || need_weight_grad)) return out;
    auto [grad_logits, grad_weight] = call_elogitnorm_backward(
        ctx->get_saved_variables(), grads[0], ctx->saved_data["reduction"].toStringRef(),
        ctx->saved_data["eps"].toDouble(), need_logits_grad, need_weight_grad);
    if (need_logits_grad) out[0] = grad_logits;
    if (need_weight_grad) out[1] = grad_weight;
    return out;
  }
};

ELogitNormOutputs elogitnorm_forward_autograd(const Tensor& logits, const Tensor& weight,
                                              const Tensor& target, c10::string_view reduction,
                                              int64_t ignore_index, double eps, double divisor,
                                              bool need_logits_grad, bool need_weight_grad) {
  auto out = ELogitNormFunction::apply(logits, weight, target, reduction, ignore_index, eps,
                                       divisor, need_logits_grad, need_weight_grad);
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6]};
}

using LogitNormOutputs = std::tuple<Tensor, Tensor, Tensor>;

class LogitNormFunction : public torch::autograd::Function<LogitNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& logits, const Tensor& target,
                               double tau, c10::string_view reduction, int64_t ignore_index,
                               bool need_grad) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("elogitnorm_fast::logitnorm_forward", "")
                         .typed<LogitNormOutputs(const Tensor&, const Tensor&, double,
                                                 c10::string_view, int64_t, bool)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, grad_unit, valid_count] =
        op.call(logits, target, tau, reduction, ignore_index, need_grad);
    ctx->save_for_backward({logits, target, grad_unit, valid_count});
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["need_grad"] = need_grad;
    ctx->mark_non_differentiable({grad_unit, valid_count});
    ctx->set_materialize_grads(false);
    return {loss, grad_unit, valid_count};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("elogitnorm_fast::logitnorm_backward", "")
            .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                          const Tensor&, c10::string_view, int64_t)>();
    check_first_derivative(backend_of(grads[0]), "LogitNorm");
    variable_list out(6);
    if (!grads[0].defined() || !ctx->saved_data["need_grad"].toBool()) return out;
    const variable_list saved = ctx->get_saved_variables();
    out[0] = op.call(grads[0], saved[0], saved[1], saved[2], saved[3],
                     ctx->saved_data["reduction"].toStringRef(),
                     ctx->saved_data["ignore_index"].toInt());
    return out;
  }
};

LogitNormOutputs logitnorm_forward_autograd(const Tensor& logits, const Tensor& target, double tau,
                                            c10::string_view reduction, int64_t ignore_index,
                                            bool need_grad) {
  auto out = LogitNormFunction::apply(logits, target, tau, reduction, ignore_index, need_grad);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace elogitnorm_fast

TORCH_LIBRARY_IMPL(elogitnorm_fast, Autograd, m) {
  m.impl("elogitnorm_forward", &elogitnorm_fast::elogitnorm_forward_autograd);
  m.impl("logitnorm_forward", &elogitnorm_fast::logitnorm_forward_autograd);
}
