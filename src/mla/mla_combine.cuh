// Merge the fp32 partial results of requests whose KV range was split over several SM parts.
// grid (b, h_kv, ceil(rows / 8)), 256 threads: one warp per q row. Requests with one split were written by the
// decode kernel and are skipped. lse of a split with no visible keys is -inf; all -inf gives out = 0, lse = +inf.
#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/vec.cuh"

namespace deepstack {
namespace mla {

template <typename T>
__global__ void __launch_bounds__(256) mla_combine_kernel(
    const float* __restrict__ o_accum, const float* __restrict__ lse_accum, const int* __restrict__ num_splits,
    T* __restrict__ out, float* __restrict__ lse, int h_q, int h_kv, int s_q, int rows) {
  const int req = blockIdx.x, kvh = blockIdx.y;
  const int r = blockIdx.z * 8 + threadIdx.x / 32, lane = threadIdx.x % 32;
  const int s0 = num_splits[req], n = num_splits[req + 1] - s0;
  if (n <= 1 || r >= rows) return;
  const float kInf = __int_as_float(0x7f800000);
  const long long stride = static_cast<long long>(h_kv) * rows;   // between splits, in rows
  const long long row0 = static_cast<long long>(s0) * stride + static_cast<long long>(kvh) * rows + r;

  float mx = -kInf;
  for (int j = lane; j < n; j += 32) mx = fmaxf(mx, lse_accum[row0 + j * stride]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  float sum = 0.f;
  if (mx != -kInf)
    for (int j = lane; j < n; j += 32) sum += __expf(lse_accum[row0 + j * stride] - mx);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  const float total = mx == -kInf ? kInf : mx + __logf(sum);

  const int hpk = h_q / h_kv;
  const int s = r / hpk, head = kvh * hpk + r % hpk;
  float acc[16];
#pragma unroll
  for (int i = 0; i < 16; ++i) acc[i] = 0.f;
  if (mx != -kInf) {
    for (int j = 0; j < n; ++j) {
      const float l = lse_accum[row0 + j * stride];
      if (l == -kInf) continue;
      const float w = __expf(l - total);
      const float4* src = reinterpret_cast<const float4*>(o_accum + (row0 + j * stride) * 512);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float4 v = src[lane + 32 * i];
        acc[4 * i] += w * v.x; acc[4 * i + 1] += w * v.y; acc[4 * i + 2] += w * v.z; acc[4 * i + 3] += w * v.w;
      }
    }
  }
  T* dst = out + ((static_cast<long long>(req) * s_q + s) * h_q + head) * 512;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint2 v = make_uint2(pack2<T>(acc[4 * i], acc[4 * i + 1]), pack2<T>(acc[4 * i + 2], acc[4 * i + 3]));
    *reinterpret_cast<uint2*>(dst + 4 * (lane + 32 * i)) = v;
  }
  if (lane == 0) lse[(static_cast<long long>(req) * h_q + head) * s_q + s] = total;
}

}  // namespace mla
}  // namespace deepstack
