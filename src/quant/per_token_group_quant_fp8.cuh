// Per-token-group FP8 quantisation: x [rows, K] (bf16/fp16/fp32) -> q [rows, K] e4m3 + fp32 scales per group of
// kGroup channels, scales written MN-major and TMA-aligned (offset b * batch_stride + g * m_aligned + m).
//
// Memory-bound: every thread moves one 16-byte vector per group it touches. A "lane group" of kLanes threads owns
// one (row, group) pair; the block's lane groups cover consecutive rows of the same K group, so the scale writes of a
// block are contiguous (MN-major). Grid: one block per (K group, kSlots * kIters rows), K group fastest. Each thread keeps kIters rows in flight before reducing, to hide DRAM latency.
#pragma once
#include "common/vec.cuh"

namespace deepstack {

// kIters: rows each thread keeps in flight; kStreaming: evict-first cache hints (data is touched once).
// kSwiGLU: quantise silu(x) * x[.. + up_offset] instead of x (a SwiGLU's gate and up halves, x rows of 2K): the
// activation of an expert MLP goes from the first GEMM's output to the second's FP8 operand in one pass, in fp32.
template <typename T, int kGroup, bool kUe8m0, int kIters = 4, bool kStreaming = false, bool kSwiGLU = false>
__global__ void __launch_bounds__(256) per_token_group_quant_fp8_kernel(
    const T* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ scales,
    int rows, int rows_per_batch, int K,
    long long x_stride_batch, long long x_stride_row,
    int scale_m_aligned, long long scale_stride_batch, float eps, long long up_offset) {
  constexpr int kElems = Vec16<T>::kElems;          // elements per 16-byte load
  constexpr int kLanes = kGroup / kElems;           // threads per group
  constexpr int kSlots = 256 / kLanes;              // (row, group) pairs per block per iteration
  static_assert(kGroup % kElems == 0 && 32 % kLanes == 0, "group size must be a multiple of 16 bytes, <= 1 warp");

  const int lane = threadIdx.x % kLanes;
  const int slot = threadIdx.x / kLanes;
  // Consecutive blocks take consecutive K groups of the same rows, so the blocks in flight stream through
  // contiguous memory (better DRAM page locality than walking down one column of groups).
  const int num_groups = K / kGroup;
  const int g = blockIdx.x % num_groups;
  const int row0 = (blockIdx.x / num_groups) * (kSlots * kIters) + slot;

  using Load = uint4;
  Load raw[kIters];
  Load raw_up[kSwiGLU ? kIters : 1];
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int r = row0 + it * kSlots;
    if (r < rows) {
      const int b = r / rows_per_batch, m = r - b * rows_per_batch;
      const T* src = x + b * x_stride_batch + m * x_stride_row + g * kGroup + lane * kElems;
      raw[it] = kStreaming ? __ldcs(reinterpret_cast<const Load*>(src)) : __ldg(reinterpret_cast<const Load*>(src));
      if constexpr (kSwiGLU) {
        const Load* up = reinterpret_cast<const Load*>(src + up_offset);
        raw_up[it] = kStreaming ? __ldcs(up) : __ldg(up);
      }
    }
  }
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int r = row0 + it * kSlots;
    // Every lane of the warp must take part in the shuffles, so reduce before the bounds check.
    float f[kElems];
    Unpack16<T>::run(raw[it], f);
    if constexpr (kSwiGLU) {
      float u[kElems];
      Unpack16<T>::run(raw_up[it], u);
#pragma unroll
      for (int e = 0; e < kElems; ++e) f[e] = f[e] / (1.f + expf(-f[e])) * u[e];
    }
    float amax = 0.f;
#pragma unroll
    for (int e = 0; e < kElems; ++e) amax = fmaxf(amax, fabsf(f[e]));
    amax = fmaxf(group_max<kLanes>(amax), eps);
    float scale = amax / 448.f;
    float inv;
    if constexpr (kUe8m0) {
      scale = ceil_to_ue8m0(scale);
      inv = 1.f / scale;                             // exact: a power of two
    } else {
      inv = 448.f / amax;
    }
    if (r >= rows) continue;
    uint32_t words[kElems / 4];
#pragma unroll
    for (int w = 0; w < kElems / 4; ++w) {
      words[w] = float2_to_e4m3x2(f[4 * w] * inv, f[4 * w + 1] * inv) |
                 (static_cast<uint32_t>(float2_to_e4m3x2(f[4 * w + 2] * inv, f[4 * w + 3] * inv)) << 16);
    }
    uint8_t* dst = q + static_cast<long long>(r) * K + g * kGroup + lane * kElems;
    if constexpr (kElems == 8) {
      if constexpr (kStreaming) __stcs(reinterpret_cast<uint2*>(dst), make_uint2(words[0], words[1]));
      else *reinterpret_cast<uint2*>(dst) = make_uint2(words[0], words[1]);
    } else {
      static_assert(kElems == 4, "16-byte loads of 2- or 4-byte elements");
      if constexpr (kStreaming) __stcs(reinterpret_cast<unsigned int*>(dst), words[0]);
      else *reinterpret_cast<uint32_t*>(dst) = words[0];
    }
    if (lane == 0) {
      const int b = r / rows_per_batch, m = r - b * rows_per_batch;
      scales[b * scale_stride_batch + static_cast<long long>(g) * scale_m_aligned + m] = scale;
    }
  }
}

}  // namespace deepstack
