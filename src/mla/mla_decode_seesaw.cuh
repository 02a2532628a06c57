// MLA decode over a paged bf16/fp16 KV cache, sm_90a: the "seesaw" schedule (FlashMLA's idea for the compute-bound
// case, our own arrangement). Same work split, metadata, partials, combine kernel and empty-row conventions as
// mla_decode.cuh; only the consumer schedule differs.
//
// The overlap kernel (mla_decode_overlap.cuh) leaves every softmax to WG0 and hides it behind WG1's 512-cycle half of
// P V, which is shorter than the softmax. Here both consumer warpgroups compute S and softmax, for alternate tiles:
// tiles go in pairs (a, b) within a request, a in stage 0, b in stage 1. WG0 computes S_a = Q K_a^T and softmax(a),
// WG1 S_b and softmax(b); each warpgroup keeps its half of O (WG0 columns 0-255, WG1 256-511) and applies both P's
// to it. The running max goes from one warpgroup to the other through shared memory, so the result is the online
// softmax of the tiles in order:
//   WG0: S_a; softmax(a) -> m_a, scale_a, P_a (registers and smem); O_L = O_L scale_a + P_a V_aL;
//        [P_b, m_b, scale_b from WG1] O_L = O_L scale_b + P_b V_bL;  then the next pair's S_a
//   WG1: S_b (issued after S_a); [m_a, scale_a, P_a from WG0] O_R = O_R scale_a + P_a V_aR; softmax(b) -> P_b;
//        O_R = O_R scale_b + P_b V_bR
// The tensor pipe sees S_a, S_b, P_a V_aL, P_a V_aR, P_b V_bL, P_b V_bR, S_a', ...: softmax(a) runs under S_b (1152
// cycles at 64 rows) and softmax(b) under the two P_a V halves (1024), so neither leaves the pipe idle.
// Lazy rescaling as in the overlap kernel (scale is 1 unless a row's max grew by more than kLazyMax).
// Shared memory: P of a tile lives in its stage's rope chunk (chunk 8) once S has read it, so two P tiles cost no
// extra space (d = 512 has no rope chunk: two separate P buffers). Each stage is released in two groups: chunks 0-3
// (plus stage 1's P) by WG0 after its P V reads, chunks 4-7 (plus stage 0's P) by WG1. S reads chunks 0-3 (and the
// stage's other early chunk) first, so a refill has ~1500 cycles of slack.
// kCluster = 2: the two row-block CTAs of a (part, KV head) load each page once (multicast; see mla_decode.cuh).
#pragma once
#include <type_traits>

#include "mla/mla_decode_overlap.cuh"

namespace deepstack {
namespace mla {

template <int kDQK>
struct SeesawLayout {
  static constexpr int kChunks = kDQK / 64;
  static constexpr bool kPInRope = kChunks == 9;                     // P of a tile in its stage's rope chunk
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kChunks * kChunkBytes;              // 2 stages
  static constexpr int kP = kK + 2 * kChunks * kChunkBytes;          // d = 512 only: 2 P buffers
  static constexpr int kM = kP + (kPInRope ? 0 : 2 * kChunkBytes);   // [2][64] fp32: running max after the stage's tile
  static constexpr int kScale = kM + 2 * 64 * 4;                     // [2][64] fp32: that tile's rescale factor
  static constexpr int kFinal = kScale + 2 * 64 * 4;                 // [64] fp32: 1 / row sum at the end
  static constexpr int kL = kFinal + 64 * 4;                         // [256] fp32: WG1's partial row sums
  static constexpr int kBars = kL + 256 * 4;   // full[2][kChunks], empty_l[2], empty_r[2], q_full, q_free
  static constexpr int kSplits = kBars + (2 * kChunks + 6) * 8;      // [2][2] int (early Q, see mla_decode.cuh)
  static constexpr int kBytes = kSplits + 4 * 4;
  static constexpr int kAlloc = kBytes + 1024;                       // slack to align the base to 1024 bytes
};

// S = Q K^T steps [kI0, kI1) of the chunk order qk_chunk (0-3, the rope chunk, 4-7), each chunk issued once its TMA
// box has landed, one commit group per chunk (see mla_decode_overlap.cuh for why).
template <typename T, int kChunks, int kI0, int kI1>
__device__ __forceinline__ void seesaw_issue_s(float (&s)[32], uint64_t* full_st, int ph, uint64_t dq0, uint64_t dk0) {
#pragma unroll
  for (int i = kI0; i < kI1; ++i) {
    const int c = qk_chunk<kChunks>(i);
    sm90::mbar_wait(&full_st[c], ph);
    sm90::fence_regs(s);
    sm90::wgmma_fence();
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t off = (c * kChunkBytes + k * 32) >> 4;
      Ops<T>::template qk<0>(s, dq0 + off, dk0 + off, (i | k) != 0);
    }
    sm90::wgmma_commit();
  }
}

// P (A-operand fragments of rows row0 and row0 + 8) into a 128-byte-swizzled [64 x 64] tile. row0 and t go through an
// opaque copy so that the 16 addresses are recomputed here (hoisted out of the page loop they were spilled).
__device__ __forceinline__ void seesaw_store_p(uint8_t* sp, const uint32_t (&pa)[4][4], int row0, int t) {
  asm volatile("mov.b32 %0, %0;" : "+r"(row0));
  asm volatile("mov.b32 %0, %0;" : "+r"(t));
  uint8_t* base = sp + row0 * 128 + 4 * t;   // row0 + 8 has the same swizzle phase, 1024 bytes further
  const int x = row0 & 7;
#pragma unroll
  for (int kb = 0; kb < 4; ++kb) {
    // column 16 kb + 2 t (+8): 16-byte unit 2 kb (+1), byte 4 t inside it
    const int u0 = ((2 * kb) ^ x) << 4, u1 = ((2 * kb + 1) ^ x) << 4;
    *reinterpret_cast<uint32_t*>(base + u0) = pa[kb][0];
    *reinterpret_cast<uint32_t*>(base + 1024 + u0) = pa[kb][1];
    *reinterpret_cast<uint32_t*>(base + u1) = pa[kb][2];
    *reinterpret_cast<uint32_t*>(base + 1024 + u1) = pa[kb][3];
  }
}

// Cache slots past the sequence may hold anything (NaN): zero the V rows of the last page (0 x NaN = NaN) before a
// P V reads them; run by the 128 threads of the warpgroup that computed the tile's S (after S is done).
__device__ __forceinline__ void seesaw_zero_tail(uint8_t* kt, int valid, int wtid) {
  if (valid < kPage) {
    for (int u = wtid; u < (kPage - valid) * 64; u += 128) {
      const int r = valid + u / 64, cu = u % 64;
      *reinterpret_cast<uint4*>(kt + (cu / 8) * kChunkBytes + swz(r, cu % 8)) = make_uint4(0, 0, 0, 0);
    }
  }
}

template <typename T, int kDQK, int kCluster = 1>
__global__ void __launch_bounds__(384, 1) mla_decode_seesaw_kernel(
    const T* __restrict__ q, T* __restrict__ out, float* __restrict__ lse, float* __restrict__ o_accum,
    float* __restrict__ lse_accum, const int* __restrict__ block_table, const int* __restrict__ seqlens,
    const int* __restrict__ sched, const int* __restrict__ num_splits, const uint8_t* __restrict__ unused_fp8,
    const CUtensorMap* __restrict__ kmap,
    int h_q, int h_kv, int s_q, int rows, int causal, int bt_stride,
    long long q_sb, long long q_ss, long long q_sh, long long unused_stride, float scale_log2) {
  using L = SeesawLayout<kDQK>;
  constexpr int kChunks = L::kChunks;
  static_assert(kDQK == 576 || kDQK == 512, "head dim 576 (512 latent + 64 rope) or 512");
  static_assert(kCluster == 1 || kCluster == 2, "row-block pairs (see mla_decode.cuh)");
  // Named barriers (one warpgroup arrives, the other syncs; 4 is finish_request's kBarFinal):
  constexpr int kBarQ = 1;        // Q loaded / sQ free (both sync)
  constexpr int kBarSIssued = 2;  // WG0 has issued S_a: WG1's S_b queues behind it
  constexpr int kBarA = 3;        // m_a, scale_a and P_a (and tile a's zeroed V rows) are in shared memory
  constexpr int kBarB = 5;        // m_b, scale_b and P_b (and tile b's zeroed V rows) are in shared memory
  constexpr int kBarL = 6;        // WG1's row sums are in shared memory (end of a request)
  // WG1 issues P_b V_bR only after WG0 has issued P_b V_bL (named barrier), so the half that WG0 waits for before
  // its next S_a (the C7514 rule below) is the earlier one in the tensor pipe and P_b V_bR covers the latency of that
  // wait and issue; before, WG1 often issued first and the pipe idled meanwhile (H200, 2026-12-01: 1.4-1.9% fewer SM
  // cycles at 128 and 256 rows). -DDEEPSTACK_MLA_SEESAW_PB_ORDER=0 restores the free order.
#ifndef DEEPSTACK_MLA_SEESAW_PB_ORDER
#define DEEPSTACK_MLA_SEESAW_PB_ORDER 1
#endif
  constexpr bool kPbOrder = DEEPSTACK_MLA_SEESAW_PB_ORDER != 0;
  constexpr int kBarPbIssued = 7;

  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (sm90::smem_addr(smem_raw) & 1023u)) & 1023u);
  uint8_t* sQ = smem + L::kQ;
  uint8_t* sK = smem + L::kK;
  float* sM = reinterpret_cast<float*>(smem + L::kM);
  float* sScale = reinterpret_cast<float*>(smem + L::kScale);
  float* sFinal = reinterpret_cast<float*>(smem + L::kFinal);
  float* sL = reinterpret_cast<float*>(smem + L::kL);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + L::kBars);   // [stage * kChunks + chunk]
  uint64_t* empty_l = full + 2 * kChunks;   // per stage: chunks 0-3 (+ stage 1's P), WG0 after its P V
  uint64_t* empty_r = empty_l + 2;          // per stage: chunks 4-7 (+ stage 0's P), WG1 after its P V
  uint64_t* q_full = empty_r + 2;           // early Q (mla_decode.cuh): the piece's Q tile landed
  uint64_t* q_free = q_full + 1;            // early Q: both warpgroups' last Q K^T of the piece are done
  int* sSplits = reinterpret_cast<int*>(smem + L::kSplits);
  // P of the tile in stage st: the stage's rope chunk (d = 576) or a separate buffer (d = 512).
  auto pbuf = [&](int st) -> uint8_t* {
    return L::kPInRope ? sK + (st * kChunks + 8) * kChunkBytes : smem + L::kP + st * kChunkBytes;
  };

  const int tid = threadIdx.x;
  const int wg = tid / 128;
  if constexpr (kEarlyQ) {
    if (tid == 0) {   // made visible by init_half_release_ring's fence and CTA / cluster sync
      sm90::mbar_init(q_full, kQLoaderThreads);
      sm90::mbar_init(q_free, 256);
    }
  }
  init_half_release_ring<kCluster, kChunks>(full, empty_l, empty_r);

  const int* meta = sched + blockIdx.x * kSchedInts;
  const int begin_req = meta[0], end_req = meta[2];
  const int kvh = blockIdx.y;
  const int rb = blockIdx.z;

  if (wg == 2) {
    // ------------------------------------------------ producer ------------------------------------------------
    sm90::regs_decrease<40>();
    if (tid != 256) {
      if constexpr (kEarlyQ) {
        if (tid >= 384 - kQLoaderThreads)
          early_q_loader<T, kChunks>(sQ, sSplits, q_full, q_free, q, seqlens, num_splits, meta,
                                     tid - (384 - kQLoaderThreads), rb, rows, h_q / h_kv, kvh, q_sb, q_ss, q_sh);
      }
      return;
    }
    sm90::fence_tensormap_acquire(kmap);
    sm90::prefetch_tensor_map(kmap);
    // Pages are streamed evict-first, unless the part's rows span more than one cluster (256 rows: two pairs read
    // every page): then evict-normal, so the other pair's read of a page still finds it in L2 (H200, 2026-12-01:
    // 2% faster at 256 rows, 1-2% slower at 128). DEEPSTACK_MLA_SEESAW_PAGE_POLICY = 0 / 1 forces first / normal.
#ifndef DEEPSTACK_MLA_SEESAW_PAGE_POLICY
#define DEEPSTACK_MLA_SEESAW_PAGE_POLICY -1
#endif
    const bool shared_pages = DEEPSTACK_MLA_SEESAW_PAGE_POLICY < 0 ? rows > 64 * kCluster
                                                                    : DEEPSTACK_MLA_SEESAW_PAGE_POLICY == 1;
    const uint64_t policy = shared_pages ? sm90::evict_normal_policy() : sm90::evict_first_policy();
    const int rank = kCluster > 1 ? static_cast<int>(sm90::cluster_ctarank()) : 0;
    auto load_box = [&](uint8_t* dst, uint64_t* fb, int c, int page) {
      sm90::mbar_arrive_expect_tx(&fb[c], kChunkBytes);
      load_page_box<kCluster>(dst + c * kChunkBytes, kmap, &fb[c], c, kvh, page, rank, policy);
    };
    int ph0 = 0, ph1 = 0;   // phase of each stage (tiles alternate stages within a request, starting at stage 0)
    // early Q: the range re-read where used and the page loop not unrolled (else spills under the 40-register cap)
    auto range = [&](int i, int v) { return kEarlyQ ? ld_nc_opaque(meta + i) : v; };
    for (int req = range(0, begin_req); req <= range(2, end_req); ++req) {
      const int sk = seqlens[req];
      const int nblk = (sk + kPage - 1) / kPage;
      const int b0 = req == range(0, begin_req) ? meta[1] : 0;
      const int b1 = req == range(2, end_req) ? meta[3] : nblk;
      DEEPSTACK_MLA_EQ_UNROLL_1
      for (int blk = b0; blk < b1; ++blk) {
        const int st = (blk - b0) & 1;
        const int ph = st ? ph1 : ph0;
        const int page = block_table[static_cast<long long>(req) * bt_stride + blk];
        uint8_t* dst = sK + st * kChunks * kChunkBytes;
        uint64_t* fb = full + st * kChunks;
        sm90::mbar_wait(&empty_l[st], ph ^ 1);
#pragma unroll
        for (int c = 0; c < 4; ++c) load_box(dst, fb, c, page);
        if (kChunks == 9 && st == 1) load_box(dst, fb, 8, page);
        sm90::mbar_wait(&empty_r[st], ph ^ 1);
#pragma unroll
        for (int c = 4; c < 8; ++c) load_box(dst, fb, c, page);
        if (kChunks == 9 && st == 0) load_box(dst, fb, 8, page);
        if (st) ph1 ^= 1;
        else ph0 ^= 1;
      }
    }
    if constexpr (kCluster > 1) {
      // Stay until every CTA of the cluster has released both stages (see mla_decode.cuh).
      sm90::mbar_wait(&empty_l[0], ph0 ^ 1);
      sm90::mbar_wait(&empty_r[0], ph0 ^ 1);
      sm90::mbar_wait(&empty_l[1], ph1 ^ 1);
      sm90::mbar_wait(&empty_r[1], ph1 ^ 1);
    }
    return;
  }

  // -------------------------------------------------- consumers --------------------------------------------------
  sm90::regs_increase<232>();
  const int wtid = tid % 128, warp = wtid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int row0 = warp * 16 + g, row1 = row0 + 8;           // tile rows of this thread's accumulator
  const int grow0 = rb * 64 + row0, grow1 = rb * 64 + row1;   // q rows (s * hpk + local head)
  const int hpk = h_q / h_kv;
  const float kInf = __int_as_float(0x7f800000);
  const uint32_t sQa = sm90::smem_addr(sQ), sKa = sm90::smem_addr(sK);
  const uint32_t sP0 = sm90::smem_addr(pbuf(0)), sP1 = sm90::smem_addr(pbuf(1));
  constexpr uint32_t kStageBytes = kChunks * kChunkBytes;
  int ph0 = 0, ph1 = 0;
  int q_phase = 0;   // early Q: pieces with pages so far, mod 2

  // The part's range is read again where it is used (kept live across the page loops it was spilled).
  for (int req = begin_req; req <= ld_nc_opaque(meta + 2); ++req) {
    const int sk = seqlens[req];
    const int nblk = (sk + kPage - 1) / kPage;
    const int b0 = req == ld_nc_opaque(meta) ? ld_nc_opaque(meta + 1) : 0;
    const int b1 = req == ld_nc_opaque(meta + 2) ? ld_nc_opaque(meta + 3) : nblk;

    sm90::bar_sync(kBarQ, 256);   // everyone is done with the previous request's sQ / sFinal / sL
    if constexpr (kEarlyQ) {
      if (b0 < b1) {
        sm90::mbar_wait(q_full, q_phase);   // loaded by producer warps 1-3 (cp.async)
        sm90::fence_proxy_async();          // ... and read by wgmma (async proxy) next
      }
    } else {
      load_q_tile_batched<T, kChunks>(sQ, q, tid, rb, rows, hpk, kvh, req, q_sb, q_ss, q_sh);
      sm90::fence_proxy_async();
      sm90::bar_sync(kBarQ, 256);
    }

    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    float m0 = -kInf, m1 = -kInf, l0 = 0.f, l1 = 0.f;   // l: this warpgroup's share of the row sums
    // Causal: query s sees keys [0, sk - s_q + s + 1).
    const int lim0 = (causal && grow0 < rows) ? sk - s_q + grow0 / hpk + 1 : sk;
    const int lim1 = (causal && grow1 < rows) ? sk - s_q + grow1 / hpk + 1 : sk;
    const bool odd = (b1 - b0) & 1;   // a last tile a without a tile b

    // Softmax of one tile's S (log2 units, lazy max): updates m, l; P packed as the P V A operand.
    auto softmax = [&](float (&s)[32], int blk, float& sc0, float& sc1, uint32_t (&pa)[4][4]) {
      float mx0 = m0, mx1 = m1;
      mask_scale_max(s, blk * kPage + 2 * t, lim0, lim1, scale_log2, mx0, mx1);
      sc0 = mx0 > m0 + kLazyMax ? exp2f(m0 - mx0) : 1.f;
      sc1 = mx1 > m1 + kLazyMax ? exp2f(m1 - mx1) : 1.f;
      if (sc0 != 1.f) m0 = mx0;
      if (sc1 != 1.f) m1 = mx1;
      const float base0 = m0 == -kInf ? 0.f : m0, base1 = m1 == -kInf ? 0.f : m1;
      exp_sum_pack<T>(s, base0, base1, sc0, sc1, l0, l1, pa);
    };

    if (wg == 0) {
      // ------------------------------------ WG0: tiles a, O[:, 0:256] ------------------------------------
      auto pair = [&](int blk, auto b_tag) {
        constexpr bool kB = decltype(b_tag)::value;
        const uint64_t dq0 = opaque_u64(sm90::make_desc_sw128(sQa, 16, 1024));
        const uint64_t dk0 = opaque_u64(sm90::make_desc_sw128(sKa, 16, 1024));
        float s[32];
        seesaw_issue_s<T, kChunks, 0, kChunks>(s, full, ph0, dq0, dk0);
        sm90::bar_arrive(kBarSIssued, 256);
        sm90::wgmma_wait<0>();
        sm90::fence_regs(s);
        if constexpr (kEarlyQ) {
          if (blk + 2 >= b1) sm90::mbar_arrive(q_free);   // last S_a of the piece: the next Q may load
        }

        float sc0, sc1;
        uint32_t pa[4][4];
        softmax(s, blk, sc0, sc1, pa);
        seesaw_zero_tail(sK, sk - blk * kPage, wtid);
        seesaw_store_p(pbuf(0), pa, row0, t);
        if (t == 0) {
          sM[row0] = m0; sM[row1] = m1;
          sScale[row0] = sc0; sScale[row1] = sc1;
        }
        sm90::fence_proxy_async();
        sm90::bar_arrive(kBarA, 256);

        rescale_rows(o, sc0, sc1);
        sm90::fence_regs(o);                       // keep the rescale before the fence (else ptxas adds one)
        sm90::wgmma_fence();
        pv_half_rs<T>(o, pa, sKa);
        sm90::wgmma_commit();
        sm90::wgmma_wait<0>();
        sm90::fence_regs(o);
        release_stage<kCluster>(&empty_l[0], lane);   // V_a[:, 0:256] read
        if constexpr (kB) {
          sm90::bar_sync(kBarB, 256);
          const float tb0 = sScale[64 + row0], tb1 = sScale[64 + row1];
          m0 = sM[64 + row0];
          m1 = sM[64 + row1];
          l0 *= tb0;
          l1 *= tb1;
#pragma unroll
          for (int c = 0; c < 4; ++c) sm90::mbar_wait(&full[kChunks + c], ph1);   // complete (WG1 waited)
          rescale_rows(o, tb0, tb1);
          sm90::fence_regs(o);
          sm90::wgmma_fence();
          pv_half_ss<T>(o, sP1, sKa + kStageBytes);
          sm90::wgmma_commit();
          if constexpr (kPbOrder) sm90::bar_arrive(kBarPbIssued, 256);
          // Done before the next S_a is issued: a P V in flight across the loop's back edge made ptxas serialise
          // every wgmma (C7514). It costs no pipe time: WG1's P_b V_bR is queued behind this one by then.
          sm90::wgmma_wait<0>();
          sm90::fence_regs(o);
          release_stage<kCluster>(&empty_l[1], lane);   // V_b[:, 0:256] and P_b read
          ph1 ^= 1;
        }
        ph0 ^= 1;
      };
#pragma unroll 1
      for (int blk = b0; blk + 1 < b1; blk += 2) pair(blk, std::true_type{});
      if (odd) pair(b1 - 1, std::false_type{});
      sm90::bar_sync(kBarL, 256);                  // WG1's row sums
      l0 += sL[2 * wtid];
      l1 += sL[2 * wtid + 1];
    } else {
      // ------------------------------------ WG1: tiles b, O[:, 256:512] ------------------------------------
      bool pending = false;   // the previous pair's P_b V_bR is in flight (stage 1's chunks 4-7 not released)
      auto pair = [&](int blk, auto b_tag) {
        constexpr bool kB = decltype(b_tag)::value;
        sm90::wgmma_wait<0>();
        sm90::fence_regs(o);
        if (pending) release_stage<kCluster>(&empty_r[1], lane);
        if constexpr (kEarlyQ && !kB) sm90::mbar_arrive(q_free);   // a lone last tile a: no more S_b in this piece
        float s[32];
        sm90::bar_sync(kBarSIssued, 256);
        if constexpr (kB) {
          const uint64_t dq0 = opaque_u64(sm90::make_desc_sw128(sQa, 16, 1024));
          const uint64_t dk0 = opaque_u64(sm90::make_desc_sw128(sKa + kStageBytes, 16, 1024));
          seesaw_issue_s<T, kChunks, 0, kChunks>(s, full + kChunks, ph1, dq0, dk0);
        }
        sm90::bar_sync(kBarA, 256);
        const float ta0 = sScale[row0], ta1 = sScale[row1];
        m0 = sM[row0];
        m1 = sM[row1];
        l0 *= ta0;
        l1 *= ta1;
#pragma unroll
        for (int c = 4; c < 8; ++c) sm90::mbar_wait(&full[c], ph0);   // complete (WG0 waited)
        rescale_rows(o, ta0, ta1);
        sm90::fence_regs(o);
        sm90::wgmma_fence();
        pv_half_ss<T>(o, sP0, sKa + 4 * kChunkBytes);
        sm90::wgmma_commit();
        if constexpr (kB) {
          sm90::wgmma_wait<1>();                   // S_b done (P_a V_aR may still run)
          sm90::fence_regs(s);
          if constexpr (kEarlyQ) {
            if (blk + 2 >= b1) sm90::mbar_arrive(q_free);   // last S_b of the piece
          }
          float sc0, sc1;
          uint32_t pa[4][4];
          softmax(s, blk + 1, sc0, sc1, pa);
          seesaw_zero_tail(sK + kStageBytes, sk - (blk + 1) * kPage, wtid);
          seesaw_store_p(pbuf(1), pa, row0, t);
          if (t == 0) {
            sM[64 + row0] = m0; sM[64 + row1] = m1;
            sScale[64 + row0] = sc0; sScale[64 + row1] = sc1;
          }
          sm90::fence_proxy_async();
          sm90::bar_arrive(kBarB, 256);
          sm90::wgmma_wait<0>();
          sm90::fence_regs(o);
          release_stage<kCluster>(&empty_r[0], lane);   // V_a[:, 256:512] and P_a read
          rescale_rows(o, sc0, sc1);
          sm90::fence_regs(o);
          if constexpr (kPbOrder) sm90::bar_sync(kBarPbIssued, 256);
          sm90::wgmma_fence();
          pv_half_rs<T>(o, pa, sKa + kStageBytes + 4 * kChunkBytes);
          sm90::wgmma_commit();
          pending = true;
          ph1 ^= 1;
        } else {
          sm90::wgmma_wait<0>();
          sm90::fence_regs(o);
          release_stage<kCluster>(&empty_r[0], lane);
          pending = false;
        }
        ph0 ^= 1;
      };
#pragma unroll 1
      for (int blk = b0; blk + 1 < b1; blk += 2) pair(blk, std::true_type{});
      if (odd) pair(b1 - 1, std::false_type{});
      sm90::wgmma_wait<0>();
      sm90::fence_regs(o);
      if (pending) release_stage<kCluster>(&empty_r[1], lane);
      sL[2 * wtid] = l0;
      sL[2 * wtid + 1] = l1;
      sm90::bar_arrive(kBarL, 256);
    }

    // q rows recomputed from an opaque block index (kept live across the page loops they were spilled)
    int rbz;
    asm volatile("mov.u32 %0, %%ctaid.z;" : "=r"(rbz));
    const int* ns = num_splits + req;
    if constexpr (kEarlyQ) {
      if (b0 < b1) {
        ns = sSplits + 2 * q_phase;
        q_phase ^= 1;
      }
    }
    finish_request<T>(o, l0, l1, m0, m1, wg, t, row0, row1, rbz * 64 + row0, rbz * 64 + row1, req, ld_nc_opaque(meta),
                      ld_nc_opaque(meta + 4), ns, h_q, h_kv, s_q, rows, hpk, kvh, sFinal, out, lse, o_accum,
                      lse_accum);
  }
}

}  // namespace mla
}  // namespace deepstack
