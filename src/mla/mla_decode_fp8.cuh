// MLA decode over an FP8 paged KV cache for few q rows per KV head (s_q x h_q / h_kv <= 32), sm_90a.
//
// Why a separate kernel: with <= 32 q rows the 64-row wgmma of mla_decode.cuh spends 2-4x its tensor and
// shared-memory work on padding rows, and its per-page consumer chain (~2.3 us) is longer than the ~1.7 us an FP8
// page may take to beat the bf16 cache by 1.6x. Here the products are transposed so that the q rows are the small
// wgmma N dimension (kN = 16 or 32):
//   S^T[64 tokens x kN rows] = K[64 x 576] . Q^T       (A = K tile, K-major; B = Q, K-major)
//   O^T[512 ch x kN rows]   += V^T[512 x 64] . P^T     (A = V^T read MN-major from the same K tile; B = P^T)
// Roles (384 threads, 1 CTA per SM):
//   WG0 (consumer): QK^T, online softmax over the token (M) dimension (warp shuffles + a 4-warp max through shared
//        memory; lazy rescaling), P^T -> shared memory, P V, then the K stage goes back to the dequant warps.
//   WG1 + WG2 (dequant, 256 threads): raw 656-byte token rows arrive by bulk copies (cp.async.bulk: no registers
//        bound the bytes in flight) in a ring of kTok-token stages; the threads read a whole page of stages into
//        registers, have the ring refilled, then dequantise into the 2-stage bf16 K ring (128-byte swizzled
//        [64 x 64] chunks, the layout mla_decode.cuh's TMA writes). Rows past s_k are written as zeros.
// f16 path (16 rows; -DDEEPSTACK_MLA_FP8_F16=0 turns it off): the dequant warps convert e4m3 pairs with one exact
// cvt.rn.f16x2.e4m3x2 each, unscaled, into the same layout as f16 (the rope chunk stays bf16), and leave each
// token's 4 scales and their per-warp maxima in shared memory. Q's latent channels become f16 once per piece with a
// per-row power-of-two prescale. S^T = sum_g scale[t, g] 2^(e_r - 14) S_g^T + S_rope^T: one f16 accumulator per
// 128-channel group, folded in fp32. P V per group g with an f16 P^T copy P^T[t, r] scale[t, g] 2^(6 - M_g); O^T
// group g in units of 2^(M_g - 6), M_g the group's largest scale exponent so far (raised lazily, O^T rescaled).
// Scheduling, split-KV partials and the empty-row conventions are those of mla_decode.cuh (same metadata, same
// combine kernel). Where the time goes: docs/mla.md.
#pragma once
#include "mla/mla_decode.cuh"

namespace deepstack {
namespace mla {
namespace fp8small {

// D[64 x N] (+)= A[64x16] (smem) * B[16 x N] (smem), bf16 (kF16 = false) or f16 in, fp32 accumulators.
#define DEEPSTACK_FP8S_MMA_N16(TY)                                                                                 \
  asm volatile(                                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"                                                                 \
      "wgmma.mma_async.sync.aligned.m64n16k16.f32." TY "." TY " "                                                 \
      "{%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, %11, 0;\n}\n"                                            \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])           \
      : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(kTnspA))
#define DEEPSTACK_FP8S_MMA_N32(TY)                                                                                 \
  asm volatile(                                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"                                                                 \
      "wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY " "                                                 \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, %19, 0;\n}\n"   \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),          \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])     \
      : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(kTnspA))
template <int kTnspA, bool kF16>
__device__ __forceinline__ void mma_n16(float (&d)[8], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  if constexpr (kF16) DEEPSTACK_FP8S_MMA_N16("f16");
  else DEEPSTACK_FP8S_MMA_N16("bf16");
}
template <int kTnspA, bool kF16>
__device__ __forceinline__ void mma_n32(float (&d)[16], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  if constexpr (kF16) DEEPSTACK_FP8S_MMA_N32("f16");
  else DEEPSTACK_FP8S_MMA_N32("bf16");
}
#undef DEEPSTACK_FP8S_MMA_N16
#undef DEEPSTACK_FP8S_MMA_N32
template <int kN, int kTnspA, bool kF16 = false>
__device__ __forceinline__ void mma(float (&d)[kN / 2], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  if constexpr (kN == 16) mma_n16<kTnspA, kF16>(d, desc_a, desc_b, accumulate);
  else mma_n32<kTnspA, kF16>(d, desc_a, desc_b, accumulate);
}

// ---- f16 path (kF16, see the kernel comment): exact conversions, the scales applied outside the tensor cores ----
// Two e4m3 values -> f16x2 with one instruction (every e4m3 value is an f16 value: exact); 16 bytes -> 16 f16.
__device__ __forceinline__ void dequant16_f16(const uint4& raw, uint4& lo, uint4& hi) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
  uint32_t o[8];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    asm("{\n.reg .b16 l, h;\nmov.b32 {l, h}, %2;\ncvt.rn.f16x2.e4m3x2 %0, l;\ncvt.rn.f16x2.e4m3x2 %1, h;\n}\n"
        : "=r"(o[2 * i]), "=r"(o[2 * i + 1]) : "r"(w[i]));
  lo = make_uint4(o[0], o[1], o[2], o[3]);
  hi = make_uint4(o[4], o[5], o[6], o[7]);
}
// 2^e as a float for e in [-126, 127]; 0 below.
__device__ __forceinline__ float pow2i(int e) { return e < -126 ? 0.f : __int_as_float((min(e, 127) + 127) << 23); }
// The unbiased exponent of a non-negative float (0 -> -127).
__device__ __forceinline__ int exp_of(float x) { return (__float_as_int(x) >> 23) - 127; }
__device__ __forceinline__ uint32_t pack_f16x2(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ void stmatrix_x4_trans(uint32_t addr, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};"
               ::"r"(addr), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}

// Bulk copy (no tensor map) of `bytes` (multiple of 16) global -> shared, completion counted on `bar`.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;"
      ::"r"(sm90::smem_addr(dst)), "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(sm90::smem_addr(bar)),
        "l"(policy)
      : "memory");
}

// The f16 path (below) for 16 q rows; -DDEEPSTACK_MLA_FP8_F16=0 keeps every row count on the bf16 dequantisation.
// 32 rows stay there: four P^T copies (16 KB) and the 5 S^T accumulators do not fit next to its 128 O^T registers
// and two raw stages.
#ifndef DEEPSTACK_MLA_FP8_F16
#define DEEPSTACK_MLA_FP8_F16 1
#endif
template <int kN>
constexpr bool kFp8F16 = DEEPSTACK_MLA_FP8_F16 != 0 && kN == 16;
// f16 path's raw ring: TMA boxes of the latent + scale bytes only (528 per token, any h_kv), the rope box straight into
// the bf16 K stage (128-byte swizzle), so three 32-token stages fit; -DDEEPSTACK_MLA_FP8_F16_TMA=0: whole 656-byte
// rows by bulk copies into two stages (the rope copied by the dequant warps).
#ifndef DEEPSTACK_MLA_FP8_F16_TMA
#define DEEPSTACK_MLA_FP8_F16_TMA 1
#endif
template <int kN>
constexpr bool kFp8Tma = kFp8F16<kN> && DEEPSTACK_MLA_FP8_F16_TMA != 0;
constexpr int kFp8LatentBytes = 528;
// Ablations for timing only (wrong results): 1 = the dequant warps skip the f16 conversion and the K stores, 2 = the
// consumer skips P V.
#ifndef DEEPSTACK_MLA_FP8_ABL
#define DEEPSTACK_MLA_FP8_ABL 0
#endif   // 512 e4m3 + 4 fp32 scales: what the f16 path's TMA ring holds per token

template <int kN, int kTok, bool kF16 = kFp8F16<kN>, bool kTma = kFp8Tma<kN>>
struct Layout {
  static constexpr int kChunks = 9;
  // Raw ring: what fits next to the bf16 ring. bf16 path: 3 x 32 tokens for N = 16, 2 x 32 for N = 32. f16 path
  // (8 KB of P^T copies and 2.3 KB of scales more): TMA ring of 528-byte rows, 96 tokens; bulk copies of 656-byte
  // rows, 2 x 32 or 5 x 16 tokens.
  static constexpr int kTokBytes = kTma ? kFp8LatentBytes : kFp8TokenBytes;   // bytes per token in a raw stage
  static constexpr int kRawBytes = kTma ? 96 * kFp8LatentBytes
                                 : kF16 ? (kTok == 32 ? 2 : 5) * kTok * kFp8TokenBytes
                                        : (kN == 16 ? 3 : 2) * 32 * kFp8TokenBytes;
  static constexpr int kStageBytes = kTok * kTokBytes;
  static constexpr int kRawStages = kRawBytes / kStageBytes;
  static constexpr int kQChunk = kN * 128;                // Q [kN rows x 64 ch], 128-byte swizzle
  static constexpr int kKStage = kChunks * kChunkBytes;   // one 64-token bf16 (f16 path: f16 latent + bf16 rope) page
  static constexpr int kPCopies = kF16 ? 4 : 1;           // f16 path: one scaled P^T per 128-channel group
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kChunks * kQChunk;
  static constexpr int kP = kK + 2 * kKStage;             // P^T [kN rows x 64 tokens], 128-byte swizzle
  static constexpr int kScale = kP + kPCopies * kN * 128; // f16 path: [2 stages][64 tokens][4] scales
  static constexpr int kGmax = kScale + (kF16 ? 2 * 64 * 16 : 0);   // [2 stages][8 dequant warps][4] max scale
  static constexpr int kQm = kGmax + (kF16 ? 2 * 8 * 16 : 0);       // [kN] 2^(e_r - 14): Q's per-row prescale
  static constexpr int kRaw = (kQm + (kF16 ? kN * 4 : 0) + 127) / 128 * 128;
  static constexpr int kRed = kRaw + kRawBytes;           // [4 warps][kN] floats
  static constexpr int kBars = kRed + 4 * kN * 4;         // raw_full[kRawStages], k_full[2], k_empty[2]
  static constexpr int kSplits = kBars + (kRawStages + 4) * 8;   // [2][2] int: early Q's num_splits pairs
  static constexpr int kBytes = kSplits + 4 * 4;
  static constexpr int kAlloc = kBytes + 1024;
  static_assert(kK % 1024 == 0 && kP % 1024 == 0, "swizzled tiles need 1024-byte alignment");
  static_assert(kRaw % 128 == 0 && kStageBytes % 128 == 0, "raw stages start on 128-byte boundaries");
  static_assert(kAlloc <= 232448, "shared memory");
};

// The pages of one SM part in order, in stages of kTok tokens: (req, blk, part). Requests without pages are skipped.
// `page` (the block-table entry of blk) is loaded when the walk enters a block, so the load's latency passes
// before the issuing warp uses it.
template <int kTok>
struct Walk {
  int req, blk, part, b1, sk, end_req, end_blk, page;
  const int* seqlens;
  const int* block_table;
  int bt_stride;
  __device__ __forceinline__ void start(const int* sl, const int* bt, int bts, int breq, int bblk, int ereq,
                                        int eblk) {
    seqlens = sl; block_table = bt; bt_stride = bts;
    req = breq; blk = bblk; part = 0; end_req = ereq; end_blk = eblk;
    settle();
  }
  __device__ __forceinline__ void settle() {
    while (req <= end_req) {
      sk = seqlens[req];
      b1 = req == end_req ? end_blk : (sk + kPage - 1) / kPage;
      if (blk < b1) {
        page = block_table[static_cast<long long>(req) * bt_stride + blk];
        return;
      }
      ++req;
      blk = 0;
    }
  }
  __device__ __forceinline__ bool done() const { return req > end_req; }
  __device__ __forceinline__ int valid() const { return min(max(sk - blk * kPage - part * kTok, 0), kTok); }
  __device__ __forceinline__ void next() {
    if (++part < kPage / kTok) return;
    part = 0;
    if (++blk < b1) {
      page = block_table[static_cast<long long>(req) * bt_stride + blk];
      return;
    }
    ++req;
    blk = 0;
    settle();
  }
};

template <int kN, int kTok>
__global__ void __launch_bounds__(384, 1) mla_decode_fp8_kernel(
    const __nv_bfloat16* __restrict__ q, __nv_bfloat16* __restrict__ out, float* __restrict__ lse,
    float* __restrict__ o_accum, float* __restrict__ lse_accum, const int* __restrict__ block_table,
    const int* __restrict__ seqlens, const int* __restrict__ sched, const int* __restrict__ num_splits,
    const uint8_t* __restrict__ kcache,
    const CUtensorMap* __restrict__ kmaps,   // [2] in global memory: latent + scales (int32), rope (bf16); TMA path
    int h_q, int h_kv, int s_q, int rows, int causal, int bt_stride,
    long long q_sb, long long q_ss, long long q_sh, long long tok_stride, float scale_log2) {
  static_assert(kN == 16 || kN == 32, "16 or 32 q rows per CTA");
  static_assert(kTok == 16 || kTok == 32, "raw stages of 16 or 32 tokens");
  constexpr bool kF16 = kFp8F16<kN>;
  constexpr bool kTma = kFp8Tma<kN>;
  constexpr int kTokBytes = Layout<kN, kTok>::kTokBytes;
  using L = Layout<kN, kTok>;
  constexpr int kR = L::kRawStages;
  constexpr int kRawStageBytes = L::kStageBytes;
  constexpr int kJ = kN / 8;   // n8 column blocks of the accumulators
  using T = __nv_bfloat16;

  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (sm90::smem_addr(smem_raw) & 1023u)) & 1023u);
  uint8_t* sQ = smem + L::kQ;
  uint8_t* sK = smem + L::kK;
  uint8_t* sP = smem + L::kP;
  uint8_t* sRaw = smem + L::kRaw;
  float* red = reinterpret_cast<float*>(smem + L::kRed);
  uint64_t* raw_full = reinterpret_cast<uint64_t*>(smem + L::kBars);
  uint64_t* k_full = raw_full + kR;
  uint64_t* k_empty = k_full + 2;
  int* sSplits = reinterpret_cast<int*>(smem + L::kSplits);
  float* sScale = reinterpret_cast<float*>(smem + L::kScale);   // f16 path: [2][64][4]
  float* sGmax = reinterpret_cast<float*>(smem + L::kGmax);     // f16 path: [2][8][4]
  float* sQm = reinterpret_cast<float*>(smem + L::kQm);         // f16 path: [kN]

  const int tid = threadIdx.x;
  if (tid == 0) {
    uint32_t dyn;   // the host passes the largest of the layouts a define may select; never run on less
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    if (dyn < L::kAlloc) __trap();
#pragma unroll
    for (int s = 0; s < kR; ++s) sm90::mbar_init(&raw_full[s], 1);
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      sm90::mbar_init(&k_full[s], kTma ? 257 : 256);   // TMA path: + the rope box's expect-tx arrival
      sm90::mbar_init(&k_empty[s], 128);
    }
    sm90::fence_barrier_init();
  }
  __syncthreads();

  const int* meta = sched + blockIdx.x * kSchedInts;
  const int begin_req = meta[0], begin_blk = meta[1], end_req = meta[2], end_blk = meta[3], begin_split = meta[4];
  const int kvh = blockIdx.y;
  const uint8_t* kbase = kcache + static_cast<long long>(kvh) * kFp8TokenBytes;

  if (tid >= 128) {
    // ------------------------------------------ dequant warpgroups ------------------------------------------
    // Bulk copies (no registers) fill a kR-deep ring of raw kTok-token stages; warp 0 issues them. Per page the
    // 8 warps read the page's stages into registers (latent: tokens p * 8 + warp, lane l holding e4m3 bytes
    // [16 l, 16 l + 16), i.e. channels 16 l.. of chunk l / 4, and its 128-channel group's scale; rope: token
    // dtid / 8, 16-byte unit dtid % 8), meet at a barrier (warp 0 then refills those stages), wait for a free
    // bf16 stage, dequantise and store. No L2 prefetch: bulk or per-line prefetches 2-8 stages ahead of the copies
    // measured 3-12% slower.
    sm90::regs_decrease<104>();
    const int dtid = tid - 128, dwarp = dtid / 32, lane = tid % 32;
    const bool packed = tok_stride == kFp8TokenBytes;   // a stage is one contiguous run of bytes
    const uint64_t policy = sm90::evict_first_policy();
    using W = Walk<kTok>;
    if constexpr (kTma) {
      if (dtid == 0) {
        sm90::fence_tensormap_acquire(kmaps);       // the maps were written by a host-to-device copy
        sm90::fence_tensormap_acquire(kmaps + 1);
      }
    }
    auto issue = [&](const W& w, int s) {   // warp 0
      const int valid = w.valid();
      if constexpr (kTma) {   // the whole kTok-token box (slots past s_k hold garbage, never read)
        if (lane == 0) {
          sm90::mbar_arrive_expect_tx(&raw_full[s], valid > 0 ? kRawStageBytes : 0);
          if (valid > 0)
            sm90::tma_load_4d(sRaw + s * kRawStageBytes, kmaps, &raw_full[s], 0, kvh, w.part * kTok, w.page, policy);
        }
        return;
      }
      if (lane == 0) sm90::mbar_arrive_expect_tx(&raw_full[s], valid * kFp8TokenBytes);
      if (valid == 0) return;
      const uint8_t* src = kbase + (static_cast<long long>(w.page) * kPage + w.part * kTok) * tok_stride;
      uint8_t* dst = sRaw + s * kRawStageBytes;
      if (packed) {
        if (lane == 0) bulk_load(dst, src, valid * kFp8TokenBytes, &raw_full[s], policy);
      } else {
        for (int tok = lane; tok < valid; tok += 32)
          bulk_load(dst + tok * kFp8TokenBytes, src + tok * tok_stride, kFp8TokenBytes, &raw_full[s], policy);
      }
    };
    W iw, pw;
    pw.start(seqlens, block_table, bt_stride, begin_req, begin_blk, end_req, end_blk);
    if (dwarp == 0) {
      iw = pw;
#pragma unroll 1
      for (int s = 0; s < kR && !iw.done(); ++s) {
        issue(iw, s);
        iw.next();
      }
    }
    const int rtok = dtid / 8, runit = dtid % 8;
    const int odd = (lane / 4) & 1;
    constexpr int kParts = kPage / kTok;
    int rs = 0, rph = 0, ks = 0, kph = 0;
#pragma unroll 1
    while (!pw.done()) {
      // Read the page's raw stages into registers first and refill them, so the ring stays in flight while this
      // warpgroup waits for the consumer to free a bf16 stage.
      uint4 v[kParts][kTok / 8], rope[kParts];
      float sc[kParts][kTok / 8];
      const int rs0 = rs;
      const int page = pw.page;   // TMA path: this page's rope box
#pragma unroll
      for (int part = 0; part < kParts; ++part) {
        const int valid = pw.valid();
        sm90::mbar_wait(&raw_full[rs], rph);
        const uint8_t* raw = sRaw + rs * kRawStageBytes;
#pragma unroll
        for (int p = 0; p < kTok / 8; ++p) {
          const int tok = p * 8 + dwarp;
          v[part][p] = make_uint4(0, 0, 0, 0);
          sc[part][p] = 0.f;
          if (tok < valid) {
            if constexpr (kF16) {   // odd chunks' lanes: high 8 bytes first (stored first, below), no selects
              const uint2* src = reinterpret_cast<const uint2*>(raw + tok * kTokBytes) + 2 * lane;
              const uint2 first = src[odd], second = src[1 - odd];
              v[part][p] = make_uint4(first.x, first.y, second.x, second.y);
            } else {
              v[part][p] = *(reinterpret_cast<const uint4*>(raw + tok * kFp8TokenBytes) + lane);
            }
            sc[part][p] = *(reinterpret_cast<const float*>(raw + tok * kTokBytes + 512) + lane / 8);
          }
        }
        rope[part] = make_uint4(0, 0, 0, 0);
        if (!kTma && rtok < valid)
          rope[part] = *(reinterpret_cast<const uint4*>(raw + rtok * kFp8TokenBytes + 528) + runit);
        rs = rs + 1 == kR ? 0 : rs + 1;
        rph ^= rs == 0;
        pw.next();
      }
      sm90::bar_sync(4, 256);   // every dequant thread has read this page's stages: refill them
      if (dwarp == 0) {
#pragma unroll 1
        for (int part = 0; part < kParts && !iw.done(); ++part) {
          issue(iw, (rs0 + part) % kR);
          iw.next();
        }
      }
      sm90::mbar_wait(&k_empty[ks], kph ^ 1);
      uint8_t* dst = sK + ks * L::kKStage;
      if constexpr (kTma) {   // the rope box lands swizzled in the stage's bf16 chunk 8 (rows past s_k: garbage,
        if (dtid == 0) {      // masked out of S^T and never read by P V)
          sm90::mbar_arrive_expect_tx(&k_full[ks], kPage * 128);
          sm90::tma_load_4d(dst + 8 * kChunkBytes, kmaps + 1, &k_full[ks], 0, kvh, 0, page, policy);
        }
      }
      if constexpr (kF16) {
        // The consumer applies the scales: each token's 4 (0 past the valid tokens) and this warp's max per group.
        float mx = 0.f;
#pragma unroll
        for (int part = 0; part < kParts; ++part)
#pragma unroll
          for (int p = 0; p < kTok / 8; ++p) {
            mx = fmaxf(mx, sc[part][p]);
            if (lane % 8 == 0) sScale[(ks * 64 + part * kTok + p * 8 + dwarp) * 4 + lane / 8] = sc[part][p];
          }
        if (lane % 8 == 0) sGmax[(ks * 8 + dwarp) * 4 + lane / 8] = mx;
      }
#pragma unroll
      for (int part = 0; part < kParts; ++part) {
#pragma unroll
        for (int p = 0; p < kTok / 8; ++p) {
          // Lanes of odd chunks store their high unit first: each quarter warp's 16-byte stores then hit 8
          // different bank groups (no conflicts).
          const int r = part * kTok + p * 8 + dwarp;
          uint4 lo, hi;
          uint8_t* chunk = dst + (lane / 4) * kChunkBytes;
          if constexpr (kF16) {   // unscaled, exact; zeros past the valid tokens; odd lanes' halves came swapped
            if constexpr (DEEPSTACK_MLA_FP8_ABL == 1) continue;
            dequant16_f16(v[part][p], lo, hi);
            *reinterpret_cast<uint4*>(chunk + swz(r, 2 * (lane % 4) + odd)) = lo;
            *reinterpret_cast<uint4*>(chunk + swz(r, 2 * (lane % 4) + 1 - odd)) = hi;
          } else {
            dequant16_bf16(v[part][p], sc[part][p], lo, hi);   // zeros past the valid tokens
            *reinterpret_cast<uint4*>(chunk + swz(r, 2 * (lane % 4) + odd)) = odd ? hi : lo;
            *reinterpret_cast<uint4*>(chunk + swz(r, 2 * (lane % 4) + 1 - odd)) = odd ? lo : hi;
          }
        }
        if (!kTma && rtok < kTok)
          *reinterpret_cast<uint4*>(dst + 8 * kChunkBytes + swz(part * kTok + rtok, runit)) = rope[part];
      }
      sm90::fence_proxy_async();
      sm90::mbar_arrive(&k_full[ks]);
      ks ^= 1;
      kph ^= ks == 0;
    }
    return;
  }

  // ---------------------------------------------------- consumer ----------------------------------------------------
  sm90::regs_increase<240>();
  const int warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int hpk = h_q / h_kv;
  const float kInf = __int_as_float(0x7f800000);
  constexpr float kSlack = 8.f;
  const uint32_t sQa = sm90::smem_addr(sQ), sKa = sm90::smem_addr(sK), sPa = sm90::smem_addr(sP);
  int ks = 0, kph = 0;

  // Early Q (see mla_decode.cuh; here the consumers issue it themselves): the Q tile of the part's next piece with
  // pages and its num_splits pair are copied with cp.async (no registers, all in flight at once) as soon as the
  // current piece's last S^T is done, so the DRAM round trip overlaps the last tile's softmax, P V and the epilogue;
  // the next piece only waits for its own copies (cp.async.wait_all) and meets at the barrier it had anyway.
  // -DDEEPSTACK_MLA_EARLY_Q=0: the one-unit-at-a-time load at the start of every piece.
  auto first_with_pages = [&](int r) {   // the first request >= r whose piece of this part has pages
    for (; r <= end_req; ++r) {
      const int rb0 = r == begin_req ? begin_blk : 0;
      const int rb1 = r == end_req ? end_blk : (seqlens[r] + kPage - 1) / kPage;
      if (rb0 < rb1) break;
    }
    return r;
  };
  auto issue_q = [&](int r, int slot) {   // Q rows of request r (zeros past the last row) and its num_splits pair
    if (r > end_req) return;
#pragma unroll 1
    for (int u = tid; u < kN * 72; u += 128) {
      const int row = u / 72, cu = u % 72;
      const bool valid = row < rows;
      const T* src = valid ? q + r * q_sb + (row / hpk) * q_ss + (kvh * hpk + row % hpk) * q_sh + cu * 8 : q;
      cp_async_16_zfill(sQa + (cu / 8) * L::kQChunk + swz(row, cu % 8), src, valid ? 16 : 0);
    }
    if (tid < 2) cp_async_4(sm90::smem_addr(sSplits + 2 * slot + tid), num_splits + r + tid);
  };
  // Where the next Q is issued in the piece's last tile: 16 rows under its P V (a consumer-bound kernel: issued
  // before the softmax, the copies delayed the stage release), 32 rows right after its S^T (H200 A/B 2026-11-30,
  // docs/mla.md). -DDEEPSTACK_MLA_FP8_EQ_LATE=0 / 1 forces one.
#ifndef DEEPSTACK_MLA_FP8_EQ_LATE
#define DEEPSTACK_MLA_FP8_EQ_LATE -1
#endif
  constexpr bool kQLate = DEEPSTACK_MLA_FP8_EQ_LATE < 0 ? kN == 16 : DEEPSTACK_MLA_FP8_EQ_LATE != 0;
  // f16 path: Q's 512 latent channels -> f16 in place, row r times 2^(14 - e_r) (e_r: the exponent of the row's
  // largest |q|), so the row's largest lands in [2^14, 2^15) and every bf16 value down to 2^-17 of it is exact in
  // f16; the rope chunk stays bf16. sQm[r] = 2^(e_r - 14) undoes it on S^T.
  auto convert_q = [&]() {
    constexpr int kT = 128 / kN, kU = 64 / kT;   // threads per row, 16-byte units per thread
    const int row = tid / kT, sub = tid % kT;
    uint4 u[kU];
    __nv_bfloat162 mx = __float2bfloat162_rn(0.f);
#pragma unroll
    for (int i = 0; i < kU; ++i) {
      const int cu = sub + kT * i;
      u[i] = *reinterpret_cast<const uint4*>(sQ + (cu / 8) * L::kQChunk + swz(row, cu % 8));
      const uint32_t w[4] = {u[i].x, u[i].y, u[i].z, u[i].w};
#pragma unroll
      for (int k = 0; k < 4; ++k) mx = __hmax2(mx, __habs2(*reinterpret_cast<const __nv_bfloat162*>(&w[k])));
    }
    float m = fmaxf(__low2float(mx), __high2float(mx));
#pragma unroll
    for (int o = 1; o < kT; o *= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    const int e = m > 0.f ? max(exp_of(m), -100) : 14;
    const float mul = pow2i(14 - e);
#pragma unroll
    for (int i = 0; i < kU; ++i) {
      const int cu = sub + kT * i;
      uint32_t w[4] = {u[i].x, u[i].y, u[i].z, u[i].w};
#pragma unroll
      for (int k = 0; k < 4; ++k)
        w[k] = pack_f16x2(__uint_as_float(w[k] << 16) * mul, __uint_as_float(w[k] & 0xffff0000u) * mul);
      *reinterpret_cast<uint4*>(sQ + (cu / 8) * L::kQChunk + swz(row, cu % 8)) = make_uint4(w[0], w[1], w[2], w[3]);
    }
    if (sub == 0) sQm[row] = pow2i(e - 14);
  };
  int q_slot = 0;   // early Q: pieces with pages so far, mod 2
  if constexpr (kEarlyQ) issue_q(first_with_pages(begin_req), 0);

  for (int req = begin_req; req <= end_req; ++req) {
    const int sk = seqlens[req];
    const int nblk = (sk + kPage - 1) / kPage;
    const int b0 = req == begin_req ? begin_blk : 0;
    const int b1 = req == end_req ? end_blk : nblk;

    // Q rows -> shared memory (zeros past the last row): kChunks chunks of [kN rows x 64 ch], 128-byte swizzle.
    if constexpr (kEarlyQ) {
      if (b0 < b1) {
        cp_async_wait_all();         // this thread's copies of the piece's Q landed
        sm90::fence_proxy_async();   // ... and are read by wgmma (async proxy) after the barrier
      }
      sm90::bar_sync(1, 128);   // the previous request's reads of red are done; every thread's Q copies landed
    } else {
      sm90::bar_sync(1, 128);   // the previous request's reads of red are done
#pragma unroll 1
      for (int u = tid; u < kN * 72; u += 128) {
        const int r = u / 72, cu = u % 72;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r < rows) {
          const int s = r / hpk, head = kvh * hpk + r % hpk;
          v = __ldg(reinterpret_cast<const uint4*>(q + req * q_sb + s * q_ss + head * q_sh) + cu);
        }
        *reinterpret_cast<uint4*>(sQ + (cu / 8) * L::kQChunk + swz(r, cu % 8)) = v;
      }
      sm90::fence_proxy_async();
      sm90::bar_sync(1, 128);
    }
    float qm[kJ][2];   // f16 path: 2^(e_r - 14) of this thread's rows
    if constexpr (kF16) {
      if (b0 < b1) {
        convert_q();
        sm90::fence_proxy_async();   // generic writes, read by wgmma (async proxy)
        sm90::bar_sync(1, 128);
#pragma unroll
        for (int j = 0; j < kJ; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) qm[j][e] = sQm[8 * j + 2 * t + e];
      }
    }

    float o[8][kN / 2];
    // f16 path: O^T rows of group g (m64 blocks 2g, 2g + 1) are kept in units of 2^(M_g - 6); M_g (the largest
    // scale exponent of the group seen so far) only moves up, like the lazy softmax max.
    int Mg[4];
#pragma unroll
    for (int gi = 0; gi < 4; ++gi) Mg[gi] = -1000;
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

    for (int blk = b0; blk < b1; ++blk) {
      sm90::mbar_wait(&k_full[ks], kph);
      const uint32_t kst = sKa + ks * L::kKStage;
      float s[kN / 2];
      float csc[2][4];   // f16 path: this thread's two tokens' scales (x 2^(6 - M_g) once M_g is known)
      float gfac[4];     // f16 path: factor of group g's O^T for this tile's raise of M_g
      bool graise = false;
      if constexpr (kF16) {
        // S^T = sum_g scale[t, g] 2^(e_r - 14) S_g^T + S_rope^T: 4 f16 chains on the unscaled K (one per 128-channel
        // group) and the rope's bf16 chain, folded in fp32.
        float sg[4][kN / 2], sr[kN / 2];
        const uint64_t dk0 = sm90::make_desc_sw128(kst, 16, 1024), dq0 = sm90::make_desc_sw128(sQa, 16, 1024);
        sm90::wgmma_fence();
#pragma unroll
        for (int gi = 0; gi < 4; ++gi)
#pragma unroll
          for (int cc = 0; cc < 2; ++cc)
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              const int c = 2 * gi + cc;
              mma<kN, 0, true>(sg[gi], dk0 + ((c * kChunkBytes + k * 32) >> 4),
                               dq0 + ((c * L::kQChunk + k * 32) >> 4), (cc | k) != 0);
            }
#pragma unroll
        for (int k = 0; k < 4; ++k)
          mma<kN, 0, false>(sr, dk0 + ((8 * kChunkBytes + k * 32) >> 4), dq0 + ((8 * L::kQChunk + k * 32) >> 4),
                            k != 0);
        sm90::wgmma_commit();
        // Under the products: the scales of this thread's tokens (warp * 16 + g, + 8) and the tile's max per group.
#pragma unroll
        for (int a = 0; a < 2; ++a) {
          const float4 c = *reinterpret_cast<const float4*>(sScale + (ks * 64 + warp * 16 + g + 8 * a) * 4);
          csc[a][0] = c.x; csc[a][1] = c.y; csc[a][2] = c.z; csc[a][3] = c.w;
        }
        float gm[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int w = 0; w < 8; ++w) {
          const float4 c = *reinterpret_cast<const float4*>(sGmax + (ks * 8 + w) * 4);
          gm[0] = fmaxf(gm[0], c.x); gm[1] = fmaxf(gm[1], c.y); gm[2] = fmaxf(gm[2], c.z); gm[3] = fmaxf(gm[3], c.w);
        }
#pragma unroll
        for (int gi = 0; gi < 4; ++gi) {
          const int mt = max(exp_of(gm[gi]), -120);   // same in every thread
          gfac[gi] = 1.f;
          if (mt > Mg[gi]) {
            gfac[gi] = pow2i(Mg[gi] - mt);
            Mg[gi] = mt;
            graise = true;
          }
        }
        sm90::wgmma_wait<0>();
#pragma unroll
        for (int gi = 0; gi < 4; ++gi) sm90::fence_regs(sg[gi]);
        sm90::fence_regs(sr);
#pragma unroll
        for (int j = 0; j < kJ; ++j)
#pragma unroll
          for (int a = 0; a < 2; ++a)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int i = 4 * j + 2 * a + e;
              const float lat = fmaf(sg[0][i], csc[a][0], fmaf(sg[1][i], csc[a][1],
                                     fmaf(sg[2][i], csc[a][2], sg[3][i] * csc[a][3])));
              s[i] = fmaf(lat, qm[j][e], sr[i]);
            }
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
          for (int gi = 0; gi < 4; ++gi) csc[a][gi] *= pow2i(6 - Mg[gi]);
      } else {
        const uint64_t dk0 = sm90::make_desc_sw128(kst, 16, 1024), dq0 = sm90::make_desc_sw128(sQa, 16, 1024);
        sm90::wgmma_fence();
#pragma unroll
        for (int c = 0; c < 9; ++c) {
#pragma unroll
          for (int k = 0; k < 4; ++k)
            mma<kN, 0>(s, dk0 + ((c * kChunkBytes + k * 32) >> 4), dq0 + ((c * L::kQChunk + k * 32) >> 4),
                       (c | k) != 0);
        }
        sm90::wgmma_commit();
        sm90::wgmma_wait<0>();
        sm90::fence_regs(s);
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
      sm90::bar_sync(2, 128);
      if constexpr (kEarlyQ && !kQLate) {
        // every warp's S^T of the piece's last tile is done: sQ may take the next piece's Q
        if (blk == b1 - 1) issue_q(first_with_pages(req + 1), q_slot ^ 1);
      }
      float scl[kJ][2];
      bool any_up = false;
#pragma unroll
      for (int j = 0; j < kJ; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int r = 8 * j + 2 * t + e;
          const float v = fmaxf(fmaxf(red[r], red[kN + r]), fmaxf(red[2 * kN + r], red[3 * kN + r]));
          // Lazy rescaling: the running max moves only when the tile's max exceeds it by more than kSlack (log2
          // units), so P <= 2^kSlack and O is rarely rescaled; out and lse use the same max, so the result is
          // exact. (m = -inf: any finite max moves it.)
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
      // P^T -> shared memory: [kN rows x 64 tokens], 128-byte swizzle (the previous P V finished reading it:
      // every consumer thread waited for it at the end of the previous tile).
      if constexpr (kF16) {
        // Four f16 copies, group g's = P^T[t, r] scale[t, g] 2^(6 - M_g) <= 2^15 (P <= 2^kSlack, scale < 2^(M_g+1)).
        // stmatrix .trans: the accumulator fragment of 8 tokens x 8 rows (j, a) is stored as 8 rows of P^T; lane
        // L gives the address of row L % 8 of matrix L / 8 = 2 j + a.
        static_assert(kN == 16, "the f16 path's P^T store is written for 16 rows");
        const uint32_t paddr = sPa + swz(8 * (lane / 16) + lane % 8, 2 * warp + (lane / 8) % 2);
#pragma unroll
        for (int gi = 0; gi < 4; ++gi) {
          uint32_t pr[4];
#pragma unroll
          for (int mtx = 0; mtx < 4; ++mtx) {
            const int j = mtx / 2, a = mtx % 2;
            pr[mtx] = pack_f16x2(s[4 * j + 2 * a] * csc[a][gi], s[4 * j + 2 * a + 1] * csc[a][gi]);
          }
          stmatrix_x4_trans(paddr + gi * kN * 128, pr[0], pr[1], pr[2], pr[3]);
        }
        if (__any_sync(0xffffffffu, any_up) || graise) {
#pragma unroll
          for (int mb = 0; mb < 8; ++mb)
#pragma unroll
            for (int j = 0; j < kJ; ++j)
#pragma unroll
              for (int a = 0; a < 2; ++a)
#pragma unroll
                for (int e = 0; e < 2; ++e) o[mb][4 * j + 2 * a + e] *= scl[j][e] * gfac[mb / 2];
        }
      } else {
#pragma unroll
        for (int j = 0; j < kJ; ++j)
#pragma unroll
          for (int a = 0; a < 2; ++a)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int r = 8 * j + 2 * t + e, tok = warp * 16 + g + 8 * a;
              *reinterpret_cast<T*>(sP + swz(r, tok / 8) + 2 * (tok % 8)) = __float2bfloat16_rn(s[4 * j + 2 * a + e]);
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
      }
      sm90::fence_proxy_async();
      sm90::bar_sync(3, 128);   // P^T complete (and every thread is done with red)
#pragma unroll
      for (int mb = 0; mb < 8; ++mb) sm90::fence_regs(o[mb]);
      sm90::wgmma_fence();
#pragma unroll
      for (int mb = 0; mb < (DEEPSTACK_MLA_FP8_ABL == 2 ? 0 : 8); ++mb) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const uint64_t da = sm90::make_desc_sw128(kst + mb * kChunkBytes + k * 16 * 128, kChunkBytes, 1024);
          const uint64_t db = sm90::make_desc_sw128(sPa + (kF16 ? (mb / 2) * kN * 128 : 0) + k * 32, 16, 1024);
          mma<kN, 1, kF16>(o[mb], da, db, 1);
        }
      }
      sm90::wgmma_commit();
      if constexpr (kEarlyQ && kQLate) {
        if (blk == b1 - 1) issue_q(first_with_pages(req + 1), q_slot ^ 1);   // under the last P V
      }
      // Release the stage now rather than after the next QK^T: with two stages, the dequant warps then get a
      // whole tile's time to fill the other one (measured: as fast as overlapping P V with the next QK^T).
      sm90::wgmma_wait<0>();
#pragma unroll
      for (int mb = 0; mb < 8; ++mb) sm90::fence_regs(o[mb]);
      sm90::mbar_arrive(&k_empty[ks]);
      ks ^= 1;
      kph ^= ks == 0;
    }

    // ---- finish this request: row sums over the 8 lanes of a column and the 4 warps, then out/lse or partials ----
    const int* ns = num_splits + req;
    if constexpr (kEarlyQ) {
      if (b0 < b1) {
        ns = sSplits + 2 * q_slot;
        q_slot ^= 1;
      }
    }
    const int split = req == begin_req ? begin_split : ns[0];
    const bool single = ns[1] - ns[0] == 1;
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
    float gpost[4];   // f16 path: O^T group g is in units of 2^(M_g - 6)
#pragma unroll
    for (int gi = 0; gi < 4; ++gi) gpost[gi] = kF16 ? pow2i(Mg[gi] - 6) : 1.f;
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
            for (int a = 0; a < 2; ++a) dst[mb * 64 + 8 * a] = __float2bfloat16_rn(o[mb][4 * j + 2 * a + e] * (inv * gpost[mb / 2]));
        } else {
          float* dst = o_accum + ((static_cast<long long>(split) * h_kv + kvh) * rows + r) * kDV + warp * 16 + g;
#pragma unroll
          for (int mb = 0; mb < 8; ++mb)
#pragma unroll
            for (int a = 0; a < 2; ++a) dst[mb * 64 + 8 * a] = o[mb][4 * j + 2 * a + e] * (inv * gpost[mb / 2]);
        }
      }
  }
}

}  // namespace fp8small
}  // namespace mla
}  // namespace deepstack
