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
// Scheduling, split-KV partials and the empty-row conventions are those of mla_decode.cuh (same metadata, same
// combine kernel). Where the time goes: docs/mla.md.
#pragma once
#include "mla/mla_decode.cuh"

namespace deepstack {
namespace mla {
namespace fp8small {

// D[64 x N] (+)= A[64x16] (smem) * B[16 x N] (smem), bf16 in, fp32 accumulators.
template <int kTnspA>
__device__ __forceinline__ void mma_n16(float (&d)[8], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, %11, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(kTnspA));
}
template <int kTnspA>
__device__ __forceinline__ void mma_n32(float (&d)[16], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, %19, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(kTnspA));
}
template <int kN, int kTnspA>
__device__ __forceinline__ void mma(float (&d)[kN / 2], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  if constexpr (kN == 16) mma_n16<kTnspA>(d, desc_a, desc_b, accumulate);
  else mma_n32<kTnspA>(d, desc_a, desc_b, accumulate);
}

// Bulk copy (no tensor map) of `bytes` (multiple of 16) global -> shared, completion counted on `bar`.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;"
      ::"r"(sm90::smem_addr(dst)), "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(sm90::smem_addr(bar)),
        "l"(policy)
      : "memory");
}

template <int kN, int kTok>
struct Layout {
  static constexpr int kChunks = 9;
  static constexpr int kRawBytes = (kN == 16 ? 3 : 2) * 32 * kFp8TokenBytes;   // what fits next to the bf16 ring
  static constexpr int kStageBytes = kTok * kFp8TokenBytes;
  static constexpr int kRawStages = kRawBytes / kStageBytes;
  static constexpr int kQChunk = kN * 128;                // Q [kN rows x 64 ch], 128-byte swizzle
  static constexpr int kKStage = kChunks * kChunkBytes;   // one 64-token bf16 page
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kChunks * kQChunk;
  static constexpr int kP = kK + 2 * kKStage;             // P^T [kN rows x 64 tokens], 128-byte swizzle
  static constexpr int kRaw = kP + kN * 128;
  static constexpr int kRed = kRaw + kRawBytes;           // [4 warps][kN] floats
  static constexpr int kBars = kRed + 4 * kN * 4;         // raw_full[kRawStages], k_full[2], k_empty[2]
  static constexpr int kSplits = kBars + (kRawStages + 4) * 8;   // [2][2] int: early Q's num_splits pairs
  static constexpr int kBytes = kSplits + 4 * 4;
  static constexpr int kAlloc = kBytes + 1024;
  static_assert(kK % 1024 == 0 && kP % 1024 == 0, "swizzled tiles need 1024-byte alignment");
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
    const uint8_t* __restrict__ kcache, int h_q, int h_kv, int s_q, int rows, int causal, int bt_stride,
    long long q_sb, long long q_ss, long long q_sh, long long tok_stride, float scale_log2) {
  static_assert(kN == 16 || kN == 32, "16 or 32 q rows per CTA");
  static_assert(kTok == 16 || kTok == 32, "raw stages of 16 or 32 tokens");
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

  const int tid = threadIdx.x;
  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < kR; ++s) sm90::mbar_init(&raw_full[s], 1);
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      sm90::mbar_init(&k_full[s], 256);
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
    auto issue = [&](const W& w, int s) {   // warp 0
      const int valid = w.valid();
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
            v[part][p] = *(reinterpret_cast<const uint4*>(raw + tok * kFp8TokenBytes) + lane);
            sc[part][p] = *(reinterpret_cast<const float*>(raw + tok * kFp8TokenBytes + 512) + lane / 8);
          }
        }
        rope[part] = make_uint4(0, 0, 0, 0);
        if (rtok < valid) rope[part] = *(reinterpret_cast<const uint4*>(raw + rtok * kFp8TokenBytes + 528) + runit);
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
#pragma unroll
      for (int part = 0; part < kParts; ++part) {
#pragma unroll
        for (int p = 0; p < kTok / 8; ++p) {
          // Lanes of odd chunks store their high unit first: each quarter warp's 16-byte stores then hit 8
          // different bank groups (no conflicts).
          const int r = part * kTok + p * 8 + dwarp;
          uint4 lo, hi;
          dequant16_bf16(v[part][p], sc[part][p], lo, hi);   // zeros past the valid tokens
          uint8_t* chunk = dst + (lane / 4) * kChunkBytes;
          *reinterpret_cast<uint4*>(chunk + swz(r, 2 * (lane % 4) + odd)) = odd ? hi : lo;
          *reinterpret_cast<uint4*>(chunk + swz(r, 2 * (lane % 4) + 1 - odd)) = odd ? lo : hi;
        }
        if (rtok < kTok)
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

    for (int blk = b0; blk < b1; ++blk) {
      sm90::mbar_wait(&k_full[ks], kph);
      const uint32_t kst = sKa + ks * L::kKStage;
      float s[kN / 2];
      {
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
      }
      sm90::wgmma_wait<0>();
      sm90::fence_regs(s);

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
      sm90::fence_proxy_async();
      sm90::bar_sync(3, 128);   // P^T complete (and every thread is done with red)
#pragma unroll
      for (int mb = 0; mb < 8; ++mb) sm90::fence_regs(o[mb]);
      sm90::wgmma_fence();
#pragma unroll
      for (int mb = 0; mb < 8; ++mb) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const uint64_t da = sm90::make_desc_sw128(kst + mb * kChunkBytes + k * 16 * 128, kChunkBytes, 1024);
          const uint64_t db = sm90::make_desc_sw128(sPa + k * 32, 16, 1024);
          mma<kN, 1>(o[mb], da, db, 1);
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
            for (int a = 0; a < 2; ++a) dst[mb * 64 + 8 * a] = __float2bfloat16_rn(o[mb][4 * j + 2 * a + e] * inv);
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

}  // namespace fp8small
}  // namespace mla
}  // namespace deepstack
