// Tile-scheduler metadata for MLA decode, computed on the GPU (no host sync, CUDA-graph capturable).
//
// Work of a request = ceil(s_k / 64) pages + kFixedCost (the cost of starting a split: Q load, output write,
// combine). The total is cut into `num_parts` nearly equal contiguous ranges of (request, page); a range may end
// inside a request and the next range continues it, which splits that request. Output:
//   sched [num_parts, 8] int32: begin_req, begin_block, end_req (inclusive), end_block (exclusive, in end_req),
//                               begin_split (global split index of begin_req's piece), 0, 0, 0.
//                               An empty part has begin_req = b, end_req = b - 1.
//   num_splits [b + 1] int32:   prefix sum of the number of pieces of each request (num_splits[0] = 0).
// One CTA: threads fill the per-request page counts in shared memory, thread 0 runs the serial greedy cut (in
// registers and shared memory only: a few tens of cycles per request and part), the CTA scans the piece counts into
// num_splits and writes the rows. (The first version read each written row back from global memory in a serial
// fix-up loop: one L2 round trip per part, ~40 us for 132 parts on the H200.)
#pragma once
#include <cstdint>
#include <climits>

namespace deepstack {
namespace mla {

constexpr int kMetaRowInts = 5;   // per part in shared memory: begin_req, begin_block, end_req, end_block, piece

template <int kFixedCost>
__global__ void __launch_bounds__(256) mla_metadata_kernel(const int* __restrict__ seqlens, int* __restrict__ sched,
                                                           int* __restrict__ num_splits, int batch, int num_parts) {
  extern __shared__ int smem_meta[];
  int* nblk = smem_meta;                 // [batch]; after the cut: the first split index of each request
  int* pieces = smem_meta + batch;       // [batch]
  int* part_rows = pieces + batch;       // [num_parts][kMetaRowInts]
  __shared__ int total;
  __shared__ int warp_sums[8];
  const int tid = threadIdx.x;
  if (tid == 0) total = 0;
  __syncthreads();
  int local = 0;
  for (int i = tid; i < batch; i += blockDim.x) {
    const int n = (max(seqlens[i], 0) + 63) / 64;
    nblk[i] = n;
    pieces[i] = 0;
    local += n + kFixedCost;
  }
  atomicAdd(&total, local);
  __syncthreads();

  if (tid == 0) {
    const int payload = (total + num_parts - 1) / num_parts + kFixedCost;
    int r = 0, blk = 0, cnt = 0;   // cursor (request, page) and the pieces request r has so far
    for (int p = 0; p < num_parts; ++p) {
      int* row = part_rows + p * kMetaRowInts;
      if (r >= batch) {
        row[0] = batch; row[1] = 0; row[2] = batch - 1; row[3] = 0; row[4] = 0;
        continue;
      }
      const int br = r, bb = blk, first_piece = cnt;
      int er = r, eb = blk;
      int cap = p == num_parts - 1 ? INT_MAX : payload;
      while (r < batch) {
        const int n = nblk[r], left = n - blk;
        if (cap == INT_MAX || left + kFixedCost <= cap) {   // the rest of request r fits in this part
          if (cap != INT_MAX) cap -= left + kFixedCost;
          pieces[r] = cnt + 1;
          er = r; eb = n;
          ++r; blk = 0; cnt = 0;
        } else {
          const int take = cap - kFixedCost;
          if (take <= 0) break;                              // no room left: the next part starts request r
          ++cnt;
          er = r; eb = blk + take;
          blk += take;
          break;
        }
      }
      row[0] = br; row[1] = bb; row[2] = er; row[3] = eb; row[4] = first_piece;
    }
  }
  __syncthreads();

  // Exclusive scan of pieces (each thread a contiguous run of requests) -> nblk (first split index), num_splits.
  const int per = (batch + blockDim.x - 1) / blockDim.x;
  const int i0 = min(batch, tid * per), i1 = min(batch, i0 + per);
  int run = 0;
  for (int i = i0; i < i1; ++i) run += pieces[i];
  const int lane = tid % 32, warp = tid / 32;
  int incl = run;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += v;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  int acc = incl - run;
  for (int w = 0; w < warp; ++w) acc += warp_sums[w];
  for (int i = i0; i < i1; ++i) {
    nblk[i] = acc;
    acc += pieces[i];
    num_splits[i + 1] = acc;
  }
  if (tid == 0) num_splits[0] = 0;
  __syncthreads();

  for (int p = tid; p < num_parts; p += blockDim.x) {
    const int* row = part_rows + p * kMetaRowInts;
    const int br = row[0];
    int4* dst = reinterpret_cast<int4*>(sched + p * 8);
    dst[0] = make_int4(br, row[1], row[2], row[3]);
    dst[1] = make_int4(row[4] + (br < batch ? nblk[br] : 0), 0, 0, 0);
  }
}

}  // namespace mla
}  // namespace deepstack
