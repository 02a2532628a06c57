// MLA decode over a paged bf16/fp16 KV cache, sm_90a: the general kernel's work split (mla_decode.cuh), rescheduled
// so that the tensor cores stay busy while WG0 runs the softmax. For the compute-bound configs (many q rows).
//
// In mla_decode.cuh WG0 computes S = Q K^T, waits for it, runs the softmax and only then do both warpgroups issue
// their P V halves: the softmax (and the wgmma drain / refill around it) leaves the tensor pipe idle for ~20% of
// every tile. Here, per tile i:
//   WG0: [S(i) ready] softmax(i) -> P(i) in registers; O[:, :256] += P(i) V(i)[:, :256] (A from registers), then
//        issue S(i+1) = Q K(i+1)^T right behind it; once P V is done, hand P(i) to WG1 through shared memory.
//   WG1: O[:, 256:] += P(i) V(i)[:, 256:], issued only after WG0 has issued S(i+1), so it queues behind S(i+1) and
//        runs while WG0 is busy with softmax(i+1).
// The tensor pipe sees P(i)V_L, S(i+1), P(i)V_R, P(i+1)V_L, S(i+2), ... with no softmax gap. WG1's half of a K tile is
// therefore released later (a QK^T later than before), so the ring releases a tile in two halves: per-chunk
// "full" barriers (one per 64-channel TMA box) and two "empty" barriers per stage, one for the chunks that only WG0
// reads last (V[:, :256] and the rope chunk), one for WG1's V[:, 256:]. S(i+2) consumes the late chunks last.
// Same metadata, output, split-KV partials, combine kernel and empty-row conventions as mla_decode.cuh. kCluster > 1:
// the row-block CTAs of a (part, KV head) form a cluster that loads each page once (multicast; mla_decode.cuh).
#pragma once
#include <type_traits>

#include "mla/mla_decode.cuh"

namespace deepstack {
namespace mla {

template <int kDQK>
struct OverlapLayout {
  static constexpr int kChunks = kDQK / 64;
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kChunks * kChunkBytes;          // 2 stages
  static constexpr int kP = kK + 2 * kChunks * kChunkBytes;
  static constexpr int kScale = kP + kChunkBytes;                 // 64 fp32: per-row rescale of the tile in sP
  static constexpr int kFinal = kScale + 64 * 4;                  // 64 fp32: 1 / row sum at the end
  static constexpr int kBars = kFinal + 64 * 4;                   // full[2][kChunks], empty_a[2], empty_b[2]
  static constexpr int kBytes = kBars + (2 * kChunks + 4) * 8;
  static constexpr int kAlloc = kBytes + 1024;                    // slack to align the base to 1024 bytes
};

// Chunk order of Q K^T: WG1's V chunks (4..7, released last) at the end.
template <int kChunks>
__device__ __forceinline__ constexpr int qk_chunk(int i) {
  return kChunks == 9 ? (i < 4 ? i : (i == 4 ? 8 : i - 1)) : i;
}
__device__ __forceinline__ constexpr bool late_chunk(int c) { return c >= 4 && c < 8; }

__device__ __forceinline__ uint64_t opaque_u64(uint64_t v) {
  asm volatile("mov.b64 %0, %0;" : "+l"(v));
  return v;
}

// Lazy rescaling: the running max of a row moves only when a tile's max exceeds it by more than kLazyMax (log2
// units), so P <= 2^kLazyMax and O is rarely rescaled; exact, since out and lse use the same max.
constexpr float kLazyMax = 8.f;

// O rows (g, g + 8) *= (sc0, sc1); skipped by the whole warp when no row of it moved its max (the common case).
__device__ __forceinline__ void rescale_rows(float (&o)[128], float sc0, float sc1) {
  if (__all_sync(0xffffffffu, sc0 == 1.f && sc1 == 1.f)) return;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    o[4 * j] *= sc0; o[4 * j + 1] *= sc0;
    o[4 * j + 2] *= sc1; o[4 * j + 3] *= sc1;
  }
}

// Barriers of a two-stage K ring whose stages are released in two halves (this kernel and the seesaw kernel): one
// "full" barrier per stage and 64-channel box (one TMA each) and, per stage, an "empty" barrier for each half (one
// arrival per consumer warp of every CTA in the cluster). Every CTA of a cluster waits until its peers' barriers are
// initialised before any remote use.
template <int kCluster, int kChunks>
__device__ __forceinline__ void init_half_release_ring(uint64_t* full, uint64_t* empty_a, uint64_t* empty_b) {
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < 2 * kChunks; ++i) sm90::mbar_init(&full[i], 1);
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      sm90::mbar_init(&empty_a[s], empty_count<kCluster>(128));
      sm90::mbar_init(&empty_b[s], empty_count<kCluster>(128));
    }
    sm90::fence_barrier_init();
  }
  if constexpr (kCluster > 1) sm90::cluster_sync();
  else __syncthreads();
}

template <typename T, int kDQK, int kCluster = 1>
__global__ void __launch_bounds__(384, 1) mla_decode_overlap_kernel(
    const T* __restrict__ q, T* __restrict__ out, float* __restrict__ lse, float* __restrict__ o_accum,
    float* __restrict__ lse_accum, const int* __restrict__ block_table, const int* __restrict__ seqlens,
    const int* __restrict__ sched, const int* __restrict__ num_splits, const uint8_t* __restrict__ unused_fp8,
    const CUtensorMap* __restrict__ kmap,
    int h_q, int h_kv, int s_q, int rows, int causal, int bt_stride,
    long long q_sb, long long q_ss, long long q_sh, long long unused_stride, float scale_log2) {
  using L = OverlapLayout<kDQK>;
  constexpr int kChunks = L::kChunks;
  static_assert(kDQK == 576 || kDQK == 512, "head dim 576 (512 latent + 64 rope) or 512");
  static_assert(kCluster == 1 || kCluster == 2, "row-block pairs (see mla_decode.cuh)");
  // Named barriers: 1 Q loaded / sQ free, 2 sP free (WG1 -> WG0), 3 sP ready (WG0 -> WG1), 4 final sums.
  constexpr int kBarQ = 1, kBarPFree = 2, kBarPReady = 3;   // kBarFinal = 4: finish_request

  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (sm90::smem_addr(smem_raw) & 1023u)) & 1023u);
  uint8_t* sQ = smem + L::kQ;
  uint8_t* sK = smem + L::kK;
  uint8_t* sP = smem + L::kP;
  float* sScale = reinterpret_cast<float*>(smem + L::kScale);
  float* sFinal = reinterpret_cast<float*>(smem + L::kFinal);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + L::kBars);   // [stage * kChunks + chunk]
  uint64_t* empty_a = full + 2 * kChunks;                            // chunks 0..3 (+ 8): WG0 after its P V
  uint64_t* empty_b = empty_a + 2;                                   // chunks 4..7: WG1 after its P V

  const int tid = threadIdx.x;
  const int wg = tid / 128;
  init_half_release_ring<kCluster, kChunks>(full, empty_a, empty_b);

  const int* meta = sched + blockIdx.x * kSchedInts;
  const int begin_req = meta[0], begin_blk = meta[1], end_req = meta[2], end_blk = meta[3], begin_split = meta[4];
  const int kvh = blockIdx.y;
  const int rb = blockIdx.z;

  if (wg == 2) {
    // ------------------------------------------------ producer ------------------------------------------------
    sm90::regs_decrease<40>();
    if (tid != 256) return;
    sm90::fence_tensormap_acquire(kmap);
    sm90::prefetch_tensor_map(kmap);
    const uint64_t policy = sm90::evict_first_policy();
    const int rank = kCluster > 1 ? static_cast<int>(sm90::cluster_ctarank()) : 0;
    auto load_box = [&](uint8_t* dst, uint64_t* fb, int c, int page) {
      sm90::mbar_arrive_expect_tx(&fb[c], kChunkBytes);
      load_page_box<kCluster>(dst + c * kChunkBytes, kmap, &fb[c], c, kvh, page, rank, policy);
    };
    int stage = 0, phase = 0;
    for (int req = begin_req; req <= end_req; ++req) {
      const int sk = seqlens[req];
      const int nblk = (sk + kPage - 1) / kPage;
      const int b0 = req == begin_req ? begin_blk : 0;
      const int b1 = req == end_req ? end_blk : nblk;
      for (int blk = b0; blk < b1; ++blk) {
        const int page = block_table[static_cast<long long>(req) * bt_stride + blk];
        uint8_t* dst = sK + stage * kChunks * kChunkBytes;
        uint64_t* fb = full + stage * kChunks;
        sm90::mbar_wait(&empty_a[stage], phase ^ 1);
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
          if (late_chunk(c)) continue;
          load_box(dst, fb, c, page);
        }
        sm90::mbar_wait(&empty_b[stage], phase ^ 1);
#pragma unroll
        for (int c = 4; c < 8; ++c) load_box(dst, fb, c, page);
        stage ^= 1;
        phase ^= stage == 0;
      }
    }
    if constexpr (kCluster > 1) {
      // Stay until every CTA of the cluster has released both stages (see mla_decode.cuh).
#pragma unroll 1
      for (int i = 0; i < 2; ++i) {
        sm90::mbar_wait(&empty_a[stage], phase ^ 1);
        sm90::mbar_wait(&empty_b[stage], phase ^ 1);
        stage ^= 1;
        phase ^= stage == 0;
      }
    }
    return;
  }

  // -------------------------------------------------- consumers --------------------------------------------------
  sm90::regs_increase<232>();   // both consumers share the code below: one register budget
  const int wtid = tid % 128, warp = wtid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int row0 = warp * 16 + g, row1 = row0 + 8;           // tile rows of this thread's accumulator
  const int grow0 = rb * 64 + row0, grow1 = rb * 64 + row1;   // q rows (s * hpk + local head)
  const int hpk = h_q / h_kv;
  const float kInf = __int_as_float(0x7f800000);
  const uint32_t sQa = sm90::smem_addr(sQ), sKa = sm90::smem_addr(sK), sPa = sm90::smem_addr(sP);
  int stage = 0, phase = 0;
  bool first_tile = true;

  // S = Q K^T for the tile in (st, ph), each 64-channel chunk issued once its TMA box has landed.
  auto issue_qk = [&](float (&s)[32], int st, int ph) {
    const uint32_t kb = sKa + st * kChunks * kChunkBytes;
    // Opaque bases: otherwise the compiler keeps all 72 per-step descriptors of both call sites live (spills).
    const uint64_t dq0 = opaque_u64(sm90::make_desc_sw128(sQa, 16, 1024));
    const uint64_t dk0 = opaque_u64(sm90::make_desc_sw128(kb, 16, 1024));
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int c = qk_chunk<kChunks>(i);
      sm90::mbar_wait(&full[st * kChunks + c], ph);
      // One commit group per chunk, each opened by its own fence: a wgmma group spanning the barrier's spin loop
      // makes ptxas serialise every wgmma (C7520).
      sm90::fence_regs(s);
      sm90::wgmma_fence();
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint32_t off = (c * kChunkBytes + k * 32) >> 4;
        Ops<T>::template qk<0>(s, dq0 + off, dk0 + off, (i | k) != 0);
      }
      sm90::wgmma_commit();
    }
  };

  for (int req = begin_req; req <= end_req; ++req) {
    const int sk = seqlens[req];
    const int nblk = (sk + kPage - 1) / kPage;
    const int b0 = req == begin_req ? begin_blk : 0;
    const int b1 = req == end_req ? end_blk : nblk;

    // Q rows of this block -> shared memory (zeros past the last row), 128-byte swizzled chunks.
    sm90::bar_sync(kBarQ, 256);   // everyone is done with the previous request's sQ / sFinal
    load_q_tile<T, kChunks>(sQ, q, tid, rb, rows, hpk, kvh, req, q_sb, q_ss, q_sh);
    sm90::fence_proxy_async();
    sm90::bar_sync(kBarQ, 256);

    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    float m0 = -kInf, m1 = -kInf, l0 = 0.f, l1 = 0.f;

    if (wg == 0) {
      // Causal: query s sees keys [0, sk - s_q + s + 1).
      const int lim0 = (causal && grow0 < rows) ? sk - s_q + grow0 / hpk + 1 : sk;
      const int lim1 = (causal && grow1 < rows) ? sk - s_q + grow1 / hpk + 1 : sk;
      float s[32];
      if (b0 < b1) {
        issue_qk(s, stage, phase);
        sm90::wgmma_wait<0>();
        sm90::fence_regs(s);
      }
      // One tile: softmax(blk), P V, and (kNext) the next tile's S. Peeled so that no branch joins paths with
      // different wgmma groups in flight (ptxas then serialises every wgmma, C7518).
      auto tile = [&](int blk, auto next_tag) {
        constexpr bool kNext = decltype(next_tag)::value;
        const uint32_t kst = sKa + stage * kChunks * kChunkBytes;
        // Cache slots past the sequence may hold anything (NaN): zero those V rows before any P V reads them.
        const int valid = sk - blk * kPage;
        if (valid < kPage) {
          uint8_t* kt = sK + stage * kChunks * kChunkBytes;
          for (int u = wtid; u < (kPage - valid) * 64; u += 128) {
            const int r = valid + u / 64, cu = u % 64;
            *reinterpret_cast<uint4*>(kt + (cu / 8) * kChunkBytes + swz(r, cu % 8)) = make_uint4(0, 0, 0, 0);
          }
          sm90::fence_proxy_async();
        }

        // Mask (select, so NaN in unused cache slots never reaches the max) and online softmax in log2 units.
        float mx0 = m0, mx1 = m1;
        mask_scale_max(s, blk * kPage + 2 * t, lim0, lim1, scale_log2, mx0, mx1);
        // Lazy rescaling (see kLazyMax).
        const float sc0 = mx0 > m0 + kLazyMax ? exp2f(m0 - mx0) : 1.f;
        const float sc1 = mx1 > m1 + kLazyMax ? exp2f(m1 - mx1) : 1.f;
        if (sc0 != 1.f) m0 = mx0;
        if (sc1 != 1.f) m1 = mx1;
        const float base0 = m0 == -kInf ? 0.f : m0, base1 = m1 == -kInf ? 0.f : m1;
        uint32_t pa[4][4];
        exp_sum_pack<T>(s, base0, base1, sc0, sc1, l0, l1, pa);
        rescale_rows(o, sc0, sc1);
        sm90::fence_regs(o);                       // keep the rescale before the fence (else ptxas adds one)
        sm90::wgmma_fence();
        pv_half_rs<T>(o, pa, kst);
        sm90::wgmma_commit();

        // Next tile's S right behind this P V (WG1's P V half queues after it).
        const int nstage = stage ^ 1, nphase = phase ^ (nstage == 0);
        if constexpr (kNext) {
          issue_qk(s, nstage, nphase);
          sm90::wgmma_wait<kChunks>();             // this tile's P V is done; S(i + 1)'s kChunks groups may still run
        } else {
          sm90::wgmma_wait<0>();
        }
        sm90::fence_regs(o);
        // V[:, :256] and rope of this stage are free
        release_stage<kCluster>(&empty_a[stage], lane);

        if (!first_tile) sm90::bar_sync(kBarPFree, 256);   // WG1 is done reading the previous P and scales
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
        sm90::fence_proxy_async();
        sm90::bar_arrive(kBarPReady, 256);         // P, scales (and zeroed V rows) ready for WG1
        if constexpr (kNext) {
          sm90::wgmma_wait<0>();
          sm90::fence_regs(s);
        }
        stage = nstage;
        phase = nphase;
      };
      if (b0 < b1) {
#pragma unroll 1
        for (int blk = b0; blk + 1 < b1; ++blk) tile(blk, std::true_type{});
        tile(b1 - 1, std::false_type{});
      }
    } else {
      for (int blk = b0; blk < b1; ++blk) {
        sm90::bar_sync(kBarPReady, 256);
#pragma unroll
        for (int c = 4; c < 8; ++c) sm90::mbar_wait(&full[stage * kChunks + c], phase);   // already complete
        const uint32_t kst = sKa + stage * kChunks * kChunkBytes;
        const float sc0 = sScale[row0], sc1 = sScale[row1];
        rescale_rows(o, sc0, sc1);
        sm90::fence_regs(o);
        sm90::wgmma_fence();
        pv_half_ss<T>(o, sPa, kst + 4 * kChunkBytes);
        sm90::wgmma_commit();
        sm90::wgmma_wait<0>();
        sm90::fence_regs(o);
        sm90::bar_arrive(kBarPFree, 256);          // P buffer free
        // V[:, 256:] of this stage is free
        release_stage<kCluster>(&empty_b[stage], lane);
        stage ^= 1;
        phase ^= stage == 0;
      }
    }

    finish_request<T>(o, l0, l1, m0, m1, wg, t, row0, row1, grow0, grow1, req, begin_req, begin_split,
                      num_splits + req, h_q, h_kv, s_q, rows, hpk, kvh, sFinal, out, lse, o_accum, lse_accum);
  }
  if (wg == 0 && !first_tile) sm90::bar_sync(kBarPFree, 256);   // match WG1's last "P free" arrival
}

}  // namespace mla
}  // namespace deepstack
