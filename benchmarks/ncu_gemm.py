"""ncu target for the FP8 GEMM: one launch per (shape, variant) after warm-up, inside cudaProfilerStart/Stop, so
`ncu --profile-from-start off` profiles exactly those launches (in the order listed).

  ncu --clock-control none --profile-from-start off --section SpeedOfLight --csv \\
      python benchmarks/ncu_gemm.py --shapes c4x8192x7168x2048,32768x7168x2048 --variant new: --variant old:DS_X

Shapes and variants are written as for benchmarks/ab_gemm.py (dense MxNxK, contiguous cGxMGxNxK or with MoE-like
group sizes rGxMGxNxK, masked mGxMGxNxK;
NAME:DEFINES[:MULTICAST[:TMA_STORE[:SPLIT_TAIL]]]). The kernels must already be in DEEPSTACK_JIT_CACHE_DIR
(ab_gemm.py --prebuild-only builds the same set). `--deepgemm` also profiles a live DeepGEMM's call on each dense
and contiguous shape (after ours; see bench_gemm.py for the package), to compare the two kernels' counters on the
same data.
"""
from __future__ import annotations

import argparse

import torch

from torch_deepstack.gemm import kernels
from torch_deepstack.testing.bench import profile_one_call

from ab_gemm import contiguous_ids, make_call, parse_shape, parse_variant, select, shape_name


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", required=True, help="comma-separated shapes (ab_gemm.py notation)")
    p.add_argument("--variant", action="append", default=None, help="NAME:DEFINES[:...] (repeatable)")
    p.add_argument("--config", action="append", default=[], help="bm,bn,stages forced config (repeatable; default: "
                                                                  "the heuristic's)")
    p.add_argument("--deepgemm", action="store_true",
                   help="also profile a live DeepGEMM on each dense and contiguous shape")
    args = p.parse_args()
    variants = [parse_variant(v) for v in (args.variant or ["default:"])]
    for text in args.shapes.split(","):
        shape = parse_shape(text)
        call, _, _ = make_call(shape)
        for variant in variants:
            for cfg in args.config or [None]:
                select(variant, tuple(int(v) for v in cfg.split(",")) if cfg else None)
                profile_one_call(f"{shape_name(shape)} {variant[0]} {cfg or 'heuristic'}", call)
        if args.deepgemm and shape[0] != kernels.KIND_MASKED:
            profile_one_call(f"{shape_name(shape)} DeepGEMM", live_deepgemm(shape))
    return 0


def live_deepgemm(shape):
    """A live DeepGEMM call of a dense (M x N x K) or contiguous (cG... / rG... layouts of ab_gemm) shape on fresh
    data, checked against ours by bench_gemm.deepgemm_contender."""
    import bench_gemm
    from torch_deepstack.quant import per_token_group_quant_fp8

    kind, g, mg, n, k = shape
    bench_gemm.DG = bench_gemm.live_deepgemm()
    if bench_gemm.DG is None:
        raise SystemExit("--deepgemm: no DeepGEMM package imports")
    ids = None if kind == kernels.KIND_DENSE else contiguous_ids(kind, g, mg).cuda()
    rows = g * mg if ids is None else ids.numel()
    aq, asf = per_token_group_quant_fp8(torch.randn(rows, k, device="cuda", dtype=torch.bfloat16))
    d = torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)
    if kind == kernels.KIND_DENSE:
        (bq, bsf), args = bench_gemm.quant_weight(n, k), ()
        torch.ops.deepstack.fp8_gemm_nt(aq, asf, bq, bsf, d)
    else:
        bq, bsf = bench_gemm.quant_weight(n, k, g)
        args = (ids,)
        torch.ops.deepstack.m_grouped_fp8_gemm_nt_contiguous(aq, asf, bq, bsf, d, *args)
    call = bench_gemm.deepgemm_contender("dense" if kind == kernels.KIND_DENSE else "contiguous", aq, asf, bq, bsf,
                                         d, *args, rows=None if ids is None else ids >= 0)
    if call is None:
        raise SystemExit("--deepgemm: DeepGEMM's output disagrees with ours")
    return call


if __name__ == "__main__":
    raise SystemExit(main())
