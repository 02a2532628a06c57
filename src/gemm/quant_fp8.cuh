// Fused FP8 quantisation kernels that emit the layouts the GEMM kernels read directly.
//   per_block_quant_fp8_kernel: weights, one fp32 scale per 128x128 block; optionally writes q transposed
//     ([K, N], the B operand of the data-gradient GEMM) through a shared-memory tile.
//   per_block_quant_fp8_dual_kernel: both of those at once (one DRAM read of the weight).
//   per_token_group_quant_fp8_t_kernel: activations/gradients quantised per 128 rows of each column and written
//     transposed ([K, M] with scales [K, ceil(M/128)] MN-major): the operands of the weight-gradient GEMM.
//   per_token_group_quant_fp8_dual_kernel: that and the per-token 1x128 layout at once (one DRAM read).
// Conventions match torch_deepstack/quant: scale = max(amax, eps) / 448 (rounded up to a power of two when
// kUe8m0), q = saturate_e4m3(x * inv) with inv = 448 / max(amax, eps) (or 1 / scale for power-of-two scales).
#pragma once
#include <cstdint>

#include "common/vec.cuh"

namespace deepstack {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float(float v) { return v; }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

__device__ __forceinline__ uint8_t float_to_e4m3(float v) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

template <bool kUe8m0>
__device__ __forceinline__ void scale_from_amax(float amax, float eps, float& scale, float& inv) {
  const float a = fmaxf(amax, eps);
  if (kUe8m0) {
    scale = ceil_to_ue8m0(a / 448.f);
    inv = 1.f / scale;
  } else {
    scale = a / 448.f;
    inv = 448.f / a;
  }
}

// Block-wide max over 256 threads.
__device__ __forceinline__ float block_max_256(float v, float* red) {
  v = group_max<32>(v);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  float r = red[0];
#pragma unroll
  for (int i = 1; i < 8; ++i) r = fmaxf(r, red[i]);
  return r;
}

// ---- vectorised paths (whole, 16-byte aligned blocks) ----------------------------------------------------------
// The scalar loops below read 2-byte elements and wrote single bytes: on the H200 the weight quantiser ran at ~30%
// of DRAM bandwidth, the transposed activation quantiser at ~35% (torch.profiler, 2026-11-30). These paths load
// 16-byte vectors into registers (each element read once), and a thread holds R consecutive rows of kV columns, so
// the transposed output leaves it as whole R-byte column pieces: one shared-memory store per column, swizzled by the
// thread's column vector so that a warp's stores hit distinct banks, then 16-byte global stores of q^T rows.

// Loads rows [r0, r0 + R) x columns [c0, c0 + kV) of x (row stride ldx) as floats.
template <typename T, int R>
__device__ __forceinline__ void load_rows(const T* __restrict__ x, int64_t ldx, int r0, int c0,
                                          float (&f)[R][16 / sizeof(T)]) {
  uint4 raw[R];
#pragma unroll
  for (int i = 0; i < R; ++i) raw[i] = __ldg(reinterpret_cast<const uint4*>(x + (r0 + i) * ldx + c0));
#pragma unroll
  for (int i = 0; i < R; ++i) Unpack16<T>::run(raw[i], f[i]);
}

// Four values times inv as four e4m3 bytes, the first in the lowest.
__device__ __forceinline__ uint32_t e4m3x4(float a, float b, float c, float d, float inv) {
  return uint32_t(float2_to_e4m3x2(a * inv, b * inv)) | (uint32_t(float2_to_e4m3x2(c * inv, d * inv)) << 16);
}

// kV values times inv as kV e4m3 bytes at the address dst() gives (one 8-byte store for kV = 8, one 4-byte store
// for kV = 4); the address is taken after the packing, as the kernels computed it before this was shared.
template <int kV, typename Dst>
__device__ __forceinline__ void store_row_bytes(const float (&v)[kV], float inv, Dst dst) {
  uint32_t w[kV / 4];
#pragma unroll
  for (int j = 0; j < kV / 4; ++j) w[j] = e4m3x4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3], inv);
  uint8_t* p = dst();
  if constexpr (kV == 8) *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[1]);
  else *reinterpret_cast<uint32_t*>(p) = w[0];
}

// Column j of f (R rows, R = 4, 8 or 16) quantised with inv, as R bytes, row r0 in the lowest byte.
template <int R, int kV>
__device__ __forceinline__ void column_bytes(const float (&f)[R][kV], int j, float inv, uint32_t (&w)[R / 4]) {
#pragma unroll
  for (int i = 0; i < R / 4; ++i) w[i] = e4m3x4(f[4 * i][j], f[4 * i + 1][j], f[4 * i + 2][j], f[4 * i + 3][j], inv);
}

template <int N>
__device__ __forceinline__ void st_shared_words(uint8_t* p, const uint32_t (&w)[N]) {
  if constexpr (N == 1) *reinterpret_cast<uint32_t*>(p) = w[0];
  else if constexpr (N == 2) *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[1]);
  else *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

// A 128 x 128 block held as f[R][kV] by the threads (cv, rg) (cv = threadIdx % (128 / kV)), column j of the thread
// quantised with inv_of(j), written transposed: q^T rows col0 + c, bytes [row0, row0 + 128). Through tile (16 KB of
// shared memory): column c's 128 bytes in tile row c, row group rg's R bytes at slot rg ^ swz(cv) (slots of R
// bytes), so a warp's stores hit distinct banks; then 16-byte global stores of whole q^T row pieces.
template <int R, int kV, typename InvOf>
__device__ __forceinline__ void store_transposed(const float (&f)[R][kV], InvOf inv_of, uint8_t* tile,
                                                 uint8_t* __restrict__ q, int64_t ldq, int row0, int col0) {
  constexpr int kVecs = 128 / kV, kSlots = 128 / R;
  const int cv = threadIdx.x % kVecs, rg = threadIdx.x / kVecs;
#pragma unroll
  for (int j = 0; j < kV; ++j) {
    uint32_t w[R / 4];
    column_bytes<R, kV>(f, j, inv_of(j), w);
    st_shared_words(tile + (cv * kV + j) * 128 + (rg ^ (cv % kSlots)) * R, w);
  }
  __syncthreads();
  // q^T row c, bytes [16 h, 16 h + 16) = rows 16 h .. 16 h + 15 of the block: slots 16 h / R ...
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const int c = threadIdx.x / 8 + 32 * p, h = threadIdx.x % 8, s = (c / kV) % kSlots;
    uint4 v;
    if constexpr (R == 16) {
      v = *reinterpret_cast<const uint4*>(tile + c * 128 + (h ^ s) * 16);
    } else {   // R == 8: two slots; slot 2h's bytes first
      const uint2 a = *reinterpret_cast<const uint2*>(tile + c * 128 + ((2 * h) ^ s) * 8);
      const uint2 b = *reinterpret_cast<const uint2*>(tile + c * 128 + ((2 * h + 1) ^ s) * 8);
      v = make_uint4(a.x, a.y, b.x, b.y);
    }
    *reinterpret_cast<uint4*>(q + (col0 + c) * ldq + row0 + 16 * h) = v;
  }
}

// Whole 128 x 128 block, 16-byte aligned rows of x and (transposed) q: thread (cv = column vector, rg = row group)
// holds rows [rg R, rg R + R) of columns [cv kV, cv kV + kV). Returns false (nothing done) if the block does not
// qualify, so the caller runs the scalar path; the condition is uniform over the block.
template <typename T, bool kTranspose, bool kUe8m0>
__device__ __forceinline__ bool per_block_quant_vec(const T* __restrict__ x, uint8_t* __restrict__ q,
                                                    float* __restrict__ sf, int N, int K, int64_t ldx, int64_t ldq,
                                                    int sf_sy, int sf_sx, float eps, float* red, uint8_t* tile) {
  constexpr int kV = 16 / sizeof(T), kVecs = 128 / kV, R = kVecs / 2;   // bf16: 8 columns x 8 rows; fp32: 4 x 16
  const int n0 = blockIdx.y * 128, k0 = blockIdx.x * 128;
  const bool whole = n0 + 128 <= N && k0 + 128 <= K;
  const bool aligned = ((reinterpret_cast<uintptr_t>(x) | (ldx * sizeof(T))) & 15) == 0 &&
                       ((reinterpret_cast<uintptr_t>(q) | ldq) & (kTranspose ? 15 : kV - 1)) == 0;
  if (!(whole && aligned)) return false;
  const int cv = threadIdx.x % kVecs, rg = threadIdx.x / kVecs;
  float f[R][kV];
  load_rows<T, R>(x, ldx, n0 + rg * R, k0 + cv * kV, f);
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < R; ++i) {
#pragma unroll
    for (int j = 0; j < kV; ++j) amax = fmaxf(amax, fabsf(f[i][j]));
  }
  amax = block_max_256(amax, red);
  float scale, inv;
  scale_from_amax<kUe8m0>(amax, eps, scale, inv);
  if (threadIdx.x == 0) sf[blockIdx.y * sf_sy + blockIdx.x * sf_sx] = scale;
  if constexpr (!kTranspose) {
#pragma unroll
    for (int i = 0; i < R; ++i)
      store_row_bytes<kV>(f[i], inv, [&] { return q + (n0 + rg * R + i) * ldq + k0 + cv * kV; });
  } else {
    store_transposed<R, kV>(f, [&](int) { return inv; }, tile, q, ldq, n0, k0);
  }
  return true;
}

// Scalar path of one 128 x 128 block (partial or unaligned blocks): tile is [128][132] bytes (transposed only).
template <typename T, bool kTranspose, bool kUe8m0>
__device__ __forceinline__ void per_block_quant_scalar(const T* __restrict__ x, uint8_t* __restrict__ q,
                                                       float* __restrict__ sf, int N, int K, int64_t ldx,
                                                       int64_t ldq, int sf_sy, int sf_sx, float eps, float* red,
                                                       uint8_t (*tile)[132]) {
  const int n0 = blockIdx.y * 128, k0 = blockIdx.x * 128;
  const int rows = min(128, N - n0), cols = min(128, K - k0);
  float amax = 0.f;
  for (int i = threadIdx.x; i < 128 * 128; i += 256) {
    const int r = i / 128, c = i % 128;
    if (r < rows && c < cols) amax = fmaxf(amax, fabsf(to_float(x[(n0 + r) * ldx + k0 + c])));
  }
  amax = block_max_256(amax, red);
  float scale, inv;
  scale_from_amax<kUe8m0>(amax, eps, scale, inv);
  if (threadIdx.x == 0) sf[blockIdx.y * sf_sy + blockIdx.x * sf_sx] = scale;
  for (int i = threadIdx.x; i < 128 * 128; i += 256) {
    const int r = i / 128, c = i % 128;
    if (r < rows && c < cols) {
      const uint8_t v = float_to_e4m3(to_float(x[(n0 + r) * ldx + k0 + c]) * inv);
      if (kTranspose) tile[c][r] = v;
      else q[(n0 + r) * ldq + k0 + c] = v;
    }
  }
  if (kTranspose) {
    __syncthreads();
    for (int i = threadIdx.x; i < 128 * 128; i += 256) {
      const int c = i / 128, r = i % 128;  // r fastest: consecutive bytes of one q^T row
      if (r < rows && c < cols) q[(k0 + c) * ldq + n0 + r] = tile[c][r];
    }
  }
}

// grid (ceil(K/128), ceil(N/128)), 256 threads. x [N, K] (row stride ldx); q [N, K] or, transposed, [K, N]
// (row stride ldq); scale of block (by, bx) goes to sf[by * sf_sy + bx * sf_sx].
template <typename T, bool kTranspose, bool kUe8m0>
__global__ void __launch_bounds__(256) per_block_quant_fp8_kernel(const T* __restrict__ x, uint8_t* __restrict__ q,
                                                                  float* __restrict__ sf, int N, int K, int64_t ldx,
                                                                  int64_t ldq, int sf_sy, int sf_sx, float eps) {
  __shared__ float red[8];
  __shared__ __align__(16) uint8_t tile[kTranspose ? 128 : 1][kTranspose ? 132 : 1];
  __shared__ __align__(16) uint8_t vtile[kTranspose ? 128 * 128 : 16];
  if (per_block_quant_vec<T, kTranspose, kUe8m0>(x, q, sf, N, K, ldx, ldq, sf_sy, sf_sx, eps, red, vtile)) return;
  per_block_quant_scalar<T, kTranspose, kUe8m0>(x, q, sf, N, K, ldx, ldq, sf_sy, sf_sx, eps, red,
                                                reinterpret_cast<uint8_t (*)[132]>(&tile[0][0]));
}

// Both orientations of the weight in one pass (FP8Linear's forward and data-gradient operands): q [N, K] with
// sf [ceil(N/128), ceil(K/128)] and q^T [K, N] with sft [ceil(K/128), ceil(N/128)], both row-major. Each block is
// quantised twice by the single-orientation paths, so both results equal those kernels' bit for bit; the second
// pass reads the block from L2 (this CTA has just read it), so DRAM sees x once. Grid and block as above.
template <typename T, bool kUe8m0>
__global__ void __launch_bounds__(256, 1) per_block_quant_fp8_dual_kernel(const T* __restrict__ x,
                                                                       uint8_t* __restrict__ q, float* __restrict__ sf,
                                                                       uint8_t* __restrict__ qt,
                                                                       float* __restrict__ sft, int N, int K,
                                                                       int64_t ldx, float eps) {
  __shared__ float red[8];
  __shared__ __align__(16) uint8_t tile[128][132];
  __shared__ __align__(16) uint8_t vtile[128 * 128];
  const int nb = (N + 127) / 128, kb = (K + 127) / 128;
  if (!per_block_quant_vec<T, false, kUe8m0>(x, q, sf, N, K, ldx, K, kb, 1, eps, red, vtile))
    per_block_quant_scalar<T, false, kUe8m0>(x, q, sf, N, K, ldx, K, kb, 1, eps, red, tile);
  __syncthreads();   // red is reused
  if (!per_block_quant_vec<T, true, kUe8m0>(x, qt, sft, N, K, ldx, N, 1, nb, eps, red, vtile))
    per_block_quant_scalar<T, true, kUe8m0>(x, qt, sft, N, K, ldx, N, 1, nb, eps, red, tile);
}

// Scales of a block's columns (groups of 128 tokens) held as f[R][kV] by the threads (cv, rg), kCols columns:
// maxima over each thread's R rows, the warp's row groups (lanes kVecs apart), then the 8 warps through red; column
// c's inverse scale goes to inv[c], its scale to sf[c]. Both barriers included (red and inv are shared).
template <bool kUe8m0, int R, int kV, int kCols>
__device__ __forceinline__ void column_scales(const float (&f)[R][kV], float (*red)[kCols], float* inv,
                                              float* __restrict__ sf, float eps) {
  constexpr int kVecs = kCols / kV;
  const int cv = threadIdx.x % kVecs, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int j = 0; j < kV; ++j) {
    float a = 0.f;
#pragma unroll
    for (int i = 0; i < R; ++i) a = fmaxf(a, fabsf(f[i][j]));
#pragma unroll
    for (int off = kVecs; off < 32; off *= 2) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, off));
    if (lane < kVecs) red[warp][cv * kV + j] = a;
  }
  __syncthreads();
  if (threadIdx.x < kCols) {
    float a = red[0][threadIdx.x];
#pragma unroll
    for (int w = 1; w < 8; ++w) a = fmaxf(a, red[w][threadIdx.x]);
    float scale, iv;
    scale_from_amax<kUe8m0>(a, eps, scale, iv);
    inv[threadIdx.x] = iv;
    sf[threadIdx.x] = scale;
  }
  __syncthreads();
}

// Whole 128-row x 64-column block of the transposed activation quantiser (see the kernel below), 16-byte aligned x
// rows: thread (cv, rg) holds rows [rg R, rg R + R) of columns [cv kV, cv kV + kV) (bf16: 4 rows x 8 columns, fp32:
// 8 x 4). False if the block does not qualify (the scalar path then runs; uniform over the block).
template <typename T, bool kUe8m0>
__device__ __forceinline__ bool group_quant_t_vec(const T* __restrict__ x, uint8_t* __restrict__ q,
                                                  float* __restrict__ sf, int M, int K, int64_t ldx, int64_t ldq,
                                                  int sf_ld, float eps, float (*red)[64], float* inv_s,
                                                  uint8_t* tile, int m0, int k0) {
  constexpr int kV = 16 / sizeof(T), kVecs = 64 / kV, R = 128 * kVecs / 256, kSlots = 128 / R;
  const bool whole = m0 + 128 <= M && k0 + 64 <= K;
  const bool aligned = ((reinterpret_cast<uintptr_t>(x) | (ldx * sizeof(T)) | reinterpret_cast<uintptr_t>(q) | ldq) &
                        15) == 0;
  if (!(whole && aligned)) return false;
  const int cv = threadIdx.x % kVecs, rg = threadIdx.x / kVecs;
  float f[R][kV];
  load_rows<T, R>(x, ldx, m0 + rg * R, k0 + cv * kV, f);
  column_scales<kUe8m0, R, kV, 64>(f, red, inv_s, sf + k0 + (m0 / 128) * sf_ld, eps);
  // tile[c][...]: the 128 bytes of q row k0 + c; row group rg's R bytes at slot rg ^ swz(cv), where swz keeps the
  // low bits of rg (lanes of one warp differ in them) and moves the high ones, so a warp's stores hit distinct banks.
  constexpr int kLanesPerVec = 32 / kVecs;   // row groups in one warp (bf16 4, fp32 2)
#pragma unroll
  for (int j = 0; j < kV; ++j) {
    uint32_t w[R / 4];
    column_bytes<R, kV>(f, j, inv_s[cv * kV + j], w);
    const int slot = rg ^ ((cv * kLanesPerVec) % kSlots);
    st_shared_words(tile + (cv * kV + j) * 128 + slot * R, w);
  }
  __syncthreads();
  // q row k0 + c, bytes [16 h, 16 h + 16): rows 16 h .. 16 h + 15 = row groups 16 h / R ..., whose slots are
  // consecutive and in order (the swizzle moves only bits above them)
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    const int c = threadIdx.x / 8 + 32 * p, h = threadIdx.x % 8;
    const int swz = ((c / kV) * kLanesPerVec) % kSlots;
    const int slot = ((16 / R) * h) ^ swz;
    *reinterpret_cast<uint4*>(q + (k0 + c) * ldq + m0 + 16 * h) =
        *reinterpret_cast<const uint4*>(tile + c * 128 + slot * R);
  }
  return true;
}

// One 128-row x 64-column block at (m0, k0) of the transposed activation quantiser: the vectorised path, or the
// scalar one for partial or unaligned blocks. tile: 128 x 65 floats of shared memory, inv_s: 64 floats.
template <typename T, bool kUe8m0>
__device__ __forceinline__ void group_quant_t_block(const T* __restrict__ x, uint8_t* __restrict__ q,
                                                    float* __restrict__ sf, int M, int K, int m_pad, int64_t ldx,
                                                    int64_t ldq, int sf_ld, float eps, float (*tile)[65],
                                                    float* inv_s, int m0, int k0) {
  {
    // the vectorised path reuses the scalar path's shared memory: red (8 x 64 floats) and the q tile (8 KB)
    float (*red)[64] = reinterpret_cast<float (*)[64]>(&tile[0][0]);
    uint8_t* qtile = reinterpret_cast<uint8_t*>(&tile[16][0]);
    if (group_quant_t_vec<T, kUe8m0>(x, q, sf, M, K, ldx, ldq, sf_ld, eps, red, inv_s, qtile, m0, k0)) return;
  }
  for (int i = threadIdx.x; i < 128 * 64; i += 256) {
    const int r = i / 64, c = i % 64;
    tile[r][c] = (m0 + r < M && k0 + c < K) ? to_float(x[(m0 + r) * ldx + k0 + c]) : 0.f;
  }
  __syncthreads();
  {  // 4 threads per column, 32 rows each
    const int c = threadIdx.x / 4, part = threadIdx.x % 4;
    float amax = 0.f;
#pragma unroll 8
    for (int r = part * 32; r < part * 32 + 32; ++r) amax = fmaxf(amax, fabsf(tile[r][c]));
    amax = group_max<4>(amax);
    float scale, inv;
    scale_from_amax<kUe8m0>(amax, eps, scale, inv);
    if (part == 0) {
      inv_s[c] = inv;
      if (k0 + c < K) sf[k0 + c + (m0 / 128) * sf_ld] = scale;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 128 * 64; i += 256) {
    const int c = i / 128, r = i % 128;  // r fastest: consecutive bytes of one q row
    if (k0 + c < K && m0 + r < m_pad) q[(k0 + c) * ldq + m0 + r] = float_to_e4m3(tile[r][c] * inv_s[c]);
  }
}

// grid (ceil(K/64), ceil(M/128)), 256 threads. x [M, K] (row stride ldx) -> q [K, m_pad] (row stride ldq, columns
// [M, m_pad) written as zeros), sf[k + (m / 128) * sf_ld] (MN-major, sf_ld = align(K, 4)).
template <typename T, bool kUe8m0>
__global__ void __launch_bounds__(256) per_token_group_quant_fp8_t_kernel(const T* __restrict__ x,
                                                                          uint8_t* __restrict__ q,
                                                                          float* __restrict__ sf, int M, int K,
                                                                          int m_pad, int64_t ldx, int64_t ldq,
                                                                          int sf_ld, float eps) {
  __shared__ __align__(16) float tile[128][65];
  __shared__ float inv_s[64];
  group_quant_t_block<T, kUe8m0>(x, q, sf, M, K, m_pad, ldx, ldq, sf_ld, eps, tile, inv_s, blockIdx.y * 128,
                                 blockIdx.x * 64);
}

// Per-token 1x128 groups of rows [m0, m0 + 128) x columns [k0, k0 + 128) (K a multiple of 128): thread t takes
// row t / 2, half t % 2 (64 columns); q row-major [M, K] (row stride K), the scale of (row m, group g) at
// sf[m + g * sf_m] (MN-major). The same arithmetic as per_token_group_quant_fp8_kernel, so the same bits.
template <typename T, bool kUe8m0>
__device__ __forceinline__ void group_quant_rows_block(const T* __restrict__ x, uint8_t* __restrict__ q,
                                                       float* __restrict__ sf, int M, int K, int64_t ldx, int sf_m,
                                                       float eps, int m0, int k0) {
  constexpr int kV = 16 / sizeof(T), kVecs = 64 / kV;   // 16-byte vectors per half row
  const int r = m0 + threadIdx.x / 2, c0 = k0 + (threadIdx.x % 2) * 64;
  const bool aligned = ((reinterpret_cast<uintptr_t>(x) | (ldx * sizeof(T))) & 15) == 0;
  float f[kVecs][kV];
  float amax = 0.f;
  if (r < M) {
    const T* src = x + r * ldx + c0;
#pragma unroll
    for (int v = 0; v < kVecs; ++v) {
      if (aligned) {
        Unpack16<T>::run(__ldg(reinterpret_cast<const uint4*>(src + v * kV)), f[v]);
      } else {
#pragma unroll
        for (int e = 0; e < kV; ++e) f[v][e] = to_float(src[v * kV + e]);
      }
#pragma unroll
      for (int e = 0; e < kV; ++e) amax = fmaxf(amax, fabsf(f[v][e]));
    }
  }
  amax = group_max<2>(amax);   // (all lanes take part; rows past M are not stored)
  float scale, inv;
  scale_from_amax<kUe8m0>(amax, eps, scale, inv);
  if (r >= M) return;
  uint8_t* dst = q + static_cast<int64_t>(r) * K + c0;
#pragma unroll
  for (int v = 0; v < kVecs; ++v) store_row_bytes<kV>(f[v], inv, [&] { return dst + v * kV; });
  if (threadIdx.x % 2 == 0) sf[r + (k0 / 128) * sf_m] = scale;
}

// Whole 128 x 128 block at (m0, k0) of the dual activation quantiser with 16-byte aligned rows, from registers:
// thread (cv, rg) holds rows [rg R, rg R + R) x columns [cv kV, cv kV + kV) (bf16/fp16 8 x 8, fp32 16 x 4, the
// weight quantiser's geometry), read from DRAM once. Row maxima (per-token groups) by shuffles among the kVecs
// lanes of a row, column maxima (groups of 128 tokens) through shared memory; q^T leaves through the weight
// quantiser's swizzled transpose tile, each column with its own scale. False (nothing done): not whole/aligned.
template <typename T, bool kUe8m0>
__device__ __forceinline__ bool group_quant_dual_vec(const T* __restrict__ x, uint8_t* __restrict__ q,
                                                     float* __restrict__ sf, uint8_t* __restrict__ qt,
                                                     float* __restrict__ sft, int M, int K, int64_t ldx, int sf_m,
                                                     int64_t ldqt, int sft_ld, float eps, float (*red)[128],
                                                     float* inv_c, uint8_t* tile) {
  constexpr int kV = 16 / sizeof(T), kVecs = 128 / kV, R = kVecs / 2;
  const int m0 = blockIdx.y * 128, k0 = blockIdx.x * 128;
  const bool aligned = ((reinterpret_cast<uintptr_t>(x) | (ldx * sizeof(T)) | reinterpret_cast<uintptr_t>(q) |
                         reinterpret_cast<uintptr_t>(qt) | ldqt) & 15) == 0;
  if (!(m0 + 128 <= M && aligned)) return false;   // (K is a multiple of 128: blocks are whole along K)
  const int cv = threadIdx.x % kVecs, rg = threadIdx.x / kVecs;
  float f[R][kV];
  load_rows<T, R>(x, ldx, m0 + rg * R, k0 + cv * kV, f);
  // per-token groups: a row's 128 columns lie in kVecs consecutive lanes of one warp
#pragma unroll
  for (int i = 0; i < R; ++i) {
    float a = 0.f;
#pragma unroll
    for (int j = 0; j < kV; ++j) a = fmaxf(a, fabsf(f[i][j]));
    a = group_max<kVecs>(a);
    float scale, inv;
    scale_from_amax<kUe8m0>(a, eps, scale, inv);
    const int r = m0 + rg * R + i;
    store_row_bytes<kV>(f[i], inv, [&] { return q + static_cast<int64_t>(r) * K + k0 + cv * kV; });
    if (cv == 0) sf[r + (k0 / 128) * sf_m] = scale;
  }
  // groups of 128 tokens per column
  column_scales<kUe8m0, R, kV, 128>(f, red, inv_c, sft + k0 + (m0 / 128) * sft_ld, eps);
  store_transposed<R, kV>(f, [&](int j) { return inv_c[cv * kV + j]; }, tile, qt, ldqt, m0, k0);
  return true;
}

// Both activation layouts in one kernel (FP8Linear: x for the forward and the weight gradient, dy for the data
// and the weight gradient): q [M, K] with per-token 1x128 scales (per_token_group_quant_fp8's layout: sf[m + g *
// sf_m]) and q^T [K, m_pad] with 1x128 scales along M (per_token_group_quant_fp8_t's). grid (K / 128, ceil(M / 128)),
// 256 threads; K a multiple of 128. Whole aligned blocks are read once into registers (group_quant_dual_vec); the
// last partial row block and unaligned rows take the row pass and the transposed quantiser's two 64-column blocks
// (re-reading x from L1/L2). Bit for bit the single-layout kernels' results.
template <typename T, bool kUe8m0>
__global__ void __launch_bounds__(256) per_token_group_quant_fp8_dual_kernel(
    const T* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ sf, uint8_t* __restrict__ qt,
    float* __restrict__ sft, int M, int K, int m_pad, int64_t ldx, int sf_m, int64_t ldqt, int sft_ld, float eps) {
  __shared__ __align__(16) float tile[128][65];
  __shared__ float inv_s[128];
  {
    // the register path borrows the fallback's shared memory: red (8 x 128 floats) and the q^T tile (16 KB)
    float (*red)[128] = reinterpret_cast<float (*)[128]>(&tile[0][0]);
    uint8_t* qtile = reinterpret_cast<uint8_t*>(&tile[32][0]);
    if (group_quant_dual_vec<T, kUe8m0>(x, q, sf, qt, sft, M, K, ldx, sf_m, ldqt, sft_ld, eps, red, inv_s, qtile))
      return;
  }
  const int m0 = blockIdx.y * 128, k0 = blockIdx.x * 128;
  group_quant_rows_block<T, kUe8m0>(x, q, sf, M, K, ldx, sf_m, eps, m0, k0);
  group_quant_t_block<T, kUe8m0>(x, qt, sft, M, K, m_pad, ldx, ldqt, sft_ld, eps, tile, inv_s, m0, k0);
  __syncthreads();   // tile and inv_s are reused
  group_quant_t_block<T, kUe8m0>(x, qt, sft, M, K, m_pad, ldx, ldqt, sft_ld, eps, tile, inv_s, m0, k0 + 64);
}

}  // namespace deepstack
