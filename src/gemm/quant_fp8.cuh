// Fused FP8 quantisation kernels that emit the layouts the GEMM kernels read directly.
//   per_block_quant_fp8_kernel: weights, one fp32 scale per 128x128 block; optionally writes q transposed
//     ([K, N], the B operand of the data-gradient GEMM) through a shared-memory tile.
//   per_token_group_quant_fp8_t_kernel: activations/gradients quantised per 128 rows of each column and written
//     transposed ([K, M] with scales [K, ceil(M/128)] MN-major): the operands of the weight-gradient GEMM.
// Conventions match torch_deepstack/quant: scale = max(amax, eps) / 448 (rounded up to a power of two when
// kUe8m0), q = saturate_e4m3(x * inv) with inv = 448 / max(amax, eps) (or 1 / scale for power-of-two scales).
#pragma once
#include <cstdint>

#include "common/vec.cuh"

namespace deepstack {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float(float v) { return v; }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

__device__ __forceinline__ uint8_t float_to_e4m3(float v) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

template <bool kUe8m0>
__device__ __forceinline__ void scale_from_amax(float amax, float eps, float& scale, float& inv) {
  const float a = fmaxf(amax, eps);
  if (kUe8m0) {
    scale = ceil_to_ue8m0(a / 448.f);
    inv = 1.f / scale;
  } else {
    scale = a / 448.f;
    inv = 448.f / a;
  }
}

// Block-wide max over 256 threads.
__device__ __forceinline__ float block_max_256(float v, float* red) {
  v = group_max<32>(v);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  float r = red[0];
#pragma unroll
  for (int i = 1; i < 8; ++i) r = fmaxf(r, red[i]);
  return r;
}

// grid (ceil(K/128), ceil(N/128)), 256 threads. x [N, K] (row stride ldx); q [N, K] or, transposed, [K, N]
// (row stride ldq); scale of block (by, bx) goes to sf[by * sf_sy + bx * sf_sx].
template <typename T, bool kTranspose, bool kUe8m0>
__global__ void __launch_bounds__(256) per_block_quant_fp8_kernel(const T* __restrict__ x, uint8_t* __restrict__ q,
                                                                  float* __restrict__ sf, int N, int K, int64_t ldx,
                                                                  int64_t ldq, int sf_sy, int sf_sx, float eps) {
  __shared__ float red[8];
  __shared__ uint8_t tile[kTranspose ? 128 : 1][kTranspose ? 132 : 1];
  const int n0 = blockIdx.y * 128, k0 = blockIdx.x * 128;
  const int rows = min(128, N - n0), cols = min(128, K - k0);
  float amax = 0.f;
  for (int i = threadIdx.x; i < 128 * 128; i += 256) {
    const int r = i / 128, c = i % 128;
    if (r < rows && c < cols) amax = fmaxf(amax, fabsf(to_float(x[(n0 + r) * ldx + k0 + c])));
  }
  amax = block_max_256(amax, red);
  float scale, inv;
  scale_from_amax<kUe8m0>(amax, eps, scale, inv);
  if (threadIdx.x == 0) sf[blockIdx.y * sf_sy + blockIdx.x * sf_sx] = scale;
  for (int i = threadIdx.x; i < 128 * 128; i += 256) {
    const int r = i / 128, c = i % 128;
    if (r < rows && c < cols) {
      const uint8_t v = float_to_e4m3(to_float(x[(n0 + r) * ldx + k0 + c]) * inv);
      if (kTranspose) tile[c][r] = v;
      else q[(n0 + r) * ldq + k0 + c] = v;
    }
  }
  if (kTranspose) {
    __syncthreads();
    for (int i = threadIdx.x; i < 128 * 128; i += 256) {
      const int c = i / 128, r = i % 128;  // r fastest: consecutive bytes of one q^T row
      if (r < rows && c < cols) q[(k0 + c) * ldq + n0 + r] = tile[c][r];
    }
  }
}

// grid (ceil(K/64), ceil(M/128)), 256 threads. x [M, K] (row stride ldx) -> q [K, m_pad] (row stride ldq, columns
// [M, m_pad) written as zeros), sf[k + (m / 128) * sf_ld] (MN-major, sf_ld = align(K, 4)).
template <typename T, bool kUe8m0>
__global__ void __launch_bounds__(256) per_token_group_quant_fp8_t_kernel(const T* __restrict__ x,
                                                                          uint8_t* __restrict__ q,
                                                                          float* __restrict__ sf, int M, int K,
                                                                          int m_pad, int64_t ldx, int64_t ldq,
                                                                          int sf_ld, float eps) {
  __shared__ float tile[128][65];
  __shared__ float inv_s[64];
  const int m0 = blockIdx.y * 128, k0 = blockIdx.x * 64;
  for (int i = threadIdx.x; i < 128 * 64; i += 256) {
    const int r = i / 64, c = i % 64;
    tile[r][c] = (m0 + r < M && k0 + c < K) ? to_float(x[(m0 + r) * ldx + k0 + c]) : 0.f;
  }
  __syncthreads();
  {  // 4 threads per column, 32 rows each
    const int c = threadIdx.x / 4, part = threadIdx.x % 4;
    float amax = 0.f;
#pragma unroll 8
    for (int r = part * 32; r < part * 32 + 32; ++r) amax = fmaxf(amax, fabsf(tile[r][c]));
    amax = group_max<4>(amax);
    float scale, inv;
    scale_from_amax<kUe8m0>(amax, eps, scale, inv);
    if (part == 0) {
      inv_s[c] = inv;
      if (k0 + c < K) sf[k0 + c + blockIdx.y * sf_ld] = scale;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 128 * 64; i += 256) {
    const int c = i / 128, r = i % 128;  // r fastest: consecutive bytes of one q row
    if (k0 + c < K && m0 + r < m_pad) q[(k0 + c) * ldq + m0 + r] = float_to_e4m3(tile[r][c] * inv_s[c]);
  }
}

}  // namespace deepstack
