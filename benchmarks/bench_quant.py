"""per_token_group_quant_fp8: our kernel vs the eager PyTorch version, as a fraction of copy bandwidth.

Bytes per call: read M*K input elements, write M*K e4m3 bytes and M*K/128 fp32 scales.
Target (issue 2): >= 85% of the device-to-device copy bandwidth measured in the same run, on large inputs.
"""
import argparse

import torch

import torch_deepstack  # noqa: F401
from torch_deepstack.quant.reference import per_token_group_quant_fp8_ref
from torch_deepstack.testing.bench import BenchTable, bench_gpu


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = bench_gpu(lambda: b.copy_(a), flush=False)
    return 2 * nbytes / ms / 1e6


def sweep(copy: float) -> None:
    """Time kernel variants (rows in flight per thread, streaming cache hints) to choose the defaults."""
    from torch_deepstack.jit import get_kernel
    from torch_deepstack.quant import kernels as qk
    from torch_deepstack.quant.scale_layout import mn_major_tma_aligned_empty
    t = BenchTable("quant", "per_token_group_quant_fp8_sweep", "per_token_group_quant_fp8 variant sweep (bf16)",
                   ["M", "K", "iters", "streaming", "us", "GB/s", "% of copy"])
    for m, k in [(16384, 7168), (65536, 7168)]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        q = torch.empty(m, k, device="cuda", dtype=torch.float8_e4m3fn)
        s = mn_major_tma_aligned_empty((m, k // 128), device="cuda")
        nbytes = m * k * 3 + m * (k // 128) * 4
        for iters in (1, 2, 4, 8):
            for streaming in (False, True):
                kern = get_kernel(qk.group_quant_spec(x.dtype, 128, False, iters, streaming), qk._SIGNATURE)
                ms = bench_gpu(lambda: qk.launch_group_quant(kern, x, q, s, 128, iters, 1e-4))
                t.add(m, k, iters, streaming, ms * 1e3, nbytes / ms / 1e6, 100 * nbytes / ms / 1e6 / copy)
    t.save()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time kernel variants")
    args = ap.parse_args()
    shapes = [(4096, 7168), (16384, 7168), (65536, 7168), (128, 7168)] if not args.quick else [(4096, 7168)]
    copy = copy_bandwidth_gbs()
    if args.sweep:
        sweep(copy)
    t = BenchTable("quant", "per_token_group_quant_fp8", "per_token_group_quant_fp8 (1x128, e4m3, MN-major scales)",
                   ["M", "K", "dtype", "ours us", "ours GB/s", "% of copy", "eager us", "speedup"])
    t.notes.append(f"copy bandwidth in this run: {copy:.0f} GB/s (read + write of a 2 GiB buffer)")
    op = torch.ops.deepstack.per_token_group_quant_fp8
    for m, k in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            nbytes = m * k * (x.element_size() + 1) + m * (k // 128) * 4
            ours = bench_gpu(lambda: op(x))
            eager = bench_gpu(lambda: per_token_group_quant_fp8_ref(x), rep=20)
            gbs = nbytes / ours / 1e6
            t.add(m, k, str(dtype).split(".")[-1], ours * 1e3, gbs, 100 * gbs / copy, eager * 1e3, eager / ours)
    t.save()


if __name__ == "__main__":
    main()
