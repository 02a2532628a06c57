// SwiGLU of an expert MLP's first GEMM output h = [gate | up] (rows of 2F): act = silu(gate) * up, and its gradient
// written into one [rows, 2F] tensor, each computed in fp32 and rounded once. One thread per 16-byte unit of a row's
// F columns (kVec; else one per element): a single read of h (and of the gradient) where PyTorch's silu, multiply
// and their backward make a pass per operation.
#pragma once
#include "common/scalar.cuh"
#include "common/vec.cuh"

namespace deepstack {

// kBackward = false: out [rows, F] = silu(gate) * up. kBackward = true: out [rows, 2F] = (d gate | d up) for the
// incoming gradient grad [rows, F]: d up = grad * silu(gate), d gate = grad * up * sigmoid(gate) (1 + gate (1 -
// sigmoid(gate))). Row strides in elements: h_stride (h), g_stride (grad), o_stride (out).
template <typename T, bool kVec, bool kBackward>
__global__ void __launch_bounds__(256) swiglu_kernel(
    const T* __restrict__ h, long long h_stride, const T* __restrict__ grad, long long g_stride, T* __restrict__ out,
    long long o_stride, int rows, int f) {
  constexpr int kElems = kVec ? Vec16<T>::kElems : 1;
  const int units = f / kElems;
  const long long total = (long long)rows * units;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const long long r = i / units;
    const int col = static_cast<int>(i - r * units) * kElems;
    const T* gate_p = h + r * h_stride + col;
    float gate[kElems], up[kElems], dy[kElems];
    if constexpr (kVec) {
      Unpack16<T>::run(__ldg(reinterpret_cast<const uint4*>(gate_p)), gate);
      Unpack16<T>::run(__ldg(reinterpret_cast<const uint4*>(gate_p + f)), up);
      if constexpr (kBackward) Unpack16<T>::run(__ldg(reinterpret_cast<const uint4*>(grad + r * g_stride + col)), dy);
    } else {
      gate[0] = to_f32(gate_p[0]);
      up[0] = to_f32(gate_p[f]);
      if constexpr (kBackward) dy[0] = to_f32(grad[r * g_stride + col]);
    }
    float a[kElems], b[kElems];
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      const float sig = 1.f / (1.f + expf(-gate[e]));
      const float silu = gate[e] * sig;
      if constexpr (kBackward) {
        a[e] = dy[e] * up[e] * sig * (1.f + gate[e] * (1.f - sig));   // d gate
        b[e] = dy[e] * silu;                                          // d up
      } else {
        a[e] = silu * up[e];
      }
    }
    T* dst = out + r * o_stride + col;
    if constexpr (kVec) {
      *reinterpret_cast<uint4*>(dst) = Pack16<T>::run(a);
      if constexpr (kBackward) *reinterpret_cast<uint4*>(dst + f) = Pack16<T>::run(b);
    } else {
      dst[0] = from_f32<T>(a[0]);
      if constexpr (kBackward) dst[f] = from_f32<T>(b[0]);
    }
  }
}

}  // namespace deepstack
