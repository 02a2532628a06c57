// MLA decode over an FP8 paged KV cache for few q rows per KV head (s_q x h_q / h_kv <= 32), sm_90a.
// Dequantised K never goes through shared memory: both products take their A operand from registers.
//
// Why: mla_decode_fp8.cuh dequantises into a bf16 K ring that its one consumer then reads twice with shared-memory
// wgmma (QK^T's A and P V's A): ~330 KB of shared-memory traffic per 64-token page, N = 16/32 wgmma paced by those
// A reads (~1.4 / 1.9 us per page for the consumer alone), and a 2-stage ring that couples the dequantising warps
// to it. Here the raw 656-byte rows stay in a ring of whole pages (4 for 16 rows, 3 for 32; one bulk copy per page)
// and each worker warpgroup builds its wgmma A fragments straight from them (kN = q rows, 16 or 32):
//   S^T[64 tokens x kN] = K[64 x 576] . Q^T      A = K from registers: lane (g, t) of warp w holds tokens 16 w + g
//       (+8) and one 16-byte unit of e4m3 bytes per 64-channel step (units 2t, 2t+1 of each 128-byte group: no
//       bank conflicts). The channel order inside a step is what the registers hold (bytes 0 2 | 1 3 of each
//       word); Q is stored with the same permutation (q_channel), so the products are unchanged.
//   O^T[512 ch x kN] += V^T[512 x 64] . P^T      A = V^T from registers: lane (g, t) of warp w holds the 16
//       channels 16 (8 w + g) .. +15 (two M rows in each of the 8 m64 blocks) for tokens 16 kk + 2 t (+1, +8, +9),
//       the natural token order, so P^T is written unpermuted; byte pairs of two tokens are gathered with prmt.
//       Output rows are un-permuted when written (16 contiguous channels per lane).
//   e4m3 -> bf16 without conversion instructions: a byte's bits moved to bf16 positions are value * 2^-120; one
//   packed bf16 multiply by scale * 2^64 gives value * scale * 2^-56 (exact for power-of-two scales), and Q's latent
//   channels and P are stored times 2^56, so every product is exact and the tensor cores see only normal numbers.
// Roles (384 threads, 1 CTA per SM): WG0: warp 0 issues the page copies (cp.async.bulk, no registers). WG1 and WG2
// (workers) take alternate pages of the CTA's range (page index parity), each with its own Q copy, online softmax
// state and O^T for all kN rows, so each page is dequantised once (twice: once per product layout) and the two
// workers overlap each other's latencies. At the end of every request worker 1 passes its (m, l, O^T) through a
// global scratch buffer (one float per register, coalesced) to worker 0, which merges and writes the result.
// Registers: setmaxnreg 24 (copies) / 240 (workers): 24 + 2 x 240 = 3 x 168, the CTA's launch allocation (asking
// for more makes setmaxnreg.inc wait forever).
// Scheduling, split-KV partials, the combine kernel and the empty-row conventions are those of mla_decode.cuh.
#pragma once
#include "mla/mla_decode.cuh"
#include "mla/mla_decode_fp8.cuh"

namespace deepstack {
namespace mla {
namespace fp8regs {

// D[64 x N] (+)= A[64 x 16] (registers) * B[16 x N] (smem, K-major), bf16 in, fp32 accumulators.
__device__ __forceinline__ void mma_rs_n16(float (&d)[8], const uint32_t (&a)[4], uint64_t desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, %12, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
}
__device__ __forceinline__ void mma_rs_n32(float (&d)[16], const uint32_t (&a)[4], uint64_t desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, {%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
}
template <int kN>
__device__ __forceinline__ void mma_rs(float (&d)[kN / 2], const uint32_t (&a)[4], uint64_t desc_b, int acc) {
  if constexpr (kN == 16) mma_rs_n16(d, a, desc_b, acc);
  else mma_rs_n32(d, a, desc_b, acc);
}

// e4m3 bytes 1 and 3 of w (odd) or 0 and 2 (even) at bf16 bit positions (low half from the lower byte): value *
// 2^-120 each, e4m3 subnormals landing on bf16 subnormals.
__device__ __forceinline__ uint32_t e4m3_odd(uint32_t w) { return (w & 0x80008000u) | ((w >> 4) & 0x07F007F0u); }
__device__ __forceinline__ uint32_t e4m3_even(uint32_t w) { return e4m3_odd(w << 8); }
__device__ __forceinline__ uint32_t bmul(uint32_t x, __nv_bfloat162 s) {
  __nv_bfloat162 v = *reinterpret_cast<const __nv_bfloat162*>(&x);
  v = __hmul2(v, s);
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ uint32_t word(const uint4& u, int i) {
  return i == 0 ? u.x : i == 1 ? u.y : i == 2 ? u.z : u.w;
}
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}

constexpr float kTwo64 = 18446744073709551616.f;   // 2^64
constexpr float kTwo56 = 72057594037927936.f;      // 2^56

// Channel of Q (0..575) that the QK^T k position `kpos` (0..63) of 64-channel step c (0..8) multiplies.
__device__ __forceinline__ int q_channel(int c, int kpos) {
  const int kk = kpos / 16, j = kpos % 16, t = (j % 8) / 2, hi = j / 8, e = j % 2;
  if (c < 8) return 128 * (c / 2) + 16 * (2 * t + (c % 2)) + 4 * kk + hi + 2 * e;   // bytes 0 2 | 1 3 of a word
  return 512 + 16 * t + 4 * kk + 2 * hi + e;                                       // rope: bf16 pairs as stored
}

template <int kN>
struct Layout {
  static constexpr int kStages = kN == 16 ? 4 : 3;           // raw pages in flight (what fits next to Q)
  static constexpr int kPageBytes = kPage * kFp8TokenBytes;  // 41984 = 41 KB
  static constexpr int kQChunk = kN * 128;                   // Q [kN rows x 64 k positions], 128-byte swizzle
  static constexpr int kQWorker = 9 * kQChunk;
  static constexpr int kQ = 0;                               // [2 workers]
  static constexpr int kP = kQ + 2 * kQWorker;               // P^T [2 workers][kN rows x 64 tokens], 128-byte swizzle
  static constexpr int kRaw = kP + 2 * kN * 128;
  static constexpr int kRed = kRaw + kStages * kPageBytes;   // [2 workers][4 warps][kN] floats
  static constexpr int kBars = kRed + 2 * 4 * kN * 4;        // full[kStages], empty[kStages], merged, merge_free
  static constexpr int kBytes = kBars + (2 * kStages + 2) * 8;
  static constexpr int kAlloc = kBytes + 1024;
  static constexpr int kMergeFloats = 8 * (kN / 2) + 2 * 2 * (kN / 8);   // per worker thread: O^T, m, l
  static_assert(kQChunk % 1024 == 0 && kP % 1024 == 0 && kRaw % 1024 == 0, "swizzled tiles need 1024-byte alignment");
  static_assert(kAlloc <= 232448, "shared memory");
};

template <int kN>
__global__ void __launch_bounds__(384, 1) mla_decode_fp8_regs_kernel(
    const __nv_bfloat16* __restrict__ q, __nv_bfloat16* __restrict__ out, float* __restrict__ lse,
    float* __restrict__ o_accum, float* __restrict__ lse_accum, const int* __restrict__ block_table,
    const int* __restrict__ seqlens, const int* __restrict__ sched, const int* __restrict__ num_splits,
    const uint8_t* __restrict__ kcache, float* __restrict__ merge_scratch, int h_q, int h_kv, int s_q, int rows,
    int causal, int bt_stride, long long q_sb, long long q_ss, long long q_sh, long long tok_stride,
    float scale_log2) {
  static_assert(kN == 16 || kN == 32, "16 or 32 q rows per CTA");
  using L = Layout<kN>;
  constexpr int kS = L::kStages;
  constexpr int kJ = kN / 8;   // n8 column blocks of the accumulators
  constexpr int kMerge = L::kMergeFloats;
  constexpr int kProducerRegs = 24, kWorkerRegs = 240;   // 24 + 2 x 240 = 3 x 168: the launch allocation (more deadlocks setmaxnreg.inc)
  using T = __nv_bfloat16;

  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (sm90::smem_addr(smem_raw) & 1023u)) & 1023u);
  uint8_t* sRaw = smem + L::kRaw;
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + L::kBars);
  uint64_t* empty = full + kS;
  uint64_t* merged = empty + kS;       // worker 1's partial of the current request is in the scratch
  uint64_t* merge_free = merged + 1;   // worker 0 has read it

  const int tid = threadIdx.x;
  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < kS; ++s) {
      sm90::mbar_init(&full[s], 1);
      sm90::mbar_init(&empty[s], 128);
    }
    sm90::mbar_init(merged, 128);
    sm90::mbar_init(merge_free, 128);
    sm90::fence_barrier_init();
  }
  __syncthreads();

  const int* meta = sched + blockIdx.x * kSchedInts;
  const int begin_req = meta[0], begin_blk = meta[1], end_req = meta[2], end_blk = meta[3];
  const int kvh = blockIdx.y;

  if (tid < 128) {
    // ------------------------------------------- page copies (warp 0) -------------------------------------------
    sm90::regs_decrease<kProducerRegs>();
    if (tid >= 32) return;
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
  // Worker wk takes the pages with an index (counted over this CTA's whole range) of parity wk.
  sm90::regs_increase<kWorkerRegs>();
  const int wk = tid / 128 - 1;
  const int wt = tid % 128, warp = wt / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  uint8_t* sQ = smem + L::kQ + wk * L::kQWorker;
  uint8_t* sP = smem + L::kP + wk * kN * 128;
  float* red = reinterpret_cast<float*>(smem + L::kRed) + wk * 4 * kN;
  const int bar_q = 1 + 3 * wk, bar_max = 2 + 3 * wk, bar_p = 3 + 3 * wk;
  const int hpk = h_q / h_kv;
  const float kInf = __int_as_float(0x7f800000);
  constexpr float kSlack = 8.f;
  const uint32_t sQa = sm90::smem_addr(sQ), sPa = sm90::smem_addr(sP);
  const int chan0 = 16 * (8 * warp + g);      // this lane's 16 V channels
  float* scratch = merge_scratch + ((static_cast<long long>(blockIdx.y) * gridDim.x + blockIdx.x) * kMerge) * 128 + wt;
  int page_idx = 0;

  for (int req = begin_req; req <= end_req; ++req) {
    const int nreq = req - begin_req;
    const int sk = seqlens[req];
    const int nblk = (sk + kPage - 1) / kPage;
    const int b0 = req == begin_req ? begin_blk : 0;
    const int b1 = req == end_req ? end_blk : nblk;

    // Q rows -> shared memory in the permuted channel order (latent channels times 2^56), zeros past the last row.
    sm90::bar_sync(bar_q, 128);   // the previous request's reads of red are done
#pragma unroll 1
    for (int u = wt; u < kN * 72; u += 128) {
      const int lr = u / 72, cu = u % 72, c = cu / 8, unit = cu % 8;
      uint32_t v[4] = {0u, 0u, 0u, 0u};
      if (lr < rows) {
        const T* qrow = q + req * q_sb + (lr / hpk) * q_ss + (kvh * hpk + lr % hpk) * q_sh;
        const float mul = c < 8 ? kTwo56 : 1.f;
#pragma unroll
        for (int x = 0; x < 4; ++x) {
          const float lo = __bfloat162float(qrow[q_channel(c, 8 * unit + 2 * x)]) * mul;
          const float hi = __bfloat162float(qrow[q_channel(c, 8 * unit + 2 * x + 1)]) * mul;
          const __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);
          v[x] = *reinterpret_cast<const uint32_t*>(&p);
        }
      }
      *reinterpret_cast<uint4*>(sQ + c * L::kQChunk + swz(lr, unit)) = make_uint4(v[0], v[1], v[2], v[3]);
    }
    sm90::fence_proxy_async();
    sm90::bar_sync(bar_q, 128);

    float o[8][kN / 2];
#pragma unroll
    for (int mb = 0; mb < 8; ++mb)
#pragma unroll
      for (int i = 0; i < kN / 2; ++i) o[mb][i] = 0.f;
    // This thread's q rows: 8 j + 2 t + e (accumulator columns).
    // Causal: query s sees sk - s_q + s + 1 keys; s of each row packed in bytes (registers are short at 32 rows).
    float m[kJ][2], l[kJ][2];
    uint32_t qpos[(2 * kJ + 3) / 4] = {};
#pragma unroll
    for (int j = 0; j < kJ; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int r = 8 * j + 2 * t + e, k = 2 * j + e;
        m[j][e] = -kInf;
        l[j][e] = 0.f;
        qpos[k / 4] |= static_cast<uint32_t>(r < rows ? r / hpk : s_q - 1) << (8 * (k % 4));
      }
    const int lim_base = causal ? sk - s_q + 1 : sk;

#pragma unroll 1
    for (int blk = b0; blk < b1; ++blk, ++page_idx) {
      if ((page_idx & 1) != wk) continue;
      const int rs = page_idx % kS, rph = (page_idx / kS) & 1;
      const int valid = min(sk - blk * kPage, kPage);
      sm90::mbar_wait(&full[rs], rph);
      const uint8_t* raw = sRaw + rs * L::kPageBytes;

      // ---- S^T = K Q^T, A from registers: tokens 16 warp + g (+8); 9 steps of 64 channels, double-buffered ----
      float s[kN / 2];
      {
        const uint8_t* ra = raw + (16 * warp + g) * kFp8TokenBytes;
        const uint8_t* rb = ra + 8 * kFp8TokenBytes;
        const float4 sca = *reinterpret_cast<const float4*>(ra + 512);
        const float4 scb = *reinterpret_cast<const float4*>(rb + 512);
        const float sa4[4] = {sca.x, sca.y, sca.z, sca.w}, sb4[4] = {scb.x, scb.y, scb.z, scb.w};
        uint32_t a[2][2][4];   // half-steps of 2 k16 steps, double-buffered
#pragma unroll
        for (int c = 0; c < 9; ++c) {
          uint4 ua, ub, ua2, ub2;
          if (c < 8) {
            const int off = 128 * (c / 2) + 16 * (2 * t + (c % 2));
            ua = *reinterpret_cast<const uint4*>(ra + off);
            ub = *reinterpret_cast<const uint4*>(rb + off);
          } else {
            ua = *reinterpret_cast<const uint4*>(ra + 528 + 32 * t);
            ua2 = *reinterpret_cast<const uint4*>(ra + 528 + 32 * t + 16);
            ub = *reinterpret_cast<const uint4*>(rb + 528 + 32 * t);
            ub2 = *reinterpret_cast<const uint4*>(rb + 528 + 32 * t + 16);
          }
          const __nv_bfloat162 sa = __float2bfloat162_rn(sa4[(c / 2) % 4] * kTwo64);
          const __nv_bfloat162 sb = __float2bfloat162_rn(sb4[(c / 2) % 4] * kTwo64);
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int buf = half;
            if (c >= 1) sm90::wgmma_wait<1>();   // the half-step before the previous one is done with a[buf]
#pragma unroll
            for (int x = 0; x < 2; ++x) {
              const int kk = 2 * half + x;
              if (c < 8) {
                const uint32_t wa = word(ua, kk), wb = word(ub, kk);
                a[buf][x][0] = bmul(e4m3_even(wa), sa);   // k 2t, 2t+1   <- bytes 0, 2
                a[buf][x][1] = bmul(e4m3_even(wb), sb);
                a[buf][x][2] = bmul(e4m3_odd(wa), sa);    // k 2t+8, 2t+9 <- bytes 1, 3
                a[buf][x][3] = bmul(e4m3_odd(wb), sb);
              } else {   // rope: bf16 pairs as stored
                const uint4& pa = kk < 2 ? ua : ua2;
                const uint4& pb = kk < 2 ? ub : ub2;
                a[buf][x][0] = word(pa, (2 * kk) % 4);
                a[buf][x][1] = word(pb, (2 * kk) % 4);
                a[buf][x][2] = word(pa, (2 * kk + 1) % 4);
                a[buf][x][3] = word(pb, (2 * kk + 1) % 4);
              }
            }
            sm90::wgmma_fence();
#pragma unroll
            for (int x = 0; x < 2; ++x) {
              const int kk = 2 * half + x;
              mma_rs<kN>(s, a[buf][x], sm90::make_desc_sw128(sQa + c * L::kQChunk + kk * 32, 16, 1024),
                         (c | kk) != 0);
            }
            sm90::wgmma_commit();
          }
        }
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
          const int k = 2 * j + e;
          const int lim = lim_base + (causal ? static_cast<int>((qpos[k / 4] >> (8 * (k % 4))) & 0xFFu) : 0);
#pragma unroll
          for (int a = 0; a < 2; ++a) {
            float& x = s[4 * j + 2 * a + e];
            x = tok0 + 8 * a < lim ? x * scale_log2 : -kInf;
          }
          float v = fmaxf(s[4 * j + e], s[4 * j + 2 + e]);
          v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 4));
          v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 8));
          v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 16));
          if (g == 0) red[warp * kN + 8 * j + 2 * t + e] = v;
        }
      sm90::bar_sync(bar_max, 128);
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
      // P^T * 2^56 -> shared memory: [kN rows x 64 tokens], 128-byte swizzle (the previous P V is complete: every
      // thread waited for it).
#pragma unroll
      for (int j = 0; j < kJ; ++j)
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int r = 8 * j + 2 * t + e, tok = warp * 16 + g + 8 * a;
            *reinterpret_cast<T*>(sP + swz(r, tok / 8) + 2 * (tok % 8)) =
                __float2bfloat16_rn(s[4 * j + 2 * a + e] * kTwo56);
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
      sm90::bar_sync(bar_p, 128);   // P^T complete (and every thread is done with red)

      // ---- O^T += V^T P^T, A from registers: channels chan0 .. +15 (block mb: rows g, g+8 = chan0 + 2 mb, +1),
      // tokens 16 kk + 2 t (+1, +8, +9); half-steps of 4 blocks, double-buffered ----
#pragma unroll
      for (int mb = 0; mb < 8; ++mb) sm90::fence_regs(o[mb]);
      {
        uint32_t pa[2][4][4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          uint4 u[4];
          float sc[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int tok = 16 * kk + 2 * t + (i & 1) + 8 * (i >> 1);
            const uint8_t* row = raw + tok * kFp8TokenBytes;
            u[i] = *reinterpret_cast<const uint4*>(row + chan0);
            sc[i] = *reinterpret_cast<const float*>(row + 512 + 4 * warp);
            if (tok >= valid) {   // stale bytes past s_k: zeros (0 x NaN would reach O)
              u[i] = make_uint4(0u, 0u, 0u, 0u);
              sc[i] = 0.f;
            }
          }
          if (kk == 3) sm90::mbar_arrive(&empty[rs]);   // this worker's last read of the page
          const __nv_bfloat162 s01 = __floats2bfloat162_rn(sc[0] * kTwo64, sc[1] * kTwo64);
          const __nv_bfloat162 s23 = __floats2bfloat162_rn(sc[2] * kTwo64, sc[3] * kTwo64);
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int buf = half;
            if (kk >= 1) sm90::wgmma_wait<1>();   // the half-step before the previous one is done with pa[buf]
#pragma unroll
            for (int x = 0; x < 4; ++x) {
              const int mb = 4 * half + x;
              // bytes 2 (mb % 2) (row g) and +1 (row g + 8) of word mb / 2: tokens i, i + 1 to bytes 1, 3 and 0, 2
              const uint32_t sel = (mb % 2) ? 0x6723u : 0x4501u;
              const uint32_t y01 = prmt(word(u[0], mb / 2), word(u[1], mb / 2), sel);
              const uint32_t y23 = prmt(word(u[2], mb / 2), word(u[3], mb / 2), sel);
              pa[buf][x][0] = bmul(e4m3_odd(y01), s01);
              pa[buf][x][1] = bmul(e4m3_even(y01), s01);
              pa[buf][x][2] = bmul(e4m3_odd(y23), s23);
              pa[buf][x][3] = bmul(e4m3_even(y23), s23);
            }
            sm90::wgmma_fence();
#pragma unroll
            for (int x = 0; x < 4; ++x)
              mma_rs<kN>(o[4 * half + x], pa[buf][x], sm90::make_desc_sw128(sPa + kk * 32, 16, 1024), 1);
            sm90::wgmma_commit();
          }
        }
        sm90::wgmma_wait<0>();
      }
#pragma unroll
      for (int mb = 0; mb < 8; ++mb) sm90::fence_regs(o[mb]);
    }

    // ---- merge the two workers' partials of this request (worker 1 -> scratch -> worker 0) ----
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
          __stcg(scratch + (8 * (kN / 2) + 2 * j + e) * 128, m[j][e]);
          __stcg(scratch + (8 * (kN / 2) + 2 * kJ + 2 * j + e) * 128, l[j][e]);
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
          const float mx = fmaxf(m[j][e], m1);
          f0[j][e] = mx == -kInf ? 0.f : exp2f(m[j][e] - mx);
          f1[j][e] = mx == -kInf ? 0.f : exp2f(m1 - mx);
          m[j][e] = mx;
          l[j][e] = l[j][e] * f0[j][e] + l1 * f1[j][e];
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

    // ---- finish this request: row sums over the 8 lanes of a column and the 4 warps, then out/lse or partials ----
    const int split = req == begin_req ? meta[4] : num_splits[req];   // meta[4]: this part's first split
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
    sm90::bar_sync(bar_max, 128);
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
        float v[16];   // channels chan0 + 2 mb + a
#pragma unroll
        for (int mb = 0; mb < 8; ++mb)
#pragma unroll
          for (int a = 0; a < 2; ++a) v[2 * mb + a] = o[mb][4 * j + 2 * a + e] * inv;
        if (single) {
          T* dst = out + ((static_cast<long long>(req) * s_q + r / hpk) * h_q + kvh * hpk + r % hpk) * kDV + chan0;
          uint32_t w[8];
#pragma unroll
          for (int x = 0; x < 8; ++x) {
            const __nv_bfloat162 p = __floats2bfloat162_rn(v[2 * x], v[2 * x + 1]);
            w[x] = *reinterpret_cast<const uint32_t*>(&p);
          }
          reinterpret_cast<uint4*>(dst)[0] = make_uint4(w[0], w[1], w[2], w[3]);
          reinterpret_cast<uint4*>(dst)[1] = make_uint4(w[4], w[5], w[6], w[7]);
        } else {
          float* dst = o_accum + ((static_cast<long long>(split) * h_kv + kvh) * rows + r) * kDV + chan0;
#pragma unroll
          for (int x = 0; x < 4; ++x)
            reinterpret_cast<float4*>(dst)[x] = make_float4(v[4 * x], v[4 * x + 1], v[4 * x + 2], v[4 * x + 3]);
        }
      }
  }
}

}  // namespace fp8regs
}  // namespace mla
}  // namespace deepstack
