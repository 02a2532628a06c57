// MLA decode over an FP8 paged KV cache for few q rows per KV head (s_q x h_q / h_kv <= 32), sm_90a: the
// register-A kernel with exact e4m3 -> f16 conversions. No K tile in shared memory: both products take their A operand
// from registers, converted straight from the raw 656-byte rows with one cvt.rn.f16x2.e4m3x2 per byte pair.
//
// Why: mla_decode_fp8.cuh stages an f16 K tile in shared memory that one consumer reads twice by wgmma: ~310 KB of
// shared-memory traffic per 64-token page (~1.96 us/page measured against a ~1.39 us DRAM floor). Here a page's raw
// bytes are written once (bulk copy) and read twice (S^T and P V fragments): ~125 KB, plus the Q and P^T operand
// reads. Numerics are those of the f16 path of mla_decode_fp8.cuh (same tests):
//   S^T[64 tokens x kN] = sum_g scale[t, g] 2^(e_r - 14) S_g^T + S_rope^T: one f16 RS-wgmma chain per 128-channel
//       group g on the unscaled e4m3 values, Q's latent channels as f16 times 2^(14 - e_r) per row, the rope a bf16
//       chain; folded in fp32 (the rope term carried in units of 2^(e_r - 14): exact power-of-two scalings).
//       A = K from registers: lane (g, t) of warp w holds tokens 16 w + g (+8); per 64-channel step c (group c / 2)
//       one 16-byte unit of e4m3 bytes per token (unit 2 t + c % 2 of the group's 128 bytes); word kk's bytes 0 1
//       are the fragment's k pair (2t, 2t+1) of k16 block kk, bytes 2 3 the pair (2t+8, 2t+9). Q is stored with the
//       same channel permutation (q_kpos), so the products are unchanged.
//   O^T[512 ch x kN] += V^T[512 x 64] . P^T_g per group g (m64 blocks 2g, 2g+1), P^T_g[t, r] = P scale[t, g]
//       2^(6 - M_g) in f16 (four copies), O^T group g in units of 2^(M_g - 6), M_g the group's largest scale
//       exponent so far (raised lazily with O^T rescaled). A = V^T from registers: ldmatrix.trans (b16) on the raw
//       rows gives lane (g, t) the channel pair (2g, 2g+1) of a 16-channel chunk for tokens 2t, 2t+1; one prmt
//       regroups the 4 bytes into (channel 2g: tokens 2t, 2t+1 | channel 2g+1: ...), two cvts give the fragment's
//       rows g and g+8. Block mb = 2 G + h, warp w: rows 16 w + g (+8) are channels 128 G + 32 w + 16 h + 2 g (+1).
// Roles (384 threads, 1 CTA per SM): WG0 warp 0 issues the page copies (cp.async.bulk, a ring of whole pages).
// WG1 and WG2 (workers) take alternate pages of the CTA's range, each with its own softmax state, M_g and O^T for
// all kN rows (Q is shared: both workers sync at each request start). At the end of every request worker 1 passes
// (m, l, O^T in true units) through a global scratch buffer to worker 0, which merges and writes the result.
// Registers: setmaxnreg 24 (copies) / 240 (workers): 24 + 2 x 240 = 3 x 168, the CTA's launch allocation.
// Scheduling, split-KV partials, the combine kernel and the empty-row conventions are those of mla_decode.cuh.
// kSplit (32 rows, opt-in: kernels._FP8_REGS_SPLIT32): both workers take EVERY page; worker wk owns the 128-channel
// groups 2 wk, 2 wk + 1: its S^T partial (those groups' four 64-channel steps plus rope k16 blocks 2 wk, 2 wk + 1) is
// added to the other's through shared memory (a slot per page parity and worker, named barrier 6 over 256 threads),
// both then run the same softmax (same floats, so the same m, l, M_g), write the P^T copies of their own groups and
// accumulate O^T for their 256 V channels (64 registers instead of 128: m, l and the row constants stay in
// registers). No per-request merge; worker 0 writes lse. Each page is released by 256 arrivals. A/B switches:
// DEEPSTACK_FP8R_SPLIT_ROWS (row-split softmax), DEEPSTACK_FP8R_SPLIT_COPIES (one code copy per worker).
// The worker warpgroups' code is in mla_decode_fp8_regs_worker.cuh, included into the kernel body.
#pragma once
#include "mla/mla_decode.cuh"
#include "mla/mla_decode_fp8.cuh"

namespace deepstack {
namespace mla {
namespace fp8regs {

// D[64 x N] (+)= A[64 x 16] (registers) * B[16 x N] (smem, K-major), f16 or bf16 in, fp32 accumulators.
#define DEEPSTACK_FP8R_MMA_N16(TY)                                                                                 \
  asm volatile(                                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"                                                                 \
      "wgmma.mma_async.sync.aligned.m64n16k16.f32." TY "." TY " "                                                 \
      "{%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, %12, p, 1, 1, 0;\n}\n"                               \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])           \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(acc))
#define DEEPSTACK_FP8R_MMA_N32(TY)                                                                                 \
  asm volatile(                                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"                                                                 \
      "wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY " "                                                 \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, {%16, %17, %18, %19}, %20, p, 1, 1, " \
      "0;\n}\n"                                                                                                    \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),          \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])     \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(acc))
template <int kN, bool kF16>
__device__ __forceinline__ void mma_rs(float (&d)[kN / 2], const uint32_t (&a)[4], uint64_t desc_b, int acc) {
  if constexpr (kN == 16) {
    if constexpr (kF16) DEEPSTACK_FP8R_MMA_N16("f16");
    else DEEPSTACK_FP8R_MMA_N16("bf16");
  } else {
    if constexpr (kF16) DEEPSTACK_FP8R_MMA_N32("f16");
    else DEEPSTACK_FP8R_MMA_N32("bf16");
  }
}
#undef DEEPSTACK_FP8R_MMA_N16
#undef DEEPSTACK_FP8R_MMA_N32

// Bytes 0 1 and 2 3 of w (two e4m3 pairs) -> two f16x2 (exact), the lower byte in the lower half.
__device__ __forceinline__ void cvt_e4m3x4(uint32_t w, uint32_t& lo, uint32_t& hi) {
  asm("{\n.reg .b16 l, h;\nmov.b32 {l, h}, %2;\ncvt.rn.f16x2.e4m3x2 %0, l;\ncvt.rn.f16x2.e4m3x2 %1, h;\n}\n"
      : "=r"(lo), "=r"(hi) : "r"(w));
}
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t sel) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %1, %2;" : "=r"(r) : "r"(a), "r"(sel));
  return r;
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ uint32_t word(const uint4& u, int i) {
  return i == 0 ? u.x : i == 1 ? u.y : i == 2 ? u.z : u.w;
}
// k position (0..63) inside a 64-channel step of the 16-channel unit's word k (channels 2k, 2k+1 of the unit) for
// lane t: word k / 2 of the lane's 16 bytes feeds k16 block k / 2, its bytes 0 1 the pair (2t, 2t+1), bytes 2 3 the
// pair (2t+8, 2t+9).
__device__ __forceinline__ int q_kpos(int k, int t) { return 16 * (k / 2) + 8 * (k % 2) + 2 * t; }

// Pipelining of the worker's wgmma chains (A/B switches; defaults from the H200 A/B of 2026-11-30, docs/mla.md):
// S^T: kQB k16 blocks per commit (2 or 4); P V: kGB groups per commit (1, 2 or 4); two fragment buffers each.
#ifndef DEEPSTACK_FP8R_QK_BLOCKS
#define DEEPSTACK_FP8R_QK_BLOCKS 0   // 0: 4 at 16 rows (1-2% faster than 2), 2 at 32 (4: spills, 4% slower)
#endif
// Split variant only: 1 = each worker runs the softmax for its 16 of the 32 rows (the S^T exchange then sends only
// the other worker's rows) and writes all four P^T copies for them; the copies, the O^T rescale factors and the row
// sums are shared through shared memory behind a 256-thread barrier per page. 0 = both run it for all 32 rows.
#ifndef DEEPSTACK_FP8R_SPLIT_ROWS
#define DEEPSTACK_FP8R_SPLIT_ROWS 0
#endif
// Split variant only: 1 = one copy of the worker code per worker (constant group offsets; see the kernel body).
#ifndef DEEPSTACK_FP8R_SPLIT_COPIES
#define DEEPSTACK_FP8R_SPLIT_COPIES 0
#endif
#ifndef DEEPSTACK_FP8R_PV_GROUPS
#define DEEPSTACK_FP8R_PV_GROUPS 2   // 32 rows: 286 us against 303 (1) and 297 (4) at 128/1/32/8192
#endif
// 16 rows (alternating workers): the raw ring holds a page as 1, 2 or 4 sub-stages of 64, 32 or 16 tokens. A
// sub-stage is released after the P V block(s) that read it last (S^T: warp w reads only tokens 16 w .. 16 w + 15,
// P V k16 block kk only tokens 16 kk ..), so the first sub-stages go back to the copies while the page's last P V
// blocks run, and the sub-stage ring fills the shared memory left over: 4.5 pages (9 / 18 stages) instead of 4.
#ifndef DEEPSTACK_FP8R_SUBPAGES
#define DEEPSTACK_FP8R_SUBPAGES 1
#endif
// Worker-chain switches (16 rows, alternating workers; H200 profile of 2026-11-30 in docs/mla.md: the workers, not
// the page stream, set the page time). LEAN: exp2 as one ex2.approx.ftz (exp2f adds a range fix-up; the results
// differ only where exp2 < 2^-126, which vanishes beside a row sum >= 1) and the stale-token masks of P V computed
// inside their last-page branch (ptxas hoisted them onto every k16 block). FAST_SOFTMAX: one 128-thread
// barrier.red.or asks whether any element exceeds its row's running max + slack or any token's scale its group's
// exponent; if none (most pages), the max shuffles, the reduction through shared memory and its barrier are
// skipped (same decisions, bit-identical results). Both are on in the 16-row build since 2026-11-30 05:00 UTC
// (kernels._FP8_REGS16_DEFINES; 3.7-4.0% faster at b = 128). Tried and removed: one code copy per worker (the
// P^T descriptors uniform: no R2UR), 22-30% slower (both copies hot on every SM sub-partition).
#ifndef DEEPSTACK_FP8R_LEAN
#define DEEPSTACK_FP8R_LEAN 0
#endif
#ifndef DEEPSTACK_FP8R_FAST_SOFTMAX
#define DEEPSTACK_FP8R_FAST_SOFTMAX 0
#endif
#ifndef DEEPSTACK_FP8R_WK_SHFL
#define DEEPSTACK_FP8R_WK_SHFL 0
#endif
// 32-row split with SPLIT_ROWS, A/B switches (docs/mla.md "32 rows: the fast softmax vote per worker"): SPLIT_XV = the
// S^T exchange as two float4 stores and loads per thread instead of eight floats each; SPLIT_P2VOTE = the barrier
// after the P^T copies is a bar.red.or asking whether any row maximum or group exponent moved (either worker): on
// pages where none did (most), the other worker's rescale factors are not read. FAST_SOFTMAX applies to the split
// too (each worker votes over its rows). All change no arithmetic (bit-identical, tested).
#ifndef DEEPSTACK_FP8R_SPLIT_XV
#define DEEPSTACK_FP8R_SPLIT_XV 0
#endif
#ifndef DEEPSTACK_FP8R_SPLIT_P2VOTE
#define DEEPSTACK_FP8R_SPLIT_P2VOTE 0
#endif
// Ablation (timing only, wrong results): the copies fill the ring once; the workers then wait for nothing and
// compute every later page on those stale bytes (the workers' own per-page time, no DRAM stream).
#ifndef DEEPSTACK_FP8R_ABL_NOLOAD
#define DEEPSTACK_FP8R_ABL_NOLOAD 0
#endif

// 2^x: exp2f (with its fix-up for results below 2^-126) or one ex2.approx.ftz (DEEPSTACK_FP8R_LEAN)
__device__ __forceinline__ float exp2_w(float x) {
  if constexpr (DEEPSTACK_FP8R_LEAN != 0) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
  } else {
    return exp2f(x);
  }
}
// OR of `p` over the `threads` threads of named barrier `id` (a barrier: every thread waits for all of them)
__device__ __forceinline__ bool bar_any(int id, int threads, bool p) {
  uint32_t r;
  asm volatile("{\n.reg .pred p, q;\nsetp.ne.u32 p, %1, 0;\nbar.red.or.pred q, %2, %3, p;\n"
               "selp.u32 %0, 1, 0, q;\n}\n" : "=r"(r) : "r"(static_cast<uint32_t>(p)), "r"(id), "r"(threads) : "memory");
  return r != 0;
}
template <int V>
struct IntC {
  static constexpr int value = V;
};

template <int kN, bool kSplit = false>
struct Layout {
  static constexpr int kSub = kN == 16 && !kSplit ? DEEPSTACK_FP8R_SUBPAGES : 1;   // ring stages per page
  static_assert(kSub == 1 || kSub == 2 || kSub == 4, "DEEPSTACK_FP8R_SUBPAGES: 1, 2 or 4");
  static constexpr int kSubTok = kPage / kSub;                // tokens per ring stage
  // ring stages (what fits next to Q and P^T): 4 pages at 16 rows, 3 at 32; sub-stages: 4.5 pages
  static constexpr int kStages = kSub == 1 ? (kN == 16 ? 4 : 3) : 9 * kSub / 2;
  static constexpr int kStageBytes = kSubTok * kFp8TokenBytes;   // 41984 for a whole page
  static constexpr int kQChunk = kN * 128;                   // Q [kN rows x 64 k positions], 128-byte swizzle
  static constexpr int kPCopy = kN * 128;                    // one P^T copy [kN rows x 64 tokens] f16, 128-byte swizzle
  static constexpr int kQ = 0;                               // 9 chunks, shared by both workers
  static constexpr int kP = kQ + 9 * kQChunk;                // [2 workers][4 groups] P^T copies
  static constexpr int kRaw = kP + (kSplit ? 4 : 8) * kPCopy;   // split: one copy per group (its worker's)
  static constexpr int kRed = kRaw + kStages * kStageBytes;   // [2 workers][4 warps][kN + 4] floats
  static constexpr int kRow = kRed + 2 * 4 * (kN + 4) * 4;   // [3][kN]: 2^(14 - e_r), 2^(e_r - 14) x softmax scale, lim
  // 32 rows: each worker thread's partial row sums and running maxima [2 workers][l, m][kN / 4][128 threads]
  static constexpr int kL = kRow + 3 * kN * 4 + 16;   // + the piece's end block (int; 32 rows: read in the page loop)
  static constexpr int kX = kL + (kN == 32 && !kSplit ? 2 * 2 * (kN / 4) * 128 * 4 : 0);
  // split: the workers' partial S^T [page parity][worker][kN / 2][128 threads] floats
  static constexpr int kScl = kX + (kSplit ? 2 * 2 * (kN / 2) * 128 * 4 : 0);   // split: [kN] rescale factors, [kN] row sums
  static constexpr int kBars = kScl + (kSplit ? 2 * kN * 4 : 0);   // full[kStages], empty[kStages], merged, merge_free
  static constexpr int kBytes = kBars + (2 * kStages + 2) * 8;
  static constexpr int kAlloc = kBytes + 1024;
  static constexpr int kMergeFloats = 8 * (kN / 2) + 2 * 2 * (kN / 8);   // per worker thread: O^T, m, l
  static_assert(kQChunk % 1024 == 0 && kP % 1024 == 0 && kRaw % 1024 == 0, "swizzled tiles need 1024-byte alignment");
  static_assert(kBars % 8 == 0, "mbarriers need 8-byte alignment");
  static_assert(kAlloc <= 232448, "shared memory");
};

template <int kN, bool kSplit = false>
__global__ void __launch_bounds__(384, 1) mla_decode_fp8_regs_kernel(
    const __nv_bfloat16* __restrict__ q, __nv_bfloat16* __restrict__ out, float* __restrict__ lse,
    float* __restrict__ o_accum, float* __restrict__ lse_accum, const int* __restrict__ block_table,
    const int* __restrict__ seqlens, const int* __restrict__ sched, const int* __restrict__ num_splits,
    const uint8_t* __restrict__ kcache, float* __restrict__ merge_scratch, int h_q, int h_kv, int s_q, int rows,
    int causal, int bt_stride, long long q_sb, long long q_ss, long long q_sh, long long tok_stride,
    float scale_log2) {
  static_assert(kN == 16 || kN == 32, "16 or 32 q rows per CTA");
  static_assert(!kSplit || kN == 32, "the channel split is a 32-row variant");
  using L = Layout<kN, kSplit>;
  // kSplit: both workers take every page; worker wk owns 128-channel groups kG0 = 2 wk, 2 wk + 1 (S^T partial and O^T)
  constexpr int kNG = kSplit ? 2 : 4;   // groups per worker
  constexpr int kSteps = 2 * kNG;       // 64-channel S^T steps per worker
  constexpr int kS = L::kStages;
  constexpr int kJ = kN / 8;   // n8 column blocks of the accumulators
  constexpr int kMerge = L::kMergeFloats;
  constexpr int kRedW = kN + 4;   // per warp: the rows' tile max, then the page's largest scale per group
  constexpr int kProducerRegs = 24, kWorkerRegs = 240;   // 24 + 2 x 240 = 3 x 168 (more deadlocks setmaxnreg.inc)
  using T = __nv_bfloat16;
  constexpr int kQB = DEEPSTACK_FP8R_QK_BLOCKS > 0 ? DEEPSTACK_FP8R_QK_BLOCKS : (kN == 16 || kSplit ? 4 : 2);
  constexpr int kQH = 4 / kQB, kQF = 2;   // S^T commits per 64-channel step, fragment buffers
  constexpr int kGB = DEEPSTACK_FP8R_PV_GROUPS < kNG ? DEEPSTACK_FP8R_PV_GROUPS : kNG, kPF = 2;
  static_assert((kQB == 2 || kQB == 4) && 1 + 2 * kQH > kQF, "S^T commits: a group is folded before its reuse");
  static_assert(kGB == 1 || kGB == 2 || kGB == 4, "P V batches of 1, 2 or 4 groups");
  constexpr int kBatches = kNG / kGB;   // P V commits per k16 block
  constexpr bool kRowSplit = kSplit && DEEPSTACK_FP8R_SPLIT_ROWS != 0;
  constexpr bool kSplitCopies = DEEPSTACK_FP8R_SPLIT_COPIES != 0;
  constexpr int kMG = kRowSplit ? 4 : kNG;   // groups whose running exponent M_g the worker tracks
  constexpr int kJs = kRowSplit ? kJ / 2 : kJ;   // n8 column blocks whose softmax the worker runs
  using fp8small::pow2i;
  using fp8small::exp_of;
  using fp8small::pack_f16x2;

  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (sm90::smem_addr(smem_raw) & 1023u)) & 1023u);
  uint8_t* sQ = smem + L::kQ;
  uint8_t* sRaw = smem + L::kRaw;
  float* sQinv = reinterpret_cast<float*>(smem + L::kRow);   // per q row: 2^(14 - e_r)
  float* sQms = sQinv + kN;                                   // 2^(e_r - 14) x softmax scale (log2 units)
  int* sLim = reinterpret_cast<int*>(sQms + kN);              // keys the row sees
  int* sEnd = sLim + kN;   // the piece's end block: the page loop's bound at 32 rows (in a register, it was spilled)
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + L::kBars);
  uint64_t* empty = full + kS;
  uint64_t* merged = empty + kS;       // worker 1's partial of the current request is in the scratch
  uint64_t* merge_free = merged + 1;   // worker 0 has read it

  const int tid = threadIdx.x;
  if (tid == 0) {
    uint32_t dyn;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    if (dyn < L::kAlloc) __trap();
#pragma unroll
    for (int s = 0; s < kS; ++s) {
      sm90::mbar_init(&full[s], 1);
      sm90::mbar_init(&empty[s], kSplit ? 256 : 128);   // split: both workers read every page
    }
    sm90::mbar_init(merged, 128);
    sm90::mbar_init(merge_free, 128);
    sm90::fence_barrier_init();
  }
  __syncthreads();

  // (The schedule is read after the register split in each role: values live across setmaxnreg were spilled.)
  const int* meta = sched + blockIdx.x * kSchedInts;
  const int kvh = blockIdx.y;

  if (tid < 128) {
    // ------------------------------------------- page copies (warp 0) -------------------------------------------
    sm90::regs_decrease<kProducerRegs>();
    if (tid >= 32) return;
    const int begin_req = meta[0], begin_blk = meta[1], end_req = meta[2], end_blk = meta[3];
    const int lane = tid;
    const uint8_t* kbase = kcache + static_cast<long long>(kvh) * kFp8TokenBytes;
    const bool packed = tok_stride == kFp8TokenBytes;   // a page is one contiguous run of bytes
    const uint64_t policy = sm90::evict_first_policy();
    fp8small::Walk<kPage> w;
    w.start(seqlens, block_table, bt_stride, begin_req, begin_blk, end_req, end_blk);
    int s = 0, ph = 0, issued = 0;
#pragma unroll 1
    while (!w.done()) {
      const int valid = w.valid();
      const uint8_t* page = kbase + static_cast<long long>(w.page) * kPage * tok_stride;
#pragma unroll 1
      for (int sub = 0; sub < L::kSub; ++sub) {   // the page's ring stages (tokens sub kSubTok ..)
        if (DEEPSTACK_FP8R_ABL_NOLOAD && issued == kS) return;
        const int v = min(max(valid - sub * L::kSubTok, 0), L::kSubTok);
        sm90::mbar_wait(&empty[s], ph ^ 1);
        if (lane == 0) sm90::mbar_arrive_expect_tx(&full[s], v * kFp8TokenBytes);
        const uint8_t* src = page + static_cast<long long>(sub * L::kSubTok) * tok_stride;
        uint8_t* dst = sRaw + s * L::kStageBytes;
        if (packed) {
          if (lane == 0 && v > 0) fp8small::bulk_load(dst, src, v * kFp8TokenBytes, &full[s], policy);
        } else {
          for (int tok = lane; tok < v; tok += 32)
            fp8small::bulk_load(dst + tok * kFp8TokenBytes, src + tok * tok_stride, kFp8TokenBytes, &full[s], policy);
        }
        s = s + 1 == kS ? 0 : s + 1;
        ph ^= s == 0;
        ++issued;
      }
      w.next();
    }
    return;
  }

  // ----------------------------------------------------- workers -----------------------------------------------------
  sm90::regs_increase<kWorkerRegs>();
  const int begin_req = meta[0], begin_blk = meta[1], end_req = meta[2], end_blk = meta[3];
  // worker wk takes the pages whose index over the CTA's range has parity wk. DEEPSTACK_FP8R_WK_SHFL: read through a
  // shuffle from lane 0, which the compiler treats as warp-uniform (the P^T descriptors then in uniform registers).
#if DEEPSTACK_FP8R_WK_SHFL
  const int wk = __shfl_sync(0xffffffffu, tid / 128, 0) - 1;
#else
  const int wk = tid / 128 - 1;
#endif
  const int wt = tid % 128, wt2 = tid - 128, warp = wt / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  // kG0: this worker's first 128-channel group (split: 2 wk). With DEEPSTACK_FP8R_SPLIT_COPIES=1 the split body is
  // compiled once per worker so that kG0 is a constant (group offsets immediate, wgmma descriptors uniform-register
  // arithmetic instead of per-thread adds + R2UR), at twice the code size.
  if constexpr (kSplit && kSplitCopies) {
    auto worker_body = [&](auto wk_c) {
      constexpr int kG0 = 2 * decltype(wk_c)::value;
#include "mla/mla_decode_fp8_regs_worker.cuh"
    };
    if (wk == 0) worker_body(IntC<0>{});
    else worker_body(IntC<1>{});
  } else {
    const int kG0 = kSplit ? 2 * wk : 0;
#include "mla/mla_decode_fp8_regs_worker.cuh"
  }
}

}  // namespace fp8regs
}  // namespace mla
}  // namespace deepstack
