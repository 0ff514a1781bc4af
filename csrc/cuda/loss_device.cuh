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
