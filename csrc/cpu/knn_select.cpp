// Streaming exact top-k selection for the KNN scorer (CPU).
//
// The scorer computes a block of similarities S = Q B^T (rows: queries, columns: bank rows of
// one chunk) with a BLAS GEMM and hands it here. Each query row keeps a min-heap of its k best
// (similarity, bank index) pairs in `best_values` / `best_indices`; the heap root is the worst
// kept pair, so its similarity is a threshold: a whole run of 16 columns is skipped when its
// maximum does not beat it. Candidates of a run are collected branch-free into a buffer; a
// cold heap (first chunk: many candidates) absorbs them in bulk with nth_element + make_heap,
// a warm one by single root replacements, so selection stays a small fraction of the GEMM.
//
// Order: a pair is better when its similarity is larger, or equal with a smaller bank index.
// Chunks must arrive in increasing bank-index order (then a new column never wins a tie).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>
#include <limits>

namespace {

struct Pair {
  float v;
  int64_t i;
};

// Strict total order: larger similarity first, equal similarities by smaller bank index.
inline bool better(const Pair& a, const Pair& b) {
  return a.v > b.v || (a.v == b.v && a.i < b.i);
}

inline bool worse(float va, int64_t ia, float vb, int64_t ib) {
  // true when (va, ia) ranks below (vb, ib)
  return va < vb || (va == vb && ia > ib);
}

// Replace the root of a min-heap (by `worse`) and restore the heap property.
inline void heap_replace_root(float* vals, int64_t* idx, int64_t k, float v, int64_t i) {
  int64_t pos = 0;
  while (true) {
    int64_t child = 2 * pos + 1;
    if (child >= k) break;
    if (child + 1 < k && worse(vals[child + 1], idx[child + 1], vals[child], idx[child])) {
      ++child;
    }
    if (!worse(vals[child], idx[child], v, i)) break;
    vals[pos] = vals[child];
    idx[pos] = idx[child];
    pos = child;
  }
  vals[pos] = v;
  idx[pos] = i;
}

// Merge candidates buf[k, n) into the heap (hv, hi) of size k: copy the heap into buf[0, k),
// keep the k best with one nth_element and rebuild the heap (root = worst kept pair).
inline void bulk_merge(Pair* buf, int64_t n, float* hv, int64_t* hi, int64_t k) {
  for (int64_t j = 0; j < k; ++j) buf[j] = Pair{hv[j], hi[j]};
  std::nth_element(buf, buf + (k - 1), buf + n, better);
  // a max-heap by `better` has the worst pair at its root
  std::make_heap(buf, buf + k, better);
  for (int64_t j = 0; j < k; ++j) {
    hv[j] = buf[j].v;
    hi[j] = buf[j].i;
  }
}

void knn_select_update_cpu(const at::Tensor& scores, at::Tensor& best_values,
                           at::Tensor& best_indices, int64_t index_offset) {
  TORCH_CHECK(scores.dim() == 2 && scores.scalar_type() == at::kFloat,
              "knn_select_update: scores must be a 2-D float32 tensor, got ", scores.dim(),
              "-D ", scores.scalar_type());
  TORCH_CHECK(scores.stride(1) == 1 || scores.size(1) <= 1,
              "knn_select_update: scores rows must be contiguous, got strides ", scores.strides());
  TORCH_CHECK(best_values.dim() == 2 && best_values.scalar_type() == at::kFloat &&
                  best_values.is_contiguous(),
              "knn_select_update: best_values must be a contiguous 2-D float32 tensor");
  TORCH_CHECK(best_indices.scalar_type() == at::kLong && best_indices.is_contiguous() &&
                  best_indices.sizes() == best_values.sizes(),
              "knn_select_update: best_indices must be a contiguous int64 tensor shaped like "
              "best_values ", best_values.sizes(), ", got ", best_indices.sizes());
  TORCH_CHECK(best_values.size(0) == scores.size(0),
              "knn_select_update: scores has ", scores.size(0), " rows but best_values has ",
              best_values.size(0));
  const int64_t rows = scores.size(0);
  const int64_t cols = scores.size(1);
  const int64_t k = best_values.size(1);
  if (rows == 0 || cols == 0 || k == 0) return;
  const float* s_ptr = scores.data_ptr<float>();
  const int64_t s_stride = scores.stride(0);
  float* bv_ptr = best_values.data_ptr<float>();
  int64_t* bi_ptr = best_indices.data_ptr<int64_t>();
  constexpr int64_t kRun = 16;
  // Candidates that beat the threshold are collected first. Many of them (a cold heap: the
  // first chunk) are merged in bulk, one nth_element per `slack` candidates, amortised O(1)
  // each; the few that arrive once the heap is warm are inserted one by one (O(log k)).
  const int64_t slack = std::max<int64_t>(k, 256);
  const int64_t capacity = k + slack;
  const int64_t bulk_min = std::max<int64_t>(k / 4, 16);

  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<Pair> storage(static_cast<size_t>(capacity + kRun));
    Pair* buf = storage.data();
    for (int64_t r = begin; r < end; ++r) {
      const float* row = s_ptr + r * s_stride;
      float* hv = bv_ptr + r * k;
      int64_t* hi = bi_ptr + r * k;
      float threshold = hv[0];  // the heap root: the k-th best pair so far
      int64_t n = k;            // candidates live in buf[k, n)
      int64_t c = 0;
      for (; c + kRun <= cols; c += kRun) {
        float run_max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : run_max)
        for (int64_t j = 0; j < kRun; ++j) {
          run_max = row[c + j] > run_max ? row[c + j] : run_max;
        }
        if (!(run_max > threshold)) continue;
        // branch-free compaction of the run's candidates (the buffer has kRun spare slots)
        for (int64_t j = 0; j < kRun; ++j) {
          const float v = row[c + j];
          buf[n] = Pair{v, index_offset + c + j};
          n += static_cast<int64_t>(v > threshold);
        }
        if (n >= capacity) {
          bulk_merge(buf, n, hv, hi, k);
          n = k;
          threshold = hv[0];
        }
      }
      for (; c < cols; ++c) {
        const float v = row[c];
        buf[n] = Pair{v, index_offset + c};
        n += static_cast<int64_t>(v > threshold);
      }
      if (n - k >= bulk_min) {
        bulk_merge(buf, n, hv, hi, k);
      } else {
        // candidates come in increasing index order, so a tie with the root never wins
        for (int64_t j = k; j < n; ++j) {
          if (buf[j].v > hv[0]) heap_replace_root(hv, hi, k, buf[j].v, buf[j].i);
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(elogitnorm_fast, m) {
  m.def(
      "knn_select_update(Tensor scores, Tensor(a!) best_values, Tensor(b!) best_indices, "
      "int index_offset) -> ()");
}

TORCH_LIBRARY_IMPL(elogitnorm_fast, CPU, m) {
  m.impl("knn_select_update", &knn_select_update_cpu);
}
