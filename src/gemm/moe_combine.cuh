// MoE combine: out[t] = sum over slots c of weights[t, c] * y[rows[t, c]], slots with rows < 0 skipped, summed in
// fp32 and rounded once to T. It replaces the scatter-add (one atomic per element) that MoE layers usually combine
// with: each token reads its k rows once and writes its output row once.
//
// One block per token (grid-stride over tokens), its threads split the hidden dimension in 16-byte units (kVec) or
// single elements (hidden or the row stride not a multiple of 16 bytes). The k loads of a unit are independent, so
// they are in flight together.
#pragma once
#include "common/vec.cuh"

namespace deepstack {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

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

}  // namespace deepstack
