// Matrix products whose every entry is summed in one fixed order, for the ELogitNorm CPU kernels.
//
// A BLAS sgemm may split and regroup a dot product differently for another thread count (MKL
// does at N = 7, C = 5000, D = 64), so a loss built on it changes in its last bits when
// torch.set_num_threads changes. Here each entry of the product is one chain of fused
// multiply-adds in increasing depth order, whatever the tiling, the thread count or the
// instruction set: the results are bitwise reproducible.
#pragma once

#include <cstdint>

namespace elogitnorm_fast::cpu {

// out[i * out_row_stride + n] = sum_k A(i, k) B(k, n) for i < rows, n < cols, k < depth (in
// increasing k, one fused multiply-add per term), with any strides (either may be a transpose):
//   A(i, k) = a[i * a_row_stride + k * a_depth_stride]
//   B(k, n) = b[k * b_depth_stride + n * b_col_stride]   (fastest with b_col_stride 1)
// `out` must not overlap the inputs. Runs on at::parallel_for threads. T: float or double.
template <typename T>
void fixed_order_gemm(int64_t rows, int64_t cols, int64_t depth, const T* a,
                      int64_t a_row_stride, int64_t a_depth_stride, const T* b,
                      int64_t b_depth_stride, int64_t b_col_stride, T* out,
                      int64_t out_row_stride);

// The kernel fixed_order_gemm runs on this CPU: "avx512", "avx2" or "portable".
const char* fixed_order_gemm_kernel();

}  // namespace elogitnorm_fast::cpu
