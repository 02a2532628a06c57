// Cross-process barrier over peer-mapped memory (CUDA IPC), for the intranode EP transport.
//
// Every rank owns an array of num_ranks 64-bit flags that all ranks have mapped. Barrier number `epoch` (the same
// on every rank: all ranks make the same sequence of barrier calls): thread j publishes "rank reached epoch" into rank
// j's flag array (release, system scope, so the data this rank wrote into peer buffers earlier on the stream is
// visible first), then waits until rank j's flag in this rank's own array reaches epoch (acquire). A peer that
// never arrives trips the timeout: the kernel records the peer (1 + j) in *error and returns instead of hanging.
#pragma once
#include <cstdint>

namespace deepstack {

__device__ __forceinline__ void st_release_sys(unsigned long long* p, unsigned long long v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ unsigned long long ld_acquire_sys(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ unsigned long long global_timer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// One barrier among num_ranks ranks, run by threads 0..num_ranks-1 of a block (the others only join the
// __syncthreads), so fused kernels can end a phase with it. Every rank makes the same sequence of barriers; the
// epoch lives in device memory (*counter), not in a kernel argument, so a barrier captured in a CUDA graph advances
// it on every replay, and kernels derive the receive-area half they use from its parity.
__device__ __forceinline__ void block_barrier(unsigned long long* const* __restrict__ flag_arrays, int rank,
                                              int num_ranks, unsigned long long* __restrict__ counter,
                                              unsigned long long timeout_ns, int* __restrict__ error) {
  const int j = threadIdx.x;
  const unsigned long long epoch = *counter + 1;
  __syncthreads();                                        // everyone has read the old epoch
  if (j < num_ranks) {
    __threadfence_system();
    st_release_sys(flag_arrays[j] + rank, epoch);
    const unsigned long long* mine = flag_arrays[rank] + j;
    const unsigned long long start = global_timer_ns();
    while (ld_acquire_sys(mine) < epoch) {
      if (global_timer_ns() - start > timeout_ns) {
        atomicCAS(error, 0, 1 + j);
        break;
      }
      __nanosleep(64);
    }
  }
  __syncthreads();
  if (j == 0) *counter = epoch;
}

// host_error (nullable): a word of host-mapped pinned memory. Every fused EP call ends its sends with this barrier,
// so copying a set error word there (earlier barriers' timeouts included) lets the host see it on its next call
// without a per-call copy, event or sync.
template <int kMaxRanks>
__global__ void __launch_bounds__(kMaxRanks) ipc_barrier_kernel(
    unsigned long long* const* __restrict__ flag_arrays,   // [num_ranks] peer-mapped flag arrays
    int rank, int num_ranks, unsigned long long* __restrict__ counter, unsigned long long timeout_ns,
    int* __restrict__ error, int* __restrict__ host_error) {
  block_barrier(flag_arrays, rank, num_ranks, counter, timeout_ns, error);
  if (threadIdx.x == 0 && host_error != nullptr) {
    const int e = *reinterpret_cast<volatile int*>(error);
    if (e != 0) *reinterpret_cast<volatile int*>(host_error) = e;
  }
}

}  // namespace deepstack
