// Device helpers shared by the CUDA loss kernels: dtype loads / stores with accumulation in
// float (double for double inputs), group reductions (a warp, or a whole block) in a fixed
// order, and the per-row upstream gradient. Included by .cu files only; no torch header.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/loss_kernels.cuh"

namespace elogitnorm_fast::cuda {

constexpr int kWarp = 32;
constexpr int kBlock = 256;
// Up to this many classes a row is handled by one warp (8 rows per block), above by a block.
constexpr int64_t kWarpRowMaxClasses = 2048;

__device__ __forceinline__ float load_acc(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ double load_acc(const double* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_acc(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float load_acc(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}

template <typename acc_t>
__device__ __forceinline__ void store_kind(void* out, int64_t i, ScalarKind kind, acc_t value) {
  switch (kind) {
    case ScalarKind::Float32:
      static_cast<float*>(out)[i] = static_cast<float>(value);
      break;
    case ScalarKind::Float64:
      static_cast<double*>(out)[i] = static_cast<double>(value);
      break;
    case ScalarKind::Float16:
      static_cast<__half*>(out)[i] = __float2half_rn(static_cast<float>(value));
      break;
    case ScalarKind::BFloat16:
      static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(static_cast<float>(value));
      break;
  }
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }
__device__ __forceinline__ float sqrt_acc(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_acc(double x) { return sqrt(x); }

template <typename T>
__device__ __forceinline__ T clamp_min_keep_nan(T x, T lo) {
  return x < lo ? lo : x;
}

// Rescaling against overflow, as in the CPU kernels (csrc/cpu/loss_math.h): a row of logits
// whose largest magnitude lies outside [2^-30, 2^30] (float; [2^-300, 2^300] for double) is
// computed divided by the power of two that brings that magnitude into [1, 2); 1 otherwise
// (and for 0, inf and NaN). Exact, so rows inside the window compute exactly as before.
template <typename T>
__device__ __forceinline__ T rescale_factor(T largest) {
  constexpr int kWindow = sizeof(T) == 4 ? 30 : 300;
  constexpr int kLowest = sizeof(T) == 4 ? -100 : -1000;
  if (!isfinite(largest) || !(largest > T(0))) return T(1);
  int exponent = 0;
  frexp(largest, &exponent);
  if (exponent > -kWindow && exponent <= kWindow) return T(1);
  return ldexp(T(1), exponent - 1 < kLowest ? kLowest : exponent - 1);
}

// sample_slot of ELogitNorm: the distance row (-1 ignored, -2 target out of range) and, from
// bit kFactorShift on, the exponent of the row's rescale factor plus kFactorBias (0: factor 1).
constexpr int kFactorShift = 40;
constexpr int64_t kFactorBias = 2048;

template <typename T>
__device__ __forceinline__ int64_t encode_slot(int64_t row, T factor) {
  if (factor == T(1)) return row;
  int exponent = 0;
  frexp(factor, &exponent);  // factor = 2^(exponent - 1)
  return row | ((exponent - 1 + kFactorBias) << kFactorShift);
}

__device__ __forceinline__ int64_t slot_row(int64_t slot) {
  return slot & ((int64_t{1} << kFactorShift) - 1);
}

template <typename T>
__device__ __forceinline__ T slot_factor(int64_t slot) {
  const int64_t field = slot >> kFactorShift;
  return field == 0 ? T(1) : ldexp(T(1), static_cast<int>(field - kFactorBias));
}

// x in T, the largest finite T where x is above it.
template <typename T>
__device__ __forceinline__ T capped(double x) {
  constexpr double kMax = sizeof(T) == 4 ? 3.4028234663852886e38 : 1.7976931348623157e308;
  return x > kMax ? static_cast<T>(kMax) : static_cast<T>(x);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

template <typename T>
__device__ __forceinline__ T warp_max(T value) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const T other = __shfl_xor_sync(0xffffffffu, value, offset);
    value = other > value ? other : value;
  }
  return value;
}

// Sum over a group of kGroup threads (a warp, or the whole block of kBlock threads); every
// thread of the group gets the result. `scratch` holds kBlock / kWarp values (block case).
template <int kGroup, typename T>
__device__ __forceinline__ T group_sum(T value, T* scratch) {
  value = warp_sum(value);
  if constexpr (kGroup == kWarp) {
    return value;
  } else {
    const int lane = threadIdx.x % kWarp;
    const int warp = threadIdx.x / kWarp;
    __syncthreads();  // scratch may still be read by a previous reduction
    if (lane == 0) scratch[warp] = value;
    __syncthreads();
    T total = lane < kGroup / kWarp ? scratch[lane] : T(0);
    return warp_sum(total);
  }
}

template <int kGroup, typename T>
__device__ __forceinline__ T group_max(T value, T* scratch) {
  value = warp_max(value);
  if constexpr (kGroup == kWarp) {
    return value;
  } else {
    const int lane = threadIdx.x % kWarp;
    const int warp = threadIdx.x / kWarp;
    __syncthreads();
    if (lane == 0) scratch[warp] = value;
    __syncthreads();
    T total = scratch[lane < kGroup / kWarp ? lane : 0];
    return warp_max(total);
  }
}

// g_n for row n: the scalar (mean divides by the valid count, 0 when there is none) or entry n.
template <typename acc_t>
__device__ __forceinline__ acc_t upstream_gradient(const UpstreamView& up, int64_t n) {
  const acc_t* g = static_cast<const acc_t*>(up.grad_output);
  if (up.reduction == kReduceNone) return g[n * up.grad_stride];
  acc_t value = g[0];
  if (up.reduction == kReduceMean) {
    const acc_t count = *static_cast<const acc_t*>(up.valid_count);
    value = count > acc_t(0) ? value / count : acc_t(0);
  }
  return value;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid for grid-stride loops over `count` elements.
inline unsigned int stride_grid(int64_t count) {
  const int64_t blocks = ceil_div(count, kBlock);
  return static_cast<unsigned int>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

}  // namespace elogitnorm_fast::cuda
