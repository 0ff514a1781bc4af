// ELogitNorm CUDA kernels (docs/design.md; Ding et al., arXiv 2504.11434).
//
// Forward: (1) argmax per row, (2) the distance rows of the predicted classes by a tiled
// difference kernel, (3) one warp (small C) or block (large C) per row for s, logsumexp(z / s),
// the loss, the unit gradient and r = ds / divisor. Backward, weight part: (4) pool
// P[u, j] = -sum_n g_n r_n (v_n - z_nj) / Delta_uj^3, (5) the near-duplicate pairs in difference
// form; the binding then runs the two GEMMs (cuBLAS). int64 offsets throughout, any C.
// Overflow: rows of logits outside [2^-30, 2^30] in magnitude are computed divided by a power of
// two (rescale_factor, loss_device.cuh; kept in sample_slot for (3) and (4)), distances whose
// squares overflow or underflow are recomputed over their largest difference, and neither the
// row's scalars (double) nor P (one 1 / Delta at a time) pass through an overflowing power.
#include "cuda/loss_device.cuh"

namespace elogitnorm_fast::cuda {
namespace {

// (1) One warp per row: first index of the maximum (NaN maxima keep index 0; the NaN then
// reaches s and the loss) and the row's rescale factor, kept in its sample_slot.
template <typename scalar_t>
__global__ void predict_kernel(const scalar_t* __restrict__ logits,
                               const int64_t* __restrict__ target, int64_t rows, int64_t classes,
                               int64_t ignore_index, int64_t* __restrict__ sample_slot,
                               int64_t* __restrict__ row_class) {
  using acc_t = decltype(load_acc(logits, 0));
  const int64_t warp_global = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  const bool per_sample = rows < classes;
  if (!per_sample && lane == 0 && warp_global < classes) row_class[warp_global] = warp_global;
  if (warp_global >= rows) return;
  const int64_t n = warp_global;
  const int64_t y = target[n];
  const scalar_t* z = logits + n * classes;
  acc_t best = load_acc(z, 0);
  int64_t index = 0;
  acc_t largest = 0;
  for (int64_t j = lane; j < classes; j += kWarp) {
    const acc_t value = load_acc(z, j);
    if (value > best) {  // strictly greater: the first index per lane
      best = value;
      index = j;
    }
    largest = fabs(value) > largest ? fabs(value) : largest;
  }
  largest = warp_max(largest);
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const acc_t other = __shfl_xor_sync(0xffffffffu, best, offset);
    const int64_t other_index = __shfl_xor_sync(0xffffffffu, index, offset);
    if (other > best || (other == best && other_index < index)) {
      best = other;
      index = other_index;
    }
  }
  if (lane != 0) return;
  if (per_sample) row_class[n] = index;
  if (y == ignore_index) {
    sample_slot[n] = -1;
  } else if (y < 0 || y >= classes) {
    sample_slot[n] = -2;
  } else {
    sample_slot[n] = encode_slot(per_sample ? n : index, rescale_factor(largest));
  }
}

// (2) distances[u, j] = ||w[row_class[u]] - w[j]||: 64 x 64 output tiles, 256 threads with a
// 4 x 4 register tile each, D streamed through shared memory 16 at a time.
template <typename acc_t>
__global__ void __launch_bounds__(256) distance_kernel(const acc_t* __restrict__ weight,
                                                       const int64_t* __restrict__ row_class,
                                                       int64_t row_count, int64_t classes,
                                                       int64_t dim, acc_t* __restrict__ out) {
  constexpr int kTile = 64;
  constexpr int kDepth = 16;
  // Squared distances below kTinySquare (squares may have underflowed) or not finite (they
  // overflowed) are recomputed with a rescaling.
  constexpr acc_t kTinySquare = sizeof(acc_t) == 4 ? acc_t(7.888609052210118e-31)   // 2^-100
                                                   : acc_t(9.332636185032189e-302);  // 2^-1000
  __shared__ acc_t a_tile[kDepth][kTile + 1];
  __shared__ acc_t b_tile[kDepth][kTile + 1];
  const int tx = threadIdx.x % 16;
  const int ty = threadIdx.x / 16;
  const int64_t u0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  acc_t sums[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int k = 0; k < 4; ++k) sums[i][k] = acc_t(0);
  }
  for (int64_t k0 = 0; k0 < dim; k0 += kDepth) {
    for (int e = threadIdx.x; e < kTile * kDepth; e += 256) {
      const int r = e / kDepth;
      const int k = e % kDepth;
      const int64_t u = u0 + r;
      const int64_t j = j0 + r;
      const int64_t kk = k0 + k;
      a_tile[k][r] = (u < row_count && kk < dim) ? weight[row_class[u] * dim + kk] : acc_t(0);
      b_tile[k][r] = (j < classes && kk < dim) ? weight[j * dim + kk] : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kDepth; ++k) {
      acc_t a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = a_tile[k][ty + 16 * i];
        b[i] = b_tile[k][tx + 16 * i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const acc_t d = a[i] - b[q];
          sums[i][q] += d * d;
        }
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t u = u0 + ty + 16 * i;
    if (u >= row_count) continue;
    const int64_t own = row_class[u];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t j = j0 + tx + 16 * q;
      if (j >= classes) continue;
      acc_t sum = sums[i][q];
      acc_t scale = 1;
      if (!(sum >= kTinySquare && isfinite(sum)) && j != own) {
        // Squares overflowed (weights above about 1e19 in float) or underflowed: again, over
        // the largest difference (rare; one thread, D reads).
        const acc_t* a = weight + own * dim;
        const acc_t* b = weight + j * dim;
        scale = 0;
        for (int64_t k = 0; k < dim; ++k) scale = fmax(scale, fabs(a[k] - b[k]));
        sum = 0;
        if (scale > acc_t(0) && isfinite(scale)) {
          for (int64_t k = 0; k < dim; ++k) {
            const acc_t d = (a[k] - b[k]) / scale;
            sum += d * d;
          }
        } else {
          sum = scale * scale;  // 0 (coincident rows), or inf / NaN as they are
          scale = 1;
        }
      }
      out[u * classes + j] = j == own ? acc_t(1) : sqrt_acc(sum) * scale;
    }
  }
}

// (3) One group (a warp, or the whole block) per row.
template <int kGroup, typename scalar_t>
__global__ void __launch_bounds__(256) rows_kernel(
    const scalar_t* __restrict__ logits, const int64_t* __restrict__ target,
    const int64_t* __restrict__ sample_slot, const int64_t* __restrict__ row_class,
    const decltype(load_acc(logits, 0))* __restrict__ distances, int64_t rows, int64_t classes,
    double eps_double, double divisor_double, decltype(load_acc(logits, 0))* __restrict__ row_loss,
    decltype(load_acc(logits, 0))* __restrict__ scale_grad,
    decltype(load_acc(logits, 0))* __restrict__ grad_unit) {
  using acc_t = decltype(load_acc(logits, 0));
  __shared__ acc_t scratch[kBlock / kWarp];
  const int64_t n = kGroup == kWarp
                        ? (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp
                        : static_cast<int64_t>(blockIdx.x);
  const int lane = kGroup == kWarp ? threadIdx.x % kWarp : threadIdx.x;
  if (n >= rows) return;  // uniform over the group
  const int64_t slot = sample_slot[n];
  acc_t* grad = grad_unit == nullptr ? nullptr : grad_unit + n * classes;
  if (slot < 0) {
    if (grad != nullptr) {
      for (int64_t j = lane; j < classes; j += kGroup) grad[j] = acc_t(0);
    }
    if (lane == 0) {
      row_loss[n] = slot == -1 ? acc_t(0) : acc_t(NAN);  // -2: target out of range
      if (scale_grad != nullptr) scale_grad[n] = acc_t(0);
    }
    return;
  }
  // The row divided by its rescale factor k (1 for all ordinary rows): margins and s shrink by
  // k, z / s is the row's own; the gradient is scaled back by 1 / k, r is kept in the units of
  // the row over k (the pool pairs it with margins over k). The row's scalars are formed in
  // double: 1 / s times a normalised logit overflows float once distances exceed about 1e19.
  const int64_t u = slot_row(slot);
  const acc_t factor = slot_factor<acc_t>(slot);
  const acc_t inverse = acc_t(1) / factor;
  const acc_t eps = static_cast<acc_t>(eps_double);
  const scalar_t* z = logits + n * classes;
  const int64_t m = row_class[u];
  const int64_t y = target[n];
  const acc_t* delta = distances + u * classes;
  const acc_t v = load_acc(z, m) * inverse;
  // s = (1/divisor) sum_j (v - z_j) / max(Delta_j, eps); inv_sum = sum over z_j < v of 1/Delta.
  acc_t margin_sum = 0;
  acc_t inv_sum = 0;
  for (int64_t j = lane; j < classes; j += kGroup) {
    const acc_t inv = acc_t(1) / clamp_min_keep_nan(delta[j], eps);
    const acc_t margin = v - load_acc(z, j) * inverse;
    margin_sum += margin * inv;
    inv_sum += margin > acc_t(0) ? inv : acc_t(0);
  }
  margin_sum = group_sum<kGroup>(margin_sum, scratch);
  inv_sum = group_sum<kGroup>(inv_sum, scratch);
  const double over_k = 1.0 / static_cast<double>(factor);  // exact: a power of two
  const double raw_scale = static_cast<double>(margin_sum) / divisor_double;
  const double scale_eps = static_cast<double>(eps) * over_k;
  const double scale = clamp_min_keep_nan(raw_scale, scale_eps);
  const double inv_scale_exact = 1.0 / scale;
  const acc_t inv_scale = capped<acc_t>(inv_scale_exact);
  // logsumexp(z / s) with the known maximum v / s.
  acc_t exp_sum = 0;
  acc_t shifted_sum = 0;
  for (int64_t j = lane; j < classes; j += kGroup) {
    const acc_t t = (load_acc(z, j) * inverse - v) * inv_scale;
    const acc_t e = exp_acc(t);
    exp_sum += e;
    shifted_sum += e * t;
  }
  exp_sum = group_sum<kGroup>(exp_sum, scratch);
  shifted_sum = group_sum<kGroup>(shifted_sum, scratch);
  const acc_t target_margin = (v - load_acc(z, y) * inverse) * inv_scale;
  const double inv_exp_sum = 1.0 / static_cast<double>(exp_sum);
  const double scale_derivative =
      raw_scale < scale_eps ? 0.0
                            : -(static_cast<double>(shifted_sum) * inv_exp_sum +
                                static_cast<double>(target_margin)) * inv_scale_exact;
  if (lane == 0) {
    row_loss[n] = log_acc(exp_sum) + target_margin;
    if (scale_grad != nullptr) {
      scale_grad[n] = static_cast<acc_t>(scale_derivative / divisor_double);
    }
  }
  if (grad == nullptr) return;
  // dz_j = (p_j - [j = y]) / s - [z_j < v] r / Delta_j + [j = m] r inv_sum, all over k.
  const acc_t p_scale = static_cast<acc_t>(over_k * inv_scale_exact * inv_exp_sum);
  const acc_t r = static_cast<acc_t>(scale_derivative / divisor_double * over_k);
  const acc_t target_step = static_cast<acc_t>(over_k * inv_scale_exact);
  for (int64_t j = lane; j < classes; j += kGroup) {
    const acc_t zj = load_acc(z, j) * inverse;
    const acc_t inv = acc_t(1) / clamp_min_keep_nan(delta[j], eps);
    acc_t value = exp_acc((zj - v) * inv_scale) * p_scale;
    if (v - zj > acc_t(0)) value -= r * inv;
    if (j == y) value -= target_step;
    if (j == m) value += r * inv_sum;
    grad[j] = value;
  }
}

// (4) One thread per (row, class) element; rows sharing a distance row add atomically.
template <typename scalar_t>
__global__ void pool_kernel(const scalar_t* __restrict__ logits,
                            const int64_t* __restrict__ sample_slot,
                            const int64_t* __restrict__ row_class,
                            const decltype(load_acc(logits, 0))* __restrict__ distances,
                            const decltype(load_acc(logits, 0))* __restrict__ scale_grad,
                            UpstreamView upstream, int64_t rows, int64_t classes,
                            double eps_double, decltype(load_acc(logits, 0))* __restrict__ pooled) {
  using acc_t = decltype(load_acc(logits, 0));
  const acc_t eps = static_cast<acc_t>(eps_double);
  const int64_t total = rows * classes;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = e / classes;
    const int64_t j = e - n * classes;
    const int64_t slot = sample_slot[n];
    if (slot < 0) continue;
    const acc_t b = upstream_gradient<acc_t>(upstream, n) * scale_grad[n];
    if (b == acc_t(0)) continue;
    const int64_t u = slot_row(slot);
    const int64_t m = row_class[u];
    const acc_t delta = distances[u * classes + j];
    if (j == m || delta < eps) continue;
    const scalar_t* z = logits + n * classes;
    // r is in the units of the row over its factor k, so is the margin; one factor of 1 / Delta
    // at a time (Delta^3 overflows float for distances above about 7e12).
    const acc_t inverse = acc_t(1) / slot_factor<acc_t>(slot);
    const acc_t inv = acc_t(1) / delta;
    const acc_t margin = load_acc(z, m) * inverse - load_acc(z, j) * inverse;
    const acc_t contribution = -(((b * margin) * inv) * inv) * inv;
    atomicAdd(pooled + u * classes + j, contribution);
  }
}

// (5) Near-duplicate pairs in the difference form; one thread per (u, j), looping over D.
template <typename acc_t>
__global__ void close_pairs_kernel(const acc_t* __restrict__ weight,
                                   const acc_t* __restrict__ norms,
                                   const int64_t* __restrict__ row_class,
                                   const acc_t* __restrict__ distances, acc_t* __restrict__ pooled,
                                   int64_t row_count, int64_t classes, int64_t dim,
                                   acc_t* __restrict__ grad) {
  const int64_t total = row_count * classes;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t coefficient = pooled[e];
    if (coefficient == acc_t(0)) continue;
    const int64_t u = e / classes;
    const int64_t j = e - u * classes;
    const int64_t m = row_class[u];
    const acc_t delta = distances[e];
    if (!(delta * delta < (norms[m] + norms[j]) * acc_t(1.0 / 32))) continue;
    pooled[e] = acc_t(0);
    const acc_t* wm = weight + m * dim;
    const acc_t* wj = weight + j * dim;
    for (int64_t k = 0; k < dim; ++k) {
      const acc_t step = coefficient * (wm[k] - wj[k]);
      atomicAdd(grad + m * dim + k, step);
      atomicAdd(grad + j * dim + k, -step);
    }
  }
}

template <typename scalar_t>
cudaError_t launch_rows(const void* logits, const int64_t* target, const int64_t* sample_slot,
                        const int64_t* row_class, const void* distances, int64_t rows,
                        int64_t classes, double eps, double divisor, void* row_loss,
                        void* scale_grad, void* grad_unit, cudaStream_t stream) {
  using acc_t = decltype(load_acc(static_cast<const scalar_t*>(nullptr), 0));
  const auto* z = static_cast<const scalar_t*>(logits);
  const auto* d = static_cast<const acc_t*>(distances);
  auto* loss = static_cast<acc_t*>(row_loss);
  auto* sg = static_cast<acc_t*>(scale_grad);
  auto* gu = static_cast<acc_t*>(grad_unit);
  if (classes <= kWarpRowMaxClasses) {
    const int64_t blocks = ceil_div(rows, kBlock / kWarp);
    rows_kernel<kWarp, scalar_t><<<static_cast<unsigned int>(blocks), kBlock, 0, stream>>>(
        z, target, sample_slot, row_class, d, rows, classes, eps, divisor, loss, sg, gu);
  } else {
    rows_kernel<kBlock, scalar_t><<<static_cast<unsigned int>(rows), kBlock, 0, stream>>>(
        z, target, sample_slot, row_class, d, rows, classes, eps, divisor, loss, sg, gu);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t elogitnorm_predict(const void* logits, ScalarKind kind, const int64_t* target,
                               int64_t rows, int64_t classes, int64_t ignore_index,
                               int64_t* sample_slot, int64_t* row_class, cudaStream_t stream) {
  // One warp per row; with rows >= classes (one distance row per class) those warps also
  // write row_class[c] = c for every class.
  if (rows == 0) return cudaSuccess;
  const auto blocks = static_cast<unsigned int>(ceil_div(rows, kBlock / kWarp));
  switch (kind) {
    case ScalarKind::Float32:
      predict_kernel<<<blocks, kBlock, 0, stream>>>(static_cast<const float*>(logits), target,
                                                    rows, classes, ignore_index, sample_slot,
                                                    row_class);
      break;
    case ScalarKind::Float64:
      predict_kernel<<<blocks, kBlock, 0, stream>>>(static_cast<const double*>(logits), target,
                                                    rows, classes, ignore_index, sample_slot,
                                                    row_class);
      break;
    case ScalarKind::Float16:
      predict_kernel<<<blocks, kBlock, 0, stream>>>(static_cast<const __half*>(logits), target,
                                                    rows, classes, ignore_index, sample_slot,
                                                    row_class);
      break;
    case ScalarKind::BFloat16:
      predict_kernel<<<blocks, kBlock, 0, stream>>>(static_cast<const __nv_bfloat16*>(logits),
                                                    target, rows, classes, ignore_index,
                                                    sample_slot, row_class);
      break;
  }
  return cudaGetLastError();
}

cudaError_t class_distances(const void* weight, bool acc_double, const int64_t* row_class,
                            int64_t row_count, int64_t classes, int64_t dim, void* distances,
                            cudaStream_t stream) {
  if (row_count == 0 || classes == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned int>(ceil_div(classes, 64)),
                  static_cast<unsigned int>(ceil_div(row_count, 64)));
  if (acc_double) {
    distance_kernel<double><<<grid, 256, 0, stream>>>(static_cast<const double*>(weight),
                                                      row_class, row_count, classes, dim,
                                                      static_cast<double*>(distances));
  } else {
    distance_kernel<float><<<grid, 256, 0, stream>>>(static_cast<const float*>(weight),
                                                     row_class, row_count, classes, dim,
                                                     static_cast<float*>(distances));
  }
  return cudaGetLastError();
}

cudaError_t elogitnorm_rows(const void* logits, ScalarKind kind, const int64_t* target,
                            const int64_t* sample_slot, const int64_t* row_class,
                            const void* distances, int64_t rows, int64_t classes, double eps,
                            double divisor, void* row_loss, void* scale_grad, void* grad_unit,
                            cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (kind) {
    case ScalarKind::Float32:
      return launch_rows<float>(logits, target, sample_slot, row_class, distances, rows, classes,
                                eps, divisor, row_loss, scale_grad, grad_unit, stream);
    case ScalarKind::Float64:
      return launch_rows<double>(logits, target, sample_slot, row_class, distances, rows,
                                 classes, eps, divisor, row_loss, scale_grad, grad_unit, stream);
    case ScalarKind::Float16:
      return launch_rows<__half>(logits, target, sample_slot, row_class, distances, rows,
                                 classes, eps, divisor, row_loss, scale_grad, grad_unit, stream);
    case ScalarKind::BFloat16:
      return launch_rows<__nv_bfloat16>(logits, target, sample_slot, row_class, distances, rows,
                                        classes, eps, divisor, row_loss, scale_grad, grad_unit,
                                        stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t elogitnorm_pool(const void* logits, ScalarKind kind, const int64_t* sample_slot,
                            const int64_t* row_class, const void* distances,
                            const void* scale_grad, UpstreamView upstream, int64_t rows,
                            int64_t classes, double eps, void* pooled, cudaStream_t stream) {
  const int64_t total = rows * classes;
  if (total == 0) return cudaSuccess;
  const unsigned int grid = stride_grid(total);
#define ELOGITNORM_POOL(scalar_t, acc_t)                                                     \
  pool_kernel<scalar_t><<<grid, kBlock, 0, stream>>>(                                        \
      static_cast<const scalar_t*>(logits), sample_slot, row_class,                          \
      static_cast<const acc_t*>(distances), static_cast<const acc_t*>(scale_grad), upstream, \
      rows, classes, eps, static_cast<acc_t*>(pooled))
  switch (kind) {
    case ScalarKind::Float32:
      ELOGITNORM_POOL(float, float);
      break;
    case ScalarKind::Float64:
      ELOGITNORM_POOL(double, double);
      break;
    case ScalarKind::Float16:
      ELOGITNORM_POOL(__half, float);
      break;
    case ScalarKind::BFloat16:
      ELOGITNORM_POOL(__nv_bfloat16, float);
      break;
  }
#undef ELOGITNORM_POOL
  return cudaGetLastError();
}

cudaError_t elogitnorm_close_pairs(const void* weight, const void* norms,
                                   const int64_t* row_class, const void* distances,
                                   void* pooled, int64_t row_count, int64_t classes, int64_t dim,
                                   bool acc_double, void* grad, cudaStream_t stream) {
  const int64_t total = row_count * classes;
  if (total == 0) return cudaSuccess;
  const unsigned int grid = stride_grid(total);
  if (acc_double) {
    close_pairs_kernel<double><<<grid, kBlock, 0, stream>>>(
        static_cast<const double*>(weight), static_cast<const double*>(norms), row_class,
        static_cast<const double*>(distances), static_cast<double*>(pooled), row_count, classes,
        dim, static_cast<double*>(grad));
  } else {
    close_pairs_kernel<float><<<grid, kBlock, 0, stream>>>(
        static_cast<const float*>(weight), static_cast<const float*>(norms), row_class,
        static_cast<const float*>(distances), static_cast<float*>(pooled), row_count, classes,
        dim, static_cast<float*>(grad));
  }
  return cudaGetLastError();
}

}  // namespace elogitnorm_fast::cuda
