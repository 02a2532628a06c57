// Tile-scheduler metadata for MLA decode, computed on the GPU (no host sync, CUDA-graph capturable).
//
// Work of a request = ceil(s_k / 64) pages + kFixedCost (the cost of starting a split: Q load, output write,
// combine). The total is cut into `num_parts` nearly equal contiguous ranges of (request, page); a range may end
// inside a request and the next range continues it, which splits that request. Output:
//   sched [num_parts, 8] int32: begin_req, begin_block, end_req (inclusive), end_block (exclusive, in end_req),
//                               begin_split (global split index of begin_req's piece), 0, 0, 0.
//                               An empty part has begin_req = b, end_req = b - 1.
//   num_splits [b + 1] int32:   prefix sum of the number of pieces of each request (num_splits[0] = 0).
// One CTA: threads fill the per-request page counts in shared memory, thread 0 runs the serial greedy cut
// (a few hundred cycles per request), then writes the prefix sums.
#pragma once
#include <cstdint>
#include <climits>

namespace deepstack {
namespace mla {

template <int kFixedCost>
__global__ void __launch_bounds__(256) mla_metadata_kernel(const int* __restrict__ seqlens, int* __restrict__ sched,
                                                           int* __restrict__ num_splits, int batch, int num_parts) {
  extern __shared__ int smem_meta[];
  int* nblk = smem_meta;            // [batch]
  int* pieces = smem_meta + batch;  // [batch]
  __shared__ int total;
  if (threadIdx.x == 0) total = 0;
  __syncthreads();
  int local = 0;
  for (int i = threadIdx.x; i < batch; i += blockDim.x) {
    const int n = (max(seqlens[i], 0) + 63) / 64;
    nblk[i] = n;
    pieces[i] = 0;
    local += n + kFixedCost;
  }
  atomicAdd(&total, local);
  __syncthreads();
  if (threadIdx.x != 0) return;

  const int payload = (total + num_parts - 1) / num_parts + kFixedCost;
  int r = 0, blk = 0;
  for (int p = 0; p < num_parts; ++p) {
    int* row = sched + p * 8;
    if (r >= batch) {
      row[0] = batch; row[1] = 0; row[2] = batch - 1; row[3] = 0; row[4] = 0;
      row[5] = row[6] = row[7] = 0;
      continue;
    }
    const int br = r, bb = blk, first_piece = pieces[r];
    int er = r, eb = blk;
    int cap = p == num_parts - 1 ? INT_MAX : payload;
    while (r < batch) {
      const int left = nblk[r] - blk;
      if (cap == INT_MAX || left + kFixedCost <= cap) {   // the rest of request r fits in this part
        if (cap != INT_MAX) cap -= left + kFixedCost;
        pieces[r] += 1;
        er = r; eb = nblk[r];
        ++r; blk = 0;
      } else {
        const int take = cap - kFixedCost;
        if (take <= 0) break;                              // no room left: the next part starts request r
        pieces[r] += 1;
        er = r; eb = blk + take;
        blk += take;
        break;
      }
    }
    row[0] = br; row[1] = bb; row[2] = er; row[3] = eb; row[4] = first_piece;   // fixed up below
    row[5] = row[6] = row[7] = 0;
  }
  int acc = 0;
  num_splits[0] = 0;
  for (int i = 0; i < batch; ++i) {
    nblk[i] = acc;                  // reuse: first split index of request i
    acc += pieces[i];
    num_splits[i + 1] = acc;
  }
  for (int p = 0; p < num_parts; ++p) {
    int* row = sched + p * 8;
    if (row[0] < batch) row[4] += nblk[row[0]];
  }
}

}  // namespace mla
}  // namespace deepstack
