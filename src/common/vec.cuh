// Small device helpers shared by deepstack kernels: 16-byte vector types and warp reductions.
// No torch headers: kernels compile in seconds with plain nvcc.
#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

namespace deepstack {

// Number of elements of T in one 16-byte access.
template <typename T>
struct Vec16 {
  static constexpr int kElems = 16 / sizeof(T);
};

// Unpack one 16-byte load into floats, with register-only bit operations (no local-memory reinterpretation).
__device__ __forceinline__ void unpack16(const uint4& raw, float (&f)[4]) {
  f[0] = __uint_as_float(raw.x); f[1] = __uint_as_float(raw.y);
  f[2] = __uint_as_float(raw.z); f[3] = __uint_as_float(raw.w);
}
__device__ __forceinline__ void unpack16_bf16(const uint4& raw, float (&f)[8]) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);             // bf16 is the top half of an fp32
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void unpack16_fp16(const uint4& raw, float (&f)[8]) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h = *reinterpret_cast<const __half2*>(&w[i]);
    float2 v = __half22float2(h);
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
}
template <typename T> struct Unpack16;
template <> struct Unpack16<float> { static __device__ __forceinline__ void run(const uint4& r, float (&f)[4]) { unpack16(r, f); } };
template <> struct Unpack16<__nv_bfloat16> { static __device__ __forceinline__ void run(const uint4& r, float (&f)[8]) { unpack16_bf16(r, f); } };
template <> struct Unpack16<__half> { static __device__ __forceinline__ void run(const uint4& r, float (&f)[8]) { unpack16_fp16(r, f); } };

// Two floats to one 32-bit word of two T (bf16 or fp16, round to nearest even), `lo` in the low half.
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// The inverse of Unpack16: 16 / sizeof(T) floats to one 16-byte vector of T.
template <typename T> struct Pack16 {   // 2-byte types
  static __device__ __forceinline__ uint4 run(const float (&f)[8]) {
    return make_uint4(pack2<T>(f[0], f[1]), pack2<T>(f[2], f[3]), pack2<T>(f[4], f[5]), pack2<T>(f[6], f[7]));
  }
};
template <> struct Pack16<float> {
  static __device__ __forceinline__ uint4 run(const float (&f)[4]) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
  }
};

// Max over aligned groups of kLanes consecutive lanes (kLanes a power of two dividing 32).
template <int kLanes>
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
  for (int off = kLanes / 2; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Two floats to two saturated e4m3 bytes (round to nearest even), packed low byte first.
__device__ __forceinline__ uint16_t float2_to_e4m3x2(float a, float b) {
  return static_cast<uint16_t>(__nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3));
}

// Round a positive fp32 up to a power of two (UE8M0 scale), exactly: bump the exponent if any mantissa bit is set.
__device__ __forceinline__ float ceil_to_ue8m0(float s) {
  uint32_t bits = __float_as_uint(s);
  uint32_t exp = (bits >> 23) & 0xffu;
  exp += (bits & 0x7fffffu) != 0u;
  return __uint_as_float(exp << 23);
}

}  // namespace deepstack
