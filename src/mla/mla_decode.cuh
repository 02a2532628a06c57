// MLA decode over a paged KV cache (FlashMLA's dense decode), sm_90a.
//
// One CTA = 3 warpgroups and handles one (SM part, KV head, 64-row block of q rows). q rows are the s_q x
// (h_q / h_kv) query heads that share one KV head, packed into the wgmma M dimension (64). A part walks its
// contiguous range of (request, 64-token page) work from the tile-scheduler metadata:
//   WG2 (producer): loads one page per KV tile into a 2-stage ring. bf16/fp16 cache: one thread issues
//        kChunks TMA copies of [64 tokens x 64 channels] (128-byte swizzle; 4-D map: channel, head, token, page). FP8 cache: all 128 threads
//        load the 656-byte token rows, dequantise to q's dtype and store the same swizzled layout.
//   WG0: S = Q K^T (wgmma 64x64, K = d), mask, online softmax, P -> registers (A operand) and shared memory,
//        then O[:, 0:256] += P V[:, 0:256].
//   WG1: waits for P, O[:, 256:512] += P V[:, 256:512]. V is the first 512 channels of the K tile, read
//        MN-major straight from the same shared memory (no second load).
// WG1's P.V overlaps WG0's next QK^T + softmax. A request whose work is split over several parts writes
// fp32 partial O and lse to o_accum / lse_accum; mla_combine.cuh merges them. Single-split requests write
// `out` / `lse` directly. A request (or a causal row) with no keys gives out = 0 and lse = +inf.
#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda.h>

#include "common/sm90.cuh"
#include "common/vec.cuh"
#include "mla/wgmma.cuh"

namespace deepstack {
namespace mla {

constexpr int kPage = 64;                  // tokens per KV page (= one KV tile)
constexpr int kDV = 512;                   // value / latent channels
constexpr int kChunkBytes = 64 * 64 * 2;   // one [64 rows x 64 channels] 16-bit tile, 128-byte swizzled
constexpr int kFp8TokenBytes = 656;        // 512 e4m3 + 4 fp32 scales + 64 bf16 rope
constexpr int kSchedInts = 8;              // ints per tile-scheduler row

template <typename T> struct Ops;
template <> struct Ops<__nv_bfloat16> {
  template <int kT> static __device__ __forceinline__ void qk(float (&d)[32], uint64_t a, uint64_t b, int acc) {
    wgmma::m64n64k16_ss_bf16<kT>(d, a, b, acc);
  }
  template <int kT> static __device__ __forceinline__ void pv_rs(float (&d)[128], const uint32_t (&a)[4], uint64_t b, int acc) {
    wgmma::m64n256k16_rs_bf16<kT>(d, a, b, acc);
  }
  template <int kT> static __device__ __forceinline__ void pv_ss(float (&d)[128], uint64_t a, uint64_t b, int acc) {
    wgmma::m64n256k16_ss_bf16<kT>(d, a, b, acc);
  }
};
template <> struct Ops<__half> {
  template <int kT> static __device__ __forceinline__ void qk(float (&d)[32], uint64_t a, uint64_t b, int acc) {
    wgmma::m64n64k16_ss_f16<kT>(d, a, b, acc);
  }
  template <int kT> static __device__ __forceinline__ void pv_rs(float (&d)[128], const uint32_t (&a)[4], uint64_t b, int acc) {
    wgmma::m64n256k16_rs_f16<kT>(d, a, b, acc);
  }
  template <int kT> static __device__ __forceinline__ void pv_ss(float (&d)[128], uint64_t a, uint64_t b, int acc) {
    wgmma::m64n256k16_ss_f16<kT>(d, a, b, acc);
  }
};

// O[:, 256 columns] += P V for one 64-token tile, as 4 m64n256k16 wgmmas: P (64 x 64) at shared address p and the
// 256-channel half of V (4 chunks, read MN-major out of the K tile) at shared address v, both 128-byte swizzled.
template <typename T>
__device__ __forceinline__ void pv_half_ss(float (&o)[128], uint32_t p, uint32_t v) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint64_t da = sm90::make_desc_sw128(p + k * 32, 16, 1024);
    const uint64_t db = sm90::make_desc_sw128(v + k * 16 * 128, kChunkBytes, 1024);
    Ops<T>::template pv_ss<1>(o, da, db, 1);
  }
}

// The same with P in registers (the A-operand fragments of this thread's rows, as exp_sum_pack packs them).
template <typename T>
__device__ __forceinline__ void pv_half_rs(float (&o)[128], const uint32_t (&pa)[4][4], uint32_t v) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint64_t db = sm90::make_desc_sw128(v + k * 16 * 128, kChunkBytes, 1024);
    Ops<T>::template pv_rs<1>(o, pa[k], db, 1);
  }
}

// Byte offset of the 16-byte unit `u` (0..7) of row `r` inside a 128-byte-swizzled [rows x 64] 16-bit tile.
__device__ __forceinline__ uint32_t swz(int r, int u) { return r * 128 + ((u ^ (r & 7)) << 4); }

// ---- row-block clusters (bf16/fp16 caches): the kCluster CTAs of one (part, KV head) that hold consecutive 64-row
// blocks read the same pages. As a thread-block cluster they load each page once: CTA r issues the 64-channel boxes
// c with c % kCluster == r, multicast into every CTA of the cluster (same shared-memory offset; each CTA's "full"
// barrier counts all kChunks boxes), and a stage is refilled only after the consumers of every CTA released it (each
// consumer warp arrives on the "empty" barrier of every CTA). Without it each CTA streamed its own copy of the
// pages (two L2 reads per page, and DRAM reads whenever the CTAs drifted apart).
//
// The 4-D box load of sm90::tma_load_4d, multicast to the CTAs of `cta_mask`.
__device__ __forceinline__ void tma_load_4d_multicast(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1,
                                                      int c2, int c3, uint16_t cta_mask, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster"
      ".L2::cache_hint [%0], [%1, {%3, %4, %5, %6}], [%2], %7, %8;"
      ::"r"(sm90::smem_addr(dst)), "l"(reinterpret_cast<uint64_t>(map)), "r"(sm90::smem_addr(bar)), "r"(c0), "r"(c1),
        "r"(c2), "r"(c3), "h"(cta_mask), "l"(policy)
      : "memory");
}
// Box c (channels 64c .. 64c + 63) of one page of KV head kvh into dst: a plain TMA load without a cluster; in a
// cluster only CTA c % kCluster issues it, multicast to all (every CTA's barrier still expects the box's bytes).
template <int kCluster>
__device__ __forceinline__ void load_page_box(uint8_t* dst, const CUtensorMap* kmap, uint64_t* bar, int c, int kvh,
                                              int page, int rank, uint64_t policy) {
  if constexpr (kCluster == 1) {
    sm90::tma_load_4d(dst, kmap, bar, c * 64, kvh, 0, page, policy);
  } else if (c % kCluster == rank) {
    tma_load_4d_multicast(dst, kmap, bar, c * 64, kvh, 0, page, (1u << kCluster) - 1, policy);
  }
}
// A consumer thread is done with a stage: without a cluster every thread arrives on its CTA's "empty" barrier; in a
// cluster one arrival per warp on the "empty" barrier of every CTA of the cluster.
template <int kCluster>
__device__ __forceinline__ void release_stage(uint64_t* bar, int lane) {
  if constexpr (kCluster == 1) {
    sm90::mbar_arrive(bar);
  } else {
    __syncwarp();
    if (lane == 0) {
#pragma unroll
      for (int c = 0; c < kCluster; ++c) sm90::mbar_arrive_cluster(bar, c);
    }
  }
}
// Arrivals an "empty" barrier waits for: every consumer thread (no cluster), or one per consumer warp of each CTA.
template <int kCluster>
__device__ __forceinline__ constexpr uint32_t empty_count(int consumer_threads) {
  return kCluster == 1 ? consumer_threads : consumer_threads / 32 * kCluster;
}

// 16 e4m3 values (one 16-byte load) times `scale` -> 16 bf16 values, as two 16-byte units, without conversion
// instructions (they issue at a quarter of the FMA rate and were ~40% of the FP8 producer's time).
// Two e4m3 bytes s.eeee.mmm moved to bf16 bit positions (sign -> 15, eeee.mmm -> 10..4 of each half) are exactly
// value * 2^-120 each (e4m3 subnormals land on bf16 subnormals), so two packed bf16 multiplies, by 2^120 (exact)
// and by the scale, give the products: exact for the power-of-two scales mla_append_kv writes (other scales are
// rounded to bf16 first).
__device__ __forceinline__ uint32_t e4m3x2_to_bf16x2_scaled(uint32_t bytes_1_and_3, __nv_bfloat162 scale2) {
  const uint32_t bits = (bytes_1_and_3 & 0x80008000u) | ((bytes_1_and_3 >> 4) & 0x07F007F0u);
  const __nv_bfloat162 k2p120 = __halves2bfloat162(__ushort_as_bfloat16(0x7B80), __ushort_as_bfloat16(0x7B80));
  __nv_bfloat162 v = *reinterpret_cast<const __nv_bfloat162*>(&bits);
  v = __hmul2(__hmul2(v, k2p120), scale2);
  return *reinterpret_cast<uint32_t*>(&v);
}
__device__ __forceinline__ void dequant16_bf16(const uint4& raw, float scale, uint4& lo, uint4& hi) {
  const __nv_bfloat162 s2 = __float2bfloat162_rn(scale);
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
  uint32_t o[8];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    o[2 * i] = e4m3x2_to_bf16x2_scaled(__byte_perm(w[i], 0u, 0x1404), s2);       // bytes 0, 1 -> (lo, hi) halves
    o[2 * i + 1] = e4m3x2_to_bf16x2_scaled(__byte_perm(w[i], 0u, 0x3424), s2);   // bytes 2, 3
  }
  lo = make_uint4(o[0], o[1], o[2], o[3]);
  hi = make_uint4(o[4], o[5], o[6], o[7]);
}

template <int kDQK>
struct SmemLayout {
  static constexpr int kChunks = kDQK / 64;
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kChunks * kChunkBytes;          // 2 stages
  static constexpr int kP = kK + 2 * kChunks * kChunkBytes;
  static constexpr int kScale = kP + kChunkBytes;                 // 64 fp32: per-row rescale of this tile
  static constexpr int kFinal = kScale + 64 * 4;                  // 64 fp32: 1 / row sum at the end
  static constexpr int kBars = kFinal + 64 * 4;                   // full[2], empty[2], q_full, q_free
  static constexpr int kSplits = kBars + 6 * 8;                   // [2][2] int: num_splits[req], [req + 1] (early Q)
  static constexpr int kBytes = kSplits + 4 * 4;
  static constexpr int kAlloc = kBytes + 1024;                    // slack to align the base to 1024 bytes
};

// Q rows rb * 64 .. rb * 64 + 63 of request `req` (this KV head's q rows: s * hpk + local head) into the 128-byte
// swizzled chunks of sQ, zeros past the last row; run by the 256 consumer threads.
template <typename T, int kChunks>
__device__ __forceinline__ void load_q_tile(uint8_t* sQ, const T* __restrict__ q, int tid, int rb, int rows, int hpk,
                                            int kvh, int req, long long q_sb, long long q_ss, long long q_sh) {
#pragma unroll 1
  for (int u = tid; u < 64 * kChunks * 8; u += 256) {
    const int r = u / (kChunks * 8), cu = u % (kChunks * 8);
    const int gr = rb * 64 + r;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (gr < rows) {
      const int s = gr / hpk, head = kvh * hpk + gr % hpk;
      v = __ldg(reinterpret_cast<const uint4*>(q + req * q_sb + s * q_ss + head * q_sh) + cu);
    }
    *reinterpret_cast<uint4*>(sQ + (cu / 8) * kChunkBytes + swz(r, cu % 8)) = v;
  }
}

// The same tile load with each thread's loads issued in two batches (one batch's loads all in flight before its
// stores) instead of one load-store pair at a time: two memory latencies per request instead of 18 (16 for d = 512).
// The bf16/fp16 general kernel uses it (H200 A/B 2026-11-29: -0.4..-1.9% on memory-bound configs, docs/mla.md).
// tid goes through an opaque copy so ptxas recomputes the unit offsets per request instead of keeping them live.
template <typename T, int kChunks>
__device__ __forceinline__ void load_q_tile_batched(uint8_t* sQ, const T* __restrict__ q, int tid, int rb, int rows,
                                                    int hpk, int kvh, int req, long long q_sb, long long q_ss,
                                                    long long q_sh) {
  constexpr int kPer = 64 * kChunks * 8 / 256;   // units per thread
  constexpr int kB = kPer / 2;
  static_assert(kPer % 2 == 0, "two batches");
  int t0 = tid;
  asm volatile("mov.b32 %0, %0;" : "+r"(t0));
#pragma unroll 1
  for (int i0 = 0; i0 < kPer; i0 += kB) {
    uint4 v[kB];
#pragma unroll
    for (int i = 0; i < kB; ++i) {
      const int u = t0 + 256 * (i0 + i), r = u / (kChunks * 8), cu = u % (kChunks * 8);
      const int gr = rb * 64 + r;
      v[i] = make_uint4(0, 0, 0, 0);
      if (gr < rows) {
        const int s = gr / hpk, head = kvh * hpk + gr % hpk;
        v[i] = __ldg(reinterpret_cast<const uint4*>(q + req * q_sb + s * q_ss + head * q_sh) + cu);
      }
    }
#pragma unroll
    for (int i = 0; i < kB; ++i) {
      const int u = t0 + 256 * (i0 + i), r = u / (kChunks * 8), cu = u % (kChunks * 8);
      *reinterpret_cast<uint4*>(sQ + (cu / 8) * kChunkBytes + swz(r, cu % 8)) = v[i];
    }
  }
}

// ---- early Q (bf16/fp16 caches): the next request piece's Q tile is loaded while the current piece still runs ----
// Producer warps 1-3 (idle otherwise: one thread issues the page TMAs) copy each piece's Q tile into sQ with cp.async
// (16-byte copies into the swizzled layout, zero-filled past the last row) as soon as the consumers have finished the
// previous piece's last Q K^T (mbarrier "q_free"; P V does not read Q), and signal "q_full"; the consumers wait on it
// before the piece's first Q K^T. Before, the consumers loaded Q themselves after the previous piece's epilogue: a
// DRAM round trip per piece with the tensor pipe idle. The two num_splits entries the piece's epilogue reads come
// along (slot = piece parity). Pieces without pages (s_k = 0, or a range ending at a request's first page) load
// nothing. -DDEEPSTACK_MLA_EARLY_Q=0 restores the consumer-side load (benchmarks/ab_mla.py A/Bs the two).
#ifndef DEEPSTACK_MLA_EARLY_Q
#define DEEPSTACK_MLA_EARLY_Q 1
#endif
constexpr bool kEarlyQ = DEEPSTACK_MLA_EARLY_Q != 0;
// The general kernel (this file) only with -DDEEPSTACK_MLA_EARLY_Q_GENERAL=1: neutral on the H200 (docs/mla.md).
#ifndef DEEPSTACK_MLA_EARLY_Q_GENERAL
#define DEEPSTACK_MLA_EARLY_Q_GENERAL 0
#endif
constexpr bool kEarlyQGeneral = DEEPSTACK_MLA_EARLY_Q_GENERAL != 0;
#if DEEPSTACK_MLA_EARLY_Q
#define DEEPSTACK_MLA_EQ_UNROLL_1 _Pragma("unroll 1")
#else
#define DEEPSTACK_MLA_EQ_UNROLL_1
#endif
#if DEEPSTACK_MLA_EARLY_Q && DEEPSTACK_MLA_EARLY_Q_GENERAL
#define DEEPSTACK_MLA_EQ_GENERAL_UNROLL_1 _Pragma("unroll 1")
#else
#define DEEPSTACK_MLA_EQ_GENERAL_UNROLL_1
#endif
constexpr int kQLoaderThreads = 96;   // producer warps 1-3

__device__ __forceinline__ void cp_async_16_zfill(uint32_t dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src) : "memory");
}
// One arrival on `bar` once all of this thread's earlier cp.async copies have landed (the barrier counts it).
__device__ __forceinline__ void cp_async_mbar_arrive_noinc(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(sm90::smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// A read-only int loaded where it is used (asm volatile: not hoisted, so it does not stay live across loops).
__device__ __forceinline__ int ld_nc_opaque(const int* p) {
  int v;
  asm volatile("ld.global.nc.b32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

// The loader loop of producer thread lt (0..95) over the part's pieces (the consumers' range walk). It runs under
// the producer's 40-register cap: the range is re-read where used and a row's (s, head) is stepped, not divided.
template <typename T, int kChunks>
__device__ __forceinline__ void early_q_loader(uint8_t* sQ, int* sSplits, uint64_t* q_full, uint64_t* q_free,
                                               const T* __restrict__ q, const int* __restrict__ seqlens,
                                               const int* __restrict__ num_splits, const int* meta, int lt, int rb,
                                               int rows, int hpk, int kvh, long long q_sb, long long q_ss,
                                               long long q_sh) {
  constexpr int kWarps = kQLoaderThreads / 32;
  const int lane = lt % 32, w = lt / 32;
  const uint32_t sQa = sm90::smem_addr(sQ);
  const T* qh = q + static_cast<long long>(kvh) * hpk * q_sh;   // this KV head's first q head
  int ph = 0;
#pragma unroll 1
  for (int req = ld_nc_opaque(meta); req <= ld_nc_opaque(meta + 2); ++req) {
    const int nblk = (seqlens[req] + kPage - 1) / kPage;
    const int b0 = req == ld_nc_opaque(meta) ? ld_nc_opaque(meta + 1) : 0;
    const int b1 = req == ld_nc_opaque(meta + 2) ? ld_nc_opaque(meta + 3) : nblk;
    if (b0 >= b1) continue;
    sm90::mbar_wait(q_free, ph ^ 1);   // the previous piece's last Q K^T is done
    const T* qr = qh + req * q_sb;
    int gr = rb * 64 + w;              // q row s * hpk + lh of tile row r
    int s = gr / hpk, lh = gr - s * hpk;
#pragma unroll 1
    for (int r = w; r < 64; r += kWarps) {   // a warp per row: 16-byte units lane, lane + 32, ...
      const bool valid = gr < rows;            // zero-fill past the last row (reading nothing)
      const uint8_t* src = reinterpret_cast<const uint8_t*>(valid ? qr + s * q_ss + lh * q_sh : q) + lane * 16;
      const uint32_t bytes = valid ? 16 : 0;
      const uint32_t dst = sQa + r * 128;
#pragma unroll
      for (int i = 0; i < (kChunks * 8 + 31) / 32; ++i) {
        const int cu = lane + 32 * i;
        if (cu < kChunks * 8)
          cp_async_16_zfill(dst + (cu / 8) * kChunkBytes + (((cu % 8) ^ (r & 7)) << 4), src + 512 * i, bytes);
      }
      gr += kWarps;
      lh += kWarps;
      while (lh >= hpk) {
        lh -= hpk;
        ++s;
      }
    }
    if (lt < 2) cp_async_4(sm90::smem_addr(sSplits + 2 * ph + lt), num_splits + req + lt);
    cp_async_mbar_arrive_noinc(q_full);
    ph ^= 1;
  }
  cp_async_wait_all();
}

// Mask a tile's scores to the visible keys (a select, so NaN in unused cache slots never reaches the max), scale them
// to log2 units, and fold the tile's row maxima over the quad into mx0 / mx1 (rows g and g + 8 of the accumulator;
// tok0: this thread's first key).
__device__ __forceinline__ void mask_scale_max(float (&s)[32], int tok0, int lim0, int lim1, float scale_log2,
                                               float& mx0, float& mx1) {
  const float kInf = __int_as_float(0x7f800000);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int tok = tok0 + 8 * j + e;
      s[4 * j + e] = tok < lim0 ? s[4 * j + e] * scale_log2 : -kInf;
      s[4 * j + 2 + e] = tok < lim1 ? s[4 * j + 2 + e] * scale_log2 : -kInf;
      mx0 = fmaxf(mx0, s[4 * j + e]);
      mx1 = fmaxf(mx1, s[4 * j + 2 + e]);
    }
  }
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
  }
}

// Scores (log2 units) -> probabilities exp2(s - base) in place, added to the row sums l0 / l1 after rescaling them by
// sc0 / sc1, and packed as the A operand of the m64n256k16 P V wgmma (rows g / g + 8, k = 2t, 2t + 1 / 2t + 8, 2t + 9
// of each 16-token step).
template <typename T>
__device__ __forceinline__ void exp_sum_pack(float (&s)[32], float base0, float base1, float sc0, float sc1,
                                             float& l0, float& l1, uint32_t (&pa)[4][4]) {
  float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      s[4 * j + e] = exp2f(s[4 * j + e] - base0);
      s[4 * j + 2 + e] = exp2f(s[4 * j + 2 + e] - base1);
      sum0 += s[4 * j + e];
      sum1 += s[4 * j + 2 + e];
    }
  }
  l0 = l0 * sc0 + sum0;
  l1 = l1 * sc1 + sum1;
#pragma unroll
  for (int kb = 0; kb < 4; ++kb) {
    pa[kb][0] = pack2<T>(s[8 * kb + 0], s[8 * kb + 1]);
    pa[kb][1] = pack2<T>(s[8 * kb + 2], s[8 * kb + 3]);
    pa[kb][2] = pack2<T>(s[8 * kb + 4], s[8 * kb + 5]);
    pa[kb][3] = pack2<T>(s[8 * kb + 6], s[8 * kb + 7]);
  }
}

// ---- the end of a request, shared by the decode kernels' two consumer warpgroups (256 threads) ----
// WG0 sums its rows' softmax denominators over the quad, writes lse (the request computed by one part) or
// lse_accum (a split request's partial) and 1 / sum into sFinal; after named barrier kBarFinal both warpgroups write
// their half of O, normalised, to out or to the fp32 partials o_accum that mla_combine merges.
constexpr int kBarFinal = 4;

template <typename T>
__device__ __forceinline__ void finish_request(
    const float (&o)[128], float l0, float l1, float m0, float m1, int wg, int t, int row0, int row1, int grow0,
    int grow1, int req, int begin_req, int begin_split, const int* ns, int h_q, int h_kv, int s_q,
    int rows, int hpk, int kvh, float* sFinal, T* __restrict__ out, float* __restrict__ lse,
    float* __restrict__ o_accum, float* __restrict__ lse_accum) {
  const float kInf = __int_as_float(0x7f800000);
  // ns: num_splits + req, or its copy in shared memory (early Q); read here: fewer live registers
  const int split = req == begin_req ? begin_split : ns[0];
  const bool single = ns[1] - ns[0] == 1;
  if (wg == 0) {
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      l0 += __shfl_xor_sync(0xffffffffu, l0, off);
      l1 += __shfl_xor_sync(0xffffffffu, l1, off);
    }
    const float empty_lse = single ? kInf : -kInf;
    const float kLn2 = 0.6931471805599453f;
    const float lse0 = l0 > 0.f ? (m0 + log2f(l0)) * kLn2 : empty_lse;
    const float lse1 = l1 > 0.f ? (m1 + log2f(l1)) * kLn2 : empty_lse;
    if (t == 0) {
      sFinal[row0] = l0 > 0.f ? 1.f / l0 : 0.f;
      sFinal[row1] = l1 > 0.f ? 1.f / l1 : 0.f;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int gr = h ? grow1 : grow0;
        if (gr < rows) {
          const float v = h ? lse1 : lse0;
          if (single) lse[(static_cast<long long>(req) * h_q + kvh * hpk + gr % hpk) * s_q + gr / hpk] = v;
          else lse_accum[(static_cast<long long>(split) * h_kv + kvh) * rows + gr] = v;
        }
      }
    }
  }
  sm90::bar_sync(kBarFinal, 256);
  const float inv0 = sFinal[row0], inv1 = sFinal[row1];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int gr = h ? grow1 : grow0;
    const float inv = h ? inv1 : inv0;
    if (gr >= rows) continue;
    if (single) {
      T* dst = out + ((static_cast<long long>(req) * s_q + gr / hpk) * h_q + kvh * hpk + gr % hpk) * kDV +
               wg * 256 + 2 * t;
#pragma unroll
      for (int j = 0; j < 32; ++j)
        *reinterpret_cast<uint32_t*>(dst + 8 * j) = pack2<T>(o[4 * j + 2 * h] * inv, o[4 * j + 2 * h + 1] * inv);
    } else {
      float* dst = o_accum + ((static_cast<long long>(split) * h_kv + kvh) * rows + gr) * kDV + wg * 256 + 2 * t;
#pragma unroll
      for (int j = 0; j < 32; ++j)
        *reinterpret_cast<float2*>(dst + 8 * j) = make_float2(o[4 * j + 2 * h] * inv, o[4 * j + 2 * h + 1] * inv);
    }
  }
}

template <typename T, int kDQK, bool kFp8, int kCluster = 1>
__global__ void __launch_bounds__(384, 1) mla_decode_kernel(
    const T* __restrict__ q, T* __restrict__ out, float* __restrict__ lse, float* __restrict__ o_accum,
    float* __restrict__ lse_accum, const int* __restrict__ block_table, const int* __restrict__ seqlens,
    const int* __restrict__ sched, const int* __restrict__ num_splits, const uint8_t* __restrict__ kcache_fp8,
    const CUtensorMap* __restrict__ kmap,   // in global memory (see the Python side), bf16/fp16 caches only
    int h_q, int h_kv, int s_q, int rows, int causal, int bt_stride,
    long long q_sb, long long q_ss, long long q_sh, long long fp8_token_stride, float scale_log2) {
  using L = SmemLayout<kDQK>;
  constexpr int kChunks = L::kChunks;
  static_assert(kDQK == 576 || kDQK == 512, "head dim 576 (512 latent + 64 rope) or 512");
  static_assert(!kFp8 || (kDQK == 576 && sizeof(T) == 2), "the FP8 cache format has 576 channels");
  // Pairs only: clusters of 4 (256 rows) measured 9-12% slower (only 30 fit at once, 120 of 132 SMs; docs/mla.md).
  static_assert(kCluster == 1 || (!kFp8 && kCluster == 2), "row-block clusters: bf16/fp16 caches, pairs");
  constexpr int kProducerRegs = kFp8 ? 88 : 40;
  constexpr int kConsumerRegs = kFp8 ? 208 : 232;   // 2 * consumer + producer = 3 * 168 (the entry cap)

  extern __shared__ uint8_t smem_raw[];
  // Align to 1024 bytes (128-byte swizzle atoms) by offsetting the array itself, so the compiler still sees shared
  // memory (32-bit addresses) rather than generic pointers.
  uint8_t* smem = smem_raw + ((1024u - (sm90::smem_addr(smem_raw) & 1023u)) & 1023u);
  uint8_t* sQ = smem + L::kQ;
  uint8_t* sK = smem + L::kK;
  uint8_t* sP = smem + L::kP;
  float* sScale = reinterpret_cast<float*>(smem + L::kScale);
  float* sFinal = reinterpret_cast<float*>(smem + L::kFinal);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + L::kBars);
  uint64_t* empty = full + 2;
  uint64_t* q_full = full + 4;   // early Q: the piece's Q tile landed (one cp.async arrival per loader thread)
  uint64_t* q_free = full + 5;   // early Q: WG0's last Q K^T of the piece is done
  int* sSplits = reinterpret_cast<int*>(smem + L::kSplits);
  // Early Q measured neutral here (memory-bound: the two-stage ring covers the consumers' Q load), so off by default;
  // the FP8 producer needs all of its warpgroup.
  constexpr bool kEQ = kEarlyQ && kEarlyQGeneral && !kFp8;

  const int tid = threadIdx.x;
  const int wg = tid / 128;
  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      sm90::mbar_init(&full[s], kFp8 ? 128 : 1);
      sm90::mbar_init(&empty[s], empty_count<kCluster>(256));
    }
    if constexpr (kEQ) {
      sm90::mbar_init(q_full, kQLoaderThreads);
      sm90::mbar_init(q_free, 128);
    }
    sm90::fence_barrier_init();
  }
  if constexpr (kCluster > 1) sm90::cluster_sync();   // the peers' barriers are initialised before any remote use
  else __syncthreads();

  const int* meta = sched + blockIdx.x * kSchedInts;
  // The part's range. Early Q: read per role instead (live across the role split, it was spilled under the
  // producer's 40-register cap).
  const int p_begin_req = kEQ ? 0 : meta[0], p_begin_blk = kEQ ? 0 : meta[1], p_end_req = kEQ ? 0 : meta[2],
            p_end_blk = kEQ ? 0 : meta[3], p_begin_split = kEQ ? 0 : meta[4];
  const int kvh = blockIdx.y;
  const int rb = blockIdx.z;

  if (wg == 2) {
    // ------------------------------------------------ producer ------------------------------------------------
    sm90::regs_decrease<kProducerRegs>();
    const int begin_req = p_begin_req, begin_blk = p_begin_blk, end_req = p_end_req, end_blk = p_end_blk;
    if (!kFp8 && tid != 256) {
      if constexpr (kEQ) {
        if (tid >= 384 - kQLoaderThreads)
          early_q_loader<T, kChunks>(sQ, sSplits, q_full, q_free, q, seqlens, num_splits, meta,
                                     tid - (384 - kQLoaderThreads), rb, rows, h_q / h_kv, kvh, q_sb, q_ss, q_sh);
      }
      return;
    }
    if constexpr (!kFp8) {
      sm90::fence_tensormap_acquire(kmap);   // the map was written by a host-to-device copy
      sm90::prefetch_tensor_map(kmap);
    }
    const uint64_t policy = sm90::evict_first_policy();
    const int lane = tid % 32, warp = (tid - 256) / 32;
    int stage = 0, phase = 0;
    // FP8: an L2 prefetch (bulk copy engine, no registers) runs kPrefetch pages ahead of the register loads, so
    // those hit L2 and only a few tokens per warp need to be in flight.
    constexpr int kPrefetch = 3;
    int pf_req = begin_req, pf_blk = begin_blk, pf_end = 0;
    auto pf_seek = [&]() {   // move (pf_req, pf_blk) to the next existing page of this part, or past end_req
      while (pf_req <= end_req) {
        pf_end = pf_req == end_req ? end_blk : (max(seqlens[pf_req], 0) + kPage - 1) / kPage;
        if (pf_blk < pf_end) return;
        ++pf_req;
        pf_blk = 0;
      }
    };
    auto pf_issue = [&]() {
      if (pf_req > end_req) return;
      const int pg = block_table[static_cast<long long>(pf_req) * bt_stride + pf_blk];
      const int valid = min(kPage, seqlens[pf_req] - pf_blk * kPage);
      const int tok = tid - 256;
      if (tok < valid)
        sm90::prefetch_l2(kcache_fp8 + (static_cast<long long>(pg) * kPage + tok) * fp8_token_stride +
                              static_cast<long long>(kvh) * kFp8TokenBytes, kFp8TokenBytes);
      ++pf_blk;
      pf_seek();
    };
    if constexpr (kFp8) {
      pf_seek();
#pragma unroll 1
      for (int i = 0; i < kPrefetch; ++i) pf_issue();
    }
    // bf16/fp16: the range re-read where used (kept live, it was spilled under the 40-register cap with early Q)
    auto range = [&](int i, int v) { return kEQ ? ld_nc_opaque(meta + i) : v; };
    for (int req = range(0, begin_req); req <= range(2, end_req); ++req) {
      const int sk = seqlens[req];
      const int nblk = (sk + kPage - 1) / kPage;
      const int b0 = req == range(0, begin_req) ? range(1, begin_blk) : 0;
      const int b1 = req == range(2, end_req) ? range(3, end_blk) : nblk;
      DEEPSTACK_MLA_EQ_GENERAL_UNROLL_1   // early Q: not unrolled (the unrolled loop spilled under the 40-register cap)
      for (int blk = b0; blk < b1; ++blk) {
        const int page = block_table[static_cast<long long>(req) * bt_stride + blk];
        uint8_t* dst = sK + stage * kChunks * kChunkBytes;
        if constexpr (!kFp8) {
          sm90::mbar_wait(&empty[stage], phase ^ 1);
          sm90::mbar_arrive_expect_tx(&full[stage], kChunks * kChunkBytes);
          const int rank = kCluster == 1 ? 0 : static_cast<int>(sm90::cluster_ctarank());
#pragma unroll
          for (int c = 0; c < kChunks; ++c)
            load_page_box<kCluster>(dst + c * kChunkBytes, kmap, &full[stage], c, kvh, page, rank, policy);
        } else {
          pf_issue();
          const int valid = min(kPage, sk - blk * kPage);
          const uint8_t* base = kcache_fp8 + static_cast<long long>(page) * kPage * fp8_token_stride +
                                static_cast<long long>(kvh) * kFp8TokenBytes;
          // Each warp owns 16 tokens, 8 in flight: lane l holds e4m3 bytes [16 l, 16 l + 16) of a token and the
          // scale of its 128-channel group; rope rows are spread 4 tokens per load (8 lanes x 16 B each).
          // The first round's loads are issued before waiting for the stage to be free.
#pragma unroll 1
          for (int round = 0; round < 2; ++round) {
            const int tok0 = warp * 16 + round * 8;
            uint4 raw[8], rope[2];
            float scale[8];
#pragma unroll
            for (int u = 0; u < 8; ++u) {
              const int tok = tok0 + u;
              raw[u] = make_uint4(0, 0, 0, 0);
              scale[u] = 0.f;
              if (tok < valid) {
                const uint8_t* row = base + tok * fp8_token_stride;
                raw[u] = __ldg(reinterpret_cast<const uint4*>(row) + lane);
                scale[u] = __ldg(reinterpret_cast<const float*>(row + 512) + lane / 8);
              }
            }
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int tok = tok0 + h * 4 + lane / 8;
              rope[h] = make_uint4(0, 0, 0, 0);
              if (tok < valid)
                rope[h] = __ldg(reinterpret_cast<const uint4*>(base + tok * fp8_token_stride + 528) + lane % 8);
            }
            if (round == 0) sm90::mbar_wait(&empty[stage], phase ^ 1);
#pragma unroll
            for (int u = 0; u < 8; ++u) {
              const int tok = tok0 + u;
              uint4 lo, hi;
              dequant16_bf16(raw[u], scale[u], lo, hi);   // zeros past the valid tokens
              uint8_t* chunk = dst + (lane / 4) * kChunkBytes;
              *reinterpret_cast<uint4*>(chunk + swz(tok, 2 * (lane % 4))) = lo;
              *reinterpret_cast<uint4*>(chunk + swz(tok, 2 * (lane % 4) + 1)) = hi;
            }
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int tok = tok0 + h * 4 + lane / 8;
              *reinterpret_cast<uint4*>(dst + 8 * kChunkBytes + swz(tok, lane % 8)) = rope[h];
            }
          }
          sm90::fence_proxy_async();
          sm90::mbar_arrive(&full[stage]);
        }
        stage ^= 1;
        phase ^= stage == 0;
      }
    }
    if constexpr (kCluster > 1) {
      // Stay until every CTA of the cluster has released both stages: no peer arrives on (or receives boxes into)
      // this CTA's shared memory after it exits.
#pragma unroll 1
      for (int i = 0; i < 2; ++i) {
        sm90::mbar_wait(&empty[stage], phase ^ 1);
        stage ^= 1;
        phase ^= stage == 0;
      }
    }
    return;
  }

  // -------------------------------------------------- consumers --------------------------------------------------
  sm90::regs_increase<kConsumerRegs>();
  const int begin_req = kEQ ? meta[0] : p_begin_req, begin_blk = kEQ ? meta[1] : p_begin_blk,
            end_req = kEQ ? meta[2] : p_end_req, end_blk = kEQ ? meta[3] : p_end_blk,
            begin_split = kEQ ? meta[4] : p_begin_split;
  const int wtid = tid % 128, warp = wtid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int row0 = warp * 16 + g, row1 = row0 + 8;           // tile rows of this thread's accumulator
  const int grow0 = rb * 64 + row0, grow1 = rb * 64 + row1;   // q rows (s * hpk + local head)
  const int hpk = h_q / h_kv;
  const float kInf = __int_as_float(0x7f800000);
  const uint32_t sQa = sm90::smem_addr(sQ), sKa = sm90::smem_addr(sK), sPa = sm90::smem_addr(sP);
  int stage = 0, phase = 0;   // phase: bit 0 the K ring's parity, bit 1 early Q's (pieces with pages so far, mod 2)
  bool first_tile = true;

  for (int req = begin_req; req <= end_req; ++req) {
    const int sk = seqlens[req];
    const int nblk = (sk + kPage - 1) / kPage;
    const int b0 = req == begin_req ? begin_blk : 0;
    const int b1 = req == end_req ? end_blk : nblk;

    // Q rows of this block -> shared memory (zeros past the last row), 128-byte swizzled chunks.
    sm90::bar_sync(1, 256);   // everyone is done with the previous request's sQ / sFinal
    if constexpr (kEQ) {
      if (b0 < b1) {
        sm90::mbar_wait(q_full, (phase >> 1) & 1);   // loaded by producer warps 1-3 (cp.async)
        sm90::fence_proxy_async();                     // ... and read by wgmma (async proxy) next
      }
    } else {
      if constexpr (kFp8) load_q_tile<T, kChunks>(sQ, q, tid, rb, rows, hpk, kvh, req, q_sb, q_ss, q_sh);
      else load_q_tile_batched<T, kChunks>(sQ, q, tid, rb, rows, hpk, kvh, req, q_sb, q_ss, q_sh);
      sm90::fence_proxy_async();
      sm90::bar_sync(1, 256);
    }

    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    float m0 = -kInf, m1 = -kInf, l0 = 0.f, l1 = 0.f;
    // Causal: query s sees keys [0, sk - s_q + s + 1).
    const int lim0 = (causal && grow0 < rows) ? sk - s_q + grow0 / hpk + 1 : sk;
    const int lim1 = (causal && grow1 < rows) ? sk - s_q + grow1 / hpk + 1 : sk;

    for (int blk = b0; blk < b1; ++blk) {
      sm90::mbar_wait(&full[stage], kEQ ? phase & 1 : phase);
      const uint32_t kst = sKa + stage * kChunks * kChunkBytes;
      if (wg == 0) {
        float s[32];
        // Descriptors advance by adding (byte offset >> 4) to the start-address field (no carry: smem < 256 KB).
        const uint64_t dq0 = sm90::make_desc_sw128(sQa, 16, 1024), dk0 = sm90::make_desc_sw128(kst, 16, 1024);
        sm90::wgmma_fence();
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const uint32_t off = (c * kChunkBytes + k * 32) >> 4;
            Ops<T>::template qk<0>(s, dq0 + off, dk0 + off, (c | k) != 0);
          }
        }
        sm90::wgmma_commit();
        sm90::wgmma_wait<0>();
        sm90::fence_regs(s);
        if constexpr (kEQ) {
          if (blk == b1 - 1) sm90::mbar_arrive(q_free);   // the next piece's Q may load now
        }

        // Mask (select, so NaN in unused cache slots never reaches the max) and online softmax in log2 units.
        float mx0 = m0, mx1 = m1;
        mask_scale_max(s, blk * kPage + 2 * t, lim0, lim1, scale_log2, mx0, mx1);
        const float base0 = mx0 == -kInf ? 0.f : mx0, base1 = mx1 == -kInf ? 0.f : mx1;
        const float sc0 = exp2f(m0 - base0), sc1 = exp2f(m1 - base1);
        m0 = mx0;
        m1 = mx1;
        uint32_t pa[4][4];
        exp_sum_pack<T>(s, base0, base1, sc0, sc1, l0, l1, pa);
        if (!first_tile) sm90::bar_sync(2, 256);   // WG1 is done reading the previous P and scales
        first_tile = false;
        if (t == 0) {
          sScale[row0] = sc0;
          sScale[row1] = sc1;
        }
#pragma unroll
        for (int kb = 0; kb < 4; ++kb) {
          // column 16 kb + 2 t (+8): 16-byte unit 2 kb (+1), byte 4 t inside it
          *reinterpret_cast<uint32_t*>(sP + swz(row0, 2 * kb) + 4 * t) = pa[kb][0];
          *reinterpret_cast<uint32_t*>(sP + swz(row1, 2 * kb) + 4 * t) = pa[kb][1];
          *reinterpret_cast<uint32_t*>(sP + swz(row0, 2 * kb + 1) + 4 * t) = pa[kb][2];
          *reinterpret_cast<uint32_t*>(sP + swz(row1, 2 * kb + 1) + 4 * t) = pa[kb][3];
        }
        if constexpr (!kFp8) {
          // Cache slots past the sequence may hold anything (NaN): zero those V rows, since 0 * NaN = NaN.
          const int valid = sk - blk * kPage;
          if (valid < kPage) {
            uint8_t* kt = sK + stage * kChunks * kChunkBytes;
            for (int u = wtid; u < (kPage - valid) * 64; u += 128) {
              const int r = valid + u / 64, cu = u % 64;
              *reinterpret_cast<uint4*>(kt + (cu / 8) * kChunkBytes + swz(r, cu % 8)) = make_uint4(0, 0, 0, 0);
            }
          }
        }
        sm90::fence_proxy_async();
        sm90::bar_arrive(3, 256);                  // P, scales and V rows ready for WG1
#pragma unroll
        for (int j = 0; j < 32; ++j) {
          o[4 * j] *= sc0; o[4 * j + 1] *= sc0;
          o[4 * j + 2] *= sc1; o[4 * j + 3] *= sc1;
        }
        // P from shared memory as well (keeping it in registers costs 16 registers across the rescale: spills).
        sm90::fence_regs(o);                       // keep the rescale before the fence (else ptxas adds one)
        sm90::wgmma_fence();
        pv_half_ss<T>(o, sPa, kst);
        sm90::wgmma_commit();
        sm90::wgmma_wait<0>();
        sm90::fence_regs(o);
      } else {
        sm90::bar_sync(3, 256);
        const float sc0 = sScale[row0], sc1 = sScale[row1];
#pragma unroll
        for (int j = 0; j < 32; ++j) {
          o[4 * j] *= sc0; o[4 * j + 1] *= sc0;
          o[4 * j + 2] *= sc1; o[4 * j + 3] *= sc1;
        }
        sm90::fence_regs(o);
        sm90::wgmma_fence();
        pv_half_ss<T>(o, sPa, kst + 4 * kChunkBytes);
        sm90::wgmma_commit();
        sm90::wgmma_wait<0>();
        sm90::fence_regs(o);
        sm90::bar_arrive(2, 256);                  // P buffer free
      }
      release_stage<kCluster>(&empty[stage], lane);
      stage ^= 1;
      phase ^= stage == 0;
    }

    const int* ns = num_splits + req;
    if constexpr (kEQ) {
      if (b0 < b1) {
        ns = sSplits + (phase & 2);
        phase ^= 2;
      }
    }
    finish_request<T>(o, l0, l1, m0, m1, wg, t, row0, row1, grow0, grow1, req, begin_req, begin_split, ns, h_q,
                      h_kv, s_q, rows, hpk, kvh, sFinal, out, lse, o_accum, lse_accum);
  }
  if (wg == 0 && !first_tile) sm90::bar_sync(2, 256);   // match WG1's last "P free" arrival
}

}  // namespace mla
}  // namespace deepstack
