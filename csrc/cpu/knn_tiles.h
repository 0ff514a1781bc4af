// Register-tiled similarity kernels for the CPU KNN search (knn_search.cpp), with the
// selection fused into their epilogue.
//
// Layout ("panels"): a matrix of R rows x depth is stored as ceil(R / width) panels; panel p
// holds rows [p * width, (p + 1) * width) transposed, element (row r, column d) at
// [d * width + r], rows past R zero. A kernel computes one tile of kRows query rows x kCols
// bank rows from a query panel and a bank panel entirely in registers (depth-long FMA chains
// in one fixed order, so results do not depend on threads or tiling), then compares each row
// of the tile with that query's threshold and hands only rows holding a candidate to
// knn::select_row. The similarity matrix is never written out.
//
// Kernels exist per instruction set (knn_tiles_x86.cpp: AVX-512F 14 x 32, AVX2+FMA 6 x 16),
// picked at run time from what the CPU supports, independent of the -march the extension was
// built with; on other CPUs the search falls back to BLAS tiles.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace elogitnorm_fast::knn {

// Where the kept / pending pairs of every query live (the op's state tensors), see knn_slots.h.
struct SelectionState {
  float* values;
  int64_t* indices;
  int64_t* pending;
  float* thresholds;
  int64_t k;
  int64_t capacity;  // slots per query
};

// One call: the query panels of queries [first_query, first_query + num_queries) against bank
// panels [panel_begin, panel_end) of the packed bank.
struct TileTask {
  const float* query_panels;
  int64_t num_queries;
  int64_t first_query;
  const float* bank_panels;
  // per bank panel, kCols values the similarities start from: the bias of each bank row, and
  // -inf for padding rows past the bank's end so they never beat a threshold
  const float* bank_init;
  int64_t num_bank;  // valid bank rows in the packed bank
  int64_t panel_begin;
  int64_t panel_end;
  int64_t depth;
  int64_t index_offset;  // bank index of packed bank row 0
  SelectionState state;
  float* scratch;  // at least capacity + kCols floats, owned by the calling thread
};

struct TileKernel {
  const char* name;
  int64_t rows;  // query rows per tile
  int64_t cols;  // bank rows per tile
  void (*run)(const TileTask&);
};

// Kernels this CPU can run, fastest first (empty on non-x86 builds).
std::vector<TileKernel> supported_tile_kernels();

// Every kernel name compiled into this build, whether or not this CPU can run it.
std::vector<std::string> compiled_tile_kernels();

// Pack `rows` rows of `src` (row stride `src_stride`, `depth` columns) into panels of `width`
// rows at `out` (ceil(rows / width) * width * depth floats).
void pack_panels(const float* src, int64_t rows, int64_t src_stride, int64_t depth,
                 int64_t width, float* out);

}  // namespace elogitnorm_fast::knn
