"""Host (Python) cost of the FP8 ops' CUDA faces, measured on any machine: the faces run on CPU tensors with their
GPU parts stubbed out (kernel load and launch, tensor-map encoding, the SM count), so what is timed is the path a
call takes through Python before its launch: argument checks, output allocation, plan and tensor-map lookups,
parameter packing (not the dispatcher's hop into the Python kernel: CPU tensors would reach the CPU reference).
The GPU machine's host runs these 2-4x slower than the CPU dev machine (its torch.empty takes
4-8 us against ~1 us here), so compare the rows with each other and across commits, not with GPU timings.

  python benchmarks/host_path.py             # table, microseconds per call (best of 5 runs of 2000 calls)
  python benchmarks/host_path.py --profile fp8_gemm_nt    # cProfile of one face
  python benchmarks/host_path.py --profile "FP8Linear training"   # cProfile of a whole FP8Linear step
  python benchmarks/host_path.py --cuda      # on a GPU machine: the same rows with real launches, and torch's
                                             # own primitives (allocation, a view, an autograd.Function step)

The step rows route the deepstack ops' CPU dispatch key to the (stubbed) CUDA faces, so a whole FP8Linear
training step runs through the dispatcher, the autograd Function and the faces as it does on a GPU; the
nn.Linear rows (a real CPU matmul of the same tiny shape) are the floor torch's own autograd step costs. Unlike
the CUDA caching allocator, CPU malloc hands out new addresses every step, so the GEMM faces' call memo misses in
the step rows (~25 us per GEMM instead of ~4): they overstate the GPU machine's step.
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
from torch_deepstack.testing.gpu_stub import gpu_parts_stubbed


def route_ops_to_cuda_faces():
    """Register each op's CUDA face for the CPU key (this process only): CPU tensors take the GPU host path."""
    from torch_deepstack import _library
    for name, faces in _library.FACES.items():
        if faces.cuda is not None:
            _library.LIB.impl(name, faces.cuda, "CPU", allow_override=True)


class _EmptyFn(torch.autograd.Function):
    """An autograd.Function that only allocates its output and gradient: the floor of a Python-defined op's step."""

    @staticmethod
    def forward(ctx, x):
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        return torch.empty_like(dy)


def primitive_cases(device, t=256, n=384):
    """name -> one torch primitive the faces and FP8Linear use, for the host's own speed (GPU machine rows)."""
    x = torch.randn(t, n, dtype=torch.bfloat16, device=device, requires_grad=True)
    dy = torch.randn(t, n, dtype=torch.bfloat16, device=device)
    q = torch.empty(t, n, dtype=torch.float8_e4m3fn, device=device)
    return {"torch.empty_strided (reference)": lambda: torch.empty_strided((t, 4), (1, t), device=device),
            "as_strided (reference)": lambda: q.as_strided((t, n - 16), (n, 1)),
            "reshape to the same shape (reference)": lambda: q.reshape(-1, n),
            "autograd.Function step, empty_like only (reference)": lambda: _EmptyFn.apply(x).backward(dy)}


def step_cases(t=16, k=128, n=128, device="cpu"):
    """name -> one training / inference step of FP8Linear and of nn.Linear (the floor), on tiny shapes."""
    from torch_deepstack.gemm import FP8Linear
    ref = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device=device)
    fp8 = FP8Linear.from_linear(ref)
    x = torch.randn(t, k, dtype=torch.bfloat16, requires_grad=True, device=device)
    dy = torch.randn(t, n, dtype=torch.bfloat16, device=device)

    def train(m):
        return lambda: m(x).backward(dy)

    def infer(m):
        def run():
            with torch.no_grad():
                m(x)
        return run
    return {"nn.Linear training step": train(ref), "FP8Linear training step": train(fp8),
            "nn.Linear inference": infer(ref), "FP8Linear inference": infer(fp8)}


def cases(t=256, k=512, n=384, device="cpu"):
    """name -> call of one CUDA face (small shapes: CPU allocations stay out of the picture)."""
    x = torch.randn(t, k, dtype=torch.bfloat16, device=device)
    w = torch.randn(n, k, dtype=torch.bfloat16, device=device)
    q, s, qt, st = kernels.per_token_group_quant_fp8_dual_cuda(x)
    wq, ws = kernels.per_block_quant_fp8_cuda(w)
    d = torch.empty(t, n, dtype=torch.bfloat16, device=device)
    dw = torch.empty(k, k, dtype=torch.bfloat16, device=device)
    return {
        "torch.empty (reference)": lambda: torch.empty(t, n, dtype=torch.bfloat16, device=device),
        "per_token_group_quant_fp8": lambda: quant_kernels.per_token_group_quant_fp8_cuda(x),
        "per_token_group_quant_fp8_t": lambda: kernels.per_token_group_quant_fp8_t_cuda(x),
        "per_token_group_quant_fp8_dual": lambda: kernels.per_token_group_quant_fp8_dual_cuda(x),
        "per_block_quant_fp8": lambda: kernels.per_block_quant_fp8_cuda(w),
        "per_block_quant_fp8_dual": lambda: kernels.per_block_quant_fp8_dual_cuda(w),
        "fp8_gemm_nt": lambda: kernels.fp8_gemm_nt_cuda(q, s, wq, ws, d),
        "fp8_wgrad_gemm_nt (bf16 out)": lambda: kernels.fp8_wgrad_gemm_nt_cuda(qt, st, qt, st, dw),
        **grouped_cases(q, s, w, device),
    }


def grouped_cases(q, s, w, device, groups=2):
    """The MoE GEMMs' faces on the same operands: contiguous (rows split between groups) and masked."""
    t, k = q.shape
    wq, ws = kernels.per_block_quant_fp8_cuda(torch.stack([w] * groups).reshape(-1, k))
    bq, bs = wq.view(groups, -1, k), ws.view(groups, -1, ws.shape[-1])
    n = bq.shape[1]
    ids = (torch.arange(t, device=device) * groups // t).to(torch.int32)
    d = torch.empty(t, n, dtype=torch.bfloat16, device=device)
    qm = q.view(groups, t // groups, k)
    sm = kernels.mn_major_tma_aligned_empty((groups, t // groups, k // 128), device=device).fill_(1)
    dm = torch.empty(groups, t // groups, n, dtype=torch.bfloat16, device=device)
    counts = torch.full((groups,), t // (2 * groups), dtype=torch.int32, device=device)
    return {"m_grouped_fp8_gemm_nt_contiguous": lambda: kernels.m_grouped_contiguous_cuda(q, s, bq, bs, d, ids),
            "m_grouped_fp8_gemm_nt_masked": lambda: kernels.m_grouped_masked_cuda(qm, sm, bq, bs, dm, counts,
                                                                                 t // (2 * groups))}


def mla_cases(b=64, h_q=16, blocks_per_request=4, device="cpu"):
    """The MLA decode faces on a small paged cache (bf16, one KV head): what each layer of a decode step calls."""
    from torch_deepstack.mla import kernels as mla_kernels
    k_cache = torch.zeros(b * blocks_per_request, 64, 1, 576, dtype=torch.bfloat16, device=device)
    block_table = torch.arange(b * blocks_per_request, dtype=torch.int32, device=device).view(b, -1)
    seqlens = torch.full((b,), 64 * blocks_per_request - 7, dtype=torch.int32, device=device)
    q = torch.randn(b, 1, h_q, 576, dtype=torch.bfloat16, device=device)
    kv = torch.randn(b, 1, 576, dtype=torch.bfloat16, device=device)
    slots = block_table[:, -1].long() * 64 + 56     # int64, as PagedKVCache hands them out
    sched, splits = mla_kernels.get_mla_metadata_cuda(seqlens, h_q, 1)
    return {"get_mla_metadata": lambda: mla_kernels.get_mla_metadata_cuda(seqlens, h_q, 1),
            "mla_append_kv": lambda: mla_kernels.mla_append_kv_cuda(k_cache, kv, slots),
            "mla_decode_with_kvcache (bf16, 16 rows)": lambda: mla_kernels.mla_decode_with_kvcache_cuda(
                q, k_cache, block_table, seqlens, 512, sched, splits, causal=True)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default=None, help="a row's name (prefix): cProfile it instead of the table")
    ap.add_argument("--cuda", action="store_true", help="real GPU faces and launches (needs an sm_90 GPU)")
    args = ap.parse_args()
    if args.cuda:
        return run(args, "cuda")
    with gpu_parts_stubbed():
        route_ops_to_cuda_faces()
        run(args, "cpu")


def run(args, device):
    table = cases(device=device)
    table.update(mla_cases(device=device))
    table.update(step_cases(device=device))
    table.update(primitive_cases(device))
    sync = torch.cuda.synchronize if device == "cuda" else None
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
    print(f"| CUDA face ({'real launches' if sync else 'GPU parts stubbed'}) | host us per call |")
    print("|---|---|")
    for name, fn in table.items():   # (GPU: 200-call runs of tiny kernels, synchronised between runs: no queue stalls)
        us = bench_host(fn, iters=200, warmup=20, runs=5, between=sync) if sync else bench_host(fn, 2000, 1, runs=5)
        print(f"| {name} | {us:.1f} |")


if __name__ == "__main__":
    main()
