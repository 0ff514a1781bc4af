// The x86 tile kernels of knn_tiles.h: knn_tiles.inc compiled once for AVX-512F (14 bank rows x
// 32 queries, 28 accumulators of 32 zmm registers) and once for AVX2 + FMA (6 x 16, 12 of 16 ymm),
// each under its own `#pragma GCC target`, so one build serves every x86 CPU and the right
// kernel is picked at run time. In a standalone loop on a 2-core AMD EPYC (Zen 4, D = 512),
// single-threaded, both kernels reached 110-114 GFLOP/s of the core's 116 GFLOP/s FMA peak;
// MKL's sgemm reached 85-90 there.
#include "knn_tiles.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "knn_slots.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ELOGITNORM_FAST_X86_TILES 1
#include <immintrin.h>
#endif

namespace elogitnorm_fast::knn {

#ifdef ELOGITNORM_FAST_X86_TILES

#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {
struct Isa {
  using V = __m512;
  static constexpr int64_t kLanes = 16;
  static constexpr int64_t kRows = 14;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static uint32_t above(V v, V t) { return _mm512_cmp_ps_mask(v, t, _CMP_GT_OQ); }
};
#include "knn_tiles.inc"
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
struct Isa {
  using V = __m256;
  static constexpr int64_t kLanes = 8;
  static constexpr int64_t kRows = 6;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static uint32_t above(V v, V t) {
    return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, t, _CMP_GT_OQ)));
  }
};
#include "knn_tiles.inc"
}  // namespace avx2
#pragma GCC pop_options

std::vector<TileKernel> supported_tile_kernels() {
  std::vector<TileKernel> kernels;
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) {
    kernels.push_back({"avx512", avx512::kRows, avx512::kCols, &avx512::run_tiles});
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    kernels.push_back({"avx2", avx2::kRows, avx2::kCols, &avx2::run_tiles});
  }
  return kernels;
}

#else

std::vector<TileKernel> supported_tile_kernels() { return {}; }

#endif

void pack_panels(const float* src, int64_t rows, int64_t src_stride, int64_t depth,
                 int64_t width, float* out) {
  for (int64_t r0 = 0; r0 < rows; r0 += width) {
    const int64_t n = std::min(width, rows - r0);
    float* panel = out + r0 * depth;
    if (n < width) std::fill(panel, panel + width * depth, 0.0f);
    const float* rows_begin = src + r0 * src_stride;
    for (int64_t d = 0; d < depth; ++d) {  // contiguous writes, `n` sequential read streams
      for (int64_t r = 0; r < n; ++r) panel[d * width + r] = rows_begin[r * src_stride + d];
    }
  }
}

}  // namespace elogitnorm_fast::knn
