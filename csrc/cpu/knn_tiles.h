// Register-tiled similarity kernels for the CPU KNN search (knn_search.cpp), with the
// selection fused into their epilogue.
//
// A kernel computes one tile of kRows bank rows x kCols queries entirely in registers: the
// queries are packed ("panel": element (query c, feature d) at [d * kCols + c], queries past
// the end zero) so that one vector load holds a feature of every query of the tile, and each
// bank feature is broadcast straight from the row-major bank (kRows streams, no copy), or from
// a per-thread packed copy of the bank tile where rows 4 KiB apart would share an L1 set.
// Every similarity is one depth-long FMA chain in a fixed order, so
// results do not depend on threads or tiling. The tile is then compared with the queries'
// thresholds (two vector compares per bank row) and only the similarities that beat them are
// appended to their query's pending slots, in bank order; a full query is merged with
// knn::merge_slots (knn_slots.h). The similarity matrix is never written out.
//
// Kernels exist per instruction set (knn_tiles_x86.cpp: AVX-512F 14 x 32, AVX2+FMA 6 x 16),
// picked at run time from what the CPU supports, independent of the -march the extension was
// built with; on other CPUs the search falls back to BLAS tiles.
#pragma once

#include <cstdint>
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

// One call: the packed queries [first_query, first_query + num_queries) (num_queries <= kCols)
// against bank rows [bank_begin, bank_end).
struct TileTask {
  const float* query_panel;
  int64_t num_queries;
  int64_t first_query;
  // Bank rows from `bank_begin` on: row-major (bank_packed false: one row every `depth` floats)
  // or packed like the queries, kRows rows per panel (bank_packed true: rows past bank_end
  // zero).
  const float* bank_rows;
  bool bank_packed;
  const float* bank_bias;  // indexed by bank row, added to its similarities; nullptr: none
  int64_t bank_begin;
  int64_t bank_end;
  int64_t depth;
  int64_t index_offset;  // bank index of bank row 0
  SelectionState state;
  float* scratch;  // capacity floats, owned by the calling thread
  float* tail;     // kRows * depth floats for the zero-padded last rows of a row-major bank
};

struct TileKernel {
  const char* name;
  int64_t rows;  // bank rows per tile
  int64_t cols;  // queries per tile
  void (*run)(const TileTask&);
};

// Kernels this CPU can run, fastest first (empty on non-x86 builds).
std::vector<TileKernel> supported_tile_kernels();

// Pack `rows` rows of `src` (row stride `src_stride`, `depth` columns) into panels of `width`
// rows at `out` (ceil(rows / width) * width * depth floats).
void pack_panels(const float* src, int64_t rows, int64_t src_stride, int64_t depth,
                 int64_t width, float* out);

}  // namespace elogitnorm_fast::knn
