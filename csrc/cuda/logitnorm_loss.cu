// LogitNorm CUDA kernel (docs/design.md; Wei et al., ICML 2022): one warp (small C) or
// block (large C) per row. With a = 1 / (tau (||z|| + 1e-7)) and p = softmax(a z):
//   loss = logsumexp(a z) - a z_y
//   dz   = a (p - e_y) - a ((p - e_y) . z) z / ((||z|| + 1e-7) ||z||)   (second term 0 at z = 0)
#include "cuda/loss_device.cuh"

namespace elogitnorm_fast::cuda {
namespace {

template <int kGroup, typename scalar_t>
__global__ void __launch_bounds__(256) logitnorm_kernel(
    const scalar_t* __restrict__ logits, const int64_t* __restrict__ target, int64_t rows,
    int64_t classes, int64_t ignore_index, double tau_double,
    decltype(load_acc(logits, 0))* __restrict__ row_loss,
    decltype(load_acc(logits, 0))* __restrict__ grad_unit) {
  using acc_t = decltype(load_acc(logits, 0));
  __shared__ acc_t scratch[kBlock / kWarp];
  const int64_t n = kGroup == kWarp
                        ? (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp
                        : static_cast<int64_t>(blockIdx.x);
  const int lane = kGroup == kWarp ? threadIdx.x % kWarp : threadIdx.x;
  if (n >= rows) return;  // uniform over the group
  const int64_t y = target[n];
  acc_t* grad = grad_unit == nullptr ? nullptr : grad_unit + n * classes;
  if (y == ignore_index || y < 0 || y >= classes) {
    if (grad != nullptr) {
      for (int64_t j = lane; j < classes; j += kGroup) grad[j] = acc_t(0);
    }
    if (lane == 0) row_loss[n] = y == ignore_index ? acc_t(0) : acc_t(NAN);
    return;
  }
  const scalar_t* z = logits + n * classes;
  acc_t squares = 0;
  acc_t top = load_acc(z, 0);
  acc_t largest = 0;
  for (int64_t j = lane; j < classes; j += kGroup) {
    const acc_t value = load_acc(z, j);
    squares += value * value;
    top = value > top ? value : top;
    largest = fabs(value) > largest ? fabs(value) : largest;
  }
  squares = group_sum<kGroup>(squares, scratch);
  top = group_max<kGroup>(top, scratch);
  largest = group_max<kGroup>(largest, scratch);
  // A row whose squares overflow (or underflow) is computed divided by a power of two k: the
  // norm and its 1e-7 shrink by k, a grows by k, a z is unchanged; the gradient is over k.
  const acc_t factor = rescale_factor(largest);
  const acc_t inverse = acc_t(1) / factor;
  if (factor != acc_t(1)) {  // uniform over the group
    squares = 0;
    for (int64_t j = lane; j < classes; j += kGroup) {
      const acc_t value = load_acc(z, j) * inverse;
      squares += value * value;
    }
    squares = group_sum<kGroup>(squares, scratch);
    top *= inverse;
  }
  const acc_t norm = sqrt_acc(squares);
  const acc_t shifted_norm = norm + acc_t(1e-7) * inverse;
  const acc_t a = acc_t(1) / (static_cast<acc_t>(tau_double) * shifted_norm);
  acc_t exp_sum = 0;
  acc_t shifted_sum = 0;
  for (int64_t j = lane; j < classes; j += kGroup) {
    const acc_t shifted = load_acc(z, j) * inverse - top;
    const acc_t e = exp_acc(shifted * a);
    exp_sum += e;
    shifted_sum += e * shifted;
  }
  exp_sum = group_sum<kGroup>(exp_sum, scratch);
  shifted_sum = group_sum<kGroup>(shifted_sum, scratch);
  const acc_t zy = load_acc(z, y) * inverse;
  if (lane == 0) row_loss[n] = log_acc(exp_sum) + a * (top - zy);
  if (grad == nullptr) return;
  const acc_t dot = shifted_sum / exp_sum - (zy - top);  // (p - e_y) . z
  const acc_t k = norm > acc_t(0) ? a * dot / (shifted_norm * norm) * inverse : acc_t(0);
  const acc_t p_scale = a / exp_sum * inverse;
  for (int64_t j = lane; j < classes; j += kGroup) {
    const acc_t zj = load_acc(z, j) * inverse;
    acc_t value = exp_acc((zj - top) * a) * p_scale - k * zj;
    if (j == y) value -= a * inverse;
    grad[j] = value;
  }
}

template <typename scalar_t>
cudaError_t launch(const void* logits, const int64_t* target, int64_t rows, int64_t classes,
                   int64_t ignore_index, double tau, void* row_loss, void* grad_unit,
                   cudaStream_t stream) {
  using acc_t = decltype(load_acc(static_cast<const scalar_t*>(nullptr), 0));
  const auto* z = static_cast<const scalar_t*>(logits);
  auto* loss = static_cast<acc_t*>(row_loss);
  auto* grad = static_cast<acc_t*>(grad_unit);
  if (classes <= kWarpRowMaxClasses) {
    const auto blocks = static_cast<unsigned int>(ceil_div(rows, kBlock / kWarp));
    logitnorm_kernel<kWarp, scalar_t><<<blocks, kBlock, 0, stream>>>(
        z, target, rows, classes, ignore_index, tau, loss, grad);
  } else {
    logitnorm_kernel<kBlock, scalar_t><<<static_cast<unsigned int>(rows), kBlock, 0, stream>>>(
        z, target, rows, classes, ignore_index, tau, loss, grad);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t logitnorm_rows(const void* logits, ScalarKind kind, const int64_t* target,
                           int64_t rows, int64_t classes, int64_t ignore_index, double tau,
                           void* row_loss, void* grad_unit, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (kind) {
    case ScalarKind::Float32:
      return launch<float>(logits, target, rows, classes, ignore_index, tau, row_loss, grad_unit,
                           stream);
    case ScalarKind::Float64:
      return launch<double>(logits, target, rows, classes, ignore_index, tau, row_loss,
                            grad_unit, stream);
    case ScalarKind::Float16:
      return launch<__half>(logits, target, rows, classes, ignore_index, tau, row_loss,
                            grad_unit, stream);
    case ScalarKind::BFloat16:
      return launch<__nv_bfloat16>(logits, target, rows, classes, ignore_index, tau, row_loss,
                                   grad_unit, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace elogitnorm_fast::cuda
