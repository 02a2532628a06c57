// A kernel that must use local memory (a runtime-indexed array): the ptxas check has to reject it.
#pragma once
template <int kN>
__global__ void spilling_kernel(float* out, const int* idx) {
  float a[kN];
#pragma unroll 1
  for (int i = 0; i < kN; ++i) a[i] = out[i] * 2.f;
  out[threadIdx.x] = a[idx[threadIdx.x]];
}
