// MoE combine: out[t] = sum over slots c of weights[t, c] * y[rows[t, c]], slots with rows < 0 skipped, summed in
// fp32 and rounded once to T. It replaces the scatter-add (one atomic per element) that MoE layers usually combine
// with: each token reads its k rows once and writes its output row once.
//
// One block per token (grid-stride over tokens), its threads split the hidden dimension in 16-byte units (kVec) or
// single elements (hidden or the row stride not a multiple of 16 bytes). The k loads of a unit are independent, so
// they are in flight together.
#pragma once
#include "common/scalar.cuh"
#include "common/vec.cuh"

namespace deepstack {

template <typename T, bool kVec>
__global__ void __launch_bounds__(256) moe_combine_kernel(
    const T* __restrict__ y, long long y_row_stride, const int64_t* __restrict__ rows,
    const float* __restrict__ weights, int n, int k, int hidden, T* __restrict__ out) {
  constexpr int kElems = kVec ? Vec16<T>::kElems : 1;
  const int units = hidden / kElems;
  for (int t = blockIdx.x; t < n; t += gridDim.x) {
    const int64_t* trow = rows + (size_t)t * k;
    const float* tw = weights + (size_t)t * k;
    for (int u = threadIdx.x; u < units; u += blockDim.x) {
      float acc[kElems];
#pragma unroll
      for (int i = 0; i < kElems; ++i) acc[i] = 0.f;
#pragma unroll 4
      for (int c = 0; c < k; ++c) {
        const long long r = trow[c];
        if (r < 0) continue;
        const float w = tw[c];
        const T* src = y + r * y_row_stride + (size_t)u * kElems;
        if constexpr (kVec) {
          float f[kElems];
          Unpack16<T>::run(__ldg(reinterpret_cast<const uint4*>(src)), f);
#pragma unroll
          for (int i = 0; i < kElems; ++i) acc[i] += w * f[i];
        } else {
          acc[0] += w * to_f32(*src);
        }
      }
      T* dst = out + (size_t)t * hidden + (size_t)u * kElems;
      if constexpr (kVec) {
        *reinterpret_cast<uint4*>(dst) = Pack16<T>::run(acc);
      } else {
        *dst = from_f32<T>(acc[0]);
      }
    }
  }
}

// moe_combine's routing-weight gradient: grad_w[t, c] = <grad[t], y[rows[t, c]]> in fp32 (0 for empty slots), one
// block per token: its threads split hidden, each slot's partial dot products are summed across the block. It reads
// each gathered row once in y's dtype, where the PyTorch form materialises the [T, k, hidden] rows in fp32.
template <typename T, bool kVec>
__global__ void __launch_bounds__(256) moe_combine_weight_grad_kernel(
    const T* __restrict__ grad, const T* __restrict__ y, long long y_row_stride, const int64_t* __restrict__ rows,
    int n, int k, int hidden, float* __restrict__ grad_w) {
  constexpr int kElems = kVec ? Vec16<T>::kElems : 1;
  __shared__ float partial[8];                    // one per warp (256 threads)
  const int units = hidden / kElems;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = (blockDim.x + 31) / 32;
  for (int t = blockIdx.x; t < n; t += gridDim.x) {
    const T* g = grad + (size_t)t * hidden;
    for (int c = 0; c < k; ++c) {
      const long long r = rows[(size_t)t * k + c];   // (uniform across the block: all threads take one branch)
      if (r < 0) {
        if (threadIdx.x == 0) grad_w[(size_t)t * k + c] = 0.f;
        continue;
      }
      const T* src = y + r * y_row_stride;
      float acc = 0.f;
      for (int u = threadIdx.x; u < units; u += blockDim.x) {
        if constexpr (kVec) {
          float a[kElems], b[kElems];
          Unpack16<T>::run(__ldg(reinterpret_cast<const uint4*>(g + (size_t)u * kElems)), a);
          Unpack16<T>::run(__ldg(reinterpret_cast<const uint4*>(src + (size_t)u * kElems)), b);
#pragma unroll
          for (int i = 0; i < kElems; ++i) acc += a[i] * b[i];
        } else {
          acc += to_f32(g[u]) * to_f32(src[u]);
        }
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
      if (lane == 0) partial[warp] = acc;
      __syncthreads();
      if (threadIdx.x == 0) {
        float sum = 0.f;
        for (int w = 0; w < warps; ++w) sum += partial[w];
        grad_w[(size_t)t * k + c] = sum;
      }
      __syncthreads();                             // (partial is reused by the next slot)
    }
  }
}

}  // namespace deepstack
