// CPU op: several logit-based OOD scores in one pass per row (elogitnorm_fast::logit_scores).
//
// Per row of logits z (C entries): m1 = max_j z_j, top = one index of it, m2 = the largest of
// the other entries (m2 = m1 on a tie for the maximum), and over j != top
//   R = sum exp(z_j - m2) (>= 1),  B = sum exp(z_j - m2) (m2 - z_j),
// plus S_T = sum_j exp((z_j - m1) / T) for T != 1. Shifting by m2 keeps
// o = sum_{j != top} exp(z_j - m1) = exp(m2 - m1) R in log form, so no margin underflows it.
// The scores, finished in double from these sums (elogitnorm_fast/scoring/logit_scores.py has
// the same formulas and the reasons for the log forms):
//   msp       = (m1 - m2) - log R              (log-odds of the max softmax probability)
//   max_logit = m1
//   energy    = m1 + log1p(o)  (T = 1),  m1 + T log S_T otherwise
//   entropy   = -log H,  H = exp(m2 - m1) [R log1p(o) / o + ((m1 - m2) R + B) / (1 + o)]
//   gen       = -log sum_{j in top-M} p_j^g (1 - p_j)^g, in log space, with
//               log(1 - p_top) = log o - log1p(o) for the maximum.
// Equal values tie (infinite ones too: +inf entries share the probability, an all -inf row is
// uniform); a NaN anywhere makes every score of the row NaN.
// The row is read from memory once: it is converted into a thread-local float buffer (or used
// in place for contiguous fp32/fp64), and the passes (max, second max, sums, GEN's top-M
// selection with std::nth_element on a copy, only when GEN is requested) run on the
// cache-resident row. Rows run in parallel with at::parallel_for; fp16 / bf16 / fp32 accumulate
// in float32, fp64 in float64. The output is (K, N), K = the number of requested scores, in the
// canonical order msp, max_logit, energy, entropy, gen (SCORE_NAMES in
// elogitnorm_fast/scoring/logit_scores.py).
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

// The per-row sums of the header: out = {m1, m2, R, B, S_T, nan count}.
struct RowSums {
  double m1, m2, r, b, st;
  bool nan;
};

// float rows: four vectorised passes over the cache-resident row. Compiled for AVX2+FMA and a
// baseline, picked at load time.
__attribute__((target_clones("avx2,fma", "default"))) void float_row_sums(
    const float* x, int64_t n, float inv_t, bool want_t, RowSums* out) {
  const float ninf = -std::numeric_limits<float>::infinity();
  float m1 = ninf, nans = 0.0f;
#pragma omp simd reduction(max : m1) reduction(+ : nans)
  for (int64_t j = 0; j < n; ++j) {
    m1 = x[j] > m1 ? x[j] : m1;
    nans += x[j] != x[j] ? 1.0f : 0.0f;
  }
  float below = ninf, ties = 0.0f;
#pragma omp simd reduction(max : below) reduction(+ : ties)
  for (int64_t j = 0; j < n; ++j) {
    float v = x[j] < m1 ? x[j] : ninf;
    below = v > below ? v : below;
    ties += x[j] == m1 ? 1.0f : 0.0f;
  }
  const float m2 = ties >= 2.0f ? m1 : below;
  // the ties beyond the one taken as the maximum count exp(0) = 1 each, with m2 - z = 0
  float r = ties - 1.0f, b = 0.0f;
#pragma omp simd reduction(+ : r, b)
  for (int64_t j = 0; j < n; ++j) {
    // x < m1 selects the others, where x - m2 <= 0; equal values (infinite ones too) are 0
    // apart, not NaN
    const bool other = x[j] < m1;
    float d = other && x[j] != m2 ? x[j] - m2 : 0.0f;
    float e = other ? exp_nonpositive(d) : 0.0f;
    r += e;
    b += e > 0.0f ? -e * d : 0.0f;
  }
  float st = 0.0f;
  if (want_t) {
#pragma omp simd reduction(+ : st)
    for (int64_t j = 0; j < n; ++j) {
      float d = x[j] == m1 ? 0.0f : x[j] - m1;
      st += exp_nonpositive(d * inv_t);
    }
  }
  *out = RowSums{m1, m2, r, b, st, nans > 0.0f};
}

void double_row_sums(const double* x, int64_t n, double inv_t, bool want_t, RowSums* out) {
  const double ninf = -std::numeric_limits<double>::infinity();
  double m1 = ninf;
  bool nan = false;
  for (int64_t j = 0; j < n; ++j) {
    m1 = x[j] > m1 ? x[j] : m1;
    nan = nan || x[j] != x[j];
  }
  double below = ninf, ties = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    below = x[j] < m1 && x[j] > below ? x[j] : below;
    ties += x[j] == m1 ? 1.0 : 0.0;
  }
  const double m2 = ties >= 2.0 ? m1 : below;
  double r = ties - 1.0, b = 0.0, st = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    if (x[j] < m1) {
      double d = x[j] == m2 ? 0.0 : x[j] - m2;
      double e = std::exp(d);
      r += e;
      b += e > 0.0 ? -e * d : 0.0;
    }
    if (want_t) st += std::exp((x[j] == m1 ? 0.0 : x[j] - m1) * inv_t);
  }
  *out = RowSums{m1, m2, r, b, st, nan};
}

inline void row_sums(const float* x, int64_t n, double inv_t, bool want_t, RowSums* out) {
  float_row_sums(x, n, static_cast<float>(inv_t), want_t, out);
}
inline void row_sums(const double* x, int64_t n, double inv_t, bool want_t, RowSums* out) {
  double_row_sums(x, n, inv_t, want_t, out);
}

// The float64 quantities every score is read from (the header's formulas).
struct Finished {
  double m1, gap, r, b, log_o, o, log1p_o;
  explicit Finished(const RowSums& s) : m1(s.m1), r(s.r), b(s.b) {
    gap = s.m1 == s.m2 ? 0.0 : s.m1 - s.m2;  // >= 0, or +inf
    const double ninf = -std::numeric_limits<double>::infinity();
    log_o = (r == 0.0 || std::isinf(gap)) ? ninf : std::log(r) - gap;
    o = std::exp(log_o);
    log1p_o = std::log1p(o);
  }
  double msp() const { return -log_o; }
  double energy(double temperature, double st) const {
    return temperature == 1.0 ? m1 + log1p_o : m1 + temperature * std::log(st);
  }
  double entropy() const {
    if (r == 0.0 || std::isinf(gap)) return std::numeric_limits<double>::infinity();  // H = 0
    const double ratio = o > 0.0 ? log1p_o / o : 1.0;  // log1p(o) / o -> 1 as o -> 0
    return gap - std::log(r) - std::log(ratio + (gap + b / r) / (1.0 + o));
  }
};

// -log of sum over the top-M entries of p^g (1 - p)^g, in log space (ties: equal p, equal
// terms). The first entry equal to the maximum uses log(1 - p) = log o - log1p(o); every
// other has p <= 1/2, where log(-expm1(log p)) is accurate.
template <typename acc_t>
double gen_score(const acc_t* row, int64_t n, int64_t top_m, const Finished& f, double gamma,
                 std::vector<acc_t>& scratch, std::vector<double>& terms) {
  const acc_t* top = row;
  int64_t count = n;
  if (top_m < n) {
    scratch.assign(row, row + n);
    std::nth_element(scratch.begin(), scratch.begin() + (top_m - 1), scratch.end(),
                     std::greater<acc_t>());
    top = scratch.data();
    count = top_m;
  }
  const double ninf = -std::numeric_limits<double>::infinity();
  double largest = ninf;
  terms.clear();
  bool max_seen = false;
  for (int64_t j = 0; j < count; ++j) {
    const double z = static_cast<double>(top[j]);
    double term;
    if (!max_seen && z == f.m1) {
      max_seen = true;
      term = gamma * (f.log_o - 2.0 * f.log1p_o);
    } else {
      const double log_p = (z == f.m1 ? 0.0 : z - f.m1) - f.log1p_o;
      term = gamma * (log_p + std::log(-std::expm1(log_p)));
    }
    terms.push_back(term);
    largest = term > largest ? term : largest;
  }
  if (largest == ninf) return std::numeric_limits<double>::infinity();  // G = 0
  double total = 0.0;
  for (double term : terms) total += std::exp(term - largest);
  return -(largest + std::log(total));
}

template <typename scalar_t, typename acc_t>
void logit_scores_kernel(const scalar_t* logits, int64_t rows, int64_t cols, bool want_msp,
                         bool want_max, bool want_energy, bool want_entropy, bool want_gen,
                         double temperature, double gamma, int64_t top_m, acc_t* out) {
  const bool want_t = want_energy && temperature != 1.0;
  const double inv_t = 1.0 / temperature;
  const int64_t m_eff = std::min<int64_t>(top_m, cols);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  const double nan = std::numeric_limits<double>::quiet_NaN();
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer;
    std::vector<acc_t> scratch;
    std::vector<double> terms;
    if (!std::is_same<scalar_t, acc_t>::value) buffer.resize(cols);
    RowSums sums;
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* src = logits + r * cols;
      const acc_t* row;
      if constexpr (std::is_same<scalar_t, acc_t>::value) {
        row = src;
      } else {
        for (int64_t j = 0; j < cols; ++j) buffer[j] = static_cast<acc_t>(src[j]);
        row = buffer.data();
      }
      row_sums(row, cols, inv_t, want_t, &sums);
      const Finished f(sums);
      const bool bad = sums.nan;  // NaN anywhere in the row: every score is NaN
      int64_t k = 0;
      auto put = [&](double value) {
        out[(k++) * rows + r] = static_cast<acc_t>(bad ? nan : value);
      };
      if (want_msp) put(f.msp());
      if (want_max) put(f.m1);
      if (want_energy) put(f.energy(temperature, sums.st));
      if (want_entropy) put(f.entropy());
      if (want_gen) put(bad ? nan : gen_score<acc_t>(row, cols, m_eff, f, gamma, scratch, terms));
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
