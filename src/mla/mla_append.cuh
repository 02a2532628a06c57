// Write new latent + rope rows into paged-cache slots: grid (tokens, h_kv), 128 threads. slot < 0 skips the row.
// bf16/fp16 cache: a 16-byte-vector copy. FP8 cache (656-byte rows): per 128-channel group (one warp) the scale is
// amax / 448 rounded up to a power of two, values are e4m3 (saturating), rope stays bf16.
#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

namespace deepstack {
namespace mla {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T, int kD, bool kFp8>
__global__ void __launch_bounds__(128) mla_append_kernel(
    const T* __restrict__ kv, uint8_t* __restrict__ cache, const long long* __restrict__ slots,
    long long kv_stride_tok, long long kv_stride_head, long long cache_slot_stride, long long cache_head_stride) {
  const long long slot = slots[blockIdx.x];
  if (slot < 0) return;
  const T* src = kv + blockIdx.x * kv_stride_tok + blockIdx.y * kv_stride_head;
  uint8_t* dst = cache + slot * cache_slot_stride + blockIdx.y * cache_head_stride;
  const int tid = threadIdx.x;
  if constexpr (!kFp8) {
    constexpr int kUnits = kD * sizeof(T) / 16;
    for (int u = tid; u < kUnits; u += 128)
      reinterpret_cast<uint4*>(dst)[u] = reinterpret_cast<const uint4*>(src)[u];
  } else {
    static_assert(kD == 576, "FP8 rows hold 512 latent + 64 rope channels");
    float v[4];
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[i] = to_float(src[4 * tid + i]);
      amax = fmaxf(amax, fabsf(v[i]));
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    amax = fmaxf(amax, 1e-4f);
    uint32_t bits = __float_as_uint(amax / 448.f);
    const uint32_t exp = ((bits >> 23) & 0xffu) + ((bits & 0x7fffffu) != 0u);
    const float scale = __uint_as_float(exp << 23);
    const float inv = 1.f / scale;   // exact: a power of two
    const uint16_t lo = static_cast<uint16_t>(__nv_cvt_float2_to_fp8x2(make_float2(v[0] * inv, v[1] * inv), __NV_SATFINITE, __NV_E4M3));
    const uint16_t hi = static_cast<uint16_t>(__nv_cvt_float2_to_fp8x2(make_float2(v[2] * inv, v[3] * inv), __NV_SATFINITE, __NV_E4M3));
    reinterpret_cast<uint32_t*>(dst)[tid] = lo | (static_cast<uint32_t>(hi) << 16);
    if (tid % 32 == 0) reinterpret_cast<float*>(dst + 512)[tid / 32] = scale;
    if (tid < 32) {
      const __nv_bfloat162 r = __floats2bfloat162_rn(to_float(src[512 + 2 * tid]), to_float(src[512 + 2 * tid + 1]));
      reinterpret_cast<__nv_bfloat162*>(dst + 528)[tid] = r;
    }
  }
}

}  // namespace mla
}  // namespace deepstack
