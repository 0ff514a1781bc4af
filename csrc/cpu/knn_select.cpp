// Streaming exact top-k selection for the KNN scorer (CPU).
//
// The scorer computes a block of similarities S = Q B^T (rows: queries, columns: bank rows of
// one chunk) with a BLAS GEMM and hands it here. Each query row keeps a min-heap of its k best
// (similarity, bank index) pairs in `best_values` / `best_indices`; the heap root is the worst
// kept pair, so its similarity is a threshold: a whole run of 16 columns is skipped when its
// maximum does not beat it. After the first chunk almost every run is skipped, so selection
// costs one vectorised read of S, a small fraction of the GEMM.
//
// Order: a pair is better when its similarity is larger, or equal with a smaller bank index.
// Chunks must arrive in increasing bank-index order (then a new column never wins a tie).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <limits>

namespace {

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

  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = s_ptr + r * s_stride;
      float* hv = bv_ptr + r * k;
      int64_t* hi = bi_ptr + r * k;
      float threshold = hv[0];
      int64_t c = 0;
      for (; c + kRun <= cols; c += kRun) {
        float run_max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : run_max)
        for (int64_t j = 0; j < kRun; ++j) {
          run_max = row[c + j] > run_max ? row[c + j] : run_max;
        }
        if (!(run_max > threshold)) continue;
        for (int64_t j = 0; j < kRun; ++j) {
          const float v = row[c + j];
          if (v > threshold) {
            heap_replace_root(hv, hi, k, v, index_offset + c + j);
            threshold = hv[0];
          }
        }
      }
      for (; c < cols; ++c) {
        const float v = row[c];
        if (v > threshold) {
          heap_replace_root(hv, hi, k, v, index_offset + c);
          threshold = hv[0];
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
