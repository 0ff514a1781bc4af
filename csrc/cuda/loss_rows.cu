// Kernels shared by both CUDA losses: the reduction of the per-row losses (one block, fixed
// order, so the result does not depend on scheduling) and the backward rescale of the unit
// gradient by the upstream gradient.
#include "cuda/loss_device.cuh"

namespace elogitnorm_fast::cuda {
namespace {

constexpr int kFinalizeThreads = 1024;

template <typename acc_t>
__global__ void __launch_bounds__(kFinalizeThreads) finalize_kernel(
    const acc_t* __restrict__ row_loss, const int64_t* __restrict__ valid_index,
    int64_t invalid_value, int64_t rows, int reduction, void* loss, ScalarKind out_kind,
    acc_t* __restrict__ valid_count) {
  __shared__ double sums[kFinalizeThreads / kWarp];
  __shared__ double counts[kFinalizeThreads / kWarp];
  double total = 0;
  double count = 0;
  for (int64_t n = threadIdx.x; n < rows; n += kFinalizeThreads) {
    const acc_t value = row_loss[n];
    if (reduction == kReduceNone) store_kind(loss, n, out_kind, value);
    total += static_cast<double>(value);
    count += valid_index[n] != invalid_value ? 1.0 : 0.0;
  }
  total = warp_sum(total);
  count = warp_sum(count);
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  if (lane == 0) {
    sums[warp] = total;
    counts[warp] = count;
  }
  __syncthreads();
  if (warp != 0) return;
  total = warp_sum(lane < kFinalizeThreads / kWarp ? sums[lane] : 0.0);
  count = warp_sum(lane < kFinalizeThreads / kWarp ? counts[lane] : 0.0);
  if (lane != 0) return;
  *valid_count = static_cast<acc_t>(count);
  if (reduction == kReduceMean) store_kind(loss, 0, out_kind, total / count);  // 0 / 0 = NaN
  if (reduction == kReduceSum) store_kind(loss, 0, out_kind, total);
}

template <typename acc_t>
__global__ void rescale_kernel(const acc_t* __restrict__ grad_unit, UpstreamView upstream,
                               const int64_t* __restrict__ valid_index, int64_t invalid_value,
                               int64_t rows, int64_t classes, void* out, ScalarKind out_kind) {
  const int64_t total = rows * classes;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = e / classes;
    const acc_t g =
        valid_index[n] != invalid_value ? upstream_gradient<acc_t>(upstream, n) : acc_t(0);
    store_kind(out, e, out_kind, g * grad_unit[e]);
  }
}

}  // namespace

cudaError_t finalize_loss(const void* row_loss, bool acc_double, const int64_t* valid_index,
                          int64_t invalid_value, int64_t rows, int reduction, void* loss,
                          ScalarKind out_kind, void* valid_count, cudaStream_t stream) {
  if (acc_double) {
    finalize_kernel<double><<<1, kFinalizeThreads, 0, stream>>>(
        static_cast<const double*>(row_loss), valid_index, invalid_value, rows, reduction, loss,
        out_kind, static_cast<double*>(valid_count));
  } else {
    finalize_kernel<float><<<1, kFinalizeThreads, 0, stream>>>(
        static_cast<const float*>(row_loss), valid_index, invalid_value, rows, reduction, loss,
        out_kind, static_cast<float*>(valid_count));
  }
  return cudaGetLastError();
}

cudaError_t rescale_rows(const void* grad_unit, bool acc_double, UpstreamView upstream,
                         const int64_t* valid_index, int64_t invalid_value, int64_t rows,
                         int64_t classes, void* out, ScalarKind out_kind, cudaStream_t stream) {
  const int64_t total = rows * classes;
  if (total == 0) return cudaSuccess;
  const unsigned int grid = stride_grid(total);
  if (acc_double) {
    rescale_kernel<double><<<grid, kBlock, 0, stream>>>(static_cast<const double*>(grad_unit),
                                                        upstream, valid_index, invalid_value,
                                                        rows, classes, out, out_kind);
  } else {
    rescale_kernel<float><<<grid, kBlock, 0, stream>>>(static_cast<const float*>(grad_unit),
                                                       upstream, valid_index, invalid_value,
                                                       rows, classes, out, out_kind);
  }
  return cudaGetLastError();
}

}  // namespace elogitnorm_fast::cuda
