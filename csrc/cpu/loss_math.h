// Scalar helpers shared by the CPU loss kernels (elogitnorm_loss.cpp, logitnorm_loss.cpp).
//
// Everything here is branch-free and inline so that gcc -O3 vectorises the row loops that call
// it (`#pragma omp simd` on the loops lets it reorder the float sums; the order depends on the
// vector width only, never on the thread count).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace elogitnorm_fast::cpu {

enum class Reduction { None, Mean, Sum };

inline Reduction parse_reduction(std::string_view name, const char* op) {
  if (name == "mean") return Reduction::Mean;
  if (name == "sum") return Reduction::Sum;
  TORCH_CHECK(name == "none", op, ": reduction must be 'mean', 'sum' or 'none', got '",
              std::string(name), "'");
  return Reduction::None;
}

// exp(x) for x <= 0 (the callers shift by the row maximum), vectorisable: x = n ln2 + r with
// |r| <= ln2 / 2, a degree-7 polynomial for exp(r) (relative error below 2e-7) and 2^n built in
// the exponent bits. NaN stays NaN; x below -87 gives 0.
inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;
  constexpr float kLn2Lo = 1.428606765330187045e-06f;
  const float clamped = x < -87.0f ? -87.0f : x;
  const float n = std::nearbyint(clamped * kLog2e);
  const float r = (clamped - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return x < -87.0f ? 0.0f : p * two_n;
}

inline double exp_nonpositive(double x) { return std::exp(x); }

// Clamp from below that keeps NaN (std::max(NaN, lo) would too, but this reads as the formula).
template <typename T>
inline T clamp_min_keep_nan(T x, T lo) {
  return x < lo ? lo : x;
}

template <typename T>
inline T to_acc(T x) {
  return x;
}
inline float to_acc(c10::Half x) { return static_cast<float>(x); }
inline float to_acc(c10::BFloat16 x) { return static_cast<float>(x); }

// Copy one row into `buffer` in the accumulation type and return it; rows that already have the
// accumulation type are returned in place.
template <typename acc_t, typename scalar_t>
inline const acc_t* row_in_acc(const scalar_t* row, int64_t length, acc_t* buffer) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return row;
  } else {
#pragma omp simd
    for (int64_t j = 0; j < length; ++j) buffer[j] = static_cast<acc_t>(to_acc(row[j]));
    return buffer;
  }
}

// Rescaling against overflow. Squares and differences of float32 values above about 2^63 (or
// products with a large 1 / Delta) overflow, and those of tiny values underflow, long before
// the losses themselves do: LogitNorm is unchanged when a row of logits is multiplied by k
// (its 1e-7 scaled along), ELogitNorm's s scales with the row (its eps clamp scaled along) and
// its distances with the weight. Multiplying by a power of two is exact, so a row (or the
// weight) whose largest magnitude lies outside [2^-30, 2^30] (float; [2^-300, 2^300] for
// double) is computed divided by the power of two that brings that magnitude into [1, 2), and
// the results are scaled back: bitwise the unscaled formula wherever that neither overflows nor
// underflows. Rows inside the window (all ordinary inputs) keep k = 1 and skip the copy.
template <typename T>
inline T rescale_factor(T largest) {
  constexpr int kWindow = std::is_same_v<T, float> ? 30 : 300;
  constexpr int kLowest = std::is_same_v<T, float> ? -100 : -1000;  // keeps 1 / k finite
  if (!std::isfinite(largest) || !(largest > T(0))) return T(1);  // 0, inf and NaN: unscaled
  int exponent = 0;
  std::frexp(largest, &exponent);  // largest = m 2^exponent with m in [0.5, 1)
  if (exponent > -kWindow && exponent <= kWindow) return T(1);
  return std::ldexp(T(1), std::max(exponent - 1, kLowest));
}

// Largest magnitude among `length` values (NaN ignored: it propagates through the formulas).
template <typename acc_t, typename scalar_t>
inline acc_t max_abs(const scalar_t* values, int64_t length) {
  acc_t largest = 0;
#pragma omp simd reduction(max : largest)
  for (int64_t j = 0; j < length; ++j) {
    const acc_t a = std::abs(static_cast<acc_t>(to_acc(values[j])));
    largest = a > largest ? a : largest;
  }
  return largest;
}

// Row `row` in acc_t divided by the power of two `factor`: in place (factor 1, row already in
// acc_t) or in `buffer`.
template <typename acc_t, typename scalar_t>
inline const acc_t* scaled_row(const scalar_t* row, int64_t length, acc_t factor,
                               acc_t* buffer) {
  if (factor == acc_t(1)) return row_in_acc<acc_t>(row, length, buffer);
  const acc_t inverse = acc_t(1) / factor;
#pragma omp simd
  for (int64_t j = 0; j < length; ++j) buffer[j] = static_cast<acc_t>(to_acc(row[j])) * inverse;
  return buffer;
}

// x in T, the largest finite T where x is above it (1 / s of a tiny clamped s of a huge row):
// the row's terms are then 0 or far below -87, never 0 * inf = NaN. NaN stays NaN.
template <typename T>
inline T capped(double x) {
  return x > static_cast<double>(std::numeric_limits<T>::max()) ? std::numeric_limits<T>::max()
                                                                 : static_cast<T>(x);
}

// Per-row upstream gradient g_n: a scalar for mean / sum (mean divides by the valid count, and an
// all-ignored batch gives 0), one strided entry per row for none.
template <typename acc_t>
struct UpstreamGradient {
  const acc_t* data;
  int64_t stride;
  acc_t scalar;
  bool per_row;
  acc_t operator()(int64_t n) const { return per_row ? data[n * stride] : scalar; }
};

// `grad_acc` must be grad_output converted to acc_t (any strides) and stay alive while used.
template <typename acc_t>
inline UpstreamGradient<acc_t> upstream_gradient(const at::Tensor& grad_acc,
                                                 const at::Tensor& valid_count,
                                                 Reduction reduction, int64_t rows,
                                                 const char* op) {
  UpstreamGradient<acc_t> g{nullptr, 0, acc_t(0), false};
  if (reduction == Reduction::None) {
    TORCH_CHECK(grad_acc.dim() == 1 && grad_acc.size(0) == rows, op,
                ": grad_output must have shape (", rows, ",) for reduction='none', got ",
                grad_acc.sizes());
    g.data = grad_acc.data_ptr<acc_t>();
    g.stride = grad_acc.stride(0);
    g.per_row = true;
    return g;
  }
  TORCH_CHECK(grad_acc.numel() == 1, op, ": grad_output must be a scalar for reduction='",
              reduction == Reduction::Mean ? "mean" : "sum", "', got shape ", grad_acc.sizes());
  g.scalar = *grad_acc.data_ptr<acc_t>();
  if (reduction == Reduction::Mean) {
    const acc_t count = *valid_count.data_ptr<acc_t>();
    g.scalar = count > 0 ? g.scalar / count : acc_t(0);
  }
  return g;
}

// Row grain for at::parallel_for: about 16k elements per task, so that small batches run on
// one thread instead of paying the fork / join.
inline int64_t row_grain(int64_t columns) {
  return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(columns, 1));
}

// The last forward step of both losses: the per-row losses reduced (summed in row order: the
// same result for any thread count; mean over the valid rows, 0 / 0 = NaN as F.cross_entropy)
// and the valid-row count the backward's mean needs. `valid(n)` says whether row n counts.
template <typename scalar_t, typename Valid>
inline std::pair<at::Tensor, at::Tensor> reduce_losses(const std::vector<double>& row_loss,
                                                       Valid valid, Reduction reduction,
                                                       const at::TensorOptions& loss_options,
                                                       const at::TensorOptions& acc_options) {
  const int64_t rows = static_cast<int64_t>(row_loss.size());
  int64_t count = 0;
  for (int64_t n = 0; n < rows; ++n) count += valid(n);
  at::Tensor valid_count = at::full({}, static_cast<double>(count), acc_options);
  if (reduction == Reduction::None) {
    at::Tensor loss = at::empty({rows}, loss_options);
    scalar_t* out = loss.data_ptr<scalar_t>();
    for (int64_t n = 0; n < rows; ++n) out[n] = static_cast<scalar_t>(row_loss[n]);
    return {loss, valid_count};
  }
  double total = 0;
  for (int64_t n = 0; n < rows; ++n) total += row_loss[n];
  if (reduction == Reduction::Mean) total /= static_cast<double>(count);
  return {at::full({}, total, loss_options), valid_count};
}

// The logits part of both backwards: row n of the unit-upstream gradient times g_n (0 where
// `valid(n)` is false), in the dtype of `options`.
template <typename scalar_t, typename acc_t, typename Valid>
inline at::Tensor scale_unit_gradient(const at::Tensor& grad_unit,
                                      const UpstreamGradient<acc_t>& g, Valid valid,
                                      const at::TensorOptions& options, const char* op) {
  TORCH_CHECK(grad_unit.dim() == 2 && grad_unit.is_contiguous(), op,
              ": grad_unit must be a contiguous (N, C) tensor, got ", grad_unit.sizes());
  const int64_t rows = grad_unit.size(0);
  const int64_t classes = grad_unit.size(1);
  at::Tensor out = at::empty({rows, classes}, options);
  const acc_t* unit = grad_unit.const_data_ptr<acc_t>();
  scalar_t* dst = out.data_ptr<scalar_t>();
  at::parallel_for(0, rows, row_grain(classes), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const acc_t gn = valid(n) ? g(n) : acc_t(0);
      const acc_t* src = unit + n * classes;
      scalar_t* row = dst + n * classes;
#pragma omp simd
      for (int64_t j = 0; j < classes; ++j) row[j] = static_cast<scalar_t>(gn * src[j]);
    }
  });
  return out;
}

// Accumulation dtype: fp64 when any input is fp64, else fp32.
inline at::ScalarType accumulation_type(const at::Tensor& a, const at::Tensor& b) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble
                                                                           : at::kFloat;
}

}  // namespace elogitnorm_fast::cpu
