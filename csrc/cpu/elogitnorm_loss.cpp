// Fused ELogitNorm loss on the CPU (docs/design.md; Ding et al., arXiv 2504.11434).
//
// Forward, per call:
//   1. argmax of every row (first index of the maximum) and the target bounds check;
//   2. the distinct predicted classes of the valid rows (U <= min(N, C));
//   3. their distance rows ||w_m - w_j|| (U x C): direct differences for small problems, else one
//      GEMM (||a||^2 + ||b||^2 - 2 a.b) with entries that lost too many bits to cancellation
//      recomputed directly, so near-duplicate weight rows keep their true (tiny) distance;
//   4. one parallel pass per row: s, logsumexp(z / s), the loss and, when asked, the gradient of
//      the loss for an upstream gradient of 1 ("unit"), plus r = ds / divisor for the weight;
//   5. the reduction, summed in row order.
// Backward rescales the unit gradient by the upstream gradient g_n and builds
//   P[u, j] = -sum_{n predicted u} g_n r_n (v_n - z_nj) / Delta_uj^3   (0 where Delta is clamped)
// from which dW = scatter_u(rowsum(P) W_u - P W) + colsum(P) W - P^T W_u takes two GEMMs, or,
// when C <= 2U, one C x C x D GEMM with the C x C scatter of P (never more than twice the
// U x C rows). Nothing of size C x C x D is built.
//
// Range: a row of logits, or the weight, whose largest magnitude would overflow a square or a
// margin / Delta (or underflow it) is computed divided by a power of two (rescale_factor,
// loss_math.h): logits by row (s scales along, the loss does not change, the logits gradient is
// scaled back; sample_slot carries the row's factor to the backward), the weight as a whole
// (distances are scaled back). P is formed one factor of 1 / Delta at a time, never through
// Delta^3.
//
// Thread count: rows are split across threads, but every sum (a row's, the reduction, each entry
// of the GEMMs, run by fixed_order_gemm rather than BLAS) has one fixed order, so the results
// are bitwise the same for any torch.set_num_threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cpu/fixed_order_gemm.h"
#include "cpu/loss_math.h"

namespace elogitnorm_fast::cpu {
namespace {

constexpr const char* kForward = "elogitnorm_forward";
constexpr const char* kBackward = "elogitnorm_backward";
// Below this many multiply-adds the distance rows are computed directly (no GEMM dispatch).
constexpr int64_t kDirectDistanceWork = int64_t{1} << 18;

// Rescale factor of a row of logits (loss_math.h) from its extremes.
template <typename acc_t>
inline acc_t logit_factor(acc_t best, acc_t lowest) {
  return rescale_factor(std::max(std::abs(best), std::abs(lowest)));
}

// sample_slot[n] holds the distance row of sample n (-1: ignored) and, from bit kFactorShift
// on, the exponent of the row's rescale factor plus kFactorBias (0 where the factor is 1), so
// that the backward has the forward's factors without another saved tensor or pass.
constexpr int kFactorShift = 40;
constexpr int64_t kFactorBias = 2048;  // above the largest |exponent| of a double factor

template <typename acc_t>
inline int64_t encode_slot(int64_t row, acc_t factor) {
  if (factor == acc_t(1)) return row;
  int exponent = 0;
  std::frexp(factor, &exponent);  // factor = 2^(exponent - 1)
  return row | ((exponent - 1 + kFactorBias) << kFactorShift);
}

inline int64_t slot_row(int64_t slot) { return slot & ((int64_t{1} << kFactorShift) - 1); }

template <typename acc_t>
inline acc_t slot_factor(int64_t slot) {
  const int64_t field = slot >> kFactorShift;
  return field == 0 ? acc_t(1)
                    : std::ldexp(acc_t(1), static_cast<int>(field - kFactorBias));
}

// Step 1: predicted class of every valid row (ignored rows get -1) and its rescale factor.
template <typename scalar_t, typename acc_t>
void predict_rows(const scalar_t* logits, const int64_t* target, int64_t rows, int64_t classes,
                  int64_t ignore_index, int64_t* predicted, acc_t* factor) {
  at::parallel_for(0, rows, row_grain(classes), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(std::is_same_v<acc_t, scalar_t> ? 0 : classes);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t y = target[n];
      factor[n] = acc_t(1);
      if (y == ignore_index) {
        predicted[n] = -1;
        continue;
      }
      TORCH_CHECK_VALUE(y >= 0 && y < classes, kForward, ": target[", n, "] = ", y,
                        " must be in [0, ", classes, ") or equal ignore_index=", ignore_index);
      const acc_t* z = row_in_acc<acc_t>(logits + n * classes, classes, buffer.data());
      acc_t best = z[0];
      acc_t lowest = z[0];
#pragma omp simd reduction(max : best) reduction(min : lowest)
      for (int64_t j = 1; j < classes; ++j) {
        best = z[j] > best ? z[j] : best;
        lowest = z[j] < lowest ? z[j] : lowest;
      }
      factor[n] = logit_factor(best, lowest);
      int64_t index = 0;  // stays 0 when the maximum is NaN; the NaN then reaches s and the loss
      for (int64_t j = 0; j < classes; ++j) {
        if (z[j] == best) {
          index = j;
          break;
        }
      }
      predicted[n] = index;
    }
  });
}

// The weight as the distance and weight-gradient passes read it: in acc_t, contiguous, divided
// by `factor` (rescale_factor of its largest magnitude; usually 1, then no copy), with the
// squared norms of its rows (the GEMM forms need them; one pass finds both).
template <typename acc_t>
struct ScaledWeight {
  at::Tensor w;
  acc_t factor;
  std::vector<acc_t> norms;
};

template <typename acc_t>
void squared_norms(const acc_t* w, int64_t classes, int64_t dim, acc_t* norms,
                   acc_t* largest) {
  at::parallel_for(0, classes, row_grain(dim), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const acc_t* b = w + j * dim;
      acc_t sum = 0;
      acc_t top = 0;
#pragma omp simd reduction(+ : sum) reduction(max : top)
      for (int64_t k = 0; k < dim; ++k) {
        sum += b[k] * b[k];
        const acc_t a = std::abs(b[k]);
        top = a > top ? a : top;
      }
      norms[j] = sum;
      if (largest != nullptr) largest[j] = top;
    }
  });
}

template <typename acc_t>
ScaledWeight<acc_t> scaled_weight(const at::Tensor& weight) {
  at::Tensor w = weight.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const int64_t classes = w.size(0);
  const int64_t dim = w.size(1);
  std::vector<acc_t> norms(classes);
  std::vector<acc_t> row_largest(classes);
  squared_norms(w.const_data_ptr<acc_t>(), classes, dim, norms.data(), row_largest.data());
  acc_t largest = 0;  // max is exact and order-free
  for (const acc_t value : row_largest) largest = value > largest ? value : largest;
  const acc_t factor = rescale_factor(largest);
  if (factor != acc_t(1)) {
    w = w * (acc_t(1) / factor);
    squared_norms(w.const_data_ptr<acc_t>(), classes, dim, norms.data(),
                  static_cast<acc_t*>(nullptr));
  }
  return {w, factor, std::move(norms)};
}

// Step 3, small problems: distances by direct differences (of the weight divided by `factor`,
// multiplied back).
template <typename acc_t>
void distances_direct(const acc_t* w, int64_t classes, int64_t dim, const int64_t* row_class,
                      int64_t count, acc_t factor, acc_t* out) {
  at::parallel_for(0, count, std::max<int64_t>(1, kDirectDistanceWork / (classes * dim + 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const acc_t* a = w + row_class[u] * dim;
      for (int64_t j = 0; j < classes; ++j) {
        const acc_t* b = w + j * dim;
        acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t k = 0; k < dim; ++k) {
          const acc_t d = a[k] - b[k];
          sum += d * d;
        }
        out[u * classes + j] = std::sqrt(sum) * factor;
      }
      out[u * classes + row_class[u]] = acc_t(1);  // the released code adds the identity
    }
  });
}

// Step 3, larger problems: one GEMM, then a fix-up pass (weight divided by `factor`, distances
// multiplied back).
template <typename acc_t>
void distances_gemm(const ScaledWeight<acc_t>& scaled, const at::Tensor& row_class_tensor,
                    at::Tensor out_tensor) {
  const at::Tensor& w_tensor = scaled.w;
  const acc_t factor = scaled.factor;
  const std::vector<acc_t>& norms = scaled.norms;
  const int64_t classes = w_tensor.size(0);
  const int64_t dim = w_tensor.size(1);
  const int64_t count = row_class_tensor.size(0);
  const acc_t* w = w_tensor.const_data_ptr<acc_t>();
  const int64_t* row_class = row_class_tensor.data_ptr<int64_t>();
  at::Tensor rows = at::empty({count, dim}, w_tensor.options());
  acc_t* rows_ptr = rows.data_ptr<acc_t>();
  for (int64_t u = 0; u < count; ++u) {
    std::copy(w + row_class[u] * dim, w + (row_class[u] + 1) * dim, rows_ptr + u * dim);
  }
  acc_t* out = out_tensor.data_ptr<acc_t>();
  // rows W^T: B(k, j) = w[j * dim + k].
  fixed_order_gemm<acc_t>(count, classes, dim, rows_ptr, dim, 1, w, 1, dim, out, classes);
  at::parallel_for(0, count, row_grain(classes), [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t m = row_class[u];
      const acc_t* a = w + m * dim;
      acc_t* row = out + u * classes;
      for (int64_t j = 0; j < classes; ++j) {
        const acc_t scale = norms[m] + norms[j];
        acc_t squared = scale - 2 * row[j];
        // Cancellation: when the squared distance is small next to the norms, the GEMM form
        // keeps few correct bits; recompute those (rare) entries from the differences.
        if (squared < scale * acc_t(1.0 / 32)) {
          const acc_t* b = w + j * dim;
          acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t k = 0; k < dim; ++k) {
            const acc_t d = a[k] - b[k];
            sum += d * d;
          }
          squared = sum;
        }
        row[j] = std::sqrt(squared < 0 ? acc_t(0) : squared) * factor;
      }
      row[m] = acc_t(1);
    }
  });
}

struct RowOutputs {
  double loss;
  double scale_grad;
};

// Step 4 for one valid row, given as z / k for its rescale factor k. `distance` is the raw
// distance row of the predicted class m (self entry 1). Margins and s are those of the row
// divided by k (s's clamp eps / k alike), so z / s is the row's own. The row's scalars (s, its
// gradient and their products) are formed in double: in the input precision 1 / s times a
// normalised logit overflows once the distances exceed about 1e19, although the gradients do
// not. Writes the unit gradient into `grad` when it is not null; returns the loss and
// r = ds / divisor divided by the weight's factor f (the backward pairs it with margins over
// k f).
template <typename acc_t>
inline RowOutputs elogitnorm_row(const acc_t* z, int64_t classes, int64_t m, int64_t y,
                                 const acc_t* distance, acc_t eps, double inv_divisor,
                                 acc_t factor, double inv_weight_factor, acc_t* grad) {
  const acc_t v = z[m];
  // s = (1/divisor) sum_j (v - z_j) / max(Delta_j, eps); inv_sum = sum over z_j < v of 1/Delta.
  acc_t margin_sum = 0;
  acc_t inv_sum = 0;
#pragma omp simd reduction(+ : margin_sum, inv_sum)
  for (int64_t j = 0; j < classes; ++j) {
    const acc_t inv = acc_t(1) / clamp_min_keep_nan(distance[j], eps);
    const acc_t margin = v - z[j];
    margin_sum += margin * inv;
    inv_sum += margin > 0 ? inv : acc_t(0);
  }
  const double over_k = 1.0 / static_cast<double>(factor);  // exact: a power of two
  const double raw_scale = static_cast<double>(margin_sum) * inv_divisor;
  const double scale_eps = static_cast<double>(eps) * over_k;
  const double scale = clamp_min_keep_nan(raw_scale, scale_eps);
  const double inv_scale_exact = 1.0 / scale;
  const acc_t inv_scale = capped<acc_t>(inv_scale_exact);
  // logsumexp(z / s) with the known maximum v / s; shifted_sum = sum_j e_j (z_j - v) / s.
  acc_t exp_sum = 0;
  acc_t shifted_sum = 0;
  if (grad != nullptr) {
#pragma omp simd reduction(+ : exp_sum, shifted_sum)
    for (int64_t j = 0; j < classes; ++j) {
      const acc_t t = (z[j] - v) * inv_scale;
      const acc_t e = exp_nonpositive(t);
      grad[j] = e;
      exp_sum += e;
      shifted_sum += e * t;
    }
  } else {
#pragma omp simd reduction(+ : exp_sum, shifted_sum)
    for (int64_t j = 0; j < classes; ++j) {
      const acc_t t = (z[j] - v) * inv_scale;
      const acc_t e = exp_nonpositive(t);
      exp_sum += e;
      shifted_sum += e * t;
    }
  }
  const acc_t target_margin = (v - z[y]) * inv_scale;
  const acc_t loss = std::log(exp_sum) + target_margin;
  // ds = -(sum_j p_j z_j - z_y) / s^2 = -(sum_j p_j (z_j - v)/s + (v - z_y)/s) / s; zero where the
  // clamp s >= eps is active. In the units of the row divided by k.
  const double inv_exp_sum = 1.0 / static_cast<double>(exp_sum);
  const double scale_grad =
      raw_scale < scale_eps
          ? 0.0
          : -(static_cast<double>(shifted_sum) * inv_exp_sum +
              static_cast<double>(target_margin)) * inv_scale_exact;
  if (grad != nullptr) {
    // dz_j = (p_j - [j = y]) / s - [z_j < v] r / Delta_j;  dz_m += r * inv_sum; all over k.
    const acc_t p_scale = static_cast<acc_t>(over_k * inv_scale_exact * inv_exp_sum);
    const acc_t r = static_cast<acc_t>(scale_grad * inv_divisor * over_k);
#pragma omp simd
    for (int64_t j = 0; j < classes; ++j) {
      const acc_t inv = acc_t(1) / clamp_min_keep_nan(distance[j], eps);
      grad[j] = grad[j] * p_scale - (v - z[j] > 0 ? r * inv : acc_t(0));
    }
    grad[y] -= static_cast<acc_t>(over_k * inv_scale_exact);
    grad[m] += r * inv_sum;
  }
  return {static_cast<double>(loss), scale_grad * inv_divisor * inv_weight_factor};
}

template <typename scalar_t, typename acc_t>
std::vector<at::Tensor> forward_impl(const at::Tensor& logits, const at::Tensor& weight,
                                     const at::Tensor& target, Reduction reduction,
                                     int64_t ignore_index, double eps, double divisor,
                                     bool need_logits_grad, bool need_weight_grad) {
  const int64_t rows = logits.size(0);
  const int64_t classes = logits.size(1);
  const int64_t dim = weight.size(1);
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const auto acc_options = logits.options().dtype(acc_type);
  const auto long_options = logits.options().dtype(at::kLong);
  const scalar_t* z_all = logits.const_data_ptr<scalar_t>();
  const int64_t* y_all = target.const_data_ptr<int64_t>();

  // Steps 1 and 2.
  at::Tensor sample_slot = at::empty({rows}, long_options);
  int64_t* slot = sample_slot.data_ptr<int64_t>();
  std::vector<acc_t> factor(rows);
  predict_rows<scalar_t, acc_t>(z_all, y_all, rows, classes, ignore_index, slot, factor.data());
  std::vector<int64_t> class_slot(classes, -1);
  std::vector<int64_t> row_class_list;
  for (int64_t n = 0; n < rows; ++n) {
    const int64_t m = slot[n];
    if (m < 0) continue;
    if (class_slot[m] < 0) {
      class_slot[m] = static_cast<int64_t>(row_class_list.size());
      row_class_list.push_back(m);
    }
    slot[n] = encode_slot(class_slot[m], factor[n]);
  }
  const int64_t used = static_cast<int64_t>(row_class_list.size());
  const int64_t row_capacity = std::min(rows, classes);

  // Step 3.
  const ScaledWeight<acc_t> scaled = scaled_weight<acc_t>(weight);
  const at::Tensor& w = scaled.w;
  at::Tensor row_class = at::empty({need_weight_grad ? row_capacity : used}, long_options);
  int64_t* row_class_ptr = row_class.data_ptr<int64_t>();
  std::copy(row_class_list.begin(), row_class_list.end(), row_class_ptr);
  std::fill(row_class_ptr + used, row_class_ptr + row_class.size(0), int64_t{-1});
  at::Tensor distances = at::empty({row_class.size(0), classes}, acc_options);
  if (used > 0) {
    if (used * classes * dim <= kDirectDistanceWork) {
      distances_direct<acc_t>(w.const_data_ptr<acc_t>(), classes, dim, row_class_ptr, used,
                              scaled.factor, distances.data_ptr<acc_t>());
    } else {
      distances_gemm<acc_t>(scaled, row_class.narrow(0, 0, used), distances.narrow(0, 0, used));
    }
  }
  if (row_class.size(0) > used) distances.narrow(0, used, row_class.size(0) - used).zero_();

  // Step 4.
  at::Tensor grad_unit = at::empty(need_logits_grad ? at::IntArrayRef{rows, classes}
                                                    : at::IntArrayRef{0},
                                   acc_options);
  at::Tensor scale_grad = at::empty({need_weight_grad ? rows : 0}, acc_options);
  const double inv_divisor = 1.0 / divisor;
  const double inv_weight_factor = 1.0 / static_cast<double>(scaled.factor);
  std::vector<double> row_loss(rows);
  const acc_t* dist = distances.const_data_ptr<acc_t>();
  acc_t* grad_ptr = need_logits_grad ? grad_unit.data_ptr<acc_t>() : nullptr;
  acc_t* scale_grad_ptr = need_weight_grad ? scale_grad.data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, rows, row_grain(classes), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(classes);
    for (int64_t n = begin; n < end; ++n) {
      acc_t* grad = grad_ptr == nullptr ? nullptr : grad_ptr + n * classes;
      const int64_t u = slot[n] < 0 ? -1 : slot_row(slot[n]);
      if (u < 0) {
        row_loss[n] = 0;
        if (grad != nullptr) std::fill(grad, grad + classes, acc_t(0));
        if (scale_grad_ptr != nullptr) scale_grad_ptr[n] = 0;
        continue;
      }
      const acc_t* z = scaled_row<acc_t>(z_all + n * classes, classes, factor[n], buffer.data());
      const RowOutputs out = elogitnorm_row<acc_t>(z, classes, row_class_ptr[u], y_all[n],
                                                   dist + u * classes, static_cast<acc_t>(eps),
                                                   inv_divisor, factor[n], inv_weight_factor,
                                                   grad);
      row_loss[n] = out.loss;
      if (scale_grad_ptr != nullptr) scale_grad_ptr[n] = static_cast<acc_t>(out.scale_grad);
    }
  });

  // Step 5.
  auto [loss, valid_count] = reduce_losses<scalar_t>(
      row_loss, [&](int64_t n) { return slot[n] >= 0; }, reduction, logits.options(),
      acc_options);
  if (!need_weight_grad) {
    row_class = at::empty({0}, long_options);
    distances = at::empty({0, classes}, acc_options);
  }
  return {loss, grad_unit, scale_grad, sample_slot, row_class, distances, valid_count};
}

void check_forward_inputs(const at::Tensor& logits, const at::Tensor& weight,
                          const at::Tensor& target) {
  TORCH_CHECK(logits.dim() == 2, kForward, ": logits must be 2-D (N, C), got shape ",
              logits.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == logits.size(1), kForward,
              ": weight must be (C, D) with C = ", logits.size(1), ", got shape ", weight.sizes());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), kForward,
              ": target must have shape (", logits.size(0), ",), got ", target.sizes());
  TORCH_CHECK(logits.size(1) > 0, kForward, ": logits need at least one class");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
elogitnorm_forward_cpu(const at::Tensor& logits_in, const at::Tensor& weight,
                       const at::Tensor& target_in, c10::string_view reduction_name,
                       int64_t ignore_index, double eps, double divisor, bool need_logits_grad,
                       bool need_weight_grad) {
  check_forward_inputs(logits_in, weight, target_in);
  const Reduction reduction = parse_reduction(reduction_name, kForward);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = target_in.to(at::kLong).contiguous();
  const bool acc_double = accumulation_type(logits, weight) == at::kDouble;
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), kForward, [&] {
    if (acc_double) {
      out = forward_impl<scalar_t, double>(logits, weight, target, reduction, ignore_index, eps,
                                           divisor, need_logits_grad, need_weight_grad);
    } else {
      out = forward_impl<scalar_t, float>(logits, weight, target, reduction, ignore_index, eps,
                                          divisor, need_logits_grad, need_weight_grad);
    }
  });
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6]};
}

// dW from P (U x C): every pair (u, j) adds P[u, j] (w_u - w_j) to row u's class and subtracts
// it from row j. Small problems run this difference form directly (single-threaded: a GEMM
// dispatch and a fork / join cost more than the arithmetic there). Large ones use two GEMMs,
//   dW = scatter_u(rowsum(P) W_u - P W) + colsum(P) W - P^T W_u,
// or, when C <= 2U, one C x C x D GEMM with the Laplacian-like matrix of P (fewer flops),
// except for near-duplicate pairs (||w_u - w_j||^2 < (||w_u||^2 + ||w_j||^2) / 32), where the
// GEMM form would cancel catastrophically (P is large there, ~1 / Delta^3): those few pairs are
// taken out of P and added in the difference form afterwards. `w` is the weight divided by its
// rescale factor, P multiplied by it (their products are the true ones); `distances` are the
// true distances, compared here after the same division.
template <typename acc_t>
at::Tensor assemble_weight_gradient(at::Tensor& pooled, const ScaledWeight<acc_t>& scaled,
                                    const int64_t* row_class, const acc_t* distances,
                                    at::ScalarType out_type) {
  const at::Tensor& w = scaled.w;
  const std::vector<acc_t>& norms = scaled.norms;
  const int64_t used = pooled.size(0);
  const int64_t classes = w.size(0);
  const int64_t dim = w.size(1);
  acc_t* p = pooled.data_ptr<acc_t>();
  const acc_t* w_ptr = w.const_data_ptr<acc_t>();
  at::Tensor grad = at::zeros({classes, dim}, w.options());
  acc_t* grad_ptr = grad.data_ptr<acc_t>();
  auto add_pair = [&](int64_t u, int64_t j, acc_t coefficient) {
    const acc_t* wu = w_ptr + row_class[u] * dim;
    const acc_t* wj = w_ptr + j * dim;
    acc_t* gu = grad_ptr + row_class[u] * dim;
    acc_t* gj = grad_ptr + j * dim;
#pragma omp simd
    for (int64_t k = 0; k < dim; ++k) {
      const acc_t step = coefficient * (wu[k] - wj[k]);
      gu[k] += step;
      gj[k] -= step;
    }
  };
  if (used * classes * dim <= kDirectDistanceWork) {
    for (int64_t u = 0; u < used; ++u) {
      for (int64_t j = 0; j < classes; ++j) {
        const acc_t coefficient = p[u * classes + j];
        if (coefficient != acc_t(0)) add_pair(u, j, coefficient);
      }
    }
    return out_type == grad.scalar_type() ? grad : grad.to(out_type);
  }
  const acc_t inverse = acc_t(1) / scaled.factor;
  struct ClosePair {
    int64_t u, j;
    acc_t coefficient;
  };
  std::vector<ClosePair> close_pairs;
  std::vector<acc_t> row_sum(used, acc_t(0));
  std::vector<acc_t> column_sum(classes, acc_t(0));
  at::Tensor w_rows = at::empty({used, dim}, w.options());
  acc_t* w_rows_ptr = w_rows.data_ptr<acc_t>();
  for (int64_t u = 0; u < used; ++u) {
    const int64_t m = row_class[u];
    std::copy(w_ptr + m * dim, w_ptr + (m + 1) * dim, w_rows_ptr + u * dim);
    for (int64_t j = 0; j < classes; ++j) {
      acc_t& coefficient = p[u * classes + j];
      if (coefficient == acc_t(0)) continue;
      const acc_t delta = distances[u * classes + j] * inverse;
      if (delta * delta < (norms[m] + norms[j]) * acc_t(1.0 / 32)) {
        close_pairs.push_back({u, j, coefficient});
        coefficient = acc_t(0);
        continue;
      }
      row_sum[u] += coefficient;
      column_sum[j] += coefficient;
    }
  }
  if (classes <= 2 * used) {
    // Few classes per distance row: one C x C x D GEMM instead of two U x C x D ones. With A the
    // C x C scatter of P (A[m_u, j] = P[u, j]), dW = (diag(rowsum A + colsum A) - A - A^T) W.
    at::Tensor laplacian = at::zeros({classes, classes}, w.options());
    acc_t* l = laplacian.data_ptr<acc_t>();
    for (int64_t u = 0; u < used; ++u) {
      const int64_t m = row_class[u];
      for (int64_t j = 0; j < classes; ++j) {
        const acc_t a = p[u * classes + j];
        l[m * classes + j] -= a;
        l[j * classes + m] -= a;
        l[m * classes + m] += a;
        l[j * classes + j] += a;
      }
    }
    fixed_order_gemm<acc_t>(classes, dim, classes, l, classes, 1, w_ptr, dim, 1, grad_ptr, dim);
    for (const ClosePair& pair : close_pairs) add_pair(pair.u, pair.j, pair.coefficient);
    return out_type == grad.scalar_type() ? grad : grad.to(out_type);
  }
  at::Tensor row_part = at::empty({used, dim}, w.options());  // P W (U x D)
  acc_t* row_part_ptr = row_part.data_ptr<acc_t>();
  fixed_order_gemm<acc_t>(used, dim, classes, p, classes, 1, w_ptr, dim, 1, row_part_ptr, dim);
  // P^T W_u (C x D): A(j, u) = P[u, j].
  fixed_order_gemm<acc_t>(classes, dim, used, p, 1, classes, w_rows_ptr, dim, 1, grad_ptr, dim);
  at::parallel_for(0, classes, std::max<int64_t>(1, (int64_t{1} << 14) / dim),
                   [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const acc_t c = column_sum[j];
      const acc_t* wj = w_ptr + j * dim;
      acc_t* out = grad_ptr + j * dim;
#pragma omp simd
      for (int64_t k = 0; k < dim; ++k) out[k] = c * wj[k] - out[k];
    }
  });
  for (int64_t u = 0; u < used; ++u) {  // the row classes are distinct: no two u share a row
    const acc_t c = row_sum[u];
    const acc_t* wu = w_rows_ptr + u * dim;
    const acc_t* a = row_part_ptr + u * dim;
    acc_t* out = grad_ptr + row_class[u] * dim;
#pragma omp simd
    for (int64_t k = 0; k < dim; ++k) out[k] += c * wu[k] - a[k];
  }
  for (const ClosePair& pair : close_pairs) add_pair(pair.u, pair.j, pair.coefficient);
  return out_type == grad.scalar_type() ? grad : grad.to(out_type);
}

// Backward, weight part: pool P (U x C), then two GEMMs. The weight is divided by its rescale
// factor f and P multiplied by it, P f = -(Q / f^2) / (Delta / f)^3, formed one factor of
// 1 / Delta at a time: Delta^3 itself would overflow float32 for distances above about 7e12.
template <typename scalar_t, typename acc_t>
at::Tensor weight_gradient(const at::Tensor& logits, const at::Tensor& weight,
                           const at::Tensor& scale_grad, const int64_t* slot,
                           const at::Tensor& row_class_all, const at::Tensor& distances,
                           const UpstreamGradient<acc_t>& g, double eps_double) {
  const int64_t rows = logits.size(0);
  const int64_t classes = logits.size(1);
  const int64_t* row_class = row_class_all.const_data_ptr<int64_t>();
  int64_t used = 0;
  while (used < row_class_all.size(0) && row_class[used] >= 0) ++used;
  if (used == 0) return at::zeros_like(weight, at::MemoryFormat::Contiguous);
  TORCH_CHECK(distances.dim() == 2 && distances.size(1) == classes &&
                  distances.size(0) >= used && distances.is_contiguous(),
              kBackward, ": distances must be a contiguous (R, C) tensor, got ",
              distances.sizes());
  TORCH_CHECK(scale_grad.numel() == rows, kBackward, ": scale_grad must have ", rows,
              " entries, got ", scale_grad.numel());
  const ScaledWeight<acc_t> scaled = scaled_weight<acc_t>(weight);
  const scalar_t* z_all = logits.const_data_ptr<scalar_t>();
  const acc_t* r = scale_grad.const_data_ptr<acc_t>();
  const acc_t* dist = distances.const_data_ptr<acc_t>();
  const acc_t eps = static_cast<acc_t>(eps_double);
  at::Tensor pooled = at::zeros({used, classes}, scaled.w.options());
  acc_t* pool = pooled.data_ptr<acc_t>();
  // Q[u, j] = sum_{n predicted u} g_n r_n (v_n - z_nj), here divided by f^2: the forward's r
  // is ds / divisor over f in the units of the row over k, the margins are taken over k f.
  // Parallel over column blocks, so that rows sharing a predicted class never race (and the
  // row order is fixed).
  const acc_t inverse = acc_t(1) / scaled.factor;
  const int64_t column_grain =
      std::max<int64_t>(16, (int64_t{1} << 14) / std::max<int64_t>(rows, 1));
  at::parallel_for(0, classes, column_grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = 0; n < rows; ++n) {
      if (slot[n] < 0) continue;
      const acc_t b = g(n) * r[n];
      if (b == acc_t(0)) continue;
      const int64_t u = slot_row(slot[n]);
      const acc_t row_factor = slot_factor<acc_t>(slot[n]);
      const scalar_t* z = z_all + n * classes;
      acc_t* q = pool + u * classes;
      if (row_factor == acc_t(1) && inverse == acc_t(1)) {
        const acc_t v = static_cast<acc_t>(to_acc(z[row_class[u]]));
#pragma omp simd
        for (int64_t j = begin; j < end; ++j) q[j] += b * (v - static_cast<acc_t>(to_acc(z[j])));
      } else {
        const acc_t over_k = acc_t(1) / row_factor;
        const acc_t v = static_cast<acc_t>(to_acc(z[row_class[u]])) * over_k;
#pragma omp simd
        for (int64_t j = begin; j < end; ++j) {
          q[j] += b * ((v - static_cast<acc_t>(to_acc(z[j])) * over_k) * inverse);
        }
      }
    }
  });
  // P f = -(Q / f^2) / (Delta / f)^3 where Delta is unclamped and j is not the row's own class.
  at::parallel_for(0, used, row_grain(classes), [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      acc_t* q = pool + u * classes;
      const acc_t* d = dist + u * classes;
#pragma omp simd
      for (int64_t j = 0; j < classes; ++j) {
        const bool clamped = d[j] < eps;
        const acc_t inv = acc_t(1) / (clamped ? acc_t(1) : d[j] * inverse);
        // Each product lies between q and P f: none overflows unless P f does.
        q[j] = clamped ? acc_t(0) : -((q[j] * inv) * inv) * inv;
      }
      q[row_class[u]] = acc_t(0);
    }
  });
  return assemble_weight_gradient<acc_t>(pooled, scaled, row_class, dist, weight.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> elogitnorm_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& logits_in, const at::Tensor& weight,
    const at::Tensor& grad_unit, const at::Tensor& scale_grad, const at::Tensor& sample_slot,
    const at::Tensor& row_class, const at::Tensor& distances, const at::Tensor& valid_count,
    c10::string_view reduction_name, double eps, bool need_logits_grad,
    bool need_weight_grad) {
  const Reduction reduction = parse_reduction(reduction_name, kBackward);
  const at::Tensor logits = logits_in.contiguous();
  const auto acc_type = accumulation_type(logits, weight);
  TORCH_CHECK(sample_slot.scalar_type() == at::kLong && sample_slot.is_contiguous() &&
                  sample_slot.numel() == logits.size(0),
              kBackward, ": sample_slot must be a contiguous int64 (N,) tensor");
  const at::Tensor grad_acc = grad_output.to(acc_type);
  const int64_t* slot = sample_slot.const_data_ptr<int64_t>();
  at::Tensor grad_logits = at::empty({0}, logits.options());
  at::Tensor grad_weight = at::empty({0}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), kBackward, [&] {
    auto run = [&](auto acc_zero) {
      using acc_t = decltype(acc_zero);
      const auto g = upstream_gradient<acc_t>(grad_acc, valid_count, reduction, logits.size(0),
                                              kBackward);
      if (need_logits_grad) {
        TORCH_CHECK(grad_unit.sizes() == logits.sizes(), kBackward,
                    ": grad_unit must be shaped like the logits ", logits.sizes(), ", got ",
                    grad_unit.sizes());
        grad_logits = scale_unit_gradient<scalar_t, acc_t>(
            grad_unit, g, [&](int64_t n) { return slot[n] >= 0; }, logits.options(), kBackward);
      }
      if (need_weight_grad) {
        grad_weight = weight_gradient<scalar_t, acc_t>(logits, weight, scale_grad, slot,
                                                       row_class, distances, g, eps);
      }
    };
    if (acc_type == at::kDouble) {
      run(double(0));
    } else {
      run(float(0));
    }
  });
  return {grad_logits, grad_weight};
}

}  // namespace
}  // namespace elogitnorm_fast::cpu

TORCH_LIBRARY_IMPL(elogitnorm_fast, CPU, m) {
  m.impl("elogitnorm_forward", &elogitnorm_fast::cpu::elogitnorm_forward_cpu);
  m.impl("elogitnorm_backward", &elogitnorm_fast::cpu::elogitnorm_backward_cpu);
}
