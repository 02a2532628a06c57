// Deliberately invalid CUDA: the JIT must surface nvcc's message as a Python exception.
#pragma once
template <int kN>
__global__ void broken_kernel(float* out) { out[0] = this_identifier_does_not_exist; }
