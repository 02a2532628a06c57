// An empty kernel: measures the host cost of our launch path (benchmarks/bench_jit.py), nothing else.
#pragma once

namespace deepstack {

template <int kUnused>
__global__ void noop_kernel(const void* p, int n, float f) {
  if (n < 0 && threadIdx.x == 0) *const_cast<float*>(static_cast<const float*>(p)) = f;  // never true; keeps args
}

}  // namespace deepstack
