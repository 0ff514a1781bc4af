// Streaming exact top-k selection for the KNN scorer (CPU): one block of similarities S (rows:
// queries, columns: bank rows of one chunk, computed by the caller) merged into every query's
// running top-k. The state and its update are in knn_slots.h; knn_search.cpp fuses the GEMM.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "knn_slots.h"

namespace {

using elogitnorm_fast::knn::check_state;
using elogitnorm_fast::knn::select_row;

void knn_select_update_cpu(const at::Tensor& scores, at::Tensor& values, at::Tensor& indices,
                           at::Tensor& pending, at::Tensor& thresholds, int64_t k,
                           int64_t index_offset) {
  TORCH_CHECK(scores.dim() == 2 && scores.scalar_type() == at::kFloat,
              "knn_select_update: scores must be a 2-D float32 tensor, got ", scores.dim(),
              "-D ", scores.scalar_type());
  TORCH_CHECK(scores.stride(1) == 1 || scores.size(1) <= 1,
              "knn_select_update: scores rows must be contiguous, got strides ", scores.strides());
  const int64_t rows = scores.size(0);
  const int64_t cols = scores.size(1);
  const int64_t capacity = values.size(1);
  check_state("knn_select_update", values, indices, pending, thresholds, rows, k);
  if (rows == 0 || cols == 0) return;
  const float* s_ptr = scores.data_ptr<float>();
  const int64_t s_stride = scores.stride(0);
  float* v_ptr = values.data_ptr<float>();
  int64_t* i_ptr = indices.data_ptr<int64_t>();
  int64_t* pending_ptr = pending.data_ptr<int64_t>();
  float* threshold_ptr = thresholds.data_ptr<float>();

  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(static_cast<size_t>(std::max(capacity, cols)));
    for (int64_t r = begin; r < end; ++r) {
      select_row(s_ptr + r * s_stride, cols, index_offset, k, capacity, v_ptr + r * capacity,
                 i_ptr + r * capacity, pending_ptr[r], threshold_ptr[r], scratch.data());
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(elogitnorm_fast, m) {
  m.def(
      "knn_select_update(Tensor scores, Tensor(a!) values, Tensor(b!) indices, "
      "Tensor(c!) pending, Tensor(d!) thresholds, int k, int index_offset) -> ()");
}

TORCH_LIBRARY_IMPL(elogitnorm_fast, CPU, m) {
  m.impl("knn_select_update", &knn_select_update_cpu);
}
