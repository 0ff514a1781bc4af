// Fused exact KNN search step (CPU): similarity tiles from a GEMM, selected while cache-hot.
//
// For all queries Q and a chunk of bank rows B, each thread owns a contiguous range of query
// tiles (kQueryTile rows). For each bank tile (kBankTile rows) it runs, for every query tile of
// its range, a single-threaded GEMM S = Q_tile B_tile^T (+ bias) into its own buffer
// (kQueryTile x kBankTile floats, cache-resident) and merges every row of S into that query's
// running top-k at once (knn_slots.h). The bank tile stays in cache across the thread's query
// tiles, and the similarity block is never written to and read back from main memory, unlike a
// large multi-threaded GEMM followed by a selection pass.
//
// Results do not depend on the thread count: tiles have fixed sizes, and each query's state is
// updated by one thread in increasing bank-index order.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "knn_slots.h"

namespace {

using elogitnorm_fast::knn::check_state;
using elogitnorm_fast::knn::select_row;

// 256 x 1024 floats = 1 MiB of similarities per thread; the bank tile (1024 x D) stays in
// cache while a thread runs its query tiles against it. Measured against 128/512 query rows
// and 512/2048 bank rows on a 2-core AMD EPYC (D = 512).
constexpr int64_t kQueryTile = 256;
constexpr int64_t kBankTile = 1024;

void knn_search_update_cpu(const at::Tensor& queries, const at::Tensor& bank_rows,
                           const std::optional<at::Tensor>& bias, at::Tensor& values,
                           at::Tensor& indices, at::Tensor& pending, at::Tensor& thresholds,
                           int64_t k, int64_t index_offset) {
  TORCH_CHECK(queries.dim() == 2 && queries.scalar_type() == at::kFloat,
              "knn_search_update: queries must be a 2-D float32 tensor, got ", queries.dim(),
              "-D ", queries.scalar_type());
  TORCH_CHECK(bank_rows.dim() == 2 && bank_rows.scalar_type() == at::kFloat &&
                  bank_rows.size(1) == queries.size(1),
              "knn_search_update: bank_rows must be a 2-D float32 tensor with ", queries.size(1),
              " columns like queries, got shape ", bank_rows.sizes(), " ",
              bank_rows.scalar_type());
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->scalar_type() == at::kFloat &&
                                    bias->size(0) == bank_rows.size(0)),
              "knn_search_update: bias must be a float32 vector with one entry per bank row (",
              bank_rows.size(0), ")");
  const int64_t num_queries = queries.size(0);
  const int64_t num_bank = bank_rows.size(0);
  const int64_t capacity = values.size(1);
  check_state("knn_search_update", values, indices, pending, thresholds, num_queries, k);
  if (num_queries == 0 || num_bank == 0) return;
  const at::Tensor q = queries.contiguous();
  const at::Tensor b = bank_rows.contiguous();
  float* v_ptr = values.data_ptr<float>();
  int64_t* i_ptr = indices.data_ptr<int64_t>();
  int64_t* pending_ptr = pending.data_ptr<int64_t>();
  float* threshold_ptr = thresholds.data_ptr<float>();
  const int64_t num_tiles = (num_queries + kQueryTile - 1) / kQueryTile;

  at::parallel_for(0, num_tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
    std::vector<float> scratch(static_cast<size_t>(std::max(capacity, kBankTile)));
    at::Tensor buffer = at::empty({kQueryTile, kBankTile}, q.options());
    for (int64_t b0 = 0; b0 < num_bank; b0 += kBankTile) {
      const int64_t cols = std::min(kBankTile, num_bank - b0);
      const at::Tensor b_tile_t = b.narrow(0, b0, cols).t();
      for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
        const int64_t q0 = tile * kQueryTile;
        const int64_t rows = std::min(kQueryTile, num_queries - q0);
        at::Tensor out = buffer.narrow(0, 0, rows).narrow(1, 0, cols);
        if (bias.has_value()) {
          at::addmm_out(out, bias->narrow(0, b0, cols).unsqueeze(0), q.narrow(0, q0, rows),
                        b_tile_t);
        } else {
          at::mm_out(out, q.narrow(0, q0, rows), b_tile_t);
        }
        const float* s_ptr = out.data_ptr<float>();
        const int64_t s_stride = out.stride(0);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t query = q0 + r;
          select_row(s_ptr + r * s_stride, cols, index_offset + b0, k, capacity,
                     v_ptr + query * capacity, i_ptr + query * capacity, pending_ptr[query],
                     threshold_ptr[query], scratch.data());
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(elogitnorm_fast, m) {
  m.def(
      "knn_search_update(Tensor queries, Tensor bank_rows, Tensor? bias, Tensor(a!) values, "
      "Tensor(b!) indices, Tensor(c!) pending, Tensor(d!) thresholds, int k, int index_offset) "
      "-> ()");
}

TORCH_LIBRARY_IMPL(elogitnorm_fast, CPU, m) {
  m.impl("knn_search_update", &knn_search_update_cpu);
}
