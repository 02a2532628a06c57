// MLA decode over a bf16/fp16 paged KV cache for few q rows per KV head (s_q x h_q / h_kv <= 32), sm_90a.
//
// Why a separate kernel: with <= 32 q rows decode is memory-bound, and the general kernel (mla_decode.cuh) keeps
// only ~one 72 KB page in flight per SM: its Q tile takes 72 KB of shared memory (64 rows), which leaves room for two
// page stages, and a stage is held from its arrival until both consumer warpgroups finish P V. Here the products are
// transposed so that the q rows are the small wgmma N dimension (kN = 16 or 32), as in the FP8 few-rows kernel
// (mla_decode_fp8.cuh):
//   S^T[64 tokens x kN rows] = K[64 x d] . Q^T        (A = K chunk, K-major; B = Q, K-major)
//   O^T[512 ch x kN rows]   += V^T[512 x 64] . P^T    (A = V^T read MN-major from the same K chunks; B = P^T)
// so Q takes only kChunks x kN x 128 bytes, and the rest of shared memory is a ring of kSlots single-chunk slots
// ([64 tokens x 64 channels], 8 KB, 128-byte swizzle, one TMA box each): 23-25 slots, i.e. ~2.6-2.8 pages, each with
// its own full/empty mbarrier. A page's rope chunk is handed back right after Q K^T, its latent chunks after P V, so
// the producer refills slots as soon as they are read and ~1.5-2 pages stay in flight while the consumer works.
// Roles (160 threads, 1 CTA per SM):
//   warps 0-3 (consumer warpgroup): Q K^T, mask, online softmax over the token (M) dimension (shuffles over the 8
//        lanes of a column, a 4-warp max through shared memory, lazy rescaling), P^T -> shared memory, P V.
//   warp 4 lane 0 (producer): walks the part's pages and issues one TMA copy per chunk into the slot ring.
// Cache slots past s_k may hold anything (NaN): scores are masked by select, and the rows of the last page past s_k
// are zeroed in shared memory before P V (0 x NaN = NaN). Scheduling, split-KV partials, the combine kernel and the
// empty-row conventions are those of mla_decode.cuh. Measurements: docs/mla.md.
#pragma once
#include <type_traits>

#include "mla/mla_decode.cuh"

namespace deepstack {
namespace mla {
namespace fewrows {

// D[64 x N] (+)= A[64x16] (smem) * B[16 x N] (smem), 16-bit inputs, fp32 accumulators; A MN-major when kTnspA.
#define DEEPSTACK_FEWROWS_MMA(NAME, SHAPE, TYPE)                                                                    \
  template <int kTnspA>                                                                                             \
  __device__ __forceinline__ void NAME(float (&d)[8], uint64_t desc_a, uint64_t desc_b, int accumulate) {          \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"                                                      \
                 "wgmma.mma_async.sync.aligned." SHAPE ".f32." TYPE "." TYPE " "                                    \
                 "{%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, %11, 0;\n}\n"                                  \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])   \
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(kTnspA));                                         \
  }
DEEPSTACK_FEWROWS_MMA(mma_n16_bf16, "m64n16k16", "bf16")
DEEPSTACK_FEWROWS_MMA(mma_n16_f16, "m64n16k16", "f16")
#undef DEEPSTACK_FEWROWS_MMA

#define DEEPSTACK_FEWROWS_MMA32(NAME, TYPE)                                                                         \
  template <int kTnspA>                                                                                             \
  __device__ __forceinline__ void NAME(float (&d)[16], uint64_t desc_a, uint64_t desc_b, int accumulate) {         \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"                                                      \
                 "wgmma.mma_async.sync.aligned.m64n32k16.f32." TYPE "." TYPE " "                                    \
                 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, %19, 0;\n}\n" \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),  \
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),         \
                   "+f"(d[15])                                                                                      \
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(kTnspA));                                         \
  }
DEEPSTACK_FEWROWS_MMA32(mma_n32_bf16, "bf16")
DEEPSTACK_FEWROWS_MMA32(mma_n32_f16, "f16")
#undef DEEPSTACK_FEWROWS_MMA32

template <typename T, int kN, int kTnspA>
__device__ __forceinline__ void mma(float (&d)[kN / 2], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  constexpr bool kBf16 = !std::is_same<T, __half>::value;
  if constexpr (kN == 16) {
    if constexpr (kBf16) mma_n16_bf16<kTnspA>(d, desc_a, desc_b, accumulate);
    else mma_n16_f16<kTnspA>(d, desc_a, desc_b, accumulate);
  } else {
    if constexpr (kBf16) mma_n32_bf16<kTnspA>(d, desc_a, desc_b, accumulate);
    else mma_n32_f16<kTnspA>(d, desc_a, desc_b, accumulate);
  }
}

// An opaque copy: keeps ptxas from hoisting the per-step descriptors (base + constant) of the unrolled Q K^T out of
// the tile loop, where the 36 loop-invariant 64-bit values would hold 72 registers.
__device__ __forceinline__ uint64_t opaque_u64(uint64_t v) {
  asm volatile("mov.b64 %0, %0;" : "+l"(v));
  return v;
}

__device__ __forceinline__ int opaque_int(int v) {
  asm volatile("mov.b32 %0, %0;" : "+r"(v));
  return v;
}

template <typename T>
__device__ __forceinline__ T to_t(float x) {
  if constexpr (std::is_same<T, __half>::value) return __float2half_rn(x);
  else return __float2bfloat16_rn(x);
}

constexpr int kThreads = 160;     // consumer warpgroup + producer warp
constexpr int kMaxSmem = 232448;  // sm_90 opt-in limit per block

template <int kDQK, int kN>
struct Layout {
  static constexpr int kChunks = kDQK / 64;
  static constexpr int kQChunk = kN * 128;                 // Q [kN rows x 64 ch], 128-byte swizzle
  static constexpr int kQ = 0;
  static constexpr int kP = kQ + kChunks * kQChunk;        // P^T [kN rows x 64 tokens], 128-byte swizzle
  static constexpr int kSlot0 = kP + kN * 128;             // ring of single-chunk slots (1024-aligned)
  static constexpr int kFixed = kSlot0 + 1024 + 4 * kN * 4;   // + alignment slack + red
  static constexpr int kSlotsFit = (kMaxSmem - kFixed) / (kChunkBytes + 16);
#ifdef DEEPSTACK_FEWROWS_MAX_SLOTS   // experiment: a shallower ring
  static constexpr int kSlots = kSlotsFit < DEEPSTACK_FEWROWS_MAX_SLOTS ? kSlotsFit : DEEPSTACK_FEWROWS_MAX_SLOTS;
#else
  static constexpr int kSlots = kSlotsFit;
#endif
  static constexpr int kRed = kSlot0 + kSlots * kChunkBytes;  // [4 warps][kN] floats
  static constexpr int kBars = kRed + 4 * kN * 4;             // full[kSlots], empty[kSlots]
  static constexpr int kBytes = kBars + 2 * kSlots * 8;
  static constexpr int kAlloc = kBytes + 1024;
  static_assert(kSlot0 % 1024 == 0 && kP % 1024 == 0, "swizzled tiles need 1024-byte alignment");
  static_assert(kSlots > kChunks, "the ring must hold more than one page");
  static_assert(kAlloc <= kMaxSmem, "shared memory");
};

// Position in the slot ring: slot index and mbarrier phase parity.
struct RingPos {
  int slot, phase;
  template <int kSlots>
  __device__ __forceinline__ RingPos plus(int c) const {   // 0 <= c < kSlots
    RingPos p{slot + c, phase};
    if (p.slot >= kSlots) { p.slot -= kSlots; p.phase ^= 1; }
    return p;
  }
};

template <typename T, int kDQK, int kN>
__global__ void __launch_bounds__(kThreads, 1) mla_decode_fewrows_kernel(
    const T* __restrict__ q, T* __restrict__ out, float* __restrict__ lse, float* __restrict__ o_accum,
    float* __restrict__ lse_accum, const int* __restrict__ block_table, const int* __restrict__ seqlens,
    const int* __restrict__ sched, const int* __restrict__ num_splits, const uint8_t* __restrict__ unused_fp8,
    const CUtensorMap* __restrict__ kmap,   // in global memory (see the Python side)
    int h_q, int h_kv, int s_q, int rows, int causal, int bt_stride,
    long long q_sb, long long q_ss, long long q_sh, long long unused_stride, float scale_log2) {
  static_assert(kN == 16 || kN == 32, "16 or 32 q rows per CTA");
  static_assert(kDQK == 576 || kDQK == 512, "head dim 576 (512 latent + 64 rope) or 512");
  using L = Layout<kDQK, kN>;
  constexpr int kChunks = L::kChunks;
  constexpr int kSlots = L::kSlots;
  constexpr int kJ = kN / 8;   // n8 column blocks of the accumulators

  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (sm90::smem_addr(smem_raw) & 1023u)) & 1023u);
  uint8_t* sQ = smem + L::kQ;
  uint8_t* sP = smem + L::kP;
  uint8_t* sSlots = smem + L::kSlot0;
  float* red = reinterpret_cast<float*>(smem + L::kRed);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + L::kBars);
  uint64_t* empty = full + kSlots;

  const int tid = threadIdx.x;
  if (tid == 0) {
#pragma unroll 1
    for (int s = 0; s < kSlots; ++s) {
      sm90::mbar_init(&full[s], 1);
      sm90::mbar_init(&empty[s], 4);   // lane 0 of each consumer warp, after its wgmma wait
    }
    sm90::fence_barrier_init();
  }
  __syncthreads();

  const int* meta = sched + blockIdx.x * kSchedInts;
  const int begin_req = meta[0], begin_blk = meta[1], end_req = meta[2], end_blk = meta[3], begin_split = meta[4];
  const int kvh = blockIdx.y;

  if (tid >= 128) {
    // ------------------------------------------------ producer ------------------------------------------------
    if (tid != 128) return;
    sm90::fence_tensormap_acquire(kmap);   // the map was written by a host-to-device copy
    sm90::prefetch_tensor_map(kmap);
#ifdef DEEPSTACK_FEWROWS_EVICT_NORMAL   // experiment: page loads without the evict-first hint
    uint64_t policy;
    asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(policy));
#else
    const uint64_t policy = sm90::evict_first_policy();
#endif
    RingPos pos{0, 0};
    // The next page's block-table entry is loaded while this page's copies are issued, so its latency is hidden.
    int req = begin_req, blk = begin_blk, b1 = 0;
    auto settle = [&]() {   // move (req, blk) to the next existing page of this part, or past end_req
      while (req <= end_req) {
        b1 = req == end_req ? end_blk : (max(seqlens[req], 0) + kPage - 1) / kPage;
        if (blk < b1) return;
        ++req;
        blk = 0;
      }
    };
    settle();
    int page = req <= end_req ? block_table[static_cast<long long>(req) * bt_stride + blk] : 0;
#pragma unroll 1
    while (req <= end_req) {
      const int cur = page;
      if (++blk >= b1) {
        ++req;
        blk = 0;
        settle();
      }
      if (req <= end_req) page = block_table[static_cast<long long>(req) * bt_stride + blk];
#pragma unroll 1
      for (int c = 0; c < kChunks; ++c) {
        sm90::mbar_wait(&empty[pos.slot], pos.phase ^ 1);
        sm90::mbar_arrive_expect_tx(&full[pos.slot], kChunkBytes);
        sm90::tma_load_4d(sSlots + pos.slot * kChunkBytes, kmap, &full[pos.slot], c * 64, kvh, 0, cur, policy);
        pos = pos.plus<kSlots>(1);
      }
    }
    return;
  }

  // ---------------------------------------------------- consumer ----------------------------------------------------
  const int warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int hpk = h_q / h_kv;
  const float kInf = __int_as_float(0x7f800000);
  constexpr float kSlack = 8.f;
  const uint32_t sQa = sm90::smem_addr(sQ), sSa = sm90::smem_addr(sSlots), sPa = sm90::smem_addr(sP);
  RingPos pos{0, 0};   // slot of the current page's chunk 0

  for (int req = begin_req; req <= end_req; ++req) {
    const int sk = seqlens[req];
    const int nblk = (sk + kPage - 1) / kPage;
    const int b0 = req == begin_req ? begin_blk : 0;
    const int b1 = req == end_req ? end_blk : nblk;

    // Q rows -> shared memory (zeros past the last row): kChunks chunks of [kN rows x 64 ch], 128-byte swizzle.
    // All loads of a thread are issued before the first store (one latency per request, not one per unit).
    constexpr int kUnits = kN * kChunks * 8 / 128;
    sm90::bar_sync(1, 128);   // the previous request's reads of sQ / red are done
    {
      // (tid through an opaque copy: else the per-unit row/head offsets, invariant across requests, are hoisted out
      // of the request loop and held in registers for the whole kernel, which spilled with 32 rows.)
      const int qtid = opaque_int(tid);
      uint4 v[kUnits];
#pragma unroll
      for (int i = 0; i < kUnits; ++i) {
        const int u = qtid + 128 * i, r = u / (kChunks * 8), cu = u % (kChunks * 8);
        v[i] = make_uint4(0, 0, 0, 0);
        if (r < rows) {
          const int s = r / hpk, head = kvh * hpk + r % hpk;
          v[i] = __ldg(reinterpret_cast<const uint4*>(q + req * q_sb + s * q_ss + head * q_sh) + cu);
        }
      }
#pragma unroll
      for (int i = 0; i < kUnits; ++i) {
        const int u = qtid + 128 * i, r = u / (kChunks * 8), cu = u % (kChunks * 8);
        *reinterpret_cast<uint4*>(sQ + (cu / 8) * L::kQChunk + swz(r, cu % 8)) = v[i];
      }
    }
    sm90::fence_proxy_async();
    sm90::bar_sync(1, 128);

    float o[8][kN / 2];
#pragma unroll
    for (int mb = 0; mb < 8; ++mb)
#pragma unroll
      for (int i = 0; i < kN / 2; ++i) o[mb][i] = 0.f;
    // This thread's rows: 8 j + 2 t + e (accumulator columns), for every token slot it holds.
    float m[kJ][2], l[kJ][2];
    int lim[kJ][2];
#pragma unroll
    for (int j = 0; j < kJ; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int r = 8 * j + 2 * t + e;
        m[j][e] = -kInf;
        l[j][e] = 0.f;
        lim[j][e] = (causal && r < rows) ? sk - s_q + r / hpk + 1 : sk;   // causal: query s sees sk - s_q + s + 1
      }

#pragma unroll 1
    for (int blk = b0; blk < b1; ++blk) {
      uint32_t slot_addr[kChunks];
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const RingPos p = pos.plus<kSlots>(c);
        slot_addr[c] = sSa + p.slot * kChunkBytes;
        sm90::mbar_wait(&full[p.slot], p.phase);
      }
      float s[kN / 2];
      {
        const uint64_t dq0 = opaque_u64(sm90::make_desc_sw128(sQa, 16, 1024));
        sm90::wgmma_fence();
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
          const uint64_t dk0 = opaque_u64(sm90::make_desc_sw128(slot_addr[c], 16, 1024));
#pragma unroll
          for (int k = 0; k < 4; ++k)
            mma<T, kN, 0>(s, dk0 + ((k * 32) >> 4), dq0 + ((c * L::kQChunk + k * 32) >> 4), (c | k) != 0);
        }
        sm90::wgmma_commit();
      }
      sm90::wgmma_wait<0>();
      sm90::fence_regs(s);
      if constexpr (kChunks == 9) {   // the rope chunk is not part of V: hand its slot back now
        if (lane == 0) sm90::mbar_arrive(&empty[pos.plus<kSlots>(8).slot]);
      }

      // Mask (select: NaN never reaches the max) and the tile max per row: over this thread's two tokens, the
      // 8 lanes of its column (g), then the 4 warps.
      const int tok0 = blk * kPage + warp * 16 + g;
#pragma unroll
      for (int j = 0; j < kJ; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
#pragma unroll
          for (int a = 0; a < 2; ++a) {
            float& x = s[4 * j + 2 * a + e];
            x = tok0 + 8 * a < lim[j][e] ? x * scale_log2 : -kInf;
          }
          float v = fmaxf(s[4 * j + e], s[4 * j + 2 + e]);
          v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 4));
          v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 8));
          v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 16));
          if (g == 0) red[warp * kN + 8 * j + 2 * t + e] = v;
        }
      // Cache slots past the sequence may hold NaN: zero those V rows before P V (0 x NaN = NaN).
      const int valid = sk - blk * kPage;
      if (valid < kPage) {
#pragma unroll 1
        for (int u = tid; u < (kPage - valid) * 64; u += 128) {
          const int r = valid + u / 64, cu = u % 64;
          int sl = pos.slot + cu / 8;
          if (sl >= kSlots) sl -= kSlots;
          *reinterpret_cast<uint4*>(sSlots + sl * kChunkBytes + swz(r, cu % 8)) = make_uint4(0, 0, 0, 0);
        }
      }
      sm90::bar_sync(2, 128);
      float scl[kJ][2];
      bool any_up = false;
#pragma unroll
      for (int j = 0; j < kJ; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int r = 8 * j + 2 * t + e;
          const float v = fmaxf(fmaxf(red[r], red[kN + r]), fmaxf(red[2 * kN + r], red[3 * kN + r]));
          // Lazy rescaling: the running max moves only when the tile's max exceeds it by more than kSlack (log2
          // units), so P <= 2^kSlack and O is rarely rescaled; out and lse use the same max, so the result is exact.
          const bool up = v > m[j][e] + kSlack;
          scl[j][e] = 1.f;
          if (up) {
            scl[j][e] = exp2f(m[j][e] - v);
            m[j][e] = v;
            any_up = true;
          }
          const float base = m[j][e] == -kInf ? 0.f : m[j][e];
          float sum = 0.f;
#pragma unroll
          for (int a = 0; a < 2; ++a) {
            float& x = s[4 * j + 2 * a + e];
            x = exp2f(x - base);
            sum += x;
          }
          l[j][e] = l[j][e] * scl[j][e] + sum;
        }
      // P^T -> shared memory: [kN rows x 64 tokens], 128-byte swizzle (every consumer thread passed barrier 2 after
      // waiting for the previous P V, so nothing reads it any more).
#pragma unroll
      for (int j = 0; j < kJ; ++j)
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int r = 8 * j + 2 * t + e, tok = warp * 16 + g + 8 * a;
            *reinterpret_cast<T*>(sP + swz(r, tok / 8) + 2 * (tok % 8)) = to_t<T>(s[4 * j + 2 * a + e]);
          }
      if (__any_sync(0xffffffffu, any_up)) {
#pragma unroll
        for (int mb = 0; mb < 8; ++mb)
#pragma unroll
          for (int j = 0; j < kJ; ++j)
#pragma unroll
            for (int a = 0; a < 2; ++a)
#pragma unroll
              for (int e = 0; e < 2; ++e) o[mb][4 * j + 2 * a + e] *= scl[j][e];
      }
      sm90::fence_proxy_async();
      sm90::bar_sync(3, 128);   // P^T and the zeroed rows complete (and every thread is done with red)
#pragma unroll
      for (int mb = 0; mb < 8; ++mb) sm90::fence_regs(o[mb]);
      const uint64_t dp0 = opaque_u64(sm90::make_desc_sw128(sPa, 16, 1024));
      sm90::wgmma_fence();
#pragma unroll
      for (int mb = 0; mb < 8; ++mb) {
        const uint64_t da0 = opaque_u64(sm90::make_desc_sw128(slot_addr[mb], kChunkBytes, 1024));
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const uint64_t da = da0 + ((k * 16 * 128) >> 4);
          const uint64_t db = dp0 + ((k * 32) >> 4);
          mma<T, kN, 1>(o[mb], da, db, 1);
        }
      }
      sm90::wgmma_commit();
      sm90::wgmma_wait<0>();
#pragma unroll
      for (int mb = 0; mb < 8; ++mb) sm90::fence_regs(o[mb]);
      if (lane == 0) {
#pragma unroll
        for (int c = 0; c < 8; ++c) sm90::mbar_arrive(&empty[pos.plus<kSlots>(c).slot]);
      }
      pos = pos.plus<kSlots>(kChunks);
    }

    // ---- finish this request: row sums over the 8 lanes of a column and the 4 warps, then out/lse or partials ----
    const int split = req == begin_req ? begin_split : num_splits[req];
    const bool single = num_splits[req + 1] - num_splits[req] == 1;
#pragma unroll
    for (int j = 0; j < kJ; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float v = l[j][e];
        v += __shfl_xor_sync(0xffffffffu, v, 4);
        v += __shfl_xor_sync(0xffffffffu, v, 8);
        v += __shfl_xor_sync(0xffffffffu, v, 16);
        if (g == 0) red[warp * kN + 8 * j + 2 * t + e] = v;
      }
    sm90::bar_sync(2, 128);
    const float empty_lse = single ? kInf : -kInf;
    const float kLn2 = 0.6931471805599453f;
#pragma unroll
    for (int j = 0; j < kJ; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int r = 8 * j + 2 * t + e;
        if (r >= rows) continue;
        const float lt = red[r] + red[kN + r] + red[2 * kN + r] + red[3 * kN + r];
        const float inv = lt > 0.f ? 1.f / lt : 0.f;
        if (warp == 0 && g == 0) {
          const float v = lt > 0.f ? (m[j][e] + log2f(lt)) * kLn2 : empty_lse;
          if (single) lse[(static_cast<long long>(req) * h_q + kvh * hpk + r % hpk) * s_q + r / hpk] = v;
          else lse_accum[(static_cast<long long>(split) * h_kv + kvh) * rows + r] = v;
        }
        if (single) {
          T* dst = out + ((static_cast<long long>(req) * s_q + r / hpk) * h_q + kvh * hpk + r % hpk) * kDV +
                   warp * 16 + g;
#pragma unroll
          for (int mb = 0; mb < 8; ++mb)
#pragma unroll
            for (int a = 0; a < 2; ++a) dst[mb * 64 + 8 * a] = to_t<T>(o[mb][4 * j + 2 * a + e] * inv);
        } else {
          float* dst = o_accum + ((static_cast<long long>(split) * h_kv + kvh) * rows + r) * kDV + warp * 16 + g;
#pragma unroll
          for (int mb = 0; mb < 8; ++mb)
#pragma unroll
            for (int a = 0; a < 2; ++a) dst[mb * 64 + 8 * a] = o[mb][4 * j + 2 * a + e] * inv;
        }
      }
  }
}

}  // namespace fewrows
}  // namespace mla
}  // namespace deepstack
