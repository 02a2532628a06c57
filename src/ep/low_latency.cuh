// Low-latency dispatch and combine over NVLink (CUDA IPC): fixed-size slots, no host sync, CUDA-graph capturable.
// Python glue: torch_deepstack/ep/intranode.py. Halves and barriers as in intranode.cuh.
//
// Dispatch: rank r's half holds counts [L][R] int32, then message slots [L][R][M] of msg_bytes: the token's data
// row, its fp8 scales (if any), and its token index. Sender warp e (one per global expert) walks the tokens in
// order and gives each token that chose e the next slot of (expert e % L, source me) on rank e / L: slot order is
// token order, so the result is repeatable. After the barrier each local expert's block packs its rows source by
// source: rows [begin_s, begin_s + count_s) came from source s (layout_range = begin << 32 | count).
//
// Combine: each valid row of expert l goes home to its source s, into slot [me * L + l][token] of s's half
// ([E][M][hidden]); the source sums its top-k slots with its own weights in fp32, in top-k order.
#pragma once
#include <cstdint>

#include "ep/intranode.cuh"

namespace deepstack {
namespace ep {

// (256, 1) and (512, 1) below: without a minimum of one block ptxas aimed at full occupancy and spilled (4-28 bytes).
template <int kMaxRanks>
__global__ void __launch_bounds__(256, 1) ll_dispatch_send_kernel(
    const uint8_t* __restrict__ x, long long x_stride, int data_bytes, const float* __restrict__ scales,
    long long scales_stride, int num_scales, const int64_t* __restrict__ topk, int n, int k, int M, int L,
    uint8_t* const* __restrict__ peer_base, long long half_bytes, int rank, int R,
    const unsigned long long* __restrict__ counter, long long off_counts, long long off_slots, int msg_bytes) {
  const int lane = threadIdx.x % kWarpThreads;
  const int half = half_before_barrier(counter);
  const int E = L * R;
  const int units = data_bytes / 16;
  const int warps = gridDim.x * (blockDim.x / kWarpThreads);
  for (int e = blockIdx.x * (blockDim.x / kWarpThreads) + threadIdx.x / kWarpThreads; e < E; e += warps) {
    const int j = e / L, l = e % L;
    uint8_t* h = peer_base[j] + half * half_bytes;
    uint8_t* slots = h + off_slots + ((size_t)l * R + rank) * (size_t)M * msg_bytes;
    int count = 0;
    for (int t0 = 0; t0 < n; t0 += kWarpThreads) {
      const int t = t0 + lane;
      bool hit = false;
      if (t < n)
        for (int c = 0; c < k; ++c) hit |= topk[(size_t)t * k + c] == e;
      unsigned b = __ballot_sync(0xffffffffu, hit);
      while (b) {
        const int tok = t0 + __ffs(b) - 1;
        b &= b - 1;
        uint8_t* msg = slots + (size_t)count * msg_bytes;
        const uint8_t* src = x + (size_t)tok * x_stride;
        for (int u = lane; u < units; u += kWarpThreads)
          st_v4(msg + (size_t)u * 16, ld_nc_v4(src + (size_t)u * 16));
        float* msg_scales = reinterpret_cast<float*>(msg + data_bytes);
        for (int c = lane; c < num_scales; c += kWarpThreads) msg_scales[c] = scales[(size_t)tok * scales_stride + c];
        if (lane == 0) *reinterpret_cast<int*>(msg + data_bytes + num_scales * 4) = tok;
        ++count;
      }
    }
    if (lane == 0) reinterpret_cast<volatile int*>(h + off_counts)[l * R + rank] = count;
  }
}

// One block per local expert. recv_scales: element (l, row, g) at l * sl + g * sg + row (MN-major); null when the
// data carries no scales.
template <int kMaxRanks>
__global__ void __launch_bounds__(512, 1) ll_dispatch_recv_kernel(
    const uint8_t* __restrict__ area, long long half_bytes, const unsigned long long* __restrict__ counter,
    long long off_counts, long long off_slots, int msg_bytes, int data_bytes, int num_scales, int M, int R,
    uint8_t* __restrict__ recv_x, float* __restrict__ recv_scales, long long sl, long long sg,
    int* __restrict__ recv_count, int* __restrict__ src_info, long long* __restrict__ layout_range) {
  __shared__ int begin[kMaxRanks + 1];
  const int l = blockIdx.x, tid = threadIdx.x, lane = tid % kWarpThreads;
  const uint8_t* h = area + half_after_barrier(counter) * half_bytes;
  const int cap = M * R;
  if (tid < kWarpThreads) {
    const int cnt = tid < R ? reinterpret_cast<const volatile int*>(h + off_counts)[l * R + tid] : 0;
    const int b = warp_exclusive_sum(cnt, tid);
    if (tid < R) {
      begin[tid] = b;
      layout_range[(size_t)l * R + tid] = ((long long)b << 32) | (long long)cnt;
    }
    if (tid == R - 1) {
      begin[R] = b + cnt;
      recv_count[l] = b + cnt;
    }
  }
  __syncthreads();
  const int total = begin[R];
  const int units = data_bytes / 16;
  for (int row = tid / kWarpThreads; row < total; row += blockDim.x / kWarpThreads) {
    int s = 0;
    while (begin[s + 1] <= row) ++s;
    const uint8_t* msg = h + off_slots + (((size_t)l * R + s) * M + (row - begin[s])) * msg_bytes;
    uint8_t* dst = recv_x + ((size_t)l * cap + row) * data_bytes;
    for (int u = lane; u < units; u += kWarpThreads) st_v4(dst + (size_t)u * 16, ld_volatile_v4(msg + (size_t)u * 16));
    for (int c = lane; c < num_scales; c += kWarpThreads)
      recv_scales[l * sl + c * sg + row] = reinterpret_cast<const volatile float*>(msg + data_bytes)[c];
    if (lane == 0)
      src_info[(size_t)l * cap + row] = *reinterpret_cast<const volatile int*>(msg + data_bytes + num_scales * 4);
  }
  for (int row = total + tid; row < cap; row += blockDim.x) src_info[(size_t)l * cap + row] = -1;
}

template <int kMaxRanks>
__global__ void __launch_bounds__(256) ll_combine_send_kernel(
    const uint8_t* __restrict__ y, int row_bytes, const int* __restrict__ src_info,
    const long long* __restrict__ layout_range, int L, int M, int rank, int R,
    uint8_t* const* __restrict__ peer_base, long long half_bytes, const unsigned long long* __restrict__ counter,
    long long off_slots) {
  const int lane = threadIdx.x % kWarpThreads;
  const int half = half_before_barrier(counter);
  const int cap = M * R;
  const int units = row_bytes / 16;
  const int warps = gridDim.x * (blockDim.x / kWarpThreads);
  for (long long q = blockIdx.x * (blockDim.x / kWarpThreads) + threadIdx.x / kWarpThreads; q < (long long)L * cap;
       q += warps) {
    const int l = static_cast<int>(q / cap), row = static_cast<int>(q % cap);
    const long long lr = lane < R ? layout_range[(size_t)l * R + lane] : 0;
    const int b = static_cast<int>(lr >> 32), c = static_cast<int>(lr & 0xffffffffll);
    const unsigned in = __ballot_sync(0xffffffffu, lane < R && row >= b && row < b + c);
    if (!in) continue;                                         // past the expert's received rows
    const int s = __ffs(in) - 1;
    const int tok = src_info[(size_t)l * cap + row];
    uint8_t* dst = peer_base[s] + half * half_bytes + off_slots +
                   ((size_t)(rank * L + l) * M + tok) * (size_t)row_bytes;
    const uint8_t* src = y + ((size_t)l * cap + row) * row_bytes;
    for (int u = lane; u < units; u += kWarpThreads) st_v4(dst + (size_t)u * 16, ld_nc_v4(src + (size_t)u * 16));
  }
}

// One block per token (its threads split the hidden dimension), so even 128 tokens keep many SMs busy.
template <typename T>
__global__ void __launch_bounds__(256) ll_combine_reduce_kernel(
    const uint8_t* __restrict__ area, long long half_bytes, const unsigned long long* __restrict__ counter,
    long long off_slots, const int64_t* __restrict__ topk, const float* __restrict__ weights, int n, int k,
    int hidden, int M, T* __restrict__ out) {
  constexpr int kElems = 16 / sizeof(T);
  const uint8_t* h = area + half_after_barrier(counter) * half_bytes + off_slots;
  const size_t row_bytes = (size_t)hidden * sizeof(T);
  const int units = hidden / kElems;
  for (int t = blockIdx.x; t < n; t += gridDim.x) {
    for (int u = threadIdx.x; u < units; u += blockDim.x) {
      float acc[kElems];
#pragma unroll
      for (int e = 0; e < kElems; ++e) acc[e] = 0.f;
      for (int c = 0; c < k; ++c) {
        const long long e = topk[(size_t)t * k + c];
        if (e < 0) continue;
        const float w = weights[(size_t)t * k + c];
        float f[kElems];
        Unpack16<T>::run(ld_volatile_v4(h + ((size_t)e * M + t) * row_bytes + (size_t)u * 16), f);
#pragma unroll
        for (int i = 0; i < kElems; ++i) acc[i] += w * f[i];
      }
      *reinterpret_cast<uint4*>(out + (size_t)t * hidden + (size_t)u * kElems) = Pack16<T>::run(acc);
    }
  }
}

}  // namespace ep
}  // namespace deepstack
