// fixed_order_gemm (fixed_order_gemm.h): register-tiled products with one fused multiply-add
// chain per entry, in increasing depth order.
//
// A is packed once into panels of kRows rows (element (k, r) of a panel at [k * kRows + r], rows
// past the end zero), so that any strides of A, and its last rows, take the same path. A tile of
// kRows x 2 * kLanes entries lives in registers: per depth step it loads two vectors of a row of B,
// broadcasts each A value of the panel and issues 2 * kRows fused multiply-adds. The depth is
// walked in blocks (the partial sums go to `out` and come back, exact in T), work items are
// (column strip, group of row panels) pairs spread over at::parallel_for; none of this changes
// the order of any entry's sum. A strip of B whose columns are not contiguous (B a transpose) or
// that is the last, partial one is copied block by block into a zero-padded buffer, and tiles at
// the edges of `out` are computed in a local buffer.
//
// Kernels per instruction set (x86: AVX-512F, AVX2 + FMA, each under its own `#pragma GCC
// target`, picked at run time) and a portable one built on std::fma: all compute the same fused
// chains, so the same bits.
#include "cpu/fixed_order_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ELOGITNORM_FAST_X86_GEMM 1
#include <immintrin.h>
#endif

namespace elogitnorm_fast::cpu {
namespace {

// Depth per block: a block of a B strip (kDepthBlock x 2 * kLanes) stays in L1 while the row
// panels of a work item pass over it.
constexpr int64_t kDepthBlock = 256;
// Row panels per work item.
constexpr int64_t kPanelGroup = 8;
// Multiply-adds below which a task runs on one thread.
constexpr int64_t kTaskWork = int64_t{1} << 16;

template <typename T>
struct Operands {
  int64_t rows, cols, depth;
  const T* a_panels;  // ceil(rows / kRows) panels of depth x kRows
  const T* b;         // B(k, n) = b[k * b_depth_stride + n * b_col_stride]
  int64_t b_depth_stride;
  int64_t b_col_stride;
  T* out;
  int64_t ldc;
};

// The portable kernel: the same tiles over plain arrays, std::fma per term (a hardware
// instruction wherever the target has one).
template <typename Scalar>
struct PortableIsa {
  using T = Scalar;
  static constexpr int64_t kLanes = 8;
  static constexpr int64_t kRows = 4;
  struct V {
    T v[kLanes];
  };
  static V zero() {
    V out;
    for (int64_t l = 0; l < kLanes; ++l) out.v[l] = T(0);
    return out;
  }
  static V load(const T* p) {
    V out;
    std::memcpy(out.v, p, sizeof(out.v));
    return out;
  }
  static V set1(T x) {
    V out;
    for (int64_t l = 0; l < kLanes; ++l) out.v[l] = x;
    return out;
  }
  static V fma(V a, V b, V c) {
    for (int64_t l = 0; l < kLanes; ++l) c.v[l] = std::fma(a.v[l], b.v[l], c.v[l]);
    return c;
  }
  static void store(T* p, V v) { std::memcpy(p, v.v, sizeof(v.v)); }
  static constexpr bool kTranspose = false;
  static void transpose(const T*, int64_t, T*, int64_t) {}
};

namespace portable {
#include "cpu/fixed_order_gemm.inc"
}  // namespace portable

#ifdef ELOGITNORM_FAST_X86_GEMM

#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {
constexpr int64_t kPanelRows = 14;  // 28 accumulators + 2 B vectors + 1 broadcast of 32
struct FloatIsa {
  using T = float;
  using V = __m512;
  static constexpr int64_t kLanes = 16;
  static constexpr int64_t kRows = kPanelRows;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static constexpr bool kTranspose = true;
  // 16 x 16: 32-bit then 64-bit interleaves inside the 128-bit lanes, then two rounds of lane
  // shuffles.
  static void transpose(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
    __m512 r[16], t[16], u[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * src_stride);
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {  // u[4i + e], lane L: rows 4i..4i+3 of entry 4L + e
      u[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
      u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
      u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
      u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int e = 0; e < 4; ++e) {
      const __m512 x0 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0x44);
      const __m512 x1 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0xEE);
      const __m512 x2 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0x44);
      const __m512 x3 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0xEE);
      _mm512_storeu_ps(dst + e * dst_stride, _mm512_shuffle_f32x4(x0, x2, 0x88));
      _mm512_storeu_ps(dst + (4 + e) * dst_stride, _mm512_shuffle_f32x4(x0, x2, 0xDD));
      _mm512_storeu_ps(dst + (8 + e) * dst_stride, _mm512_shuffle_f32x4(x1, x3, 0x88));
      _mm512_storeu_ps(dst + (12 + e) * dst_stride, _mm512_shuffle_f32x4(x1, x3, 0xDD));
    }
  }
};
struct DoubleIsa {
  using T = double;
  using V = __m512d;
  static constexpr int64_t kLanes = 8;
  static constexpr int64_t kRows = kPanelRows;
  static V zero() { return _mm512_setzero_pd(); }
  static V load(const double* p) { return _mm512_loadu_pd(p); }
  static V set1(double x) { return _mm512_set1_pd(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static void store(double* p, V v) { _mm512_storeu_pd(p, v); }
  static constexpr bool kTranspose = false;
  static void transpose(const double*, int64_t, double*, int64_t) {}
};
#include "cpu/fixed_order_gemm.inc"
void run(const Operands<float>& p) { Tiles<FloatIsa>::run(p); }
void run(const Operands<double>& p) { Tiles<DoubleIsa>::run(p); }
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
constexpr int64_t kPanelRows = 6;  // 12 accumulators + 2 B vectors + 1 broadcast of 16
struct FloatIsa {
  using T = float;
  using V = __m256;
  static constexpr int64_t kLanes = 8;
  static constexpr int64_t kRows = kPanelRows;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static constexpr bool kTranspose = true;
  // 8 x 8: 32-bit then 64-bit interleaves inside the 128-bit halves, then the halves.
  static void transpose(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
    __m256 r[8], t[8], u[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * src_stride);
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; ++i) {
      u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
      u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
      u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
      u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int e = 0; e < 4; ++e) {
      _mm256_storeu_ps(dst + e * dst_stride, _mm256_permute2f128_ps(u[e], u[4 + e], 0x20));
      _mm256_storeu_ps(dst + (4 + e) * dst_stride, _mm256_permute2f128_ps(u[e], u[4 + e], 0x31));
    }
  }
};
struct DoubleIsa {
  using T = double;
  using V = __m256d;
  static constexpr int64_t kLanes = 4;
  static constexpr int64_t kRows = kPanelRows;
  static V zero() { return _mm256_setzero_pd(); }
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static V set1(double x) { return _mm256_set1_pd(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  static constexpr bool kTranspose = false;
  static void transpose(const double*, int64_t, double*, int64_t) {}
};
#include "cpu/fixed_order_gemm.inc"
void run(const Operands<float>& p) { Tiles<FloatIsa>::run(p); }
void run(const Operands<double>& p) { Tiles<DoubleIsa>::run(p); }
}  // namespace avx2
#pragma GCC pop_options

#endif  // ELOGITNORM_FAST_X86_GEMM

enum class Kernel { Avx512, Avx2, Portable };

Kernel pick_kernel() {
#ifdef ELOGITNORM_FAST_X86_GEMM
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return Kernel::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Kernel::Avx2;
#endif
  return Kernel::Portable;
}

Kernel kernel() {
  static const Kernel chosen = pick_kernel();
  return chosen;
}

// Panel height of the kernel that will run (it shapes the packing of A).
template <typename T>
int64_t panel_height() {
  switch (kernel()) {
#ifdef ELOGITNORM_FAST_X86_GEMM
    case Kernel::Avx512:
      return avx512::kPanelRows;
    case Kernel::Avx2:
      return avx2::kPanelRows;
#endif
    default:
      return PortableIsa<T>::kRows;
  }
}

}  // namespace

template <typename T>
void fixed_order_gemm(int64_t rows, int64_t cols, int64_t depth, const T* a,
                      int64_t a_row_stride, int64_t a_depth_stride, const T* b,
                      int64_t b_depth_stride, int64_t b_col_stride, T* out,
                      int64_t out_row_stride) {
  if (rows <= 0 || cols <= 0) return;
  if (depth <= 0) {
    for (int64_t i = 0; i < rows; ++i) std::fill(out + i * out_row_stride,
                                                 out + i * out_row_stride + cols, T(0));
    return;
  }
  const int64_t panel_rows = panel_height<T>();
  const int64_t panels = (rows + panel_rows - 1) / panel_rows;
  std::vector<T> a_panels(static_cast<size_t>(panels * depth * panel_rows));
  at::parallel_for(0, panels, std::max<int64_t>(1, kTaskWork / (depth * panel_rows)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      T* panel = a_panels.data() + t * depth * panel_rows;
      for (int64_t r = 0; r < panel_rows; ++r) {
        const int64_t i = t * panel_rows + r;
        if (i >= rows) {
          for (int64_t k = 0; k < depth; ++k) panel[k * panel_rows + r] = T(0);
          continue;
        }
        const T* row = a + i * a_row_stride;
        for (int64_t k = 0; k < depth; ++k) panel[k * panel_rows + r] = row[k * a_depth_stride];
      }
    }
  });
  const Operands<T> operands{rows,           cols,         depth, a_panels.data(), b,
                             b_depth_stride, b_col_stride, out,   out_row_stride};
  switch (kernel()) {
#ifdef ELOGITNORM_FAST_X86_GEMM
    case Kernel::Avx512:
      avx512::run(operands);
      return;
    case Kernel::Avx2:
      avx2::run(operands);
      return;
#endif
    default:
      portable::Tiles<PortableIsa<T>>::run(operands);
      return;
  }
}

template void fixed_order_gemm<float>(int64_t, int64_t, int64_t, const float*, int64_t, int64_t,
                                      const float*, int64_t, int64_t, float*, int64_t);
template void fixed_order_gemm<double>(int64_t, int64_t, int64_t, const double*, int64_t,
                                       int64_t, const double*, int64_t, int64_t, double*,
                                       int64_t);

const char* fixed_order_gemm_kernel() {
  switch (kernel()) {
    case Kernel::Avx512:
      return "avx512";
    case Kernel::Avx2:
      return "avx2";
    default:
      return "portable";
  }
}

}  // namespace elogitnorm_fast::cpu
