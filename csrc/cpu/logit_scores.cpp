// CPU op: several logit-based OOD scores in one pass per row (elogitnorm_fast::logit_scores).
//
// Per row of logits z (C entries), with m = max_j z_j, e_j = exp(z_j - m):
//   S = sum_j e_j, A = sum_j e_j (z_j - m), S_T = sum_j exp((z_j - m) / T)
//   msp = 1 / S, max_logit = m, energy = m + log S (T = 1) or m + T log S_T,
//   entropy (negated) = A / S - log S,
//   gen = -sum_{j in top-M} p_j^g (1 - p_j)^g with log p_j = z_j - m - log S.
// The row is read from memory once: it is converted into a thread-local float buffer (or used
// in place for contiguous fp32/fp64), and the max, the sums and GEN's top-M selection
// (std::nth_element on a copy, only when GEN is requested) then run on the cache-resident row.
// Rows run in parallel with at::parallel_for; fp16 / bf16 / fp32 accumulate in float32, fp64 in
// float64. The output is (K, N), K = the number of requested scores, in the canonical order
// msp, max_logit, energy, entropy, gen (elogitnorm_fast/scoring/logit_scores.py SCORE_NAMES).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

// The selects below (clamps, masked sums) must be if-converted for the loops to vectorise; with
// GCC's default -ftrapping-math a float compare may trap, which blocks that. Scores never rely
// on floating-point exception flags.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

namespace elogitnorm_fast {
namespace {

// exp(x) for x <= 0, Cephes single-precision polynomial (about 1 ulp), written branch-free so
// `omp simd` loops vectorise. Below -87.3 the result is 0 (exp underflows there anyway); NaN
// propagates.
static inline __attribute__((always_inline)) float exp_nonpositive(float x) {
  const float cutoff = -87.3f;
  float xc = x < cutoff ? cutoff : x;
  // round(x / ln 2) by the magic-number trick (exact without -ffast-math)
  const float magic = 12582912.0f;  // 1.5 * 2^23
  float n = (xc * 1.44269504088896341f + magic) - magic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float r2 = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r2 + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float result = y * scale;
  return x < cutoff ? 0.0f : result;
}

// Max, S, A and S_T of one float row. Compiled for AVX2+FMA and a baseline, picked at load time.
__attribute__((target_clones("avx2,fma", "default"))) void float_row_sums(
    const float* x, int64_t n, float inv_t, bool want_t, float* out) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  // all -inf: shift by 0 so every e_j is 0 instead of NaN
  const float shift = std::isinf(m) && m < 0 ? 0.0f : m;
  float s = 0.0f, a = 0.0f, st = 0.0f, below = 0.0f, ties = 0.0f;
#pragma omp simd reduction(+ : s, a, below, ties)
  for (int64_t j = 0; j < n; ++j) {
    float d = x[j] - shift;
    float e = exp_nonpositive(d);
    s += e;
    a += e > 0.0f ? e * d : 0.0f;  // 0 * (-inf) would be NaN for masked logits
    below += d < 0.0f ? e : 0.0f;
    ties += d == 0.0f ? 1.0f : 0.0f;
  }
  if (want_t) {
#pragma omp simd reduction(+ : st)
    for (int64_t j = 0; j < n; ++j) st += exp_nonpositive((x[j] - shift) * inv_t);
  }
  out[0] = m;
  out[1] = s;
  out[2] = a;
  out[3] = st;
  out[4] = below + (ties - 1.0f);  // sum over k != argmax of exp(z_k - m), for GEN
}

void double_row_sums(const double* x, int64_t n, double inv_t, bool want_t, double* out) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  const double shift = std::isinf(m) && m < 0 ? 0.0 : m;
  double s = 0.0, a = 0.0, st = 0.0, below = 0.0, ties = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    double d = x[j] - shift;
    double e = std::exp(d);
    s += e;
    a += e > 0.0 ? e * d : 0.0;
    below += d < 0.0 ? e : 0.0;
    ties += d == 0.0 ? 1.0 : 0.0;
    if (want_t) st += std::exp(d * inv_t);
  }
  out[0] = m;
  out[1] = s;
  out[2] = a;
  out[3] = st;
  out[4] = below + (ties - 1.0);
}

inline void row_sums(const float* x, int64_t n, float inv_t, bool want_t, float* out) {
  float_row_sums(x, n, inv_t, want_t, out);
}
inline void row_sums(const double* x, int64_t n, double inv_t, bool want_t, double* out) {
  double_row_sums(x, n, inv_t, want_t, out);
}

// -sum over the top-M entries of p^g (1 - p)^g, log p = z - log_norm (ties: equal p, equal
// terms). For the row maximum, 1 - p = others / S with others = sum_{k != argmax} exp(z_k - m)
// summed separately: float32 cannot resolve 1 - p_max from p_max for confident rows, yet
// (1 - p)^0.1 is far from 0 there. Every other entry has p <= 1/2, where -expm1(log p) is exact.
template <typename acc_t>
acc_t gen_score(const acc_t* row, int64_t n, int64_t top_m, acc_t m, acc_t log_s, acc_t others,
                acc_t gamma, std::vector<acc_t>& scratch) {
  const acc_t log_norm = m + log_s;
  const acc_t* top = row;
  int64_t count = n;
  if (top_m < n) {
    scratch.assign(row, row + n);
    std::nth_element(scratch.begin(), scratch.begin() + (top_m - 1), scratch.end(),
                     std::greater<acc_t>());
    top = scratch.data();
    count = top_m;
  }
  acc_t total = std::exp(gamma * (-acc_t(2) * log_s + std::log(others)));  // the maximum
  bool max_seen = false;
  for (int64_t j = 0; j < count; ++j) {
    if (!max_seen && top[j] == m) {  // counted above
      max_seen = true;
      continue;
    }
    acc_t log_p = top[j] - log_norm;
    // 1 - p = -expm1(log p) keeps the relative accuracy of 1 - p when p is close to 1
    total += std::exp(gamma * (log_p + std::log(-std::expm1(log_p))));
  }
  return -total;
}

template <typename scalar_t, typename acc_t>
void logit_scores_kernel(const scalar_t* logits, int64_t rows, int64_t cols, bool want_msp,
                         bool want_max, bool want_energy, bool want_entropy, bool want_gen,
                         double temperature, double gamma, int64_t top_m, acc_t* out) {
  const bool want_t = want_energy && temperature != 1.0;
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  const acc_t t = static_cast<acc_t>(temperature);
  const acc_t g = static_cast<acc_t>(gamma);
  const int64_t m_eff = std::min<int64_t>(top_m, cols);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer;
    std::vector<acc_t> scratch;
    if (!std::is_same<scalar_t, acc_t>::value) buffer.resize(cols);
    acc_t sums[5];
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* src = logits + r * cols;
      const acc_t* row;
      if constexpr (std::is_same<scalar_t, acc_t>::value) {
        row = src;
      } else {
        for (int64_t j = 0; j < cols; ++j) buffer[j] = static_cast<acc_t>(src[j]);
        row = buffer.data();
      }
      row_sums(row, cols, inv_t, want_t, sums);
      acc_t m = sums[0], s = sums[1], a = sums[2], st = sums[3], others = sums[4];
      if (std::isnan(s)) m = s;  // NaN anywhere in the row: every score is NaN, like torch
      const acc_t log_s = std::log(s);
      int64_t k = 0;
      if (want_msp) out[(k++) * rows + r] = acc_t(1) / s;
      if (want_max) out[(k++) * rows + r] = m;
      if (want_energy) out[(k++) * rows + r] = want_t ? m + t * std::log(st) : m + log_s;
      if (want_entropy) out[(k++) * rows + r] = a / s - log_s;
      if (want_gen) out[(k++) * rows + r] = gen_score<acc_t>(row, cols, m_eff, m, log_s, others, g, scratch);
    }
  });
}

at::Tensor logit_scores_cpu(const at::Tensor& logits, bool msp, bool max_logit, bool energy,
                            bool entropy, bool gen, double temperature, double gamma,
                            int64_t top_m) {
  TORCH_CHECK(logits.dim() == 2, "logit_scores: logits must be 2-D (N, C), got ",
              logits.dim(), "-D");
  TORCH_CHECK(logits.size(1) >= 1, "logit_scores: logits need at least one class, got C = 0");
  TORCH_CHECK(temperature > 0, "logit_scores: temperature must be > 0, got ", temperature);
  TORCH_CHECK(gamma > 0, "logit_scores: gamma must be > 0, got ", gamma);
  TORCH_CHECK(top_m >= 1, "logit_scores: top_m must be >= 1, got ", top_m);
  const int64_t k = int64_t(msp) + int64_t(max_logit) + int64_t(energy) + int64_t(entropy) +
                    int64_t(gen);
  TORCH_CHECK(k >= 1, "logit_scores: request at least one score");
  const auto st = logits.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "logit_scores: logits must be float16, bfloat16, float32 or float64, got ", st);
  const at::Tensor z = logits.contiguous();
  const int64_t rows = z.size(0), cols = z.size(1);
  const auto out_type = st == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({k, rows}, z.options().dtype(out_type));
  if (rows == 0) return out;
  if (st == at::kDouble) {
    logit_scores_kernel<double, double>(z.data_ptr<double>(), rows, cols, msp, max_logit, energy,
                                        entropy, gen, temperature, gamma, top_m,
                                        out.data_ptr<double>());
  } else if (st == at::kFloat) {
    logit_scores_kernel<float, float>(z.data_ptr<float>(), rows, cols, msp, max_logit, energy,
                                      entropy, gen, temperature, gamma, top_m,
                                      out.data_ptr<float>());
  } else if (st == at::kHalf) {
    logit_scores_kernel<at::Half, float>(z.data_ptr<at::Half>(), rows, cols, msp, max_logit,
                                         energy, entropy, gen, temperature, gamma, top_m,
                                         out.data_ptr<float>());
  } else {
    logit_scores_kernel<at::BFloat16, float>(z.data_ptr<at::BFloat16>(), rows, cols, msp,
                                             max_logit, energy, entropy, gen, temperature, gamma,
                                             top_m, out.data_ptr<float>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(elogitnorm_fast, m) {
  m.def(
      "logit_scores(Tensor logits, bool msp, bool max_logit, bool energy, bool entropy, "
      "bool gen, float temperature, float gamma, int top_m) -> Tensor");
}

TORCH_LIBRARY_IMPL(elogitnorm_fast, CPU, m) { m.impl("logit_scores", &logit_scores_cpu); }

}  // namespace elogitnorm_fast
