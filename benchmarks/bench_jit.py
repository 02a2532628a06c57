"""JIT pipeline costs: host overhead per launch, warm-cache kernel load, cold compile.

Rows:
- raw launch: Kernel.launch of an empty kernel with 3 arguments (our ctypes + packed-parameter path);
- op call: torch.ops.deepstack.per_token_group_quant_fp8 on a 1x128 input (dispatcher + checks + 2 output
  allocations + launch): what a user pays per eager call;
- baseline: one ATen op (x.add_(1)) on a tiny tensor.
Host time per call = wall time of 20k back-to-back calls with no synchronisation / 20k (the GPU queue absorbs them).
Target (issue 2): <= 10 us per launch; warm-cache load < 50 ms.
"""
import os
import subprocess
import sys
import tempfile
import time

import torch

import torch_deepstack  # noqa: F401
from torch_deepstack import jit
from torch_deepstack.jit import KernelSpec, get_kernel
from torch_deepstack.testing.bench import BenchTable, bench_host

_LOAD_SNIPPET = r"""
import time, torch
torch.zeros(1, device="cuda")  # CUDA context up front: we time the kernel load, not context creation
from torch_deepstack.jit import KernelSpec, get_kernel
t0 = time.perf_counter()
get_kernel(KernelSpec("common/noop.cuh", "deepstack::noop_kernel", (3,)), "pif")
print((time.perf_counter() - t0) * 1e3)
"""


def main():
    t = BenchTable("jit", "launch_overhead", "JIT launch overhead and kernel load",
                   ["what", "value", "unit", "target"])
    noop = get_kernel(KernelSpec("common/noop.cuh", "deepstack::noop_kernel", (3,)), "pif")
    buf = torch.zeros(4, device="cuda")
    t.add("raw launch (Kernel.launch, 3 args)", bench_host(lambda: noop.launch(1, 32, buf, 1, 0.5)), "us/launch",
          "<= 10")
    x = torch.randn(1, 128, device="cuda", dtype=torch.bfloat16)
    op = torch.ops.deepstack.per_token_group_quant_fp8
    t.add("op call (quant op, dispatcher + allocs + launch)", bench_host(lambda: op(x), iters=10000), "us/call", "")
    y = torch.zeros(4, device="cuda")
    t.add("baseline: one ATen op (x.add_(1))", bench_host(lambda: y.add_(1)), "us/call", "")
    torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, DEEPSTACK_JIT_CACHE_DIR=d)
        cold = float(subprocess.run([sys.executable, "-c", _LOAD_SNIPPET], env=env, capture_output=True, text=True,
                                    check=True).stdout.split()[-1])
        warm = min(float(subprocess.run([sys.executable, "-c", _LOAD_SNIPPET], env=env, capture_output=True,
                                        text=True, check=True).stdout.split()[-1]) for _ in range(3))
    t.add("cold compile + load (empty kernel, nvcc)", cold, "ms", "")
    t.add("warm-cache load (new process, best of 3)", warm, "ms", "< 50")
    # Graph capture of the launch path works: replay 1000 captured launches.
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(100):
            noop.launch(1, 32, buf, 1, 0.5)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        g.replay()
    torch.cuda.synchronize()
    t.add("CUDA-graph replay of captured launches", (time.perf_counter() - t0) / 1000 * 1e6, "us/launch", "")
    t.save()


if __name__ == "__main__":
    main()
