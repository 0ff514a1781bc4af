// Fused LogitNorm loss on the CPU (docs/design.md; Wei et al., ICML 2022).
//
// Per row, with a = 1 / (tau (||z|| + 1e-7)) and p = softmax(a z):
//   loss = logsumexp(a z) - a z_y
//   dz   = a (p - e_y) - a ((p - e_y) . z) z / ((||z|| + 1e-7) ||z||)   (second term 0 at z = 0)
// Forward writes dz for an upstream gradient of 1 ("unit"); backward rescales it by g_n. Rows
// whose largest magnitude would overflow ||z||^2 (or underflow it) are computed divided by a
// power of two (rescale_factor, loss_math.h): any finite row gives its exact loss.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cpu/loss_math.h"

namespace elogitnorm_fast::cpu {
namespace {

constexpr const char* kForward = "logitnorm_forward";
constexpr const char* kBackward = "logitnorm_backward";
constexpr double kNormEps = 1e-7;  // added to ||z|| as in the authors' code

// One row, given as z / k for the power of two k of rescale_factor (loss_math.h): the norm and
// its 1e-7 shrink by k and a grows by k, so a z is unchanged; the logits gradient is divided
// by k.
template <typename acc_t>
inline double logitnorm_row(const acc_t* z, int64_t classes, int64_t y, acc_t tau,
                            acc_t factor, acc_t* grad) {
  acc_t squares = 0;
  acc_t top = z[0];
#pragma omp simd reduction(+ : squares) reduction(max : top)
  for (int64_t j = 0; j < classes; ++j) {
    squares += z[j] * z[j];
    top = z[j] > top ? z[j] : top;
  }
  const acc_t inverse = acc_t(1) / factor;  // exact: a power of two
  const acc_t norm = std::sqrt(squares);
  const acc_t shifted_norm = norm + static_cast<acc_t>(kNormEps) * inverse;
  const acc_t a = acc_t(1) / (tau * shifted_norm);
  // softmax(a z) with the maximum a * top; shifted_sum = sum_j e_j (z_j - top).
  acc_t exp_sum = 0;
  acc_t shifted_sum = 0;
  if (grad != nullptr) {
#pragma omp simd reduction(+ : exp_sum, shifted_sum)
    for (int64_t j = 0; j < classes; ++j) {
      const acc_t e = exp_nonpositive((z[j] - top) * a);
      grad[j] = e;
      exp_sum += e;
      shifted_sum += e * (z[j] - top);
    }
  } else {
#pragma omp simd reduction(+ : exp_sum, shifted_sum)
    for (int64_t j = 0; j < classes; ++j) {
      const acc_t e = exp_nonpositive((z[j] - top) * a);
      exp_sum += e;
      shifted_sum += e * (z[j] - top);
    }
  }
  const acc_t loss = std::log(exp_sum) + a * (top - z[y]);
  if (grad != nullptr) {
    // (p - e_y) . z = sum_j p_j (z_j - top) - (z_y - top); both terms then scaled back by 1 / k.
    const acc_t dot = shifted_sum / exp_sum - (z[y] - top);
    const acc_t k = norm > 0 ? a * dot / (shifted_norm * norm) * inverse : acc_t(0);
    const acc_t p_scale = a / exp_sum * inverse;
#pragma omp simd
    for (int64_t j = 0; j < classes; ++j) grad[j] = grad[j] * p_scale - k * z[j];
    grad[y] -= a * inverse;
  }
  return static_cast<double>(loss);
}

template <typename scalar_t, typename acc_t>
std::vector<at::Tensor> forward_impl(const at::Tensor& logits, const at::Tensor& target,
                                     double tau, Reduction reduction, int64_t ignore_index,
                                     bool need_grad) {
  const int64_t rows = logits.size(0);
  const int64_t classes = logits.size(1);
  const auto acc_options = logits.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const scalar_t* z_all = logits.const_data_ptr<scalar_t>();
  const int64_t* y_all = target.const_data_ptr<int64_t>();
  at::Tensor grad_unit =
      at::empty(need_grad ? at::IntArrayRef{rows, classes} : at::IntArrayRef{0}, acc_options);
  acc_t* grad_ptr = need_grad ? grad_unit.data_ptr<acc_t>() : nullptr;
  std::vector<double> row_loss(rows);
  at::parallel_for(0, rows, row_grain(classes), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(classes);
    for (int64_t n = begin; n < end; ++n) {
      acc_t* grad = grad_ptr == nullptr ? nullptr : grad_ptr + n * classes;
      const int64_t y = y_all[n];
      if (y == ignore_index) {
        row_loss[n] = 0;
        if (grad != nullptr) std::fill(grad, grad + classes, acc_t(0));
        continue;
      }
      TORCH_CHECK_VALUE(y >= 0 && y < classes, kForward, ": target[", n, "] = ", y,
                        " must be in [0, ", classes, ") or equal ignore_index=", ignore_index);
      const scalar_t* row = z_all + n * classes;
      const acc_t factor = rescale_factor(max_abs<acc_t>(row, classes));
      const acc_t* z = scaled_row<acc_t>(row, classes, factor, buffer.data());
      row_loss[n] = logitnorm_row<acc_t>(z, classes, y, static_cast<acc_t>(tau), factor, grad);
    }
  });
  auto [loss, valid_count] = reduce_losses<scalar_t>(
      row_loss, [&](int64_t n) { return y_all[n] != ignore_index; }, reduction,
      logits.options(), acc_options);
  return {loss, grad_unit, valid_count};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logitnorm_forward_cpu(
    const at::Tensor& logits_in, const at::Tensor& target_in, double tau,
    c10::string_view reduction_name, int64_t ignore_index, bool need_grad) {
  TORCH_CHECK(logits_in.dim() == 2 && logits_in.size(1) > 0, kForward,
              ": logits must be 2-D (N, C) with C >= 1, got shape ", logits_in.sizes());
  TORCH_CHECK(target_in.dim() == 1 && target_in.size(0) == logits_in.size(0), kForward,
              ": target must have shape (", logits_in.size(0), ",), got ", target_in.sizes());
  TORCH_CHECK(tau > 0, kForward, ": tau must be > 0, got ", tau);
  const Reduction reduction = parse_reduction(reduction_name, kForward);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = target_in.to(at::kLong).contiguous();
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), kForward, [&] {
    if (logits.scalar_type() == at::kDouble) {
      out = forward_impl<scalar_t, double>(logits, target, tau, reduction, ignore_index,
                                           need_grad);
    } else {
      out = forward_impl<scalar_t, float>(logits, target, tau, reduction, ignore_index,
                                          need_grad);
    }
  });
  return {out[0], out[1], out[2]};
}

at::Tensor logitnorm_backward_cpu(const at::Tensor& grad_output, const at::Tensor& logits,
                                  const at::Tensor& target_in, const at::Tensor& grad_unit,
                                  const at::Tensor& valid_count, c10::string_view reduction_name,
                                  int64_t ignore_index) {
  const Reduction reduction = parse_reduction(reduction_name, kBackward);
  const int64_t rows = logits.size(0);
  const int64_t classes = logits.size(1);
  TORCH_CHECK(grad_unit.dim() == 2 && grad_unit.size(0) == rows && grad_unit.size(1) == classes &&
                  grad_unit.is_contiguous(),
              kBackward, ": grad_unit must be a contiguous (N, C) tensor, got ",
              grad_unit.sizes());
  const at::Tensor target = target_in.to(at::kLong).contiguous();
  const int64_t* y_all = target.const_data_ptr<int64_t>();
  const at::ScalarType acc_type = grad_unit.scalar_type();
  const at::Tensor grad_acc = grad_output.to(acc_type);
  at::Tensor out;
  const auto valid = [&](int64_t n) { return y_all[n] != ignore_index; };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), kBackward, [&] {
    if (acc_type == at::kDouble) {
      const auto g = upstream_gradient<double>(grad_acc, valid_count, reduction, rows, kBackward);
      out = scale_unit_gradient<scalar_t, double>(grad_unit, g, valid, logits.options(),
                                                  kBackward);
    } else {
      const auto g = upstream_gradient<float>(grad_acc, valid_count, reduction, rows, kBackward);
      out = scale_unit_gradient<scalar_t, float>(grad_unit, g, valid, logits.options(),
                                                 kBackward);
    }
  });
  return out;
}

}  // namespace
}  // namespace elogitnorm_fast::cpu

TORCH_LIBRARY_IMPL(elogitnorm_fast, CPU, m) {
  m.impl("logitnorm_forward", &elogitnorm_fast::cpu::logitnorm_forward_cpu);
  m.impl("logitnorm_backward", &elogitnorm_fast::cpu::logitnorm_backward_cpu);
}
