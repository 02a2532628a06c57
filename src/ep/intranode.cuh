// Normal-mode dispatch and combine over NVLink (CUDA IPC): rows are stored straight into the peers' receive areas by
// SM copies, with one cross-rank barrier per phase. Python glue: torch_deepstack/ep/intranode.py.
//
// Every rank maps every peer's receive area (two halves of half_bytes each). A phase writes into the half given by
// the parity of the barrier epoch (*counter) before its barrier, and the receiver reads that half after it; since
// every phase ends with exactly one barrier, the halves alternate on device, also across CUDA-graph replays.
//
// Layout of a half for a normal dispatch (byte offsets from the Python side, the same on every rank):
//   notify table [R][R + L] int32 (row s: source s's token counts per destination rank, then its per-expert
//   counts for this rank's L experts) | data rows [cap][row_bytes] | scales [cap][S] f32 | top-k [cap][k] i64 |
//   weights [cap][k] f32 | source token index [cap] i32.
// Rows from source s start at row sum_{s' < s} rc[s'][me]: the received rows come out grouped by source, each group
// in token order (the same order as the torch.distributed path, so both transports give identical results).
#pragma once
#include <cstdint>

#include "common/vec.cuh"
#include "ep/ipc_barrier.cuh"

namespace deepstack {
namespace ep {

constexpr int kWarpThreads = 32;

__device__ __forceinline__ uint4 ld_nc_v4(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ void st_v4(void* p, const uint4& v) {
  asm volatile("st.global.L1::no_allocate.v4.u32 [%0], {%1,%2,%3,%4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z),
               "r"(v.w) : "memory");
}
// Data that peers stored before a barrier: read past the (non-coherent) L1.
__device__ __forceinline__ uint4 ld_volatile_v4(const void* p) {
  uint4 v;
  asm volatile("ld.volatile.global.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ int half_before_barrier(const unsigned long long* counter) {
  return static_cast<int>(*reinterpret_cast<const volatile unsigned long long*>(counter) & 1ull);
}
__device__ __forceinline__ int half_after_barrier(const unsigned long long* counter) {
  return static_cast<int>((*reinterpret_cast<const volatile unsigned long long*>(counter) - 1ull) & 1ull);
}

// Copy one row of `units` 16-byte vectors from src to each of the `na` destinations (a warp's work; dsts lives in
// shared memory, so indexing it at run time costs no local memory).
template <int kUnroll = 4>
__device__ __forceinline__ void warp_copy_row_to(const uint8_t* src, uint8_t* const* dsts, int na, int units,
                                                 int lane) {
  int u = lane;
  for (; u + (kUnroll - 1) * kWarpThreads < units; u += kUnroll * kWarpThreads) {
    uint4 v[kUnroll];
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) v[r] = ld_nc_v4(src + (size_t)(u + r * kWarpThreads) * 16);
    for (int a = 0; a < na; ++a) {
#pragma unroll
      for (int r = 0; r < kUnroll; ++r) st_v4(dsts[a] + (size_t)(u + r * kWarpThreads) * 16, v[r]);
    }
  }
  for (; u < units; u += kWarpThreads) {
    const uint4 v = ld_nc_v4(src + (size_t)u * 16);
    for (int a = 0; a < na; ++a) st_v4(dsts[a] + (size_t)u * 16, v);
  }
}

// The ranks token t goes to (mask row t), one lane per rank: returns how many; `a` is this lane's index among them
// (valid when the lane's rank is in the mask), so the warp can list destinations in rank order.
__device__ __forceinline__ int warp_mask_ranks(const bool* __restrict__ mask, int t, int R, int lane, bool& m, int& a) {
  m = lane < R && mask[(size_t)t * R + lane];
  const unsigned act = __ballot_sync(0xffffffffu, m);
  a = __popc(act & ((1u << lane) - 1u));
  return __popc(act);
}

// Exclusive prefix over lanes (values of lanes >= n count as 0).
__device__ __forceinline__ int warp_exclusive_sum(int v, int lane) {
  int incl = v;
#pragma unroll
  for (int off = 1; off < kWarpThreads; off <<= 1) {
    const int o = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += o;
  }
  return incl - v;
}

// Plain byte copy to a peer address (the IPC transport's fallback moves); 16-byte vectors when both ends allow.
template <int kMaxRanks>
__global__ void __launch_bounds__(512) copy_bytes_kernel(uint8_t* __restrict__ dst, const uint8_t* __restrict__ src,
                                                         long long n) {
  const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x, stride = (long long)gridDim.x * blockDim.x;
  if (((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15) == 0) {
    const long long units = n / 16;
    for (long long u = tid; u < units; u += stride) st_v4(dst + u * 16, ld_nc_v4(src + u * 16));
    for (long long i = units * 16 + tid; i < n; i += stride) dst[i] = src[i];
  } else {
    for (long long i = tid; i < n; i += stride) dst[i] = src[i];
  }
}

// ---- 1. notify: exchange token counts per rank and per expert, then a barrier -------------------------------
// One block. pos_last: the last row of the inclusive cumsum of is_token_in_rank (tokens per destination), or null
// when there are no tokens. Each rank's notify row holds its counts per destination [R], its counts per expert of
// the row's owner [L], and a flag for expert ids outside [-1, E) (so every rank learns that some rank passed bad
// input, and all of them can raise instead of some waiting forever). The counts per expert are the caller's
// (expert_counts_in [E], DeepEP's num_tokens_per_expert, with or without top-k) when given, else the (token, slot)
// pairs of topk per expert (zeros without top-k). info_out: rc [R][R] (rc[s][j] = tokens s
// sends to j), tokens received per local expert [L], the bad-id flag of every rank [R], this rank's lowest and
// highest expert id (clamped to int32), then the barrier's error word (non-zero: a peer timed out, the counts are
// not valid).
template <int kMaxRanks>
__global__ void __launch_bounds__(1024) notify_dispatch_kernel(
    const int* __restrict__ pos_last, const int64_t* __restrict__ topk, const int* __restrict__ expert_counts_in,
    int n, int k, int L,
    uint8_t* const* __restrict__ peer_base, long long half_bytes, unsigned long long* const* __restrict__ flag_arrays,
    int rank, int R, unsigned long long* __restrict__ counter, unsigned long long timeout_ns, int* __restrict__ error,
    int* __restrict__ info_out) {
  extern __shared__ int expert_count[];   // [R * L]
  __shared__ long long id_lo, id_hi;
  const int tid = threadIdx.x;
  const int half = half_before_barrier(counter);
  const int E = R * L, W = R + L + 1;
  for (int e = tid; e < E; e += blockDim.x) expert_count[e] = 0;
  if (tid == 0) {
    id_lo = -1;
    id_hi = -1;
  }
  __syncthreads();
  if (topk != nullptr) {
    long long lo = -1, hi = -1;
    for (int i = tid; i < n * k; i += blockDim.x) {
      const long long e = topk[i];
      lo = e < lo ? e : lo;
      hi = e > hi ? e : hi;
      if (expert_counts_in == nullptr && e >= 0 && e < E) atomicAdd(&expert_count[e], 1);
    }
    atomicMin(&id_lo, lo);
    atomicMax(&id_hi, hi);
  }
  __syncthreads();
  const int bad = id_lo < -1 || id_hi >= E;
  const int* per_expert = expert_counts_in != nullptr ? expert_counts_in : expert_count;
  for (int idx = tid; idx < R * W; idx += blockDim.x) {
    const int j = idx / W, w = idx % W;
    const int v = w < R ? (pos_last != nullptr ? pos_last[w] : 0) : (w < R + L ? per_expert[j * L + (w - R)] : bad);
    int* table = reinterpret_cast<int*>(peer_base[j] + half * half_bytes);
    reinterpret_cast<volatile int*>(table)[rank * W + w] = v;
  }
  block_barrier(flag_arrays, rank, R, counter, timeout_ns, error);
  const volatile int* mine = reinterpret_cast<const volatile int*>(peer_base[rank] + half * half_bytes);
  for (int idx = tid; idx < R * R; idx += blockDim.x) info_out[idx] = mine[(idx / R) * W + idx % R];
  for (int l = tid; l < L; l += blockDim.x) {
    int s = 0;
    for (int src = 0; src < R; ++src) s += mine[src * W + R + l];
    info_out[R * R + l] = s;
  }
  for (int src = tid; src < R; src += blockDim.x) info_out[R * R + L + src] = mine[src * W + R + L];
  if (tid == 0) {
    const long long kMin = -2147483647ll - 1, kMax = 2147483647ll;
    info_out[R * R + L + R] = static_cast<int>(id_lo < kMin ? kMin : id_lo);
    info_out[R * R + L + R + 1] = static_cast<int>(id_hi > kMax ? kMax : id_hi);
    info_out[R * R + L + R + 2] = *reinterpret_cast<volatile int*>(error);
  }
}

// ---- positions: pos[t][j] = how many tokens t' <= t go to rank j (the inclusive scan of the mask over tokens) ---
// One block; each thread owns a contiguous run of tokens, and a block scan per rank joins the runs. One launch
// instead of torch's transpose + scan + transpose (three ops of host time per call; an outer-dimension cumsum
// took 226 us on the GPU).
// (A template, like every kernel here, so that only the specialisation asked for is compiled into a cubin.)
template <int kMaxRanks>
__global__ void __launch_bounds__(1024) rank_positions_kernel(const bool* __restrict__ mask, int n, int R,
                                                               int* __restrict__ pos) {
  static_assert(kMaxRanks <= kWarpThreads, "one lane per rank elsewhere in this file");
  __shared__ int warp_sums[32];
  const int tid = threadIdx.x, lane = tid % kWarpThreads, warp = tid / kWarpThreads;
  const int num_warps = blockDim.x / kWarpThreads;
  const int per = (n + blockDim.x - 1) / blockDim.x;
  const int begin = min(n, tid * per), end = min(n, begin + per);
  for (int j = 0; j < R; ++j) {
    int c = 0;
    for (int t = begin; t < end; ++t) c += mask[(size_t)t * R + j] ? 1 : 0;
    int incl = c;
#pragma unroll
    for (int o = 1; o < kWarpThreads; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    if (lane == kWarpThreads - 1) warp_sums[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      int w = lane < num_warps ? warp_sums[lane] : 0;
#pragma unroll
      for (int o = 1; o < kWarpThreads; o <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, w, o);
        if (lane >= o) w += v;
      }
      if (lane < num_warps) warp_sums[lane] = w;      // inclusive over warps
    }
    __syncthreads();
    int run = incl - c + (warp > 0 ? warp_sums[warp - 1] : 0);
    for (int t = begin; t < end; ++t) {
      run += mask[(size_t)t * R + j] ? 1 : 0;
      pos[(size_t)t * R + j] = run;
    }
    __syncthreads();                                   // warp_sums is reused by the next rank
  }
}

// ---- 2. send rows (dispatch and cached dispatch) -----------------------------------------------------------------
// One warp per token: the row goes to every rank in its mask, at that rank's row base(me) + slot, where
// base(me) = sum_{s < me} rc[s][j] and slot = pos[t][j] - 1 (pos: inclusive cumsum of the mask over tokens).
// cap > 0: the host has not seen the counts yet (an exact dispatch sends while the host waits for them), so the
// kernel checks the fit itself: if any rank would receive more than cap rows, nothing is sent. Every rank reads the
// same counts, so all skip together, and the host, which checks the same numbers, falls back.
template <int kMaxRanks>
__global__ void __launch_bounds__(512) dispatch_send_kernel(
    const uint8_t* __restrict__ x, long long x_stride, int row_bytes, const float* __restrict__ scales,
    long long scales_stride, int num_scales, const int64_t* __restrict__ topk, const float* __restrict__ weights,
    int k, int n, const bool* __restrict__ mask, const int* __restrict__ pos, const int* __restrict__ rc,
    uint8_t* const* __restrict__ peer_base, long long half_bytes, int rank, int R,
    const unsigned long long* __restrict__ counter, long long off_data, long long off_scales, long long off_topk,
    long long off_weights, long long off_src, uint8_t* __restrict__ out_x, float* __restrict__ out_scales,
    int64_t* __restrict__ out_topk, float* __restrict__ out_w, int* __restrict__ out_src, int L, int cap) {
  static_assert(kMaxRanks <= kWarpThreads, "one lane per rank");
  __shared__ uint8_t* dsts[512 / kWarpThreads][kMaxRanks];       // destination rank's area half
  __shared__ uint8_t* row_dst[512 / kWarpThreads][kMaxRanks];    // where the data row goes there
  __shared__ long long rows[512 / kWarpThreads][kMaxRanks];
  __shared__ int dst_rank[512 / kWarpThreads][kMaxRanks];
  const int lane = threadIdx.x % kWarpThreads, warp = threadIdx.x / kWarpThreads;
  if (cap > 0) {                                               // every warp decides alike (no block barrier below)
    int received = 0;
    if (lane < R)
      for (int s = 0; s < R; ++s) received += rc[s * R + lane];
    for (int o = kWarpThreads / 2; o > 0; o >>= 1) received = max(received, __shfl_xor_sync(0xffffffffu, received, o));
    if (received > cap) return;
  }
  const int half = half_before_barrier(counter);
  // this rank's first row in receiver `lane`'s area
  int base = 0;
  uint8_t* area = nullptr;
  if (lane < R) {
    for (int s = 0; s < rank; ++s) base += rc[s * R + lane];
    area = peer_base[lane] + half * half_bytes;
  }
  // Rows for this rank itself go straight into the outputs (out_x non-null), in their final form.
  const bool direct_self = out_x != nullptr;
  const int units = row_bytes / 16;
  const int warps = gridDim.x * (blockDim.x / kWarpThreads);
  for (int t = blockIdx.x * (blockDim.x / kWarpThreads) + warp; t < n; t += warps) {
    bool m;
    int a;
    const int na = warp_mask_ranks(mask, t, R, lane, m, a);
    if (m) {
      const long long row = base + pos[(size_t)t * R + lane] - 1;
      dsts[warp][a] = area;
      rows[warp][a] = row;
      dst_rank[warp][a] = lane;
      row_dst[warp][a] = (direct_self && lane == rank) ? out_x + row * row_bytes : area + off_data + row * row_bytes;
    }
    __syncwarp();
    warp_copy_row_to(x + (size_t)t * x_stride, row_dst[warp], na, units, lane);
    for (int a = 0; a < na; ++a) {
      uint8_t* d = dsts[warp][a];
      const long long r = rows[warp][a];
      if (direct_self && dst_rank[warp][a] == rank) {
        for (int i = lane; i < num_scales; i += kWarpThreads)
          out_scales[r * num_scales + i] = scales[(size_t)t * scales_stride + i];
        for (int i = lane; i < k; i += kWarpThreads) {
          const long long g = topk[(size_t)t * k + i];
          const long long local = (g >= (long long)rank * L && g < (long long)(rank + 1) * L) ? g - (long long)rank * L : -1;
          out_topk[r * k + i] = local;
          if (out_w != nullptr) out_w[r * k + i] = local >= 0 ? weights[(size_t)t * k + i] : 0.f;
        }
        if (lane == 0 && out_src != nullptr) out_src[r] = t;
        continue;
      }
      for (int i = lane; i < num_scales; i += kWarpThreads)
        reinterpret_cast<float*>(d + off_scales)[r * num_scales + i] = scales[(size_t)t * scales_stride + i];
      if (topk != nullptr)
        for (int i = lane; i < k; i += kWarpThreads)
          reinterpret_cast<int64_t*>(d + off_topk)[r * k + i] = topk[(size_t)t * k + i];
      if (weights != nullptr)
        for (int i = lane; i < k; i += kWarpThreads)
          reinterpret_cast<float*>(d + off_weights)[r * k + i] = weights[(size_t)t * k + i];
      if (lane == 0 && off_src >= 0) reinterpret_cast<int*>(d + off_src)[r] = t;
    }
    __syncwarp();
  }
}

// ---- 3. receive rows: copy out of this rank's area into the outputs -----------------------------------------
// Rows past the received count (worst-case mode) get zero data and scales, top-k -1, weight 0 and source -1, so
// padded outputs are deterministic (a graph replay equals an eager call).
template <int kMaxRanks>
__global__ void __launch_bounds__(512) dispatch_recv_kernel(
    const uint8_t* __restrict__ area, long long half_bytes, const unsigned long long* __restrict__ counter,
    long long off_data, long long off_scales, long long off_topk, long long off_weights, long long off_src,
    int row_bytes, int num_scales, int k, int has_topk, int has_weights, int L, int rank, int R,
    const int* __restrict__ rc, int out_rows, uint8_t* __restrict__ recv_x, float* __restrict__ recv_scales,
    int64_t* __restrict__ recv_topk, float* __restrict__ recv_w, int* __restrict__ recv_src, int skip_self) {
  const int lane = threadIdx.x % kWarpThreads;
  const uint8_t* h = area + half_after_barrier(counter) * half_bytes;
  int num_recv = 0, self_begin = 0;
  for (int s = 0; s < R; ++s) {
    if (s == rank) self_begin = num_recv;
    num_recv += rc[s * R + rank];
  }
  const int self_end = skip_self ? self_begin + rc[rank * R + rank] : self_begin;   // rows the sender wrote
  const int units = row_bytes / 16;
  const int warps = gridDim.x * (blockDim.x / kWarpThreads);
  for (int i = blockIdx.x * (blockDim.x / kWarpThreads) + threadIdx.x / kWarpThreads; i < out_rows; i += warps) {
    if (i >= self_begin && i < self_end) continue;
    const bool valid = i < num_recv;
    uint8_t* dst = recv_x + (size_t)i * row_bytes;
    if (valid) {
      const uint8_t* src = h + off_data + (size_t)i * row_bytes;
      for (int u = lane; u < units; u += kWarpThreads) st_v4(dst + (size_t)u * 16, ld_volatile_v4(src + (size_t)u * 16));
    } else {
      for (int u = lane; u < units; u += kWarpThreads) st_v4(dst + (size_t)u * 16, make_uint4(0, 0, 0, 0));
    }
    for (int c = lane; c < num_scales; c += kWarpThreads)
      recv_scales[(size_t)i * num_scales + c] =
          valid ? reinterpret_cast<const volatile float*>(h + off_scales)[(size_t)i * num_scales + c] : 0.f;
    for (int c = lane; c < k; c += kWarpThreads) {
      long long local = -1;
      if (valid && has_topk) {
        const long long g = reinterpret_cast<const volatile int64_t*>(h + off_topk)[(size_t)i * k + c];
        local = (g >= (long long)rank * L && g < (long long)(rank + 1) * L) ? g - (long long)rank * L : -1;
      }
      recv_topk[(size_t)i * k + c] = local;
      if (has_weights)
        recv_w[(size_t)i * k + c] =
            local >= 0 ? reinterpret_cast<const volatile float*>(h + off_weights)[(size_t)i * k + c] : 0.f;
    }
    if (lane == 0 && recv_src != nullptr)
      recv_src[i] = valid ? reinterpret_cast<const volatile int*>(h + off_src)[i] : -1;
  }
}

// ---- 4. combine: received rows go home ------------------------------------------------------------------------
// Row i (from source s, slot q) lands in s's area at row sum_{j < me} rc[s][j] + q: every source sees the rows of
// each destination j as one block, blocks in rank order.
template <int kMaxRanks>
__global__ void __launch_bounds__(512) combine_send_kernel(
    const uint8_t* __restrict__ x, long long x_stride, int row_bytes, const float* __restrict__ w, int k,
    const int* __restrict__ rc, int rank, int R, uint8_t* const* __restrict__ peer_base, long long half_bytes,
    const unsigned long long* __restrict__ counter, long long off_data, long long off_w, int skip_self) {
  static_assert(kMaxRanks <= kWarpThreads, "one lane per rank");
  const int lane = threadIdx.x % kWarpThreads;
  const int half = half_before_barrier(counter);
  const int cnt = lane < R ? rc[lane * R + rank] : 0;          // rows received from source `lane`
  const int begin = warp_exclusive_sum(cnt, lane);
  int home_base = 0;                                           // my block's first row in source `lane`'s area
  if (lane < R)
    for (int j = 0; j < rank; ++j) home_base += rc[lane * R + j];
  const int num_recv = __shfl_sync(0xffffffffu, begin + cnt, R - 1);
  const int units = row_bytes / 16;
  const int warps = gridDim.x * (blockDim.x / kWarpThreads);
  for (int i = blockIdx.x * (blockDim.x / kWarpThreads) + threadIdx.x / kWarpThreads; i < num_recv; i += warps) {
    const unsigned le = __ballot_sync(0xffffffffu, lane < R && begin <= i);
    const int s = 31 - __clz(le);                              // the last source whose block starts at or before i
    const long long row = __shfl_sync(0xffffffffu, home_base, s) + (i - __shfl_sync(0xffffffffu, begin, s));
    if (skip_self && s == rank) continue;                      // the reduce reads this rank's own rows from x
    uint8_t* h = peer_base[s] + half * half_bytes;
    uint8_t* dst = h + off_data + row * row_bytes;
    warp_copy_row_to(x + (size_t)i * x_stride, &dst, 1, units, lane);
    if (w != nullptr)
      for (int c = lane; c < k; c += kWarpThreads)
        reinterpret_cast<float*>(h + off_w)[row * k + c] = w[(size_t)i * k + c];
  }
}

// Sum each token's returned rows in fp32, in rank order (bitwise repeatable), and write them in T. With x_self,
// this rank's own rows are read straight from the expert output (the send kernel skipped them).
template <typename T, int kMaxRanks>
__global__ void __launch_bounds__(512) combine_reduce_kernel(
    const uint8_t* __restrict__ area, long long half_bytes, const unsigned long long* __restrict__ counter,
    long long off_data, long long off_w, const bool* __restrict__ mask, const int* __restrict__ pos,
    const int* __restrict__ rc, int rank, int R, int n, int hidden, int k, T* __restrict__ out,
    float* __restrict__ out_w, const uint8_t* __restrict__ x_self, const float* __restrict__ w_self) {
  static_assert(kMaxRanks <= kWarpThreads, "one lane per rank");
  constexpr int kElems = 16 / sizeof(T);
  __shared__ const uint8_t* srcs[512 / kWarpThreads][kMaxRanks];
  __shared__ const float* wsrcs[512 / kWarpThreads][kMaxRanks];
  const int lane = threadIdx.x % kWarpThreads, warp = threadIdx.x / kWarpThreads;
  const uint8_t* h = area + half_after_barrier(counter) * half_bytes;
  const int row_bytes = hidden * (int)sizeof(T);
  const int sent = lane < R ? rc[rank * R + lane] : 0;
  const int dest_base = warp_exclusive_sum(sent, lane);        // first row of destination `lane`'s block
  const int recv = lane < R ? rc[lane * R + rank] : 0;
  const int self_begin = __shfl_sync(0xffffffffu, warp_exclusive_sum(recv, lane), rank);   // my rows in x
  const int units = hidden / kElems;
  const int warps = gridDim.x * (blockDim.x / kWarpThreads);
  for (int t = blockIdx.x * (blockDim.x / kWarpThreads) + warp; t < n; t += warps) {
    bool m;
    int a;
    const int na = warp_mask_ranks(mask, t, R, lane, m, a);
    if (m) {
      const long long slot = pos[(size_t)t * R + lane] - 1;
      if (x_self != nullptr && lane == rank) {
        srcs[warp][a] = x_self + (self_begin + slot) * row_bytes;
        wsrcs[warp][a] = w_self != nullptr ? w_self + (self_begin + slot) * k : nullptr;
      } else {
        const long long row = dest_base + slot;
        srcs[warp][a] = h + off_data + row * row_bytes;
        wsrcs[warp][a] = reinterpret_cast<const float*>(h + off_w) + row * k;
      }
    }
    __syncwarp();
    for (int u = lane; u < units; u += kWarpThreads) {
      float acc[kElems];
#pragma unroll
      for (int e = 0; e < kElems; ++e) acc[e] = 0.f;
      for (int a = 0; a < na; ++a) {
        float f[kElems];
        Unpack16<T>::run(ld_volatile_v4(srcs[warp][a] + (size_t)u * 16), f);
#pragma unroll
        for (int e = 0; e < kElems; ++e) acc[e] += f[e];
      }
      *reinterpret_cast<uint4*>(out + (size_t)t * hidden + (size_t)u * kElems) = Pack16<T>::run(acc);
    }
    if (out_w != nullptr) {
      for (int c = lane; c < k; c += kWarpThreads) {
        float s = 0.f;
        for (int a = 0; a < na; ++a) s += reinterpret_cast<const volatile float*>(wsrcs[warp][a])[c];
        out_w[(size_t)t * k + c] = s;
      }
    }
    __syncwarp();
  }
}

}  // namespace ep
}  // namespace deepstack
