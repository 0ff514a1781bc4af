// Fused exact KNN search step (CPU): similarities computed tile by tile and selected at once.
//
// For all queries Q and a chunk of bank rows B, each thread owns a contiguous range of query
// tiles and, bank tile by bank tile, computes S = Q_tile B_tile^T (+ bias) and merges S into
// each query's running top-k (knn_slots.h). The bank tile stays in cache across the thread's
// query tiles, and the similarity matrix is never written to and read back from main memory,
// unlike a large multi-threaded GEMM followed by a selection pass. Two ways to compute S:
//
// * tile kernels (knn_tiles.h, x86 AVX-512 / AVX2): queries packed per tile, bank rows read in
//   place; each register tile is compared with its queries' thresholds before anything is
//   stored, and only the similarities that beat them reach the selection.
// * "blas": a single-threaded at::mm per 256-query x 1024-row tile pair into a per-thread
//   buffer, then a vectorised scan of each row (any CPU).
//
// Results do not depend on the thread count: every similarity is summed in a fixed order
// whatever the tiling, and each query's state is updated by one thread in increasing bank-index
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

// Bank rows a thread runs a group of query tiles against while they stay in cache, and the
// packed query tiles of one group: sized to stay within a CPU's last-level cache share.
constexpr int64_t kBankTileBytes = 4 << 20;
constexpr int64_t kQueryGroupBytes = 8 << 20;

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
  // bank tiles of ~4 MiB (2048 rows at D = 512), whole register tiles
  const int64_t bank_tile =
      std::max<int64_t>(1, kBankTileBytes / (4 * std::max<int64_t>(depth, 1)) / kernel.rows) *
      kernel.rows;
  // The kernel reads bank rows in place (kRows streams), except when rows are 4 KiB apart (D a
  // multiple of 1024): they then share one L1 set and evict each other, so each thread packs
  // each bank tile into one stream first. At other D packing only adds work.
  const bool pack_bank = depth % 1024 == 0 && depth > 0;
  const int64_t num_tiles = (num_queries + width - 1) / width;
  const float* query_ptr = a.queries.data_ptr<float>();
  const float* bank_ptr = a.bank.data_ptr<float>();
  // Query tiles are packed once per group and the bank is streamed once per group, so the
  // queries are not repacked for every bank tile.
  const int64_t group =
      std::max<int64_t>(1, kQueryGroupBytes / (4 * width * std::max<int64_t>(depth, 1)));
  at::parallel_for(0, num_tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
    std::vector<float> scratch(static_cast<size_t>(a.state.capacity));
    std::vector<float> tail(static_cast<size_t>(kernel.rows * depth));
    std::vector<float> packed(pack_bank ? static_cast<size_t>(bank_tile * depth) : 0);
    const int64_t group_tiles = std::min(group, tile_end - tile_begin);
    at::Tensor query_panels = at::empty({group_tiles * width * depth}, a.queries.options());
    float* panels = query_panels.data_ptr<float>();
    knn::TileTask task{};
    task.bank_packed = pack_bank;
    task.bank_bias = a.bias.has_value() ? a.bias->data_ptr<float>() : nullptr;
    task.depth = depth;
    task.index_offset = a.index_offset;
    task.state = a.state;
    task.scratch = scratch.data();
    task.tail = tail.data();
    for (int64_t g0 = tile_begin; g0 < tile_end; g0 += group) {
      const int64_t g1 = std::min(tile_end, g0 + group);
      const int64_t first = g0 * width;
      knn::pack_panels(query_ptr + first * depth, std::min(num_queries, g1 * width) - first,
                       depth, depth, width, panels);
      for (int64_t b0 = 0; b0 < num_bank; b0 += bank_tile) {
        task.bank_begin = b0;
        task.bank_end = std::min(num_bank, b0 + bank_tile);
        task.bank_rows = bank_ptr + b0 * depth;
        if (pack_bank) {
          knn::pack_panels(task.bank_rows, task.bank_end - b0, depth, depth, kernel.rows,
                           packed.data());
          task.bank_rows = packed.data();
        }
        for (int64_t tile = g0; tile < g1; ++tile) {
          task.query_panel = panels + (tile - g0) * width * depth;
          task.first_query = tile * width;
          task.num_queries = std::min(width, num_queries - task.first_query);
          kernel.run(task);
        }
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
