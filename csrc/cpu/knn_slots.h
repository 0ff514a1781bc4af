// Per-row state of the exact streaming top-k used by the KNN scorer (CPU), and the update of
// one row by a block of similarities (knn_search.cpp computes the blocks tile by tile).
//
// Each query row owns `capacity` slots of (similarity, bank index) pairs: slots [0, k) hold k
// kept pairs (unordered) whose worst value is the row's threshold, slots [k, k + pending) hold
// candidates that beat the threshold since the last merge. A whole run of 16 columns is skipped
// when its maximum does not beat the threshold (one vectorised read once the row is warm);
// candidates of a run are appended branch-free. When the slots fill up, one nth_element over
// their values keeps the k best and raises the threshold: O(1) per candidate amortised, where a
// heap costs O(log k), and pending candidates carry over between blocks.
// The caller finishes with a top-k over each row's first k + pending slots (selection.py).
//
// Order: a pair is better when its similarity is larger, or equal with a smaller bank index.
// Blocks must arrive in increasing bank-index order, so a new column that equals the threshold
// never beats a kept pair and is skipped.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>

namespace elogitnorm_fast::knn {

constexpr int64_t kRun = 16;

// Write the k best of (values[j], index j) to out_*, in their order: every value above `kth`
// (the k-th best value) and the leftmost values equal to it. Indices come from `indices`, or
// are `index_offset + j` when it is null. Inputs are in increasing bank-index order, so the
// leftmost ties are the smallest indices: the ones to keep. Works in place (out_* == inputs).
inline void keep_best(const float* values, const int64_t* indices, int64_t n, int64_t k,
                      float kth, int64_t index_offset, float* out_values, int64_t* out_indices) {
  int64_t above = 0;
  for (int64_t j = 0; j < n; ++j) above += static_cast<int64_t>(values[j] > kth);
  int64_t ties_left = k - above;  // >= 1: the k-th value itself
  int64_t kept = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float v = values[j];
    const int64_t index = indices == nullptr ? index_offset + j : indices[j];
    const bool tie = v == kth;
    const bool keep = v > kth || (tie && ties_left > 0);
    ties_left -= static_cast<int64_t>(tie && keep);
    out_values[kept] = v;
    out_indices[kept] = index;
    kept += static_cast<int64_t>(keep);
  }
}

// Keep the k best of slots [0, n) in [0, k), in their order (slots are always in increasing
// bank-index order: appends arrive in that order and keep_best is stable); returns the new
// threshold, the k-th best value.
inline float merge_slots(float* values, int64_t* indices, int64_t n, int64_t k, float* scratch) {
  std::copy(values, values + n, scratch);
  std::nth_element(scratch, scratch + (k - 1), scratch + n, std::greater<float>());
  const float kth = scratch[k - 1];
  keep_best(values, indices, n, k, kth, 0, values, indices);
  return kth;
}

// Offer one pair to a row's slots (select_row's columns past the last whole run): appended when `value`
// beats the threshold, after a merge when the slots are full. Returns the threshold afterwards.
inline float push_candidate(float value, int64_t index, int64_t k, int64_t capacity, float* rv,
                            int64_t* ri, int64_t& pending, float& threshold, float* scratch) {
  if (!(value > threshold)) return threshold;
  int64_t n = k + pending;
  if (n == capacity) {
    threshold = merge_slots(rv, ri, n, k, scratch);
    n = k;
    pending = 0;
    if (!(value > threshold)) return threshold;
  }
  rv[n] = value;
  ri[n] = index;
  pending = n + 1 - k;
  return threshold;
}

// Merge `row[0, cols)` (bank indices index_offset + j) into one row's slots `rv`, `ri` with its
// `pending` count and `threshold`. `scratch` holds at least max(capacity, cols) floats.
inline void select_row(const float* row, int64_t cols, int64_t index_offset, int64_t k,
                       int64_t capacity, float* rv, int64_t* ri, int64_t& pending,
                       float& threshold_io, float* scratch) {
  float threshold = threshold_io;
  int64_t n = k + pending;  // slots in use
  int64_t c = 0;
  if (cols >= k && threshold == -std::numeric_limits<float>::infinity() && n == k) {
    // The row's first block holds at least k columns: its k best become the kept pairs
    // (one nth_element instead of a merge every `capacity - k` columns).
    std::copy(row, row + cols, scratch);
    std::nth_element(scratch, scratch + (k - 1), scratch + cols, std::greater<float>());
    threshold = scratch[k - 1];
    keep_best(row, nullptr, cols, k, threshold, index_offset, rv, ri);
    c = cols;
  }
  for (; c + kRun <= cols; c += kRun) {
    float run_max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : run_max)
    for (int64_t j = 0; j < kRun; ++j) {
      run_max = row[c + j] > run_max ? row[c + j] : run_max;
    }
    if (!(run_max > threshold)) continue;
    if (n + kRun > capacity) {
      threshold = merge_slots(rv, ri, n, k, scratch);
      n = k;
    }
    // branch-free append: every column is written, only those above the threshold count
    for (int64_t j = 0; j < kRun; ++j) {
      const float v = row[c + j];
      rv[n] = v;
      ri[n] = index_offset + c + j;
      n += static_cast<int64_t>(v > threshold);
    }
  }
  pending = n - k;
  threshold_io = threshold;
  for (; c < cols; ++c) {
    push_candidate(row[c], index_offset + c, k, capacity, rv, ri, pending, threshold_io,
                   scratch);
  }
}

// Argument checks shared by the ops that update the state of `rows` queries.
inline void check_state(const char* op, const at::Tensor& values, const at::Tensor& indices,
                        const at::Tensor& pending, const at::Tensor& thresholds, int64_t rows,
                        int64_t k) {
  TORCH_CHECK(values.dim() == 2 && values.scalar_type() == at::kFloat && values.is_contiguous(),
              op, ": values must be a contiguous 2-D float32 tensor");
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.is_contiguous() &&
                  indices.sizes() == values.sizes(),
              op, ": indices must be a contiguous int64 tensor shaped like values ",
              values.sizes(), ", got ", indices.sizes());
  TORCH_CHECK(values.size(0) == rows, op, ": expected state for ", rows,
              " query rows, values has ", values.size(0));
  TORCH_CHECK(k >= 1 && values.size(1) >= k + kRun, op, ": values needs at least k + ", kRun,
              " columns (k = ", k, "), got ", values.size(1));
  TORCH_CHECK(pending.scalar_type() == at::kLong && pending.is_contiguous() &&
                  pending.dim() == 1 && pending.size(0) == rows,
              op, ": pending must be a contiguous int64 vector of length ", rows);
  TORCH_CHECK(thresholds.scalar_type() == at::kFloat && thresholds.is_contiguous() &&
                  thresholds.dim() == 1 && thresholds.size(0) == rows,
              op, ": thresholds must be a contiguous float32 vector of length ", rows);
}

}  // namespace elogitnorm_fast::knn
