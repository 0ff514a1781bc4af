// Launchers of the CUDA loss kernels (elogitnorm_loss.cu, logitnorm_loss.cu, loss_rows.cu).
//
// Plain C++ declarations over raw pointers and a cudaStream_t, with no torch header, so that nvcc
// compiles the kernels on any machine and the torch-side binding (csrc/cuda_loss_binding.cpp)
// includes this file with an ordinary C++ compiler. Every launcher enqueues work on `stream`,
// never synchronises, and returns cudaGetLastError() after its launches.
//
// Conventions shared by all launchers:
//   * logits are (rows, classes) contiguous in `kind`; the accumulation type is double for
//     Float64 logits and float otherwise ("acc" below; the binding converts logits to double when
//     the weight is double);
//   * `valid_index[n] != invalid_value` marks the rows that count (the sample slot with -1 for
//     ELogitNorm, the target with ignore_index for LogitNorm);
//   * reduction: 0 = none, 1 = mean, 2 = sum; the upstream gradient is a scalar (mean, sum) or one
//     entry per row with stride `grad_stride` (none), already converted to acc.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace elogitnorm_fast::cuda {

enum class ScalarKind : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };
enum ReductionKind : int { kReduceNone = 0, kReduceMean = 1, kReduceSum = 2 };

struct UpstreamView {
  const void* grad_output;  // acc
  int64_t grad_stride;      // used for reduction none
  int reduction;
  const void* valid_count;  // acc scalar (mean divides by it; 0 valid rows gives 0)
};

// ELogitNorm step 1: argmax per valid row. Distance rows are one per sample when rows < classes
// (row_class[n] = predicted class, sample_slot[n] = n), else one per class (row_class[j] = j,
// sample_slot[n] = predicted class); R = min(rows, classes). Ignored rows get slot -1, rows with
// an out-of-range target slot -2 (their loss becomes NaN). A valid slot carries the row's
// rescale factor in its high bits (encode_slot, loss_device.cuh).
cudaError_t elogitnorm_predict(const void* logits, ScalarKind kind, const int64_t* target,
                               int64_t rows, int64_t classes, int64_t ignore_index,
                               int64_t* sample_slot, int64_t* row_class, cudaStream_t stream);

// ELogitNorm step 2: distances[u, j] = ||w[row_class[u]] - w[j]|| (1 on the row's own class)
// from differences (no GEMM cancellation, no TF32). `weight` is (classes, dim) contiguous acc.
cudaError_t class_distances(const void* weight, bool acc_double, const int64_t* row_class,
                            int64_t row_count, int64_t classes, int64_t dim, void* distances,
                            cudaStream_t stream);

// ELogitNorm step 3: per-row loss (acc), r = ds / divisor (scale_grad, may be null; in the units
// of the row divided by its rescale factor) and the unit gradient (grad_unit, acc, may be null).
cudaError_t elogitnorm_rows(const void* logits, ScalarKind kind, const int64_t* target,
                            const int64_t* sample_slot, const int64_t* row_class,
                            const void* distances, int64_t rows, int64_t classes, double eps,
                            double divisor, void* row_loss, void* scale_grad, void* grad_unit,
                            cudaStream_t stream);

// ELogitNorm backward, weight part, step 1: pooled[u, j] += -g_n r_n (v_n - z_nj) / Delta_uj^3
// over the rows n with slot u (0 where Delta < eps or j is the row's class). `pooled` (R x C,
// acc) must be zero on entry.
cudaError_t elogitnorm_pool(const void* logits, ScalarKind kind, const int64_t* sample_slot,
                            const int64_t* row_class, const void* distances,
                            const void* scale_grad, UpstreamView upstream, int64_t rows,
                            int64_t classes, double eps, void* pooled, cudaStream_t stream);

// ELogitNorm backward, weight part, step 2: the near-duplicate pairs (Delta^2 < (|w_u|^2 +
// |w_j|^2) / 32), where the GEMM form would cancel, are added to `grad` (classes x dim, acc) in
// the difference form P (w_u - w_j) and removed from `pooled`. `norms` holds |w_j|^2.
cudaError_t elogitnorm_close_pairs(const void* weight, const void* norms,
                                   const int64_t* row_class, const void* distances,
                                   void* pooled, int64_t row_count, int64_t classes, int64_t dim,
                                   bool acc_double, void* grad, cudaStream_t stream);

// LogitNorm forward: per-row loss (acc) and the unit gradient (may be null).
cudaError_t logitnorm_rows(const void* logits, ScalarKind kind, const int64_t* target,
                           int64_t rows, int64_t classes, int64_t ignore_index, double tau,
                           void* row_loss, void* grad_unit, cudaStream_t stream);

// Both losses: reduce the per-row losses into `loss` (out_kind; () for mean / sum, (rows,) for
// none) and count the valid rows into `valid_count` (acc scalar). One block, fixed order.
cudaError_t finalize_loss(const void* row_loss, bool acc_double, const int64_t* valid_index,
                          int64_t invalid_value, int64_t rows, int reduction, void* loss,
                          ScalarKind out_kind, void* valid_count, cudaStream_t stream);

// Both losses, backward: out[n, j] = g_n * grad_unit[n, j] in out_kind (0 on invalid rows).
cudaError_t rescale_rows(const void* grad_unit, bool acc_double, UpstreamView upstream,
                         const int64_t* valid_index, int64_t invalid_value, int64_t rows,
                         int64_t classes, void* out, ScalarKind out_kind, cudaStream_t stream);

}  // namespace elogitnorm_fast::cuda
