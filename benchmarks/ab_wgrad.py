"""A/B of the weight-gradient GEMM (fp8_wgrad_gemm_nt: 1x128 scales on both operands, fp32 out) against cuBLAS bf16
`dy.T @ x`, for FP8Linear's shapes: default kernel against `DEEPSTACK_GEMM_DEFINES` variants (e.g. DS_SERIAL_PROMOTE,
the serial loop that the pipelined promotion replaced, docs/gemm.md), settled timing (bench_gpu_interleaved, L2
flushed before every call).

  python benchmarks/ab_wgrad.py --variant serial:DS_SERIAL_PROMOTE
  python benchmarks/ab_wgrad.py --prebuild-only --variant serial:DS_SERIAL_PROMOTE     # nvcc here, no GPU
"""
from __future__ import annotations

import argparse
import os

import torch

from torch_deepstack.gemm import kernels
from torch_deepstack.jit import cache

# (out features, in features, tokens): FP8Linear's wgrad GEMMs in benchmarks/bench_linear.py
SHAPES = [(2048, 7168, 8192), (7168, 2048, 8192), (7168, 16384, 8192), (4096, 7168, 2048)]


def _variants(texts):
    return [("default", "")] + [tuple(t.split(":", 1)) for t in texts]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", action="append", default=[], help="NAME:DEFINES (repeatable)")
    ap.add_argument("--prebuild-only", action="store_true")
    args = ap.parse_args()
    variants = _variants(args.variant)
    if args.prebuild_only:
        specs = set()
        for _, defines in variants:
            os.environ["DEEPSTACK_GEMM_DEFINES"] = defines
            for m, n, k in SHAPES:
                specs.add(kernels.choose_spec(kernels.KIND_DENSE, m, 1, n, k, m, True, 0, torch.float32, None,
                                              132)[0])
        for spec in specs:
            cache.build(spec)
        print(f"prebuilt {len(specs)} specialisations")
        return
    from torch_deepstack.gemm import api
    from torch_deepstack.testing.bench import bench_gpu_interleaved
    from tests.gemm.util import wgrad_operand
    from tests.helpers import calc_diff
    print("| out x in, tokens | " + " | ".join(f"{name} TFLOPS" for name, _ in variants) + " | bf16 TFLOPS | bit-identical |")
    print("|---" * (len(variants) + 3) + "|")
    for m, n, k in SHAPES:
        dy = torch.randn(k, m, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        aq, asf = wgrad_operand(dy)
        bq, bsf = wgrad_operand(x)
        outs, fns, enter = {}, {}, {}
        for name, defines in variants:
            enter[name] = (lambda d=defines: os.environ.__setitem__("DEEPSTACK_GEMM_DEFINES", d))
            enter[name]()
            outs[name] = api.fp8_wgrad_gemm_nt(aq, asf, bq, bsf)
            fns[name] = (lambda: api.fp8_wgrad_gemm_nt(aq, asf, bq, bsf))
        assert calc_diff(outs["default"], dy.float().T @ x.float()) < 1e-3
        same = all(torch.equal(outs["default"], o) for o in outs.values())
        fns["bf16"], enter["bf16"] = (lambda: dy.T @ x), (lambda: None)
        ms = bench_gpu_interleaved(fns, enter=enter)
        flop = 2 * m * n * k
        print(f"| {m} x {n}, {k} | " + " | ".join(f"{flop / ms[name] / 1e9:.0f}" for name, _ in variants) +
              f" | {flop / ms['bf16'] / 1e9:.0f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
