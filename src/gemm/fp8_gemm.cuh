// sm_90a FP8 GEMM with fine-grained scaling: D[m, n] = C[m, n] + sum_kb sa[m, kb] * sb[., kb] * (A[m, kb] . B[n, kb])
// A [M, K] and B [N, K] are e4m3, both K-major. Scales:
//   A: fp32 per 1x128 group, MN-major (read per stage by TMA: one [BLOCK_M] column of the scale matrix).
//   B: kSfbPerRow = false ("1D2D", inference): fp32 per 128x128 block, read with plain loads;
//      kSfbPerRow = true  ("1D1D", weight gradient): fp32 per 1x128 group of B rows, MN-major, read by TMA.
//
// Design (see docs/gemm.md):
//   - Warp-specialised: warpgroups 0..kMathWG-1 compute, the last warpgroup produces (one thread issues TMA).
//     setmaxnreg moves registers from the producer to the math warpgroups.
//   - kStages-deep shared-memory ring (full/empty mbarriers); each stage holds one 128-deep K slice.
//   - Two-level accumulation: each K slice accumulates on the tensor cores (4 x wgmma k32) into `acc`, then is
//     promoted on the CUDA cores into the fp32 `fin` with scale_a * scale_b. This is what keeps FP8 accurate.
//   - Persistent: gridDim.x CTAs walk the tile list with a stride; tiles are rasterised in bands of
//     `band` M-blocks so that CTAs running together share B (and A) tiles in L2.
//   - Kinds: dense; m-grouped contiguous (group id per row, -1 rows skipped and never written); m-grouped masked
//     (masked_m[g] rows valid per group, read on the device, so the grid does not depend on it).
// N and K are template arguments (JIT-specialised; kK = 0 makes K a run-time value); M is a run-time value.
#pragma once
#include <cstdint>
#include <cuda.h>
#include <cuda_bf16.h>
#include <type_traits>

#include "common/sm90.cuh"
#include "common/vec.cuh"
#include "gemm/wgmma_fp8.cuh"

namespace deepstack {

// kGemmKGrouped: the MoE weight gradient, D[g] = A[:, seg_g] B[:, seg_g]^T for consecutive K segments (1D1D scales,
// run-time K): `layout` holds the G + 1 segment bounds in 128-deep slices, D (and C) are [G, M, N] with packed groups.
enum GemmKind : int { kGemmDense = 0, kGemmContiguous = 1, kGemmMasked = 2, kGemmKGrouped = 3 };

template <typename T> struct OutStore;
template <> struct OutStore<__nv_bfloat16> {
  static __device__ __forceinline__ void pair(__nv_bfloat16* p, float a, float b) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
  }
  static __device__ __forceinline__ void one(__nv_bfloat16* p, float a) { *p = __float2bfloat16_rn(a); }
};
template <> struct OutStore<float> {
  static __device__ __forceinline__ void pair(float* p, float a, float b) { *reinterpret_cast<float2*>(p) = make_float2(a, b); }
  static __device__ __forceinline__ void one(float* p, float a) { *p = a; }
};
__device__ __forceinline__ float load_c(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load_c(const float* p) { return *p; }

// TMA tensor stores (shared -> global, bulk async-group completion), for the TMA-store epilogue.
// Out-of-bounds rows and columns of the box are not written.
__device__ __forceinline__ void tma_store_2d(const CUtensorMap* map, const void* src, int c0, int c1) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];"
               ::"l"(reinterpret_cast<uint64_t>(map)), "r"(sm90::smem_addr(src)), "r"(c0), "r"(c1) : "memory");
}
// Four 8x8 bf16 matrices from the mma fragment layout (register i: row lane / 4, columns 2 (lane % 4) + {0, 1} of
// matrix i) to the rows whose addresses lanes 8i..8i+7 give.
__device__ __forceinline__ void stmatrix_x4(uint32_t addr, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};"
               ::"r"(addr), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}
__device__ __forceinline__ void tma_store_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
// Wait until the committed stores have finished reading shared memory (the buffer may be rewritten)...
__device__ __forceinline__ void tma_store_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }
// ... or have completed entirely (before the CTA exits).
__device__ __forceinline__ void tma_store_wait_all() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }

// Which (group, m-block, n-block) the linear tile index t is, and whether it has any valid row.
struct GemmTile {
  int g, m0, n0;
};

// Unsigned division by a divisor fixed for the kernel (Granlund-Montgomery: n / d = (umulhi(n, mul) + n) >> shift
// for n < 2^31, with shift = ceil(log2 d), mul = 2^32 (2^shift - d) / d + 1), set up once per thread. The tile
// placement divided by run-time values per tile with the compiler's generic sequence (I2F, MUFU.RCP, F2I, ~25
// dependent instructions each), which the math warps ran between tiles (ncu: ~4% of the samples of a 128 x 128
// contiguous GEMM at K = 2048). Where it is used: fast_place_for below.
struct FastDiv {
  uint32_t mul, shift;
  __device__ __forceinline__ void init(uint32_t d) {        // d >= 1
    shift = d > 1 ? 32 - __clz(d - 1) : 0;
    mul = static_cast<uint32_t>(((1ull << 32) * ((1ull << shift) - d)) / d + 1);
  }
  __device__ __forceinline__ int div(int n) const {         // 0 <= n < 2^31
    return static_cast<int>((__umulhi(static_cast<uint32_t>(n), mul) + static_cast<uint32_t>(n)) >> shift);
  }
};

// Tile placement with FastDiv, where it measured faster than the generic divisions (H200, 2026-12-01, ab_gemm.py
// --steady, two passes each): the contiguous kind with 128-row tiles up to K = 8192 (4 x 8192 x 7168 x 2048 +4.9 /
// +5.4%, 4 x 8192 x 4096 x 7168 +0.6 / +2.3%, MoE-like 32 groups x ~1024 rows x 7168 x 2048 +3.4 / +5.0%) and dense
// 128 x 128 tiles up to K = 2048 (2048 x 7168 x 2048 +1.9 / +2.3%, 3072 x 7168 x 2048 +2.6 / +3.1%). Not taken:
// dense 128 x 128 at K = 16384 -3.1 / -3.8%, 128 x 176 at K = 2048 -0.9 / -1.3% (level at 7168), 256-row tiles
// +0.9..+1.9% at K <= 1536 but -0.5..-3.2% at K >= 2048 (why long K loses is not understood: the main loop's
// instructions are the same). DS_FAST_PLACE / DS_SLOW_PLACE force it on / off for every kind but masked. (The
// one-tile id lookahead, DS_ID_LOOKAHEAD1, and the opt-in 256-row contiguous tiles keep the divisions: with
// FastDiv's registers they spilled 8 and 120 bytes.)
__host__ __device__ constexpr bool fast_place_for(int kind, int block_m, int block_n, int k, bool sfb_per_row) {
#if defined(DS_FAST_PLACE)
  return kind != kGemmMasked;
#elif defined(DS_SLOW_PLACE) || defined(DS_ID_LOOKAHEAD1)
  return false;
#else
  return !sfb_per_row && k > 0 && block_m <= 128 &&
         ((kind == kGemmContiguous && k <= 8192) || (kind == kGemmDense && block_m == 128 && block_n <= 128 &&
                                                     k <= 2048));
#endif
}

template <int kKind, int kBlockM, int kBlockN, int kN, bool kFastPlace = false>
struct TileScheduler {
  int M, num_groups, band;
  int num_mb, total;
  // (kFastPlace: the placement's divisors, see FastDiv; not for the masked kind, whose M-blocks per group vary)
  int last_band, last_rows;
  FastDiv div_band_tiles, div_band, div_last, div_group_tiles;
  const int* layout;  // contiguous: group id per row; masked: masked_m per group; k-grouped: segment bounds

  static constexpr int kNumNB = (kN + kBlockN - 1) / kBlockN;
  static constexpr int kKindValue = kKind, kBlockMValue = kBlockM;

  // Masked kind: the tile list holds only the M-blocks below each group's masked_m (read here from device memory,
  // so the grid never depends on it). Walking all M_max / BLOCK_M blocks and skipping the empty ones instead gave
  // the CTAs uneven work: with a CTA stride of 132 = 4 mod 16 and two valid M-blocks per 16-block band, only half
  // of the CTAs ever met a valid tile (4 x 256 rows ran 1.75x slower than 2 x 512).
  __device__ __forceinline__ int masked_blocks(int g) const {
    return min(num_mb, (max(__ldg(layout + g), 0) + kBlockM - 1) / kBlockM);
  }

  __device__ __forceinline__ TileScheduler(int M_, int groups_, int band_, const int* layout_)
      : M(M_), num_groups(groups_), band(band_), layout(layout_) {
    num_mb = (M + kBlockM - 1) / kBlockM;
    if (kKind == kGemmMasked) {
      total = 0;
      for (int g = 0; g < num_groups; ++g) total += masked_blocks(g) * kNumNB;
    } else {
      total = num_mb * kNumNB * (kKind == kGemmKGrouped ? num_groups : 1);
      if constexpr (kFastPlace) {
        last_band = (num_mb - 1) / band;
        last_rows = num_mb - last_band * band;
        div_band_tiles.init(band * kNumNB);
        div_band.init(band);
        div_last.init(max(last_rows, 1));   // (no tiles at all when M = 0)
        if (kKind == kGemmKGrouped) div_group_tiles.init(num_mb * kNumNB);
      }
    }
  }

  // Tile t's rows and columns (the masked kind: also its group; the contiguous kind's group is read by the caller).
  __device__ __forceinline__ void place(int t, GemmTile& tile) const {
    int g = 0, r = t, blocks = num_mb;
    if (kKind == kGemmMasked) {   // find t's group: the tiles of groups 0..g-1 come first
      for (blocks = masked_blocks(0); r >= blocks * kNumNB; blocks = masked_blocks(++g)) r -= blocks * kNumNB;
    }
    // (kFastPlace: each division by the kernel's fixed divisor, see FastDiv)
    if (kKind == kGemmKGrouped) {  // every group has the same M x N tiles; an empty segment's tiles store zeros (+ C)
      g = kFastPlace ? div_group_tiles.div(r) : r / (num_mb * kNumNB);
      r -= g * num_mb * kNumNB;
    }
    const int band_idx = kFastPlace ? div_band_tiles.div(r) : r / (band * kNumNB);
    const int within = r - band_idx * band * kNumNB;
    const bool last = kFastPlace && band_idx == last_band;
    const int rows = kFastPlace ? (last ? last_rows : band) : min(band, blocks - band_idx * band);
    const int nb = kFastPlace ? (last ? div_last.div(within) : div_band.div(within)) : within / rows;
    const int mb = band_idx * band + (kFastPlace ? within - nb * rows : within % rows);
    tile.m0 = mb * kBlockM;
    tile.n0 = nb * kBlockN;
    tile.g = g;
  }

  // Contiguous kind, math warps: one id of tile t per lane (IdLookahead): lane l < 16 row l of the warp's 16 rows
  // (from `warp_row`, for the epilogue's all-rows-valid vote; rows past M read as valid, TMA clips them), lane 16 the
  // M-block's first row, lanes 17-31 its last row (the tile's group is the larger of those two).
  __device__ __forceinline__ int load_lane_id(int t, int warp_row, int lane) const {
    if (kKind != kGemmContiguous || t >= total) return 0;
    GemmTile tile;
    place(t, tile);
    return lane_id_at(tile, warp_row, lane);
  }
  // The same for a placed tile; `dep` (0) is added to the address (IdLookahead2 orders its loads with it).
  __device__ __forceinline__ int lane_id_at(const GemmTile& tile, int warp_row, int lane, int dep = 0) const {
    const int r = lane < 16 ? tile.m0 + warp_row + lane : lane == 16 ? tile.m0 : min(tile.m0 + kBlockM, M) - 1;
    return r < M ? __ldg(layout + r + dep) : 0;
  }

  // 256-row contiguous tiles: half h's ids (rows m0 + 128 h on) as lane_id_at gives a 128-row tile's; -1 in every
  // lane for a half that starts at or past M. (Groups are padded to 128 rows, so each half holds one group.)
  __device__ __forceinline__ int lane_id_half(const GemmTile& tile, int h, int warp_row, int lane) const {
    const int h0 = tile.m0 + 128 * h;
    if (h0 >= M) return -1;
    const int r = lane < 16 ? h0 + warp_row + lane : lane == 16 ? h0 : min(h0 + 128, M) - 1;
    return r < M ? __ldg(layout + r) : 0;
  }
  // The same tile's two groups, from one thread (the producer): -1 for a padding half or one past M.
  __device__ __forceinline__ void resolve_halves(int t, GemmTile& tile, int& g0, int& g1) const {
    place(t, tile);
    g0 = max(__ldg(layout + tile.m0), __ldg(layout + min(tile.m0 + 128, M) - 1));
    g1 = tile.m0 + 128 < M ? max(__ldg(layout + tile.m0 + 128), __ldg(layout + min(tile.m0 + 256, M) - 1)) : -1;
  }

  // Returns false for tiles with no valid row (contiguous padding blocks).
  __device__ __forceinline__ bool resolve(int t, GemmTile& tile) const {
    place(t, tile);
    if (kKind == kGemmContiguous) {
      const int first = __ldg(layout + tile.m0);
      const int last = __ldg(layout + min(tile.m0 + kBlockM, M) - 1);
      tile.g = max(first, last);
      return tile.g >= 0;
    }
    return true;
  }
};

// Contiguous kind, math warps: a tile's group id comes from m_indices in global memory and is needed at once (B
// scales, epilogue vote). Loaded when the tile started, that load stalled both math warpgroups twice per tile
// (resolve, then the epilogue's vote; SASS: LDG, then VIMNMX / VOTE right behind it) with the tensor cores idle.
// The lookahead loads tile t + stride's ids when tile t starts, so they arrive under t's main loop. The ids are
// per-lane values (load_lane_id) read out with shuffles when the tile starts: loaded as warp-uniform values, ptxas
// moved them into uniform registers right at the load (R2UR), which waited for it there. DS_NO_ID_LOOKAHEAD (via
// DEEPSTACK_GEMM_DEFINES) restores the load-at-start form, for A/B runs. (The producer keeps the load-at-start form:
// its whole warp walking the tiles with this lookahead ran slower, see ProducerIdLookahead.)
// From a warp's ids of one tile (one per lane, see Sched::load_lane_id): the tile's group (lanes 16 / 17: its first
// and last rows; -1 for a padding block), and whether all 16 of the warp's rows are valid (no -1 id).
__device__ __forceinline__ int ids_group(int id) {
  return max(__shfl_sync(0xffffffffu, id, 16), __shfl_sync(0xffffffffu, id, 17));
}
__device__ __forceinline__ bool ids_rows_valid(int id, int lane) {
  return __all_sync(0xffffffffu, lane >= 16 || id >= 0);
}

// 256-row contiguous tiles: the two halves of a tile may belong to different groups (groups are padded to 128
// rows), and B is loaded once per K slice for all 256 rows. So a tile runs as one or two passes over K, each with
// one group and a mask of the 64-row waves it computes and stores (bit w: wave w, the half of rows 128 w on):
// halves of one group (or one half a padding block or past M): one pass; two groups: one pass per half. Producer
// and math warps both derive the passes from the halves' groups, so they walk the same K loops. Here: the first
// pass's group and waves, and the number of passes (a second one is always half 1's group, g1, wave mask 2).
struct TilePasses {
  int g, mask, n;
  __device__ __forceinline__ TilePasses(int g0, int g1) {
    const bool two = g0 >= 0 && g1 >= 0 && g0 != g1;
    g = two ? g0 : max(g0, g1);
    mask = two ? 1 : (g0 >= 0 ? 1 : 0) | (g1 >= 0 ? 2 : 0);
    n = two ? 2 : (mask ? 1 : 0);
  }
};

// 256-row contiguous tiles, math warps: the IdLookahead below for both halves of a tile, the two ids of a lane
// packed as 16-bit halves of one register (the main loop has no registers to spare: two spilled at K = 384; the
// host keeps groups below 2^15 for these tiles).
template <typename Sched, bool kOn>
struct IdLookaheadHalves {
  int next, warp_row, lane;
  static __device__ __forceinline__ int lo(int v) { return static_cast<int>(static_cast<uint32_t>(v) << 16) >> 16; }
  static __device__ __forceinline__ int hi(int v) { return v >> 16; }
  __device__ __forceinline__ void load(const Sched& sched, int t) {
    if (!kOn || t >= sched.total) { next = 0; return; }
    GemmTile tile;
    sched.place(t, tile);
    next = (sched.lane_id_half(tile, 0, warp_row, lane) & 0xffff) |
           (sched.lane_id_half(tile, 1, warp_row, lane) << 16);
  }
  __device__ __forceinline__ IdLookaheadHalves(const Sched& sched, int first_tile, int warp_row_, int lane_)
      : warp_row(warp_row_), lane(lane_) {
    load(sched, first_tile);
  }
  // Tile t (whose ids `next` holds): its placement, the halves' groups and whether all 16 rows of this warp are
  // valid in each half; loads t + stride's ids.
  __device__ __forceinline__ void take(const Sched& sched, int t, int stride, GemmTile& tile, int& g0, int& g1,
                                       bool& whole0, bool& whole1) {
    sched.place(t, tile);
    const int id = next, first = __shfl_sync(0xffffffffu, id, 16), last = __shfl_sync(0xffffffffu, id, 17);
    g0 = max(lo(first), lo(last));
    g1 = max(hi(first), hi(last));
    whole0 = ids_rows_valid(lo(id), lane);
    whole1 = ids_rows_valid(hi(id), lane);
    load(sched, t + stride);
  }
};

template <typename Sched>
struct IdLookahead {
  int next, warp_row, lane;
  __device__ __forceinline__ IdLookahead(const Sched& sched, int first_tile, int warp_row_, int lane_)
      : warp_row(warp_row_), lane(lane_) {
    next = sched.load_lane_id(first_tile, warp_row, lane);
  }
  // Tile t (the one whose ids `next` holds): places it, takes its ids (`id`: this lane's, for valid_rows), starts
  // the loads for t + stride. False for a padding block.
  // (placed: `tile` already holds t's rows and columns)
  __device__ __forceinline__ bool take(const Sched& sched, int t, int stride, GemmTile& tile, int& id,
                                       bool placed = false) {
    if (!placed) sched.place(t, tile);
    id = next;
    tile.g = ids_group(id);
    next = sched.load_lane_id(t + stride, warp_row, lane);
    return tile.g >= 0;
  }
  // All 16 rows of this warp valid (no -1 id), from this tile's ids
  __device__ __forceinline__ bool valid_rows(int id) const { return ids_rows_valid(id, lane); }
};

// Two-tile id lookahead (contiguous kind with the B-scale lanes; default since 2026-11-30 06:31, +1.8..4.1% on the
// contiguous DSV3 shapes; DS_ID_LOOKAHEAD1 restores the one-tile IdLookahead): the math warps hold the ids of two
// tiles ahead (t + stride and t + 2 stride), with their placements, so when tile t starts the group of t + stride is
// already known (its ids arrived under t - stride's main loop) and that tile's B scales are fetched a whole tile
// ahead, as the dense kind's lanes are. With one tile of lookahead they can only be fetched when t's main loop ends
// (the group of t + stride arrives during it), and the next tile's first slice waits for that load (SASS: the
// slice's first SHFL of the scale register right before its full-barrier wait, an epilogue after the LDG). Also one
// tile placement per tile instead of two (load_lane_id and the lanes' fetch each placed t + stride).
template <typename Sched, bool kOn>
struct IdLookahead2 {
  int next, next2, lane, warp_row;
  int m1, n1, m2, n2;   // placements of the tiles whose ids next / next2 hold
  // (dep: 0, but computed from the values the tile start reads, so the load issues after those reads; see advance)
  __device__ __forceinline__ int load(const Sched& sched, int t, int& m0, int& n0, int dep = 0) const {
    if (t >= sched.total) return 0;
    GemmTile tile;
    sched.place(t, tile);
    m0 = tile.m0;
    n0 = tile.n0;
    return sched.lane_id_at(tile, warp_row, lane, dep);
  }
  __device__ __forceinline__ IdLookahead2(const Sched& sched, int first_tile, int stride, int warp_row_, int lane_)
      : next(0), next2(0), lane(lane_), warp_row(warp_row_), m1(0), n1(0), m2(0), n2(0) {
    if constexpr (kOn) {   // (off: no code at all, not even the address arithmetic)
      next = load(sched, first_tile, m1, n1);
      next2 = load(sched, first_tile + stride, m2, n2);
    }
  }
  // Tile t (whose ids `next` holds): its placement and group, this lane's id. False for a padding block.
  __device__ __forceinline__ bool take(GemmTile& tile, int& id) {
    tile.m0 = m1;
    tile.n0 = n1;
    id = next;
    tile.g = ids_group(id);
    next = next2;
    m1 = m2;
    n1 = n2;
    return tile.g >= 0;
  }
  // Starts the loads of tile t2's ids (t2 = t + 2 stride). All global loads of the math warps share one scoreboard
  // (SASS, nvcc 13.0), so a read of an older load placed after this one waits for this one too: in the default
  // contiguous kernel the first slice's B-scale shuffle waits for the ids load issued at that tile's start, a whole
  // L2 round trip per tile with the tensor cores idle. `dep` (0 at run time, computed from the values read at the
  // tile's start) makes this load's address depend on those reads, so they come first.
  __device__ __forceinline__ void advance(const Sched& sched, int t2, int dep) { next2 = load(sched, t2, m2, n2, dep); }
  // after take(t): the group of t + stride (-1: a padding block)
  __device__ __forceinline__ int ahead_group() const { return ids_group(next); }
  __device__ __forceinline__ bool valid_rows(int id) const { return ids_rows_valid(id, lane); }
};

// The producer thread's form (opt-in, DS_PRODUCER_ID_LOOKAHEAD, A/B runs): the ids of tile t + stride loaded when
// tile t starts. The lane index (0 for the producer thread) in the address keeps the loaded values out of uniform
// registers until they are used.
template <typename Sched>
struct ProducerIdLookahead {
  int first, last, lane;
  __device__ __forceinline__ void load(const Sched& sched, int t) {
    if (kGemmContiguous == Sched::kKindValue && t < sched.total) {
      GemmTile tile;
      sched.place(t, tile);
      first = __ldg(sched.layout + tile.m0 + lane);
      last = __ldg(sched.layout + min(tile.m0 + Sched::kBlockMValue, sched.M) - 1 + lane);
    }
  }
  __device__ __forceinline__ ProducerIdLookahead(const Sched& sched, int first_tile) : first(-1), last(-1) {
    asm volatile("mov.u32 %0, %%laneid;" : "=r"(lane));
    load(sched, first_tile);
  }
  __device__ __forceinline__ bool take(const Sched& sched, int t, int stride, GemmTile& tile) {
    sched.place(t, tile);
    tile.g = max(first, last);
    load(sched, t + stride);
    return tile.g >= 0;
  }
};

template <int V> struct IntC { static constexpr int value = V; };
// (lean slices) a stage's wgmma descriptor from stage 0's: the start-address field (low 14 bits, shared address / 16)
// advanced by `units`; it stays below 2^14 (shared memory < 256 KB), so nothing carries into the other fields and the
// high word is stage 0's (a constant: the stride field and the swizzle mode).
__device__ __forceinline__ uint64_t lean_desc(uint64_t desc0, int units) {
  return (desc0 & 0xffffffff00000000ull) | static_cast<uint32_t>(static_cast<uint32_t>(desc0) + units);
}
// A run-time int with IntC's interface (DS_SFB_RUNTIME: the B-scale block offset as a run-time value, for A/B runs).
struct RtInt { int value; };

// 1D2D B scales: calls f(IntC<o>{}) for the tile's column offset o = n0 % 128 inside its first 128-wide scale block
// (o is a multiple of kStep, the gcd of BLOCK_N and 128), so which scale block each 8-column fragment uses is known
// at compile time. With o a run-time value the promotion picked each fragment's scale with a compare and a select
// and ptxas re-multiplied every fragment's scale per slice: ~80 more instructions per slice at 128x160 than the 80
// FFMAs themselves (SASS, nvcc 13.0). One main-loop copy per offset instead (at most 128 / 16 = 8).
template <int kO, int kStep, typename F>
__device__ __forceinline__ void with_sfb_offset(int o, F&& f) {
  if constexpr (kO + kStep >= 128) {
    f(IntC<kO>{});
  } else {
    if (o == kO) f(IntC<kO>{}); else with_sfb_offset<kO + kStep, kStep>(o, f);
  }
}

template <int kBlockM, int kBlockN, int kN, int kK, int kStages, int kKind, bool kSfbPerRow, typename OutT,
          typename CT, bool kHasC, int kCluster = 1, bool kTmaStore = false>
__global__ void __launch_bounds__(((kBlockM == 256 ? 128 : kBlockM) / 64 + 1) * 128, 1)
fp8_gemm_kernel(const __grid_constant__ CUtensorMap tmap_a, const __grid_constant__ CUtensorMap tmap_b,
                const __grid_constant__ CUtensorMap tmap_sfa, const __grid_constant__ CUtensorMap tmap_sfb,
                const __grid_constant__ CUtensorMap tmap_d,
                OutT* __restrict__ d, const CT* c, const float* __restrict__ sfb, const int* __restrict__ layout,
                int M, int num_groups, int ldd, int ldc, int band, int sfb_sg, int sfb_sn, int sfb_sk, int num_kb_rt) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  static_assert(kBlockM == 64 || kBlockM == 128 || kBlockM == 256,
                "BLOCK_M is 64 (1 math warpgroup), 128 (2) or 256 (2, two waves each)");
  static_assert(kBlockN % 16 == 0 && kBlockN >= 16 && kBlockN <= 256, "BLOCK_N is a multiple of 16 in [16, 256]");
  // 1D2D: a tile starts at a multiple of kBlockN, so its offset inside a 128-wide B scale block is a multiple of
  // gcd(kBlockN, 128) (the lowest set bit here) and it touches at most kSfbSpan blocks (3 at most for BLOCK_N <= 256:
  // 176-wide tiles starting 96 or 112 columns into a block need three).
  constexpr int kSfbGcd = (kBlockN & -kBlockN) < 128 ? (kBlockN & -kBlockN) : 128;
  constexpr int kSfbSpan = (128 - kSfbGcd + kBlockN - 1) / 128 + 1;
  static_assert(kSfbSpan <= 3, "a tile spans at most three B scale blocks");
  // 256-row tiles (dense 1D2D, TMA-store epilogue): each of the two math warpgroups owns two 64-row waves of the
  // tile, rows 64 wg + 128 w (w = 0, 1), and runs each K slice's wgmmas wave by wave into one accumulator set,
  // promoting each wave before the next (two sets would not fit beside the 2 x BLOCK_N / 2 promoted registers).
  // Per K slice a B tile then serves 256 rows: half the barrier round trips, B loads and per-slice bookkeeping per
  // FLOP of 128-row tiles; the other warpgroup's wgmmas run while one promotes. This is the tile DeepGEMM runs at
  // M = 4096 (256 x 128, 3 stages), which measured 1.01-1.09x our 128-row tiles there (H200, 2026-11-30,
  // bench_gemm.py with a live DeepGEMM); ours with it: docs/gemm.md, session of 23:10 UTC.
  constexpr int kWaves = kBlockM == 256 ? 2 : 1;
  constexpr int kMathWG = kBlockM / 64 / kWaves;
  static_assert(kWaves == 1 || ((kKind == kGemmDense || kKind == kGemmContiguous) && !kSfbPerRow && kTmaStore &&
                                 kBlockN <= 128),
                "256-row tiles are for the dense and contiguous 1D2D kinds with the TMA-store epilogue, "
                "BLOCK_N <= 128");
  // 256-row contiguous tiles: one or two passes over K per tile (TilePasses), the halves' ids a tile ahead
  // (IdLookaheadHalves), the B scales per slice (no B-scale lanes).
  constexpr bool kContig256 = kWaves == 2 && kKind == kGemmContiguous;
  // 256-row tiles in 2-CTA clusters share A instead of B (DeepGEMM's M = 4096 form): the two CTAs take
  // horizontally adjacent N-blocks of one M-block and each loads half of the A tile (128 rows) by TMA multicast into
  // both, so L2 -> SM traffic per CTA and K slice drops from (256 + BLOCK_N) x 128 to (128 + BLOCK_N) x 128 bytes. A
  // CTA whose N-block lies past N still loads its half of A and releases its stages for its peer, and stores nothing.
  // 64-row tiles in 2-CTA clusters share A the same way (each CTA loads 32 of the 64 rows; opt-in): at M <= 128
  // every CTA re-reads all of A, so all SMs pull the same A lines from the same L2 slices at about the same time.
  constexpr bool kMcastA = kCluster == 2 && (kWaves == 2 || kBlockM == 64);
  constexpr int kMathThreads = kMathWG * 128;
  // Pipelined promotion (main loop below): two accumulator sets, so BLOCK_N <= 128 (3 x 64 registers per thread).
  // (128x144 fits in 232 registers where the K slices are a multiple of 8, spills 48 B otherwise, and ran 3-50%
  // slower than the serial 128x144 on the H200, 2026-11-30; not offered.)
  // DS_SERIAL_PROMOTE (via DEEPSTACK_GEMM_DEFINES) restores the one-slice-at-a-time loop for A/B runs.
  // The weight-gradient (1D1D) kernels pipeline too (+13-27% on the H200, 2026-11-30): their promotion reads the
  // stage's per-column B scales from shared memory, hence the second set of B-scale slots (kSfbSlots below).
#if !defined(DS_SERIAL_PROMOTE) && !defined(DS_DBG)
  constexpr bool kPipePromote = kBlockN <= 128 && kWaves == 1;
#else
  constexpr bool kPipePromote = false;
#endif
  // Slices per pipelined loop trip (a trip ends with nothing in flight, so one promotion per trip is not hidden):
  // 128-row tiles take trips of 8 (then one of 4 where 4..7 slices remain, then one at a time): +1-4% over trips of
  // 4 at M = 4096 on the H200; 64-row tiles keep trips of 4 (mixed, -8..+4%, in a kernel-only A/B). DS_PIPE4 /
  // DS_PIPE8 force 4 / 8 for A/B runs.
#if defined(DS_PIPE4)
  constexpr int kTrip = 4;
#elif defined(DS_PIPE8)
  constexpr int kTrip = 8;
#else
  constexpr int kTrip = kBlockM == 128 ? 8 : 4;
#endif
  // kK == 0: K is a run-time value (the weight-gradient GEMM, whose K is the token count).
  const int kNumKB = kK > 0 ? (kK + 127) / 128 : num_kb_rt;
#if defined(DS_DBG) && DS_DBG == 4
  const int kLoopKB = 0;  // skip the main loop: checks the scheduler and epilogue alone
#else
  const int kLoopKB = kNumKB;
#endif
  constexpr int kSfbBlocksN = (kN + 127) / 128;
  constexpr int kAccRegs = kBlockN / 2;
  // kCluster = 2 (dense 1D2D, launched as 2-CTA clusters): the two CTAs of a cluster take vertically adjacent
  // M-blocks of one N-block, and each loads half of the shared B tile with TMA multicast into both. L2 -> SM traffic
  // per CTA and K slice drops from (BLOCK_M + BLOCK_N) x 128 to (BLOCK_M + BLOCK_N / 2) x 128 bytes. A stage may be
  // refilled only when both CTAs have consumed it, so every math warp releases it in both CTAs. Opt-in on the
  // host side: on the H200 it was bit-identical but 1-8% slower than kCluster = 1 (not L2-bound there).
  // (128x192 tiles would spill: the cluster bookkeeping costs the math warps one register more)
  static_assert(kCluster == 1 || (kCluster == 2 && kKind == kGemmDense && !kSfbPerRow && kBlockN % 16 == 0 &&
                                  kBlockN <= (kWaves == 2 ? 128 : 160)),
                "2-CTA multicast is for the dense 1D2D kind, BLOCK_N <= 160 (B halves stay 8-row swizzle atoms)");
  // kTmaStore (bf16 output without C; any kind, 1D2D or 1D1D): the epilogue writes the tile into its own
  // BLOCK_M x BLOCK_N bf16 shared-memory buffer (each math warp its 16 rows: as 16 x 64 boxes of 2 KB with the 128-byte swizzle when
  // BLOCK_N is a multiple of 64, else as one unswizzled 16 x BLOCK_N box with rows BLOCK_N * 2 bytes apart) and leaves
  // it to TMA stores (tmap_d describes D, with the matching box and swizzle), so the math warps go on to the
  // next tile at once; a warp waits for its previous stores to have read the buffer only before rewriting it, a tile
  // later. The buffer costs pipeline stages (128x128: 6 -> 5), which is why the host enables it only for K-loops
  // short enough that the epilogue weighs more (measured, docs/gemm.md).
  constexpr int kEpiWarpBytes = kBlockN * 32;                   // one warp's 16 rows of bf16
  // Grouped kinds: a warp stores by TMA only when all its 16 rows are valid (contiguous: no -1 row, masked: below
  // masked_m), the staged stores otherwise.
  // (2-CTA multicast clusters with the TMA store: the experiment DEEPSTACK_GEMM_MULTICAST=2; each CTA stores its own
  // M-block, a CTA whose M-block lies past M stores nothing)
  static_assert(kKind != kGemmKGrouped || (kSfbPerRow && kK == 0 && kCluster == 1),
                "the k-grouped kind is the 1D1D weight gradient with a run-time K");
  static_assert(!kTmaStore || (!kHasC && (kCluster == 1 || kKind == kGemmDense) &&
                               std::is_same<OutT, __nv_bfloat16>::value),
                "the TMA-store epilogue is for bf16 output without C, clusters only for the dense kind");
  constexpr bool kTmaSwizzled = kBlockN % 64 == 0;
  constexpr uint32_t kBytesA = kBlockM * 128, kBytesB = kBlockN * 128;
  constexpr uint32_t kBytesSFA = kBlockM * 4, kBytesSFB = kSfbPerRow ? kBlockN * 4 : 0;
  constexpr uint32_t kStageBytes = kBytesA + kBytesB + kBytesSFA + kBytesSFB;   // what TMA delivers per stage
  // Each stage's B scales start 128-byte aligned, as bulk tensor copies require (block_n = 144 or 16 would
  // otherwise put odd stages at 64-byte offsets: a misaligned-address fault).
  constexpr int kSfbStride = kSfbPerRow ? (kBlockN + 31) / 32 * 32 : 0;
  // The pipelined 1D1D loop releases a stage when its promotion starts, before it reads the stage's
  // B scales (releasing after the promotion made ptxas spill 2.3 KB and serialise the wgmmas), so the B scales get
  // twice the slots: slice i's go to slot (stage, ring parity), which the producer reuses only for slice
  // i + 2 kStages, i.e. after every math warp released slice i + kStages, i.e. after it promoted slice i.
  constexpr int kSfbSlots = kSfbPerRow && kPipePromote ? 2 * kStages : kStages;

  // Dynamic shared memory, rounded up to 1024 bytes (the 128-byte swizzle needs 1024-byte aligned tiles).
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (sm90::smem_addr(smem_raw) & 1023)) & 1023);
  uint8_t* smem_a = smem;
  uint8_t* smem_b = smem_a + kStages * kBytesA;
  // TMA-store staging (1024-byte aligned, as the 128-byte swizzle needs: kBytesB is a multiple of 2048 here).
  constexpr uint32_t kTmaStageBytes = kTmaStore ? kBlockM * kBlockN * 2 : 0;
  uint8_t* smem_d = smem_b + kStages * kBytesB;
  float* smem_sfa = reinterpret_cast<float*>(smem_d + kTmaStageBytes);
  float* smem_sfb = smem_sfa + kStages * kBlockM;
  uint64_t* full = reinterpret_cast<uint64_t*>(smem_sfb + kSfbSlots * kSfbStride);
  uint64_t* empty = full + kStages;
  // Epilogue staging, one slice per math warp: 16 rows x 16 bf16 columns, rows 48 bytes apart (conflict-free
  // fragment writes). Accumulators leave through it as 16-byte row-contiguous stores instead of 4-byte ones: at
  // small K the 4-byte stores throttled the load/store queue (ncu: 31% of stall cycles at 4096x32768x512);
  // measured on the H200 +5-45% at M = 4096. DS_DIRECT_EPILOGUE (via DEEPSTACK_GEMM_DEFINES) turns it off for A/B
  // runs. bf16 output without C only (the weight-gradient and accumulate forms keep the direct stores).
#ifndef DS_DIRECT_EPILOGUE
  constexpr bool kStagedEpilogue = std::is_same<OutT, __nv_bfloat16>::value && !kHasC && kN % 8 == 0;
#else
  constexpr bool kStagedEpilogue = false;
#endif
  constexpr int kStageWords = 16 * 12;                          // per warp, 32-bit words
  // (with kTmaStore the staged path is the fallback for grouped warps with invalid rows and borrows each warp's part
  // of the TMA staging tile; an unaligned D takes the direct stores)
  uint32_t* epi_stage = reinterpret_cast<uint32_t*>(empty + kStages);
  // DS_SCHED_WARP (experiment, opt-in): a scheduler thread (warp 1 of the producer warpgroup) places the tiles and
  // resolves their groups (contiguous: the m_indices loads) kSchedSlots tiles ahead into a shared-memory ring; the
  // producer thread reads each tile's (m0, n0, g) from it instead of placing it itself (run-time integer divisions
  // and, for the contiguous kind, a global-load round trip per tile, on the path to each tile's first TMA load).
  // The ring sits after the staged epilogue's buffer (host: heuristic.sched_ring_bytes()).
#ifdef DS_SCHED_WARP
  constexpr bool kSchedWarp = kCluster == 1 && !kContig256;
#else
  constexpr bool kSchedWarp = false;
#endif
  constexpr int kSchedSlots = 4;
  uint64_t* sched_full = reinterpret_cast<uint64_t*>(
      reinterpret_cast<uint8_t*>(epi_stage) + ((kTmaStore || !kStagedEpilogue) ? 0 : 8 * kStageWords * 4));
  uint64_t* sched_empty = sched_full + kSchedSlots;
  int* sched_ent = reinterpret_cast<int*>(sched_empty + kSchedSlots);   // a tile's group, -1: padding block

  const int tid = threadIdx.x;
  // Warpgroup index through a shuffle: ptxas then knows it is warp-uniform and keeps the wgmma descriptors (which
  // depend on it) in uniform registers instead of rebuilding each from vector registers with R2UR per wgmma.
  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);
  if (tid == kMathThreads) {
    sm90::prefetch_tensor_map(&tmap_a);
    sm90::prefetch_tensor_map(&tmap_b);
    sm90::prefetch_tensor_map(&tmap_sfa);
    if (kSfbPerRow) sm90::prefetch_tensor_map(&tmap_sfb);
    if (kTmaStore) sm90::prefetch_tensor_map(&tmap_d);
  }
  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      sm90::mbar_init(full + s, 1);
      sm90::mbar_init(empty + s, kMathWG * 4 * kCluster);  // one arrival per math warp of each CTA
    }
    if constexpr (kSchedWarp) {
      for (int i = 0; i < kSchedSlots; ++i) {
        sm90::mbar_init(sched_full + i, 1);
        sm90::mbar_init(sched_empty + i, 1);
      }
    }
    sm90::fence_barrier_init();
    sm90::fence_proxy_async();
  }
  // With clusters the peer's barriers must be initialised before any multicast or remote arrive reaches them.
  if constexpr (kCluster > 1) sm90::cluster_sync(); else __syncthreads();

  // Clusters walk the list of cluster tiles (kCluster M-blocks high; sharing A: kCluster N-blocks wide); CTA `rank`
  // takes the rank-th block of each.
  using Sched = TileScheduler<kKind, kMcastA ? kBlockM : kBlockM * kCluster, kMcastA ? kBlockN * kCluster : kBlockN,
                              kN, kCluster == 1 && fast_place_for(kKind, kBlockM, kBlockN, kK, kSfbPerRow)>;
  const Sched sched(M, num_groups, band, layout);
#ifndef DS_NO_ID_LOOKAHEAD
  constexpr bool kIdLookahead = kKind == kGemmContiguous && !kContig256;
#else
  constexpr bool kIdLookahead = false;
#endif
#ifdef DS_PRODUCER_ID_LOOKAHEAD
  constexpr bool kProducerLookahead = kKind == kGemmContiguous && !kContig256;
#else
  constexpr bool kProducerLookahead = false;
#endif
  // (through a shuffle, like wg, so ptxas may take it as warp-uniform; the cluster build's loss of the uniform
  // datapath, 6x the R2UR of the single-CTA build, came from a mapa per slice and the final cluster barrier, both
  // gone: see empty_peer and the producer's last round of waits)
  const int rank = kCluster > 1 ? __shfl_sync(0xffffffffu, static_cast<int>(sm90::cluster_ctarank()), 0) : 0;
  const int first_tile = blockIdx.x / kCluster, tile_stride = gridDim.x / kCluster;
#if defined(DS_DBG) && DS_DBG == 3
  if (blockIdx.x == 0 && tid == 0) {  // dump the run-time parameters as the kernel sees them
    const float v[12] = {float(M), float(num_groups), float(ldd), float(ldc), float(band), float(sfb_sg),
                         float(sfb_sn), float(sfb_sk), float(num_kb_rt), float(sched.total), float(c == nullptr),
                         float(gridDim.x)};
    for (int i = 0; i < 12; ++i) d[i] = OutT(v[i]);
  }
  return;
#endif

  if (wg == kMathWG) {
    // ---------------- producer warpgroup ----------------
#ifndef DS_NO_SETMAXNREG
    sm90::regs_decrease<40>();
#endif
    // (the scheduler branch is taken per warp, by a warp-uniform test: a second single-thread branch beside the
    // producer's made ptxas treat the producer's loop as divergent and move its TMA operands out of uniform registers)
    const int pwarp = __shfl_sync(0xffffffffu, tid / 32, 0);
    if (kSchedWarp && pwarp == kMathThreads / 32 + 1) {
      if (tid % 32 == 0) {
      // scheduler thread: one ring entry per tile of this CTA (w: 1 valid, 0 padding block, -1 end of the list)
      int slot = 0;
      uint32_t ph = 0;
      for (int t = first_tile; t < sched.total; t += tile_stride) {
        GemmTile tile{0, 0, 0};
        const bool ok = sched.resolve(t, tile);
        sm90::mbar_wait(sched_empty + slot, ph ^ 1);
        sched_ent[slot] = ok ? tile.g : -1;
        sm90::mbar_arrive(sched_full + slot);      // release: the entry is visible to the producer's acquire
        if (++slot == kSchedSlots) { slot = 0; ph ^= 1; }
      }
      }
    } else if (tid == kMathThreads) {
      int s = 0;
      uint32_t phase = 0;
      ProducerIdLookahead<Sched> ids(sched, kProducerLookahead ? first_tile : sched.total);
      int slot = 0;
      uint32_t ph = 0;
      for (int t = first_tile; t < sched.total; t += tile_stride) {
        GemmTile tile;
        [[maybe_unused]] int pass_g1 = 0, passes = 1;
        if constexpr (kContig256) {
          int g0, g1;
          sched.resolve_halves(t, tile, g0, g1);
          const TilePasses tp(g0, g1);
          if (tp.n == 0) continue;                    // padding blocks
          tile.g = tp.g;
          pass_g1 = g1;
          passes = tp.n;
        } else if constexpr (kSchedWarp) {
          sm90::mbar_wait(sched_full + slot, ph);
          // (a shuffle from lane 0, this thread, hands the value to ptxas as warp-uniform: read from shared memory
          // and branched on, it made the whole loop divergent and every TMA load re-read its operands into uniform
          // registers)
          const int g = __shfl_sync(1u, sched_ent[slot], 0);
          sm90::mbar_arrive(sched_empty + slot);
          if (++slot == kSchedSlots) { slot = 0; ph ^= 1; }
          if (g < 0) continue;                        // padding block
          sched.place(t, tile);                       // (uniform arithmetic; only the group comes from the ring)
          tile.g = g;
        } else if (kProducerLookahead ? !ids.take(sched, t, tile_stride, tile) : !sched.resolve(t, tile)) {
          continue;
        }
        if (kMcastA) tile.n0 += rank * kBlockN; else tile.m0 += rank * kBlockM;
        // (256-row contiguous tiles: a pass per group; the second loads the same A, which the math warps read
        // only for its wave)
        for (int pass = 0; pass < (kContig256 ? passes : 1); ++pass) {
        if (kContig256 && pass == 1) tile.g = pass_g1;
        const int a_row = kKind == kGemmMasked ? tile.g * M + tile.m0 : tile.m0;
        const int b_row = (kKind == kGemmKGrouped ? 0 : tile.g * kN) + tile.n0;
        // k-grouped: the tile's segment, slices [kb0, kb0 + loop_kb) of the whole K
        const int kb0 = kKind == kGemmKGrouped ? __ldg(layout + tile.g) : 0;
        const int loop_kb = kKind == kGemmKGrouped ? __ldg(layout + tile.g + 1) - kb0 : kLoopKB;
        for (int kb = 0; kb < loop_kb; ++kb) {
          sm90::mbar_wait(empty + s, phase ^ 1);
          sm90::mbar_arrive_expect_tx(full + s, kStageBytes);
          const int kx = (kb0 + kb) * 128;
          if constexpr (kMcastA) {        // this CTA's half of A, into both CTAs; its own B
            sm90::tma_load_2d_multicast(smem_a + s * kBytesA + rank * (kBytesA / 2), &tmap_a, full + s, kx,
                                        a_row + rank * (kBlockM / 2), (1u << kCluster) - 1);
            sm90::tma_load_2d(smem_b + s * kBytesB, &tmap_b, full + s, kx, b_row);
          } else if constexpr (kCluster > 1) {   // its own A; this CTA's half of B, into both CTAs
            sm90::tma_load_2d(smem_a + s * kBytesA, &tmap_a, full + s, kx, a_row);
            sm90::tma_load_2d_multicast(smem_b + s * kBytesB + rank * (kBytesB / 2), &tmap_b, full + s, kx,
                                        b_row + rank * (kBlockN / 2), (1u << kCluster) - 1);
          } else {
            sm90::tma_load_2d(smem_a + s * kBytesA, &tmap_a, full + s, kx, a_row);
            sm90::tma_load_2d(smem_b + s * kBytesB, &tmap_b, full + s, kx, b_row);
          }
          sm90::tma_load_2d(smem_sfa + s * kBlockM, &tmap_sfa, full + s, tile.m0,
                            tile.g * kNumKB * (kKind == kGemmMasked) + kb0 + kb);
          if (kSfbPerRow) {
            const int slot = s + (kSfbSlots > kStages && phase ? kStages : 0);
            sm90::tma_load_2d(smem_sfb + slot * kSfbStride, &tmap_sfb, full + s, tile.n0, kb0 + kb);
          }
          if (++s == kStages) { s = 0; phase ^= 1; }
        }
        }   // passes
      }
      // Clusters: the peer's math warps release our stages remotely, so this CTA stays until every stage's last
      // fill has been released by both CTAs (one more round of the empty waits) instead of holding all warps in a
      // final cluster barrier (the idle producer warps then exit, as without clusters).
      if constexpr (kCluster > 1) {
        for (int i = 0; i < kStages; ++i) {
          sm90::mbar_wait(empty + s, phase ^ 1);
          if (++s == kStages) { s = 0; phase ^= 1; }
        }
      }
    }
  } else {
    // ---------------- math warpgroups ----------------
#ifndef DS_NO_SETMAXNREG
    sm90::regs_increase<kMathWG == 1 ? 248 : 232>();
#endif
    const int lane = tid % 32;
    const int warp_in_wg = (tid % 128) / 32;
    // clusters: the peer's empty barriers (its stage s at empty_peer + 8 s), for the releases of shared stages
    const uint32_t empty_peer = kCluster > 1 ? sm90::mapa_shared(sm90::smem_addr(empty), rank ^ 1) : 0;
    const int row_local = wg * 64 + warp_in_wg * 16 + lane / 4;  // and row_local + 8
    const int col_local = (lane % 4) * 2;                        // + 8 * j, and + 1
    float acc[kAccRegs];
    float fin[kAccRegs * kWaves];
    int s = 0;
    uint32_t phase = 0;
    // The host builds D's tensor map only for a 16-byte aligned base and row pitch; otherwise the plain epilogues.
    const bool tma_ok = kTmaStore && ((reinterpret_cast<uintptr_t>(d) | (static_cast<uintptr_t>(ldd) * 2)) & 15) == 0;
    // B-scale lanes (contiguous kind by default): 1D2D B scales read a tile ahead into registers, lane l holding
    // slice 32 r + l of each of the tile's scale blocks, and handed to the slices by shuffles, instead of one global
    // load per slice on the path to its promotion (SASS: the per-slice LDG sits right before the next slice's wgmmas
    // and its FMUL right after the wait for this slice). Dense and masked kinds load the next tile's scales when a
    // tile starts; the contiguous kind when its main loop ends (the next tile's group comes from the id lookahead).
    // H200 (docs/gemm.md, 2026-11-30 04:35 UTC session): 1.8-3.7% fewer SM cycles on the contiguous shapes, -1.5 to
    // +6.6% at steady clocks; dense shapes also lose 0.7-3.2% of their cycles but ran 0.8-2.2% slower at steady
    // (power-capped) clocks, so dense and masked kinds keep the per-slice loads. DS_SFB_LANES turns it on for every
    // kind, DS_NO_SFB_LANES off for every kind (A/B runs, tests).
#if defined(DS_SFB_LANES)
    constexpr bool kSfbLanesKind = true;
#elif defined(DS_NO_SFB_LANES)
    constexpr bool kSfbLanesKind = false;
#else
    constexpr bool kSfbLanesKind = kKind == kGemmContiguous;
#endif
    constexpr bool kSfbLanes = kSfbLanesKind && !kSfbPerRow && !kContig256 && kK > 0 && (kK + 127) / 128 <= 128 &&
                               (kKind != kGemmContiguous || kIdLookahead);
    constexpr int kSfbR = kSfbLanes ? ((kK + 127) / 128 + 31) / 32 : 1;     // registers per scale block
    constexpr int kSfbLoadBlk = (kSfbPerRow || 128 % kBlockN == 0) ? 1 : kSfbSpan;   // blocks a tile reads
    // Ids two tiles ahead (default; DS_ID_LOOKAHEAD1: one tile), so the contiguous kind's lanes fetch a tile's B
    // scales a whole tile ahead (IdLookahead2); replaces the one-tile lookahead there.
#ifndef DS_ID_LOOKAHEAD1
    constexpr bool kIdAhead2 = kKind == kGemmContiguous && kSfbLanes;
#else
    constexpr bool kIdAhead2 = false;
#endif
    IdLookahead<Sched> ids(sched, kIdLookahead && !kIdAhead2 ? first_tile : sched.total, wg * 64 + warp_in_wg * 16,
                           lane);
    IdLookahead2<Sched, kIdAhead2> ids2(sched, first_tile, tile_stride, wg * 64 + warp_in_wg * 16, lane);
    IdLookaheadHalves<Sched, kContig256> idsh(sched, first_tile, wg * 64 + warp_in_wg * 16, lane);
    // Lean slices (default since 2026-11-30 06:31, +0..3.7% dense, +1.5% on top of the two-tile lookahead contiguous;
    // DS_NO_LEAN_SLICE for the A/B control): less per-slice bookkeeping in the main loop, same operations on the same
    // values. (1) The wgmma descriptors of stage s are stage 0's plus s * (stage bytes / 16) (the descriptor's
    // address field is the shared address / 16, 14 bits, and every stage lies below 256 KB, so this is the value
    // smem_desc_sw128 computes), instead of rebuilding each from the stage address (mask, shift, or-in of the
    // constant fields: ~6 uniform instructions per operand and slice in the SASS). (2) The per-slice B-scale loads
    // (dense and masked kinds) walk a 64-bit pointer per scale block, one add per slice, instead of recomputing
    // block + k * stride with a sign extension and a 64-bit shift-add per slice.
#ifndef DS_NO_LEAN_SLICE
    constexpr bool kLean = true;
#else
    constexpr bool kLean = false;
#endif
    uint64_t desc_a0 = 0, desc_b0 = 0;
    if constexpr (kLean) {
      desc_a0 = sm90::smem_desc_sw128(smem_a + wg * 64 * 128);
      desc_b0 = sm90::smem_desc_sw128(smem_b);
    }
    float sfb_cur[kSfbR][3], sfb_nxt[kSfbR][3];
    if constexpr (kIdAhead2) {   // (read by the dependency below before a padding first tile has written them)
#pragma unroll
      for (int r = 0; r < kSfbR; ++r) {
#pragma unroll
        for (int i = 0; i < 3; ++i) sfb_cur[r][i] = 0.f;
      }
    }
    int sfb_nxt_tile = -1;                                      // the tile whose scales sfb_nxt holds...
    GemmTile sfb_nxt_place{0, 0, 0};                            // ... and its placement (reused: no second place())
    // tile tn's B scales, its first column n0 and group g given, into sfb_nxt (dep: see IdLookahead2::advance)
    const auto sfb_lanes_fetch = [&](int tn, int n0, int g, int dep) {
      const float* base = sfb + g * sfb_sg + dep;
#pragma unroll
      for (int i = 0; i < kSfbLoadBlk; ++i) {
        const float* p = base + min(n0 / 128 + i, kSfbBlocksN - 1) * sfb_sn;
#pragma unroll
        for (int r = 0; r < kSfbR; ++r) {
          const int kbl = 32 * r + lane;
          sfb_nxt[r][i] = kbl < kNumKB ? __ldg(p + kbl * sfb_sk) : 0.f;
        }
      }
      sfb_nxt_tile = tn;
    };
    // tile tn placed, then its B scales (contiguous: its group is given, from the ids; a padding block's is -1 and
    // its scales go unused)
    const auto sfb_lanes_load = [&](int tn, int g_contig) {
      if (!kSfbLanes || tn >= sched.total) return;
      GemmTile nt;
      sched.place(tn, nt);
      sfb_nxt_place = nt;
      if (kKind == kGemmContiguous) nt.g = max(g_contig, 0);
      // (A-sharing clusters: this CTA's columns are its rank's N-block of the pair, as the tile loop sets below)
      sfb_lanes_fetch(tn, nt.n0 + (kMcastA ? rank * kBlockN : 0), nt.g, 0);
    };
    // group of the tile whose ids the lookahead holds (contiguous kind)
    const auto ahead_group = [&]() { return ids_group(ids.next); };
    if constexpr (kSfbLanes && !kIdAhead2) sfb_lanes_load(first_tile, kKind == kGemmContiguous ? ahead_group() : 0);
    for (int t = first_tile; t < sched.total; t += tile_stride) {
      GemmTile tile;
      int row_id = 0;
      // (256-row contiguous tiles, packed into one register, as the main loop has none to spare: bits 0-1 the
      // first pass's waves, 2-3 whether each wave's 16 rows of this warp are all valid, 4 a second pass, 8 on its
      // group)
      [[maybe_unused]] int c256 = 0;
      if constexpr (kContig256) {
        int g0, g1;
        bool whole0, whole1;
        idsh.take(sched, t, tile_stride, tile, g0, g1, whole0, whole1);
        const TilePasses tp(g0, g1);
        if (tp.n == 0) continue;                      // padding blocks
        tile.g = tp.g;
        c256 = tp.mask | (whole0 ? 4 : 0) | (whole1 ? 8 : 0) | (tp.n == 2 ? 16 : 0) | (g1 << 8);
      } else if constexpr (kIdAhead2) {
        const bool valid = ids2.take(tile, row_id);
        const int g_ahead = ids2.ahead_group();           // tile t + stride's group (its ids arrived a tile ago)
        if (valid) {
          if (sfb_nxt_tile != t) sfb_lanes_fetch(t, tile.n0, tile.g, 0);   // the CTA's first tile only
#pragma unroll
          for (int r = 0; r < kSfbR; ++r) {
#pragma unroll
            for (int i = 0; i < kSfbLoadBlk; ++i) sfb_cur[r][i] = sfb_nxt[r][i];
          }
        }
        // New loads only after every read of the older ones (one scoreboard serves them all, see
        // IdLookahead2::advance): dep is 0 (M < 0 never holds) but depends on this tile's scales and the next
        // tile's group. Then the next tile's scales, a whole main loop ahead (also at a padding block, so no tile
        // after the first fetches its own; a padding block's group -1 reads group 0's, unused), and the ids of
        // t + 2 stride.
        const int dep = M < 0 ? (__float_as_int(sfb_cur[0][0]) ^ g_ahead) : 0;
        if (t + tile_stride < sched.total) sfb_lanes_fetch(t + tile_stride, ids2.n1, max(g_ahead, 0), dep);
        ids2.advance(sched, t + 2 * tile_stride, dep);
        if (!valid) continue;
      } else {
      const bool placed = kSfbLanes && sfb_nxt_tile == t;
      if (placed) tile = sfb_nxt_place;
      if (kIdLookahead ? !ids.take(sched, t, tile_stride, tile, row_id, placed)
                       : !(placed || sched.resolve(t, tile))) continue;
      if constexpr (kSfbLanes) {
        if (sfb_nxt_tile != t) sfb_lanes_load(t, tile.g);   // (contiguous: after a skipped padding block)
#pragma unroll
        for (int r = 0; r < kSfbR; ++r) {
#pragma unroll
          for (int i = 0; i < kSfbLoadBlk; ++i) sfb_cur[r][i] = sfb_nxt[r][i];
        }
        if (kKind != kGemmContiguous) sfb_lanes_load(t + tile_stride, 0);
      }
      }
      if (kMcastA) tile.n0 += rank * kBlockN; else tile.m0 += rank * kBlockM;
      // (256-row contiguous tiles: one pass per group of the tile, wmask its waves; every other tile one pass)
      for (int pass = 0; pass < (kContig256 ? 1 + ((c256 >> 4) & 1) : 1); ++pass) {
      [[maybe_unused]] int wmask = 3;
      if constexpr (kContig256) {
        if (pass == 1) tile.g = c256 >> 8;
        wmask = pass == 0 ? c256 & 3 : 2;
      }
#pragma unroll
      for (int i = 0; i < kAccRegs * kWaves; ++i) fin[i] = 0.f;
#if defined(DS_DBG) && DS_DBG == 4
#pragma unroll
      for (int i = 0; i < kAccRegs; ++i) fin[i] = 1.f + i;
#endif

      // 1D2D: the tile's columns span up to kSfbSpan 128-wide scale blocks of B, from block n0 / 128 on (clamped to
      // the last block: columns past N are never stored). Fragment j (columns 8j..8j+7) uses block (o + 8j) / 128
      // past it, with o = n0 % 128 a compile-time value (with_sfb_offset).
      const int nblk_lo = tile.n0 / 128;
      const float* sfb_tile = sfb + (kSfbPerRow ? 0 : tile.g * sfb_sg);
      const float* sfb_blk[3];
#pragma unroll
      for (int i = 0; i < 3; ++i) sfb_blk[i] = sfb_tile + min(nblk_lo + i, kSfbBlocksN - 1) * sfb_sn;
      // (lean slices) slice kb's B scale of block i at sfb_run[i]: the slices load in order, one step each
      const float* sfb_run[3] = {sfb_blk[0], sfb_blk[1], sfb_blk[2]};
      const int64_t sfb_step = sfb_sk;
      // BLOCK_N dividing 128 (tiles start at multiples of it): every tile lies in one scale block, so only the first
      // block's scale is read (fewer live registers in the main loop; the values are the same).
      constexpr bool kOneSfb = kSfbPerRow || 128 % kBlockN == 0;

      int kb = 0;
      // slices of this tile (k-grouped: its segment's; the producer walks the same count). Through a shuffle, so
      // ptxas knows it is warp-uniform and keeps it in a uniform register (a vector register live through the main
      // loop made the TMA-store form spill).
      const int loop_kb = kKind == kGemmKGrouped
          ? __shfl_sync(0xffffffffu, __ldg(layout + tile.g + 1) - __ldg(layout + tile.g), 0) : kLoopKB;
      const auto main_loop = [&](auto off, auto wm) {   // wm: the waves computed (IntC<3> or a run-time mask)
        // scale block (0, 1, 2 past nblk_lo) of fragment j, and the pick of one of up to three values by it
        const auto blk = [&](int j) { return kOneSfb ? 0 : (off.value + 8 * j) / 128; };
        const auto pick = [](int i, float x0, float x1, float x2) {
          return i == 0 ? x0 : (kSfbSpan < 3 || i == 1 ? x1 : x2);
        };
        // B scales of slice k_blk (blocks a fragment never uses are not loaded: their values are dead)
        const auto load_sfb = [&](int k_blk, float (&b)[3]) {
          if constexpr (kSfbLanes) {   // slice k_blk's scales from lane k_blk % 32 of register k_blk / 32
#pragma unroll
            for (int i = 0; i < 3; ++i) {
              if (i >= kSfbLoadBlk) { b[i] = b[0]; continue; }
              float v = sfb_cur[0][i];
#pragma unroll
              for (int r = 1; r < kSfbR; ++r) v = k_blk >= 32 * r ? sfb_cur[r][i] : v;
              b[i] = __shfl_sync(0xffffffffu, v, k_blk % 32);
            }
          } else if constexpr (kLean) {
#pragma unroll
            for (int i = 0; i < 3; ++i) {
              if (kOneSfb && i > 0) { b[i] = b[0]; continue; }
              b[i] = __ldg(sfb_run[i]);
              sfb_run[i] += sfb_step;
            }
          } else {
#pragma unroll
            for (int i = 0; i < 3; ++i) b[i] = (kOneSfb && i > 0) ? b[0] : __ldg(sfb_blk[i] + k_blk * sfb_sk);
          }
        };
        // Stage `stage`'s four k32 wgmmas into a, committed as one group (A rows a_off 16-byte units past the
        // warpgroup's first row: the second wave of a 256-row tile), shared by the pipelined and serial loops.
        const auto mma_stage = [&](float (&a)[kAccRegs], int stage, uint32_t a_off) {
          const uint64_t desc_a = (kLean ? lean_desc(desc_a0, stage * (kBytesA >> 4))
                                         : sm90::smem_desc_sw128(smem_a + stage * kBytesA + wg * 64 * 128)) + a_off;
          const uint64_t desc_b = kLean ? lean_desc(desc_b0, stage * (kBytesB >> 4))
                                        : sm90::smem_desc_sw128(smem_b + stage * kBytesB);
          sm90::fence_regs(a);
          sm90::wgmma_fence();
#pragma unroll
          for (int k = 0; k < 4; ++k) WgmmaFp8<kBlockN>::mma(desc_a + 2 * k, desc_b + 2 * k, a, k > 0);
          sm90::wgmma_commit();
        };
        if constexpr (kPipePromote) {
          // Slices go in trips (kTrip) through two accumulator sets: the wgmmas of slice i + 1 are issued before slice
          // i is waited for and promoted, so a warpgroup's promotion overlaps its own tensor-core work instead of
          // leaving the tensor cores to the other warpgroup (ncu: tensor pipe 73% busy with the serial promotion).
          // Nothing is in flight across the loop's back edge: ptxas serialises every wgmma (C7514) when accumulators
          // retired by a wait in one iteration were issued in another.
          float acc2[kAccRegs];
          float sc0[6], sc1[6];     // scale_a (rows r, r + 8) x scale_b of up to three blocks
          int st0 = 0, st1 = 0;
          const auto issue = [&](float (&a)[kAccRegs], float (&sc)[6], int& stage, int k_blk) {
            [[maybe_unused]] float b[3] = {0.f, 0.f, 0.f};
            if constexpr (!kSfbPerRow) load_sfb(k_blk, b);
            sm90::mbar_wait(full + s, phase);
            const float a0 = smem_sfa[s * kBlockM + row_local], a1 = smem_sfa[s * kBlockM + row_local + 8];
            if constexpr (kSfbPerRow) {   // (1D1D: the A scales alone; the B scales stay in the stage)
              sc[0] = a0;
              sc[1] = a1;
            } else {
#pragma unroll
              for (int i = 0; i < 3; ++i) { sc[2 * i] = a0 * b[i]; sc[2 * i + 1] = a1 * b[i]; }
            }
            mma_stage(a, s, 0);
            stage = s + (kSfbSlots > kStages && phase ? kStages : 0);   // (1D1D pipe: the B-scale slot)
            if (++s == kStages) { s = 0; phase ^= 1; }
          };
          const auto promote = [&](float (&a)[kAccRegs], const float (&sc)[6], int stage) {
            sm90::fence_regs(a);
            __syncwarp();
            if (lane == 0) sm90::mbar_arrive(empty + (kSfbSlots > kStages ? stage % kStages : stage));
            if constexpr (kSfbPerRow) {   // the serial loop's 1D1D promotion, same expressions, from the B-scale slot
              const float* sbr = smem_sfb + stage * kSfbStride + col_local;
#pragma unroll
              for (int j = 0; j < kBlockN / 8; ++j) {
                const float2 b = *reinterpret_cast<const float2*>(sbr + j * 8);
                fin[j * 4 + 0] = fmaf(a[j * 4 + 0], sc[0] * b.x, fin[j * 4 + 0]);
                fin[j * 4 + 1] = fmaf(a[j * 4 + 1], sc[0] * b.y, fin[j * 4 + 1]);
                fin[j * 4 + 2] = fmaf(a[j * 4 + 2], sc[1] * b.x, fin[j * 4 + 2]);
                fin[j * 4 + 3] = fmaf(a[j * 4 + 3], sc[1] * b.y, fin[j * 4 + 3]);
              }
              return;
            }
            if (kCluster > 1 && lane == 1) sm90::mbar_arrive_remote(empty_peer + 8 * stage);
#pragma unroll
            for (int j = 0; j < kBlockN / 8; ++j) {
              const int i = blk(j);
              const float r0 = pick(i, sc[0], sc[2], sc[4]), r1 = pick(i, sc[1], sc[3], sc[5]);
              fin[j * 4 + 0] = fmaf(a[j * 4 + 0], r0, fin[j * 4 + 0]);
              fin[j * 4 + 1] = fmaf(a[j * 4 + 1], r0, fin[j * 4 + 1]);
              fin[j * 4 + 2] = fmaf(a[j * 4 + 2], r1, fin[j * 4 + 2]);
              fin[j * 4 + 3] = fmaf(a[j * 4 + 3], r1, fin[j * 4 + 3]);
            }
          };
          // One trip of kT slices from kb: slice i is issued, then slice i - 1 (the other set) is waited for and
          // promoted; the last is promoted after wait_group 0.
          const auto trip = [&](auto len) {
            constexpr int kT = decltype(len)::value;
            issue(acc, sc0, st0, kb);
#pragma unroll
            for (int i = 1; i < kT; ++i) {
              if (i % 2) issue(acc2, sc1, st1, kb + i); else issue(acc, sc0, st0, kb + i);
              sm90::wgmma_wait<1>();
              if (i % 2) promote(acc, sc0, st0); else promote(acc2, sc1, st1);
            }
            sm90::wgmma_wait<0>();
            if ((kT - 1) % 2) promote(acc2, sc1, st1); else promote(acc, sc0, st0);
          };
          for (; kb + kTrip <= loop_kb; kb += kTrip) trip(IntC<kTrip>{});
          if (kTrip > 4 && kb + 4 <= loop_kb) {
            trip(IntC<4>{});
            kb += 4;
          }
        }
        // One K slice without pipelining, its B scales given (1D2D; unused by 1D1D, which reads them from the
        // stage).
        const auto serial_slice = [&](const float (&sb)[3], int kb) {
          sm90::mbar_wait(full + s, phase);
          // (256-row tiles: one wave after the other, each into acc and promoted into its own part of fin; both
          // waves' A scales are read first, as the stage may be refilled as soon as the last wave released it)
          float sa0w[kWaves], sa1w[kWaves];
#pragma unroll
          for (int w = 0; w < kWaves; ++w) {
            sa0w[w] = smem_sfa[s * kBlockM + w * 128 + row_local];
            sa1w[w] = smem_sfa[s * kBlockM + w * 128 + row_local + 8];
          }
#pragma unroll
          for (int w = 0; w < kWaves; ++w) {
            if (kContig256 && !((wm.value >> w) & 1)) continue;
            const float sa0 = sa0w[w], sa1 = sa1w[w];
            float* fw = fin + w * kAccRegs;
            mma_stage(acc, s, w * (128 * 128 >> 4));
            sm90::wgmma_wait<0>();
            sm90::fence_regs(acc);

            if (!kSfbPerRow) {
              if (w == kWaves - 1 || (kContig256 && wm.value == 1)) {   // the last wave computed
                __syncwarp();
                if (lane == 0) sm90::mbar_arrive(empty + s);  // stage free: smem operands and scales consumed
                if (kCluster > 1 && lane == 1) sm90::mbar_arrive_remote(empty_peer + 8 * s);
              }
              const float s00 = sa0 * sb[0], s01 = sa0 * sb[1], s02 = sa0 * sb[2];
              const float s10 = sa1 * sb[0], s11 = sa1 * sb[1], s12 = sa1 * sb[2];
#pragma unroll
              for (int j = 0; j < kBlockN / 8; ++j) {
                const int i = blk(j);
                const float r0 = pick(i, s00, s01, s02), r1 = pick(i, s10, s11, s12);
                fw[j * 4 + 0] = fmaf(acc[j * 4 + 0], r0, fw[j * 4 + 0]);
                fw[j * 4 + 1] = fmaf(acc[j * 4 + 1], r0, fw[j * 4 + 1]);
                fw[j * 4 + 2] = fmaf(acc[j * 4 + 2], r1, fw[j * 4 + 2]);
                fw[j * 4 + 3] = fmaf(acc[j * 4 + 3], r1, fw[j * 4 + 3]);
              }
            } else {
              const float* sbr = smem_sfb + (s + (kSfbSlots > kStages && phase ? kStages : 0)) * kSfbStride + col_local;
#pragma unroll
              for (int j = 0; j < kBlockN / 8; ++j) {
                const float2 b = *reinterpret_cast<const float2*>(sbr + j * 8);
                fin[j * 4 + 0] = fmaf(acc[j * 4 + 0], sa0 * b.x, fin[j * 4 + 0]);
                fin[j * 4 + 1] = fmaf(acc[j * 4 + 1], sa0 * b.y, fin[j * 4 + 1]);
                fin[j * 4 + 2] = fmaf(acc[j * 4 + 2], sa1 * b.x, fin[j * 4 + 2]);
                fin[j * 4 + 3] = fmaf(acc[j * 4 + 3], sa1 * b.y, fin[j * 4 + 3]);
              }
              __syncwarp();
              if (lane == 0) sm90::mbar_arrive(empty + s);
            }
#ifdef DS_DBG
            if (DS_DBG == 1 && kb == 0) {  // raw tensor-core partial of the first K slice
#pragma unroll
              for (int i = 0; i < kAccRegs; ++i) fw[i] = acc[i];
            }
            if (DS_DBG == 2) {  // the scales only
#pragma unroll
              for (int i = 0; i < kAccRegs; ++i) fw[i] = (i % 4 < 2 ? sa0 : sa1) * 1000.f + sb[0];
            }
#endif
          }
          if (++s == kStages) { s = 0; phase ^= 1; }
        };
        // 256-row tiles and (since 2026-12-01) the serial 1D2D loop of tiles wider than 128 (128x176 / 192,
        // 64x192): unrolled, with each slice's B scales loaded a slice ahead, so that the next slice's barrier wait
        // and scale reads can move up into this slice's last promotion (as in DeepGEMM's loop) and no global load
        // sits between a slice's wgmmas and its promotion. For the wide tiles on the H200 (ab_gemm.py --steady):
        // 4096x2112x7168 at 128x176 +3.6%, 64x24576x1536 at 64x192 +1.1%, 128x24576x1536 at 128x192 level.
        // DS_NO_SERIAL_AHEAD (A/B control) restores the plain loop for them.
#ifndef DS_NO_SERIAL_AHEAD
        constexpr bool kAheadLoop = kWaves == 2 || (!kSfbPerRow && !kPipePromote);
#else
        constexpr bool kAheadLoop = kWaves == 2;
#endif
        if constexpr (kAheadLoop) {
          float sb_next[3] = {0.f, 0.f, 0.f};
          if (kb < loop_kb) load_sfb(kb, sb_next);
#pragma unroll 4
          for (; kb < loop_kb; ++kb) {
            const float sb[3] = {sb_next[0], sb_next[1], sb_next[2]};
            if (kb + 1 < loop_kb) load_sfb(kb + 1, sb_next);
            serial_slice(sb, kb);
          }
        } else {
          for (; kb < loop_kb; ++kb) {
            float sb[3] = {0.f, 0.f, 0.f};
            if (!kSfbPerRow) load_sfb(kb, sb);
            serial_slice(sb, kb);
          }
        }
      };
      // (256-row contiguous tiles: a second copy of the loop for passes of one wave)
      const auto waves_loop = [&](auto off) {
        if (kContig256 && wmask != 3) main_loop(off, RtInt{wmask}); else main_loop(off, IntC<3>{});
      };
#if defined(DS_SFB_RUNTIME)
      waves_loop(RtInt{kOneSfb ? 0 : tile.n0 % 128});   // one loop, the offset a run-time value (A/B runs, tests)
#else
      if constexpr (kOneSfb) waves_loop(IntC<0>{}); else with_sfb_offset<0, kSfbGcd>(tile.n0 % 128, waves_loop);
#endif
      if (kSfbLanes && kKind == kGemmContiguous && !kIdAhead2) sfb_lanes_load(t + tile_stride, ahead_group());

      // ---- epilogue: registers -> global, only valid rows and columns ----
      int row_limit = M;
      // masked: rows below masked_m[g], and never past the group's M_max rows (a masked_m > M_max would write
      // into the next group, or past D's end for the last one; the reference clamps the same way)
      if (kKind == kGemmMasked) row_limit = min(M, __ldg(layout + tile.g));
      // masked and k-grouped: D (and C) viewed as [G * M, N]
      const int64_t row_base = kKind == kGemmMasked || kKind == kGemmKGrouped ? static_cast<int64_t>(tile.g) * M : 0;
      // (256-row tiles: wave by wave; `continue` below moves on to the next wave, then the next tile)
#pragma unroll
      for (int w = 0; w < kWaves; ++w) {
        if (kContig256 && !((wmask >> w) & 1)) continue;
        const float* fw = fin + w * kAccRegs;
        if constexpr (kTmaStore) {
          if (tma_ok) {
            uint8_t* buf = smem_d + (w * 8 + wg * 4 + warp_in_wg) * kEpiWarpBytes;
            const int row = tile.m0 + w * 128 + wg * 64 + warp_in_wg * 16;   // this warp's first row
            // Grouped kinds: the box writes all 16 rows (TMA clips only at the tensor's end), so a warp with an
            // invalid row among them (contiguous: id -1; masked: at or past masked_m) takes the staged stores below.
            bool whole = true;
            if (kKind == kGemmContiguous) {
              if (kContig256) {
                whole = (c256 >> (2 + w)) & 1;                                       // ids loaded a tile ahead
              } else if (kIdLookahead) {
                whole = kIdAhead2 ? ids2.valid_rows(row_id) : ids.valid_rows(row_id);   // loaded a tile ahead
              } else {
                const int r = row + lane % 16;
                whole = __all_sync(0xffffffffu, r >= M || __ldg(layout + r) >= 0);
              }
            }
            if (kKind == kGemmMasked) whole = row + 16 <= row_limit;
            if (kKind == kGemmKGrouped) whole = row + 16 <= M;     // (D is [G * M, N]: no rows into the next group)
            // this warp's stores of the previous tile have read the buffer (the staged stores reuse it too)
            if ((w == 0 || (kContig256 && wmask == 2)) && lane == 0) tma_store_wait_read();
            __syncwarp();
            if (whole) {
              // stmatrix (8 per 128 columns instead of 32 4-byte stores; H200 +0-2.5% at M = 4096): per pair of
              // 8-column blocks (j, j + 1) one x4 store of the matrices (rows 0-7, j), (8-15, j), (0-7, j + 1),
              // (8-15, j + 1); lane l gives row l % 8 (+ 8 for odd l / 8) of matrix l / 8. Row r's 16-byte chunk c sits
              // at chunk c ^ (r % 8) of its 128-byte box row (128-byte swizzle); buf is 1024-byte aligned and j even,
              // so the address is one per-lane base XOR (j % 8) << 4.
              // Unswizzled (BLOCK_N not a multiple of 64): row r at r * BLOCK_N * 2 bytes, 8-column block c at 16 c.
              const int rr = lane % 8, mi = lane / 8;
              const uint32_t z = kTmaSwizzled
                  ? (sm90::smem_addr(buf) + (rr + 8 * (mi % 2)) * 128 + (rr << 4)) ^ ((mi / 2) << 4)
                  : sm90::smem_addr(buf) + (rr + 8 * (mi % 2)) * (kBlockN * 2) + (mi / 2) * 16;
#pragma unroll
              for (int j = 0; j < kBlockN / 8; j += 2) {
                stmatrix_x4(kTmaSwizzled ? (z + (j / 8) * 2048) ^ ((j % 8) << 4) : z + j * 16,
                            pack2<__nv_bfloat16>(fw[j * 4 + 0], fw[j * 4 + 1]),
                            pack2<__nv_bfloat16>(fw[j * 4 + 2], fw[j * 4 + 3]),
                            pack2<__nv_bfloat16>(fw[j * 4 + 4], fw[j * 4 + 5]),
                            pack2<__nv_bfloat16>(fw[j * 4 + 6], fw[j * 4 + 7]));
              }
              sm90::fence_proxy_async();               // generic-proxy writes visible to the TMA (async proxy)
              __syncwarp();
              if (lane == 0 && row < M && (!kMcastA || tile.n0 < kN)) {
                const int trow = static_cast<int>(row_base) + row;   // masked: D viewed as [G * M_max, N]
                if constexpr (kTmaSwizzled) {
#pragma unroll
                  for (int b = 0; b < kBlockN / 64; ++b) tma_store_2d(&tmap_d, buf + b * 2048, tile.n0 + b * 64, trow);
                } else {
                  tma_store_2d(&tmap_d, buf, tile.n0, trow);
                }
                tma_store_commit();
              }
              continue;
            }
          }
        }
        if constexpr (kStagedEpilogue) {
          if (((reinterpret_cast<uintptr_t>(d) | (static_cast<uintptr_t>(ldd) * 2)) & 15) == 0) {
            // (with kTmaStore: the start of this warp's own part of the TMA staging tile, whose stores have read it)
            uint32_t* st = kTmaStore
                ? reinterpret_cast<uint32_t*>(smem_d + (w * 8 + wg * 4 + warp_in_wg) * kEpiWarpBytes)
                : epi_stage + (wg * 4 + warp_in_wg) * kStageWords;
            const int srow = lane >> 1, shalf = lane & 1;            // the row and 8-column half this lane stores
            const int grow = tile.m0 + w * 128 + wg * 64 + warp_in_wg * 16 + srow;
            bool row_ok = grow < row_limit;
            if (kKind == kGemmContiguous && row_ok) row_ok = __ldg(layout + grow) >= 0;
            OutT* drow = d + (row_base + grow) * static_cast<int64_t>(ldd);
#pragma unroll
            for (int cc = 0; cc < kBlockN / 16; ++cc) {
#pragma unroll
              for (int jj = 0; jj < 2; ++jj) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                  const int j = cc * 2 + jj;
                  st[(lane / 4 + h * 8) * 12 + jj * 4 + lane % 4] =
                      pack2<__nv_bfloat16>(fw[j * 4 + h * 2], fw[j * 4 + h * 2 + 1]);
                }
              }
              __syncwarp();
              const uint4 v = *reinterpret_cast<const uint4*>(st + srow * 12 + shalf * 4);
              const int col = tile.n0 + cc * 16 + shalf * 8;
              if (row_ok && col < kN) *reinterpret_cast<uint4*>(drow + col) = v;
              __syncwarp();                                          // reads done before the next slice overwrites
            }
            continue;
          }
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = tile.m0 + w * 128 + row_local + h * 8;
          bool valid = row < row_limit;
          if (kKind == kGemmContiguous && valid) valid = __ldg(layout + row) >= 0;
          if (!valid) continue;
          OutT* drow = d + (row_base + row) * static_cast<int64_t>(ldd);
          const CT* crow = kHasC ? c + (row_base + row) * static_cast<int64_t>(ldc) : nullptr;
          // C may be D itself (in-place accumulation), so the compiler may not move a load of C past a store to D:
          // loaded one by one between the stores, every value waited a full memory round trip (the k-grouped wgrad
          // with C ran at ~0.27x its speed without). Each thread reads only the elements it writes, so all of its
          // row's C values are loaded first, together.
          float cv[kHasC ? kBlockN / 4 : 1];
          if constexpr (kHasC) {
#pragma unroll
            for (int j = 0; j < kBlockN / 8; ++j) {
              const int col = tile.n0 + j * 8 + col_local;
              cv[j * 2] = col < kN ? load_c(crow + col) : 0.f;
              cv[j * 2 + 1] = col + 1 < kN ? load_c(crow + col + 1) : 0.f;
            }
          }
#pragma unroll
          for (int j = 0; j < kBlockN / 8; ++j) {
            const int col = tile.n0 + j * 8 + col_local;
            float v0 = fw[j * 4 + h * 2], v1 = fw[j * 4 + h * 2 + 1];
            if constexpr (kHasC) { v0 += cv[j * 2]; v1 += cv[j * 2 + 1]; }
            if (kN % 2 == 0) {
              if (col < kN) OutStore<OutT>::pair(drow + col, v0, v1);
            } else {
              if (col < kN) OutStore<OutT>::one(drow + col, v0);
              if (col + 1 < kN) OutStore<OutT>::one(drow + col + 1, v1);
            }
          }
        }
      }   // waves
      }   // passes
    }
    if constexpr (kTmaStore) {
      if (lane == 0) tma_store_wait_all();  // shared memory must outlive this warp's stores
    }
  }
#endif
}

}  // namespace deepstack
