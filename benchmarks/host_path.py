"""Host (Python) cost of the FP8 ops' CUDA faces, measured on any machine: the faces run on CPU tensors with their
GPU parts stubbed out (kernel load and launch, tensor-map encoding, the SM count), so what is timed is the path a
call takes through Python before its launch: argument checks, output allocation, plan and tensor-map lookups,
parameter packing (not the dispatcher's hop into the Python kernel: CPU tensors would reach the CPU reference).
The GPU machine's host runs these 2-4x slower than the CPU dev machine (its torch.empty takes
4-8 us against ~1 us here), so compare the rows with each other and across commits, not with GPU timings.

  python benchmarks/host_path.py             # table, microseconds per call (best of 5 runs of 2000 calls)
  python benchmarks/host_path.py --profile fp8_gemm_nt    # cProfile of one face
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch

import torch_deepstack  # noqa: F401
from torch_deepstack.gemm import kernels
from torch_deepstack.quant import kernels as quant_kernels
from torch_deepstack.testing.bench import bench_host


class _NoLaunch:
    """A loaded kernel whose launches do nothing."""

    def launch(self, *args, **kwargs):
        pass

    def launch_cluster(self, *args, **kwargs):
        pass

    def max_active_clusters(self, *args):
        return 66


def stub_gpu_parts():
    no_launch = _NoLaunch()
    kernels.get_kernel = quant_kernels.get_kernel = lambda spec, signature: no_launch
    quant_kernels._kernels.clear()
    kernels.make_tensor_map = lambda *args, **kwargs: bytes(128)
    kernels.num_sms = lambda device: 132


def cases(t=256, k=512, n=384):
    """name -> call of one CUDA face (small shapes: CPU allocations stay out of the picture)."""
    x = torch.randn(t, k, dtype=torch.bfloat16)
    w = torch.randn(n, k, dtype=torch.bfloat16)
    q, s, qt, st = kernels.per_token_group_quant_fp8_dual_cuda(x)
    wq, ws = kernels.per_block_quant_fp8_cuda(w)
    d = torch.empty(t, n, dtype=torch.bfloat16)
    dw = torch.empty(k, k, dtype=torch.bfloat16)
    return {
        "torch.empty (reference)": lambda: torch.empty(t, n, dtype=torch.bfloat16),
        "per_token_group_quant_fp8": lambda: quant_kernels.per_token_group_quant_fp8_cuda(x),
        "per_token_group_quant_fp8_t": lambda: kernels.per_token_group_quant_fp8_t_cuda(x),
        "per_token_group_quant_fp8_dual": lambda: kernels.per_token_group_quant_fp8_dual_cuda(x),
        "per_block_quant_fp8": lambda: kernels.per_block_quant_fp8_cuda(w),
        "per_block_quant_fp8_dual": lambda: kernels.per_block_quant_fp8_dual_cuda(w),
        "fp8_gemm_nt": lambda: kernels.fp8_gemm_nt_cuda(q, s, wq, ws, d),
        "fp8_wgrad_gemm_nt (bf16 out)": lambda: kernels.fp8_wgrad_gemm_nt_cuda(qt, st, qt, st, dw),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default=None, help="a row's name (prefix): cProfile it instead of the table")
    args = ap.parse_args()
    stub_gpu_parts()
    table = cases()
    if args.profile:
        name = next(n for n in table if n.startswith(args.profile))
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(3000):
            table[name]()
        pr.disable()
        out = io.StringIO()
        pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(20)
        print(out.getvalue())
        return
    print("| CUDA face (GPU parts stubbed) | host us per call |")
    print("|---|---|")
    for name, fn in table.items():
        print(f"| {name} | {bench_host(fn, iters=2000, warmup=1, runs=5):.1f} |")


if __name__ == "__main__":
    main()
