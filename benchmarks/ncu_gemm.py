"""ncu target for the FP8 GEMM: one launch per (shape, variant) after warm-up, inside cudaProfilerStart/Stop, so
`ncu --profile-from-start off` profiles exactly those launches (in the order listed).

  ncu --clock-control none --profile-from-start off --section SpeedOfLight --csv \\
      python benchmarks/ncu_gemm.py --shapes c4x8192x7168x2048,32768x7168x2048 --variant new: --variant old:DS_X

Shapes and variants are written as for benchmarks/ab_gemm.py (dense MxNxK, contiguous cGxMGxNxK, masked mGxMGxNxK;
NAME:DEFINES[:MULTICAST[:TMA_STORE[:SPLIT_TAIL]]]). The kernels must already be in DEEPSTACK_JIT_CACHE_DIR
(ab_gemm.py --prebuild-only builds the same set).
"""
from __future__ import annotations

import argparse

import torch

from ab_gemm import make_call, parse_shape, parse_variant, select, shape_name


def profiled(name: str, call) -> None:
    """Three warm-up calls, then one call between cudaProfilerStart/Stop (what `--profile-from-start off` profiles)."""
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print("profiled", name, flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", required=True, help="comma-separated shapes (ab_gemm.py notation)")
    p.add_argument("--variant", action="append", default=None, help="NAME:DEFINES[:...] (repeatable)")
    args = p.parse_args()
    variants = [parse_variant(v) for v in (args.variant or ["default:"])]
    for text in args.shapes.split(","):
        shape = parse_shape(text)
        call, _, _ = make_call(shape)
        for variant in variants:
            select(variant, None)
            profiled(f"{shape_name(shape)} {variant[0]}", call)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
