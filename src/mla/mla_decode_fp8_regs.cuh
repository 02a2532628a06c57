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
// registers). No per-request merge; worker 0 writes lse. Each page is released by 256 arrivals.
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
#ifndef DEEPSTACK_FP8R_PV_GROUPS
#define DEEPSTACK_FP8R_PV_GROUPS 2   // 32 rows: 286 us against 303 (1) and 297 (4) at 128/1/32/8192
#endif

template <int kN, bool kSplit = false>
struct Layout {
  static constexpr int kStages = kN == 16 ? 4 : 3;           // raw pages in flight (what fits next to Q and P^T)
  static constexpr int kPageBytes = kPage * kFp8TokenBytes;  // 41984
  static constexpr int kQChunk = kN * 128;                   // Q [kN rows x 64 k positions], 128-byte swizzle
  static constexpr int kPCopy = kN * 128;                    // one P^T copy [kN rows x 64 tokens] f16, 128-byte swizzle
  static constexpr int kQ = 0;                               // 9 chunks, shared by both workers
  static constexpr int kP = kQ + 9 * kQChunk;                // [2 workers][4 groups] P^T copies
  static constexpr int kRaw = kP + (kSplit ? 4 : 8) * kPCopy;   // split: one copy per group (its worker's)
  static constexpr int kRed = kRaw + kStages * kPageBytes;   // [2 workers][4 warps][kN + 4] floats
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
    int s = 0, ph = 0;
#pragma unroll 1
    while (!w.done()) {
      const int valid = w.valid();
      sm90::mbar_wait(&empty[s], ph ^ 1);
      if (lane == 0) sm90::mbar_arrive_expect_tx(&full[s], valid * kFp8TokenBytes);
      const uint8_t* src = kbase + static_cast<long long>(w.page) * kPage * tok_stride;
      uint8_t* dst = sRaw + s * L::kPageBytes;
      if (packed) {
        if (lane == 0) fp8small::bulk_load(dst, src, valid * kFp8TokenBytes, &full[s], policy);
      } else {
        for (int tok = lane; tok < valid; tok += 32)
          fp8small::bulk_load(dst + tok * kFp8TokenBytes, src + tok * tok_stride, kFp8TokenBytes, &full[s], policy);
      }
      w.next();
      s = s + 1 == kS ? 0 : s + 1;
      ph ^= s == 0;
    }
    return;
  }

  // ----------------------------------------------------- workers -----------------------------------------------------
  sm90::regs_increase<kWorkerRegs>();
  const int begin_req = meta[0], begin_blk = meta[1], end_req = meta[2], end_blk = meta[3];
  const int wk = tid / 128 - 1;      // worker wk takes the pages whose index over the CTA's range has parity wk
  const int wt = tid % 128, wt2 = tid - 128, warp = wt / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int kG0 = kSplit ? 2 * wk : 0;   // split: this worker's first 128-channel group
  uint8_t* sP = smem + L::kP + (kSplit ? kG0 : wk * 4) * L::kPCopy;   // this worker's P^T copies (one per group)
  float* red = reinterpret_cast<float*>(smem + L::kRed) + wk * 4 * kRedW;
  const int bar_max = 1 + 2 * wk, bar_p = 2 + 2 * wk, bar_q = 5;
  const int hpk = h_q / h_kv;
  const float kInf = __int_as_float(0x7f800000);
  constexpr float kSlack = 8.f;
  // wgmma B descriptors: one base each, operand offsets added as constants (start address field, 16-byte units)
  const uint64_t dq0 = sm90::make_desc_sw128(sm90::smem_addr(sQ), 16, 1024);
  const uint64_t dqg = dq0 + ((2 * kG0 * L::kQChunk) >> 4);   // the first Q chunk of this worker's groups
  const uint64_t dp0 = sm90::make_desc_sw128(sm90::smem_addr(sP), 16, 1024);
  const uint32_t sPa = sm90::smem_addr(sP);
  // ldmatrix rows: lane L addresses row L % 8 of matrix L / 8: tokens 8 (L / 8 % 2) + L % 8 of a k16 block,
  // channels 32 warp + 16 (L / 16) of a group (chunk h = L / 16).
  const uint32_t v_lane =
      (8 * ((lane / 8) % 2) + lane % 8) * kFp8TokenBytes + 16 * (lane / 16) + 32 * warp + 128 * kG0;
  constexpr int kBarX = 6;   // split: the two workers' partial S^T exchange (256 threads)
  constexpr int kBarP2 = 7;   // split rows: both workers' P^T rows written (256 threads)
  float* sX = reinterpret_cast<float*>(smem + L::kX) + wt;
  float* sScl = reinterpret_cast<float*>(smem + L::kScl);   // split rows: this page's O^T rescale factor per row
  float* sLt = sScl + kN;                                     // split rows: the request's row sums
  const int kR0 = kRowSplit ? 16 * wk : 0;                    // split rows: this worker's first row
  int page_idx = 0;

  for (int req = begin_req; req <= end_req; ++req) {
    const int nreq = req - begin_req;
    const int sk = seqlens[req];
    const int nblk = (sk + kPage - 1) / kPage;
    const int b0 = req == begin_req ? begin_blk : 0;
    const int b1 = req == end_req ? end_blk : nblk;

    // ---- Q (both workers): latent channels -> f16 times 2^(14 - e_r) (e_r: exponent of the row's largest |q|: its
    // largest lands in [2^14, 2^15), every bf16 value down to 2^-17 of it is exact), rope bf16; the k-position
    // permutation of the S^T fragments; zeros past the last row. ----
    sm90::bar_sync(bar_q, 256);   // both workers are done with the previous request's Q (and worker 0 with red)
    {
      constexpr int kTR = 256 / kN, kUR = 32 / kTR;   // threads per row, 16-channel units per thread
      const int row = wt2 / kTR, sub = wt2 % kTR;
      const bool vrow = row < rows;
      const T* qrow = q + req * q_sb + (row / hpk) * q_ss + (kvh * hpk + row % hpk) * q_sh;
      uint4 u[kUR][2];
      __nv_bfloat162 mx2 = __float2bfloat162_rn(0.f);
#pragma unroll
      for (int i = 0; i < kUR; ++i) {
        const int unit = sub + kTR * i;
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          u[i][hh] = vrow ? __ldg(reinterpret_cast<const uint4*>(qrow + 16 * unit + 8 * hh)) : make_uint4(0, 0, 0, 0);
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const uint32_t wd = word(u[i][hh], k);
            mx2 = __hmax2(mx2, __habs2(*reinterpret_cast<const __nv_bfloat162*>(&wd)));
          }
        }
      }
      float mx = fmaxf(__low2float(mx2), __high2float(mx2));
#pragma unroll
      for (int o = 1; o < kTR; o *= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const int e = mx > 0.f ? max(exp_of(mx), -100) : 14;
      const float mul = pow2i(14 - e);
#pragma unroll
      for (int i = 0; i < kUR; ++i) {
        const int unit = sub + kTR * i, grp = unit / 8, tq = (unit % 8) / 2, c = 2 * grp + unit % 2;
        uint8_t* dst = sQ + c * L::kQChunk + row * 128;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const uint32_t wd = word(u[i][k / 4], k % 4);
          const int kp = q_kpos(k, tq);
          *reinterpret_cast<uint32_t*>(dst + (((kp / 8) ^ (row & 7)) << 4) + 2 * (kp % 8)) =
              pack_f16x2(__uint_as_float(wd << 16) * mul, __uint_as_float(wd & 0xffff0000u) * mul);
        }
      }
      if (sub == 0) {   // powers of two: the scalings below are exact
        sQinv[row] = pow2i(14 - e);
        sQms[row] = pow2i(e - 14) * scale_log2;
        sLim[row] = (causal && vrow) ? sk - s_q + row / hpk + 1 : sk;   // causal: query s sees sk - s_q + s + 1
        if (row == 0) *sEnd = b1;
      }
      if (wt2 < kN * 4) {   // rope: row wt2 / 4, 16 channels 16 tq.. as stored (bf16)
        const int rr = wt2 / 4, tq = wt2 % 4;
        uint4 r2[2] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
        if (rr < rows) {
          const T* qr = q + req * q_sb + (rr / hpk) * q_ss + (kvh * hpk + rr % hpk) * q_sh + 512 + 16 * tq;
          r2[0] = __ldg(reinterpret_cast<const uint4*>(qr));
          r2[1] = __ldg(reinterpret_cast<const uint4*>(qr + 8));
        }
        uint8_t* dst = sQ + 8 * L::kQChunk + rr * 128;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const int kp = q_kpos(k, tq);
          *reinterpret_cast<uint32_t*>(dst + (((kp / 8) ^ (rr & 7)) << 4) + 2 * (kp % 8)) = word(r2[k / 4], k % 4);
        }
      }
    }
    sm90::fence_proxy_async();    // generic writes, read by wgmma (async proxy)
    sm90::bar_sync(bar_q, 256);

    float o[2 * kNG][kN / 2];   // m64 blocks 2 G + h of this worker's groups G
#pragma unroll
    for (int mb = 0; mb < 2 * kNG; ++mb)
#pragma unroll
      for (int i = 0; i < kN / 2; ++i) o[mb][i] = 0.f;
    int Mg[kMG];   // group g's O^T is in units of 2^(Mg[g] - 6); only moves up (split rows: all four groups)
#pragma unroll
    for (int gi = 0; gi < kMG; ++gi) Mg[gi] = -1000;
    // This thread's q rows: 8 j + 2 t + e (accumulator columns).
    // Per-row constants (sQinv, sQms, sLim) are read from shared memory where used: registers are short at 32 rows.
    // m, l: the running row maxima and this thread's partial row sums; at 32 rows kept in shared memory between
    // pages (one slot per thread: sM / sL[(2 j + e) * 128]): in registers, ptxas spilled loop values there (O^T,
    // the S^T chains and their fragments fill the rest).
    constexpr bool kStateSmem = kN == 32 && !kSplit;   // split: O^T is half as large, m and l fit
    // Split: the per-row constants in registers for the request (read from shared memory on every page otherwise).
    constexpr bool kRowRegs = kSplit;
    float rq_inv[kRowRegs ? kJ : 1][2], rq_ms[kRowRegs ? kJ : 1][2];
    int rq_lim[kRowRegs ? kJ : 1][2];
    if constexpr (kRowRegs) {
#pragma unroll
      for (int j = 0; j < kJ; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          rq_inv[j][e] = sQinv[8 * j + 2 * t + e];
          rq_ms[j][e] = sQms[(8 * j + kR0) % kN + 2 * t + e];   // split rows: entries j < 2 are this worker's rows
          rq_lim[j][e] = sLim[(8 * j + kR0) % kN + 2 * t + e];
        }
    }
    float* sL = reinterpret_cast<float*>(smem + L::kL) + wk * (kN / 4) * 128 + wt;
    float* sM = sL + 2 * (kN / 4) * 128;
    float m[kJ][2], l[kJ][2];
#pragma unroll
    for (int j = 0; j < kJ; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        m[j][e] = -kInf;
        l[j][e] = 0.f;
        if constexpr (kStateSmem) {
          sL[(2 * j + e) * 128] = 0.f;
          sM[(2 * j + e) * 128] = -kInf;
        }
      }

#pragma unroll 1
    for (int blk = b0; blk < (kN == 32 && !kSplit ? *sEnd : b1); ++blk, ++page_idx) {
      if (!kSplit && (page_idx & 1) != wk) continue;
      const int rs = page_idx % kS, rph = (page_idx / kS) & 1;
      const int valid = min(sk - blk * kPage, kPage);
      sm90::mbar_wait(&full[rs], rph);
      const uint8_t* raw = sRaw + rs * L::kPageBytes;

      // ---- S^T = K Q^T: the rope chain (bf16) into s, then 8 steps of 64 channels (f16), group accumulators
      // alternating; a group is folded into s (times its tokens' scales) while the next one runs ----
      const int ta = 16 * warp + g;   // this thread's tokens ta, ta + 8 (S^T rows g, g + 8 of the warp)
      const uint8_t* ra = raw + ta * kFp8TokenBytes;
      const uint8_t* rb = ra + 8 * kFp8TokenBytes;
      // csc: the two tokens' scales (zeros past the valid tokens), x 2^(6 - M_g) once M_g is known. At 32 rows they
      // are loaded after S^T (the folds read their two scales from shared memory: registers are short there).
      constexpr bool kLateScales = kN == 32 && !kSplit;
      float csc[2][kMG];   // split: this worker's groups kG0, kG0 + 1 (split rows: all four)
      auto load_scales = [&]() {
        if constexpr (kSplit && !kRowSplit) {
          const float2 x = *reinterpret_cast<const float2*>(ra + 512 + 4 * kG0);
          const float2 y = *reinterpret_cast<const float2*>(rb + 512 + 4 * kG0);
          const bool va = ta < valid, vb = ta + 8 < valid;
          csc[0][0] = va ? x.x : 0.f; csc[0][1] = va ? x.y : 0.f;
          csc[1][0] = vb ? y.x : 0.f; csc[1][1] = vb ? y.y : 0.f;
        } else {
          const float4 x = *reinterpret_cast<const float4*>(ra + 512);
          const float4 y = *reinterpret_cast<const float4*>(rb + 512);
          const bool va = ta < valid, vb = ta + 8 < valid;
          csc[0][0] = va ? x.x : 0.f; csc[0][1] = va ? x.y : 0.f; csc[0][2] = va ? x.z : 0.f; csc[0][3] = va ? x.w : 0.f;
          csc[1][0] = vb ? y.x : 0.f; csc[1][1] = vb ? y.y : 0.f; csc[1][2] = vb ? y.z : 0.f; csc[1][3] = vb ? y.w : 0.f;
        }
      };
      if constexpr (!kLateScales) load_scales();
      float s[kN / 2];
      float acc[2][kN / 2];
      uint32_t fa[kQF][kQB][4];   // [buffer][k16 block of the commit][fragment register]
      if constexpr (kSplit) {   // worker wk: the rope's k16 blocks 2 wk, 2 wk + 1 (16 bytes per token and lane)
        const uint4 pa = *reinterpret_cast<const uint4*>(ra + 528 + 32 * t + 16 * wk);
        const uint4 pb = *reinterpret_cast<const uint4*>(rb + 528 + 32 * t + 16 * wk);
        uint32_t fr[2][4];
#pragma unroll
        for (int x = 0; x < 2; ++x) {
          fr[x][0] = word(pa, 2 * x);
          fr[x][1] = word(pb, 2 * x);
          fr[x][2] = word(pa, 2 * x + 1);
          fr[x][3] = word(pb, 2 * x + 1);
        }
        const uint64_t dr = dq0 + ((8 * L::kQChunk + wk * 64) >> 4);
        sm90::wgmma_fence();
#pragma unroll
        for (int x = 0; x < 2; ++x) mma_rs<kN, false>(s, fr[x], dr + ((x * 32) >> 4), x != 0);
        sm90::wgmma_commit();
      } else {
        const uint4 pa0 = *reinterpret_cast<const uint4*>(ra + 528 + 32 * t);
        const uint4 pa1 = *reinterpret_cast<const uint4*>(ra + 528 + 32 * t + 16);
        const uint4 pb0 = *reinterpret_cast<const uint4*>(rb + 528 + 32 * t);
        const uint4 pb1 = *reinterpret_cast<const uint4*>(rb + 528 + 32 * t + 16);
        uint32_t fr[4][4];   // rope fragments: bf16 pairs as stored
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          const uint4& pa = kk < 2 ? pa0 : pa1;
          const uint4& pb = kk < 2 ? pb0 : pb1;
          fr[kk][0] = word(pa, (2 * kk) % 4);
          fr[kk][1] = word(pb, (2 * kk) % 4);
          fr[kk][2] = word(pa, (2 * kk + 1) % 4);
          fr[kk][3] = word(pb, (2 * kk + 1) % 4);
        }
        sm90::wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
          mma_rs<kN, false>(s, fr[kk], dq0 + ((8 * L::kQChunk + kk * 32) >> 4), kk != 0);
        sm90::wgmma_commit();
      }
      auto fold = [&](int grp) {   // s += scale[t, grp] * S_grp^T (the group's chain is complete)
        float (&ag)[kN / 2] = acc[grp % 2];   // grp: the worker's group index (split: group kG0 + grp)
        sm90::fence_regs(ag);
        float sc2[2];   // rows past the valid tokens may fold garbage: the mask below selects them out
        if constexpr (kLateScales) {
          sc2[0] = *reinterpret_cast<const float*>(ra + 512 + 4 * grp);
          sc2[1] = *reinterpret_cast<const float*>(rb + 512 + 4 * grp);
        } else if constexpr (kRowSplit) {   // (selects: a register array takes constant indices only)
          sc2[0] = wk ? csc[0][(2 + grp) % kMG] : csc[0][grp];
          sc2[1] = wk ? csc[1][(2 + grp) % kMG] : csc[1][grp];
        } else {
          sc2[0] = csc[0][grp];
          sc2[1] = csc[1][grp];
        }
#pragma unroll
        for (int j = 0; j < kJ; ++j)
#pragma unroll
          for (int a = 0; a < 2; ++a)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int i = 4 * j + 2 * a + e;
              s[i] = fmaf(ag[i], sc2[a], s[i]);
            }
      };
      // Commit groups: i = 0 the rope, then i = 1 + kQH c + hs: k16 blocks [kQB hs, kQB hs + kQB) of step c, with
      // fragment buffer i % kQF. Waiting for all but the last kQF - 1 before commit i (i >= kQF) frees its buffer and
      // completes every commit <= i - kQF: the rope at i = kQF, group g's last commit, (2g + 2) kQH, at
      // i = (2g + 2) kQH + kQF, where it is folded (before group g + 2 reuses its accumulator).
#pragma unroll
      for (int c = 0; c < kSteps; ++c) {   // (split: step c of this worker's groups, 2 kG0 + c of the row)
        const int grp = c / 2;
        const int off = 128 * (kG0 + grp) + 16 * (2 * t + (c % 2));
        const uint4 ua = *reinterpret_cast<const uint4*>(ra + off);
        const uint4 ub = *reinterpret_cast<const uint4*>(rb + off);
#pragma unroll
        for (int hs = 0; hs < kQH; ++hs) {
          const int i = 1 + kQH * c + hs, buf = i % kQF;
          if (i >= kQF) sm90::wgmma_wait<kQF - 1>();
          if (i == kQF) {   // the rope chain is done: carry it in units of 2^(e_r - 14)
            sm90::fence_regs(s);
#pragma unroll
            for (int j = 0; j < kJ; ++j)
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                const float qi = kRowRegs ? rq_inv[kRowRegs ? j : 0][e] : sQinv[8 * j + 2 * t + e];
                s[4 * j + e] *= qi;
                s[4 * j + 2 + e] *= qi;
              }
          }
#pragma unroll
          for (int gf = 0; gf < kNG; ++gf)
            if (i == (2 * gf + 2) * kQH + kQF) fold(gf);
#pragma unroll
          for (int x = 0; x < kQB; ++x) {
            const int kk = kQB * hs + x;
            cvt_e4m3x4(word(ua, kk), fa[buf][x][0], fa[buf][x][2]);
            cvt_e4m3x4(word(ub, kk), fa[buf][x][1], fa[buf][x][3]);
          }
          sm90::wgmma_fence();
#pragma unroll
          for (int x = 0; x < kQB; ++x) {
            const int kk = kQB * hs + x;
            mma_rs<kN, true>(acc[grp % 2], fa[buf][x], dqg + ((c * L::kQChunk + kk * 32) >> 4),
                             ((c % 2) | kk) != 0);
          }
          sm90::wgmma_commit();
        }
      }
      sm90::wgmma_wait<0>();
#pragma unroll
      for (int gf = 0; gf < kNG; ++gf)
        if ((2 * gf + 2) * kQH + kQF > kSteps * kQH) fold(gf);
      if constexpr (kLateScales) load_scales();
      if constexpr (kSplit) {
        // S^T = this worker's partial (its rope half, its two groups) + the other's, through shared memory; double
        // buffered by page parity (a worker writes a buffer again only after the next exchange barrier, which the
        // other passes after reading it). s0 + s1 is the same float in both workers, so their softmax states agree.
        float* xw = sX + (2 * (page_idx & 1) + wk) * (kN / 2) * 128;
        const float* xr = sX + (2 * (page_idx & 1) + (wk ^ 1)) * (kN / 2) * 128;
        if constexpr (kRowSplit) {   // send the other worker's rows (s[8 (1 - wk) + i]), keep s[0..7] = own rows
#pragma unroll
          for (int i = 0; i < kN / 4; ++i) xw[i * 128] = wk ? s[i] : s[kN / 4 + i];
          sm90::bar_sync(kBarX, 256);
#pragma unroll
          for (int i = 0; i < kN / 4; ++i) s[i] = (wk ? s[kN / 4 + i] : s[i]) + xr[i * 128];
        } else {
#pragma unroll
          for (int i = 0; i < kN / 2; ++i) xw[i * 128] = s[i];
          sm90::bar_sync(kBarX, 256);
#pragma unroll
          for (int i = 0; i < kN / 2; ++i) s[i] += xr[i * 128];
        }
      }

      // Mask (select: NaN never reaches the max), the scale 2^(e_r - 14) x softmax scale, and the tile max per row:
      // over this thread's two tokens, the 8 lanes of its column (g), then the 4 warps. Lane t also reduces group
      // t's largest scale of the page.
      const int tok0 = blk * kPage + ta;
#pragma unroll
      for (int j = 0; j < kJs; ++j)   // (split rows: this worker's rows kR0 + 8 j + 2 t + e, red slots 8 j + 2 t + e)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int lim = kRowRegs ? rq_lim[kRowRegs ? j : 0][e] : sLim[8 * j + 2 * t + e];
          const float qms = kRowRegs ? rq_ms[kRowRegs ? j : 0][e] : sQms[8 * j + 2 * t + e];
#pragma unroll
          for (int a = 0; a < 2; ++a) {
            float& x = s[4 * j + 2 * a + e];
            x = tok0 + 8 * a < lim ? x * qms : -kInf;
          }
          float v = fmaxf(s[4 * j + e], s[4 * j + 2 + e]);
          v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 4));
          v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 8));
          v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 16));
          if (g == 0) red[warp * kRedW + 8 * j + 2 * t + e] = v;
        }
      {
        float v;
        if constexpr (kSplit && !kRowSplit)   // lane t: the worker's group t % 2 (lanes 2, 3 repeat lanes 0, 1)
          v = fmaxf(t % 2 == 0 ? csc[0][0] : csc[0][1], t % 2 == 0 ? csc[1][0] : csc[1][1]);
        else
          v = fmaxf(t == 0 ? csc[0][0] : t == 1 ? csc[0][1] : t == 2 ? csc[0][2] : csc[0][3],
                    t == 0 ? csc[1][0] : t == 1 ? csc[1][1] : t == 2 ? csc[1][2] : csc[1][3]);
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 4));
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 8));
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 16));
        if (g == 0) red[warp * kRedW + kN + t] = v;
      }
      sm90::bar_sync(bar_max, 128);
      float gfac[kMG];
      bool graise = false;
      {
        float gm[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          const float4 c4 = *reinterpret_cast<const float4*>(red + w * kRedW + kN);
          gm[0] = fmaxf(gm[0], c4.x); gm[1] = fmaxf(gm[1], c4.y); gm[2] = fmaxf(gm[2], c4.z); gm[3] = fmaxf(gm[3], c4.w);
        }
#pragma unroll
        for (int gi = 0; gi < kMG; ++gi) {
          const int mt = max(exp_of(gm[gi]), -120);   // same in every thread of the worker
          gfac[gi] = 1.f;
          if (mt > Mg[gi]) {
            gfac[gi] = pow2i(Mg[gi] - mt);
            Mg[gi] = mt;
            graise = true;
          }
        }
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
          for (int gi = 0; gi < kMG; ++gi) csc[a][gi] *= pow2i(6 - Mg[gi]);
      }
      float scl[kJ][2];
      bool any_up = false;
#pragma unroll
      for (int j = 0; j < kJs; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int r = 8 * j + 2 * t + e;
          const float v = fmaxf(fmaxf(red[r], red[kRedW + r]), fmaxf(red[2 * kRedW + r], red[3 * kRedW + r]));
          // Lazy rescaling: the running max moves only when the tile's max exceeds it by more than kSlack (log2
          // units), so P <= 2^kSlack and O is rarely rescaled; out and lse use the same max, so the result is exact.
          float mr = kStateSmem ? sM[(2 * j + e) * 128] : m[j][e];
          const bool up = v > mr + kSlack;
          scl[j][e] = 1.f;
          if (up) {
            scl[j][e] = exp2f(mr - v);
            mr = v;
            any_up = true;
          }
          if constexpr (kStateSmem) sM[(2 * j + e) * 128] = mr;
          else m[j][e] = mr;
          const float base = mr == -kInf ? 0.f : mr;
          float sum = 0.f;
#pragma unroll
          for (int a = 0; a < 2; ++a) {
            float& x = s[4 * j + 2 * a + e];
            x = exp2f(x - base);
            sum += x;
          }
          if constexpr (kStateSmem) sL[(2 * j + e) * 128] = sL[(2 * j + e) * 128] * scl[j][e] + sum;
          else l[j][e] = l[j][e] * scl[j][e] + sum;
        }
      // Four f16 P^T copies, group g's = P^T[t, r] scale[t, g] 2^(6 - M_g) <= 2^15 (P <= 2^kSlack, scale < 2^(M_g+1)).
      // stmatrix .trans: the accumulator fragment of 8 tokens x 8 rows (j, a) is stored as 8 rows of P^T; lane L
      // gives the address of row L % 8 of matrix L / 8 = 2 (j % 2) + a. (The previous P V is complete: every thread
      // waited for it.)
      {
        // (split rows: all four copies from their base, this worker's 16 rows)
        const uint32_t paddr = sPa - (kRowSplit ? kG0 * L::kPCopy - wk * 2048 : 0) +
                               swz(8 * (lane / 16) + lane % 8, 2 * warp + (lane / 8) % 2);
#pragma unroll
        for (int gi = 0; gi < kMG; ++gi)
#pragma unroll
          for (int jj = 0; jj < kJs / 2; ++jj) {
            uint32_t pr[4];
#pragma unroll
            for (int mtx = 0; mtx < 4; ++mtx) {
              const int j = 2 * jj + mtx / 2, a = mtx % 2;
              pr[mtx] = pack_f16x2(s[4 * j + 2 * a] * csc[a][gi], s[4 * j + 2 * a + 1] * csc[a][gi]);
            }
            fp8small::stmatrix_x4_trans(paddr + gi * L::kPCopy + jj * 2048, pr[0], pr[1], pr[2], pr[3]);
          }
      }
      if constexpr (kRowSplit) {
        // Own rows' rescale factors out, both workers' P^T rows complete (and every thread done with red), then the
        // other rows' factors in: O^T (this worker's groups, all rows) rescaled by row and by its groups' exponents.
        if (warp == 0 && g == 0) {
#pragma unroll
          for (int j = 0; j < kJs; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) sScl[kR0 + 8 * j + 2 * t + e] = scl[j][e];
        }
        sm90::fence_proxy_async();
        sm90::bar_sync(kBarP2, 256);
        float sa[kJ][2];   // factors of rows 8 j + 2 t + e
        bool need = false;
#pragma unroll
        for (int j = 0; j < kJ; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float own = scl[j % kJs][e];
            const float other = sScl[(8 * j + 2 * t + e) % kN];
            sa[j][e] = (j / kJs == wk) ? own : other;
            need |= sa[j][e] != 1.f;
          }
        const float gf[2] = {wk ? gfac[2 % kMG] : gfac[0], wk ? gfac[3 % kMG] : gfac[1 % kMG]};
        if (__any_sync(0xffffffffu, need) || gf[0] != 1.f || gf[1] != 1.f) {
#pragma unroll
          for (int mb = 0; mb < 2 * kNG; ++mb)
#pragma unroll
            for (int j = 0; j < kJ; ++j)
#pragma unroll
              for (int a = 0; a < 2; ++a)
#pragma unroll
                for (int e = 0; e < 2; ++e) o[mb][4 * j + 2 * a + e] *= sa[j][e] * gf[mb / 2];
        }
      } else {
      if (__any_sync(0xffffffffu, any_up) || graise) {
#pragma unroll
        for (int mb = 0; mb < 2 * kNG; ++mb)
#pragma unroll
          for (int j = 0; j < kJ; ++j)
#pragma unroll
            for (int a = 0; a < 2; ++a)
#pragma unroll
              for (int e = 0; e < 2; ++e) o[mb][4 * j + 2 * a + e] *= scl[j][e] * gfac[mb / 2];
      }
      sm90::fence_proxy_async();
      sm90::bar_sync(bar_p, 128);   // P^T complete (and every thread is done with red)
      }

      // ---- O^T += V^T P^T_g, A from registers: per k16 block kk, batches of kGB groups (blocks 2 G, 2 G + 1 each):
      // one ldmatrix.x4.trans per group, prmt + cvt; fragments double-buffered by batch ----

#pragma unroll
      for (int mb = 0; mb < 2 * kNG; ++mb) sm90::fence_regs(o[mb]);
      {
        const uint32_t vbase = sm90::smem_addr(raw) + v_lane;
        uint32_t pa[kPF][2 * kGB][4];   // [buffer][block of the batch][fragment register]
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
          for (int bt = 0; bt < kBatches; ++bt) {
            const int step = kk * kBatches + bt, buf = step % kPF;
            uint32_t r[kGB][4];
#pragma unroll
            for (int x = 0; x < kGB; ++x) ldsm_x4_trans(vbase + kk * 16 * kFp8TokenBytes + 128 * (kGB * bt + x), r[x]);
            if (step == 4 * kBatches - 1) sm90::mbar_arrive(&empty[rs]);   // this worker's last read of the page
            if (step >= kPF) sm90::wgmma_wait<kPF - 1>();   // the batch that used pa[buf] is done
#pragma unroll
            for (int x = 0; x < kGB; ++x)
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                // matrix 2h: tokens 0-7 of the block (fragment regs 0, 1), 2h + 1: tokens 8-15 (regs 2, 3)
                const uint32_t p0 = prmt(r[x][2 * h], 0x3120u), p1 = prmt(r[x][2 * h + 1], 0x3120u);
                uint32_t (&f)[4] = pa[buf][2 * x + h];
                cvt_e4m3x4(p0, f[0], f[1]);
                cvt_e4m3x4(p1, f[2], f[3]);
              }
            if (16 * kk + 16 > valid) {   // stale bytes past s_k: zeros (0 x NaN would reach O)
              const int tk = 16 * kk + 2 * t;
              const uint32_t m01 = (tk < valid ? 0x0000FFFFu : 0u) | (tk + 1 < valid ? 0xFFFF0000u : 0u);
              const uint32_t m23 = (tk + 8 < valid ? 0x0000FFFFu : 0u) | (tk + 9 < valid ? 0xFFFF0000u : 0u);
#pragma unroll
              for (int bl = 0; bl < 2 * kGB; ++bl) {
                pa[buf][bl][0] &= m01;
                pa[buf][bl][1] &= m01;
                pa[buf][bl][2] &= m23;
                pa[buf][bl][3] &= m23;
              }
            }
            sm90::wgmma_fence();
#pragma unroll
            for (int bl = 0; bl < 2 * kGB; ++bl) {
              const int mb = 2 * kGB * bt + bl;
              mma_rs<kN, true>(o[mb], pa[buf][bl],
                               dp0 + (((mb / 2) * L::kPCopy + kk * 32) >> 4), 1);
            }
            sm90::wgmma_commit();
          }
        }
      sm90::wgmma_wait<0>();
      }
#pragma unroll
      for (int mb = 0; mb < 2 * kNG; ++mb) sm90::fence_regs(o[mb]);
    }

    // (32 rows: m and l stay in shared memory through the merge, the register peak of the request end, too)
    auto m_of = [&](int j, int e) { return kStateSmem ? sM[(2 * j + e) * 128] : m[j][e]; };
    auto l_of = [&](int j, int e) { return kStateSmem ? sL[(2 * j + e) * 128] : l[j][e]; };
    // ---- O^T to true units; merge the two workers' partials of this request (worker 1 -> scratch -> worker 0) ----
#pragma unroll
    for (int mb = 0; mb < 2 * kNG; ++mb) {
      const float f = pow2i((kRowSplit ? (wk ? Mg[(2 + mb / 2) % kMG] : Mg[mb / 2]) : Mg[mb / 2]) - 6);
#pragma unroll
      for (int i = 0; i < kN / 2; ++i) o[mb][i] *= f;
    }
    if constexpr (!kSplit) {   // (split: each worker holds the whole request for its channels, nothing to merge)
    float* scratch =   // (formed here: registers are short in the page loop at 32 rows)
        merge_scratch + ((static_cast<long long>(blockIdx.y) * gridDim.x + blockIdx.x) * kMerge) * 128 + wt;
    if (wk == 1) {
      if (nreq > 0) sm90::mbar_wait(merge_free, (nreq - 1) & 1);   // worker 0 has read the previous one
#pragma unroll
      for (int mb = 0; mb < 8; ++mb)
#pragma unroll
        for (int i = 0; i < kN / 2; ++i) __stcg(scratch + (mb * (kN / 2) + i) * 128, o[mb][i]);
#pragma unroll
      for (int j = 0; j < kJ; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          __stcg(scratch + (8 * (kN / 2) + 2 * j + e) * 128, m_of(j, e));
          __stcg(scratch + (8 * (kN / 2) + 2 * kJ + 2 * j + e) * 128, l_of(j, e));
        }
      sm90::mbar_arrive(merged);
      continue;
    }
    sm90::mbar_wait(merged, nreq & 1);
    {
      float f0[kJ][2], f1[kJ][2];
#pragma unroll
      for (int j = 0; j < kJ; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float m1 = __ldcg(scratch + (8 * (kN / 2) + 2 * j + e) * 128);
          const float l1 = __ldcg(scratch + (8 * (kN / 2) + 2 * kJ + 2 * j + e) * 128);
          const float m0 = m_of(j, e);
          const float mx = fmaxf(m0, m1);
          f0[j][e] = mx == -kInf ? 0.f : exp2f(m0 - mx);
          f1[j][e] = mx == -kInf ? 0.f : exp2f(m1 - mx);
          const float lm = l_of(j, e) * f0[j][e] + l1 * f1[j][e];
          if constexpr (kStateSmem) {
            sM[(2 * j + e) * 128] = mx;
            sL[(2 * j + e) * 128] = lm;
          } else {
            m[j][e] = mx;
            l[j][e] = lm;
          }
        }
#pragma unroll
      for (int mb = 0; mb < 8; ++mb)
#pragma unroll
        for (int j = 0; j < kJ; ++j)
#pragma unroll
          for (int a = 0; a < 2; ++a)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int i = 4 * j + 2 * a + e;
              o[mb][i] = o[mb][i] * f0[j][e] + __ldcg(scratch + (mb * (kN / 2) + i) * 128) * f1[j][e];
            }
    }
    sm90::mbar_arrive(merge_free);
    }

    // ---- finish this request: row sums over the 8 lanes of a column and the 4 warps, then out/lse or partials ----
    const int split = req == begin_req ? meta[4] : num_splits[req];   // meta[4]: this part's first split
    const bool single = num_splits[req + 1] - num_splits[req] == 1;
#pragma unroll
    for (int j = 0; j < kJs; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float v = l_of(j, e);
        v += __shfl_xor_sync(0xffffffffu, v, 4);
        v += __shfl_xor_sync(0xffffffffu, v, 8);
        v += __shfl_xor_sync(0xffffffffu, v, 16);
        if (g == 0) red[warp * kRedW + 8 * j + 2 * t + e] = v;
      }
    sm90::bar_sync(bar_max, 128);
    const float empty_lse = single ? kInf : -kInf;
    const float kLn2 = 0.6931471805599453f;
    if constexpr (kRowSplit) {   // own rows: the sum to sLt, lse; then every row's sum from sLt
#pragma unroll
      for (int j = 0; j < kJs; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int rl = 8 * j + 2 * t + e, r = kR0 + rl;
          const float lt = red[rl] + red[kRedW + rl] + red[2 * kRedW + rl] + red[3 * kRedW + rl];
          if (warp == 0 && g == 0) {
            sLt[r] = lt;
            if (r < rows) {
              const float v = lt > 0.f ? (m[j][e] + log2f(lt)) * kLn2 : empty_lse;
              if (single) lse[(static_cast<long long>(req) * h_q + kvh * hpk + r % hpk) * s_q + r / hpk] = v;
              else lse_accum[(static_cast<long long>(split) * h_kv + kvh) * rows + r] = v;
            }
          }
        }
      sm90::bar_sync(kBarP2, 256);
    }
    const int ch0 = 32 * warp + 2 * g;   // block mb = 2 G + h: channels 128 G + 16 h + ch0 (+1)
#pragma unroll
    for (int j = 0; j < kJ; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int r = 8 * j + 2 * t + e;
        if (r >= rows) continue;
        const float lt = kRowSplit ? sLt[r] : red[r] + red[kRedW + r] + red[2 * kRedW + r] + red[3 * kRedW + r];
        const float inv = lt > 0.f ? 1.f / lt : 0.f;
        if (!kRowSplit && warp == 0 && g == 0 && (!kSplit || wk == 0)) {   // (split: both workers hold the same m, l)
          const float v = lt > 0.f ? (m_of(j, e) + log2f(lt)) * kLn2 : empty_lse;
          if (single) lse[(static_cast<long long>(req) * h_q + kvh * hpk + r % hpk) * s_q + r / hpk] = v;
          else lse_accum[(static_cast<long long>(split) * h_kv + kvh) * rows + r] = v;
        }
        if (single) {
          T* dst = out + ((static_cast<long long>(req) * s_q + r / hpk) * h_q + kvh * hpk + r % hpk) * kDV + ch0;
#pragma unroll
          for (int mb = 0; mb < 2 * kNG; ++mb) {
            const __nv_bfloat162 p = __floats2bfloat162_rn(o[mb][4 * j + e] * inv, o[mb][4 * j + 2 + e] * inv);
            *reinterpret_cast<__nv_bfloat162*>(dst + 128 * (kG0 + mb / 2) + 16 * (mb % 2)) = p;
          }
        } else {
          float* dst = o_accum + ((static_cast<long long>(split) * h_kv + kvh) * rows + r) * kDV + ch0;
#pragma unroll
          for (int mb = 0; mb < 2 * kNG; ++mb)
            *reinterpret_cast<float2*>(dst + 128 * (kG0 + mb / 2) + 16 * (mb % 2)) =
                make_float2(o[mb][4 * j + e] * inv, o[mb][4 * j + 2 + e] * inv);
        }
      }
  }
}

}  // namespace fp8regs
}  // namespace mla
}  // namespace deepstack
