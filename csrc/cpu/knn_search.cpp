// Fused exact KNN search step (CPU): similarities computed tile by tile and selected at once.
//
// For all queries Q and a chunk of bank rows B, each thread owns a contiguous range of query
// tiles (kQueryTile rows) and, bank tile by bank tile (kBankTile rows), computes
// S = Q_tile B_tile^T (+ bias) and merges every row of S into that query's running top-k
// (knn_slots.h). The bank tile stays in cache across the thread's query tiles, and the
// similarity matrix is never written to and read back from main memory, unlike a large
// multi-threaded GEMM followed by a selection pass. Two ways to compute S:
//
// * tile kernels (knn_tiles.h, x86 AVX-512 / AVX2): the bank chunk is packed once, each query
//   tile per bank tile; a register tile compares each similarity row with its query's
//   threshold before anything is stored, so selection reads only rows holding a candidate.
// * "blas": a single-threaded at::mm per tile pair into a per-thread buffer, then a vectorised
//   scan of each row (any CPU).
//
// Results do not depend on the thread count: tiles have fixed sizes, every similarity is summed
// in a fixed order, and each query's state is updated by one thread in increasing bank-index
// order. The two ways may differ in the last bits of a similarity (different summation order).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "knn_slots.h"
#include "knn_tiles.h"

namespace {

namespace knn = elogitnorm_fast::knn;

// 252 = 14 x 18 = 6 x 42 query rows: whole register tiles for both x86 kernels. The BLAS path
// was measured with 256 x 1024 tiles against 128/512 x 512/2048 on a 2-core AMD EPYC (D = 512);
// the tile kernels with 1024, 2048 and 4096 bank rows.
constexpr int64_t kQueryTile = 252;
constexpr int64_t kBankTile = 2048;

struct SearchArgs {
  const at::Tensor& queries;  // contiguous
  const at::Tensor& bank;     // contiguous
  const std::optional<at::Tensor>& bias;
  knn::SelectionState state;
  int64_t index_offset;
};

// The kernel `name` asks for: nullptr for the BLAS path.
const knn::TileKernel* pick_kernel(const std::string& name,
                                   const std::vector<knn::TileKernel>& supported) {
  if (name == "blas") return nullptr;
  if (name == "auto") return supported.empty() ? nullptr : &supported.front();
  for (const auto& kernel : supported) {
    if (name == kernel.name) return &kernel;
  }
  std::string names = "auto, blas";
  for (const auto& kernel : supported) names += std::string(", ") + kernel.name;
  TORCH_CHECK(false, "knn_search_update: kernel must be one of ", names,
              " on this CPU, got '", name, "'");
  return nullptr;
}

void search_tiles(const knn::TileKernel& kernel, const SearchArgs& a) {
  const int64_t num_queries = a.queries.size(0);
  const int64_t num_bank = a.bank.size(0);
  const int64_t depth = a.queries.size(1);
  const int64_t width = kernel.cols;
  const int64_t panels = (num_bank + width - 1) / width;
  at::Tensor bank_panels = at::empty({panels * width * depth}, a.queries.options());
  at::Tensor bank_init = at::full({panels * width}, -std::numeric_limits<float>::infinity(),
                                  a.queries.options());
  if (a.bias.has_value()) {
    bank_init.narrow(0, 0, num_bank).copy_(*a.bias);
  } else {
    bank_init.narrow(0, 0, num_bank).zero_();
  }
  const float* bank_ptr = a.bank.data_ptr<float>();
  float* panels_ptr = bank_panels.data_ptr<float>();
  at::parallel_for(0, panels, 16, [&](int64_t p0, int64_t p1) {
    const int64_t rows = std::min(num_bank, p1 * width) - p0 * width;
    knn::pack_panels(bank_ptr + p0 * width * depth, rows, depth, depth, width,
                     panels_ptr + p0 * width * depth);
  });

  const int64_t query_tile = kQueryTile / kernel.rows * kernel.rows;
  const int64_t num_tiles = (num_queries + query_tile - 1) / query_tile;
  const int64_t panels_per_tile = std::max<int64_t>(1, kBankTile / width);
  const float* query_ptr = a.queries.data_ptr<float>();
  at::parallel_for(0, num_tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
    std::vector<float> scratch(static_cast<size_t>(a.state.capacity + width));
    at::Tensor query_panels = at::empty({query_tile * depth}, a.queries.options());
    knn::TileTask task{};
    task.query_panels = query_panels.data_ptr<float>();
    task.bank_panels = panels_ptr;
    task.bank_init = bank_init.data_ptr<float>();
    task.num_bank = num_bank;
    task.depth = depth;
    task.index_offset = a.index_offset;
    task.state = a.state;
    task.scratch = scratch.data();
    for (int64_t p0 = 0; p0 < panels; p0 += panels_per_tile) {
      task.panel_begin = p0;
      task.panel_end = std::min(panels, p0 + panels_per_tile);
      for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
        task.first_query = tile * query_tile;
        task.num_queries = std::min(query_tile, num_queries - task.first_query);
        // repacked per bank tile: ~1 % of the tile's FMAs at kBankTile = 2048, and no copy of
        // all queries held at once
        knn::pack_panels(query_ptr + task.first_query * depth, task.num_queries, depth, depth,
                         kernel.rows, query_panels.data_ptr<float>());
        kernel.run(task);
      }
    }
  });
}

void search_blas(const SearchArgs& a) {
  constexpr int64_t kBlasQueryTile = 256;
  constexpr int64_t kBlasBankTile = 1024;
  const int64_t num_queries = a.queries.size(0);
  const int64_t num_bank = a.bank.size(0);
  const knn::SelectionState& s = a.state;
  const int64_t num_tiles = (num_queries + kBlasQueryTile - 1) / kBlasQueryTile;
  at::parallel_for(0, num_tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
    std::vector<float> scratch(static_cast<size_t>(std::max(s.capacity, kBlasBankTile)));
    at::Tensor buffer = at::empty({kBlasQueryTile, kBlasBankTile}, a.queries.options());
    for (int64_t b0 = 0; b0 < num_bank; b0 += kBlasBankTile) {
      const int64_t cols = std::min(kBlasBankTile, num_bank - b0);
      const at::Tensor b_tile_t = a.bank.narrow(0, b0, cols).t();
      for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
        const int64_t q0 = tile * kBlasQueryTile;
        const int64_t rows = std::min(kBlasQueryTile, num_queries - q0);
        at::Tensor out = buffer.narrow(0, 0, rows).narrow(1, 0, cols);
        if (a.bias.has_value()) {
          at::addmm_out(out, a.bias->narrow(0, b0, cols).unsqueeze(0),
                        a.queries.narrow(0, q0, rows), b_tile_t);
        } else {
          at::mm_out(out, a.queries.narrow(0, q0, rows), b_tile_t);
        }
        const float* s_ptr = out.data_ptr<float>();
        const int64_t s_stride = out.stride(0);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t query = q0 + r;
          knn::select_row(s_ptr + r * s_stride, cols, a.index_offset + b0, s.k, s.capacity,
                          s.values + query * s.capacity, s.indices + query * s.capacity,
                          s.pending[query], s.thresholds[query], scratch.data());
        }
      }
    }
  });
}

void knn_search_update_cpu(const at::Tensor& queries, const at::Tensor& bank_rows,
                           const std::optional<at::Tensor>& bias, at::Tensor& values,
                           at::Tensor& indices, at::Tensor& pending, at::Tensor& thresholds,
                           int64_t k, int64_t index_offset, c10::string_view kernel) {
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
  knn::check_state("knn_search_update", values, indices, pending, thresholds, num_queries, k);
  const std::vector<knn::TileKernel> supported = knn::supported_tile_kernels();
  const knn::TileKernel* tile_kernel = pick_kernel(std::string(kernel), supported);
  if (num_queries == 0 || bank_rows.size(0) == 0) return;
  const at::Tensor q = queries.contiguous();
  const at::Tensor b = bank_rows.contiguous();
  const SearchArgs args{q,
                        b,
                        bias,
                        {values.data_ptr<float>(), indices.data_ptr<int64_t>(),
                         pending.data_ptr<int64_t>(), thresholds.data_ptr<float>(), k,
                         values.size(1)},
                        index_offset};
  if (tile_kernel != nullptr) {
    search_tiles(*tile_kernel, args);
  } else {
    search_blas(args);
  }
}

// Kernels `knn_search_update` accepts on this CPU, the one "auto" picks first; "blas" last.
std::vector<std::string> knn_search_kernels() {
  std::vector<std::string> names;
  for (const auto& kernel : knn::supported_tile_kernels()) names.emplace_back(kernel.name);
  names.emplace_back("blas");
  return names;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(elogitnorm_fast, m) {
  m.def(
      "knn_search_update(Tensor queries, Tensor bank_rows, Tensor? bias, Tensor(a!) values, "
      "Tensor(b!) indices, Tensor(c!) pending, Tensor(d!) thresholds, int k, int index_offset, "
      "str kernel=\"auto\") -> ()");
  m.def("knn_search_kernels() -> str[]", &knn_search_kernels);
}

TORCH_LIBRARY_IMPL(elogitnorm_fast, CPU, m) {
  m.impl("knn_search_update", &knn_search_update_cpu);
}
