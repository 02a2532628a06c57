"""The MoE weight gradient (`k_grouped_fp8_wgrad_gemm_nt`): one k-grouped launch against one weight-gradient GEMM
per expert segment (what the op did before 2026-11-30 22:00 UTC, and what it still does under CUDA-graph capture),
and for bf16 output the one launch with its TMA-store epilogue against the staged stores it had before
(DEEPSTACK_GEMM_TMA_STORE=0).

D[g] = dY[:, seg_g] @ X[:, seg_g].T for G experts whose segments (their tokens, padded to 128) vary around
`expected` tokens (x U(0.7, 1.3), one empty), bf16 output (FP8Experts' bf16 master weights) and fp32 output.
Shapes: FP8Experts' two weights at DeepSeek-V3 sizes (w_in's gradient 4096 x 7168, w_out's 7168 x 2048), 32 local
experts. Both forms are checked equal (bit for bit) first. Timing: bench_gpu_interleaved (L2 write-flushed before
each call, contenders settled ~100 ms each, rotated rounds), whole calls with their host time.

  python benchmarks/bench_k_grouped.py             # prints the table, writes docs/benchmarks.md's block
  python benchmarks/bench_k_grouped.py --print     # prints only
  python benchmarks/bench_k_grouped.py --ab tma::,staged:0:,serial:0:DS_SERIAL_PROMOTE
      # one launch only, kernel variants NAME:DEEPSTACK_GEMM_TMA_STORE:DEEPSTACK_GEMM_DEFINES timed interleaved
"""
from __future__ import annotations

import argparse
import os

import torch

import torch_deepstack  # noqa: F401
from torch_deepstack.gemm.kernels import k_grouped_per_segment as per_segment
from torch_deepstack.testing.bench import BenchTable, bench_gpu_interleaved

ops = torch.ops.deepstack
# (M, N, G, expected tokens per expert): FP8Experts' two weights at DeepSeek-V3 sizes, shorter and longer segments
CONFIGS = [(4096, 7168, 32, 1024), (7168, 2048, 32, 1024), (4096, 7168, 32, 256), (4096, 7168, 8, 4096)]


def segments(g: int, expected: int, seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    sizes = [int(expected * float(u)) for u in torch.rand(g, generator=gen) * 0.6 + 0.7]
    sizes[1] = 0
    return [(s + 127) // 128 * 128 for s in sizes]


def operand(t: torch.Tensor):
    """t [tokens, C] -> the weight-gradient operand [C, tokens] (1x128 scales along tokens) and its scales."""
    q, s = ops.per_token_group_quant_fp8_t(t, 1e-4, False)
    return q.as_strided((q.shape[0], q.stride(0)), (q.stride(0), 1)), s


def ab(variants: str) -> None:
    """One-launch kernel variants (epilogue, experiment defines) against each other, interleaved; printed only."""
    parsed = [v.split(":") for v in variants.split(",")]
    print("M x N | G x tokens | out | " + " | ".join(f"{name} us" for name, _, _ in parsed))
    for m, n, g, expected in CONFIGS:
        ks = segments(g, expected)
        total = sum(ks)
        aq, asf = operand(torch.randn(total, m, device="cuda").to(torch.bfloat16))
        bq, bsf = operand(torch.randn(total, n, device="cuda").to(torch.bfloat16))
        for out_dtype in (torch.bfloat16, torch.float32):
            d = torch.empty(g, m, n, dtype=out_dtype, device="cuda")
            outs = {}

            def select(tma, defines):
                os.environ["DEEPSTACK_GEMM_TMA_STORE"], os.environ["DEEPSTACK_GEMM_DEFINES"] = tma, defines
            for name, tma, defines in parsed:      # every variant gives the same bits
                select(tma, defines)
                ops.k_grouped_fp8_wgrad_gemm_nt(aq, asf, bq, bsf, d, ks)
                outs[name] = d.clone()
            first = next(iter(outs.values()))
            if not all(torch.equal(first, o) for o in outs.values()):
                raise SystemExit(f"variants differ at {m}x{n}")
            ms = bench_gpu_interleaved(
                {name: (lambda: ops.k_grouped_fp8_wgrad_gemm_nt(aq, asf, bq, bsf, d, ks)) for name, _, _ in parsed},
                enter={name: (lambda t=tma, df=defines: select(t, df)) for name, tma, df in parsed})
            select("", "")
            print(f"{m}x{n} | {g}x{expected} | {str(out_dtype).split('.')[-1]} | " +
                  " | ".join(f"{ms[name] * 1e3:.1f}" for name, _, _ in parsed), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--print", action="store_true", help="print only, leave docs/benchmarks.md alone")
    ap.add_argument("--ab", default=None, metavar="NAME:TMA_STORE:DEFINES,...",
                    help="time one-launch kernel variants against each other instead (printed only)")
    args = ap.parse_args()
    if args.ab:
        return ab(args.ab)
    table = BenchTable("gemm", "k_grouped", "MoE weight gradient: one k-grouped launch against one GEMM per segment",
                       ["M x N", "G x tokens", "out", "one launch us", "TFLOPS", "per segment us", "TFLOPS",
                        "one launch / per segment speed", "one launch, staged epilogue us", "TMA store / staged speed"])
    table.notes += ["segments: expected tokens x U(0.7, 1.3) per expert, one empty, each padded to 128; both forms "
                    "checked bit-identical first; bench_gpu_interleaved, whole calls (host time included)"]
    for m, n, g, expected in CONFIGS:
        ks = segments(g, expected)
        total = sum(ks)
        aq, asf = operand(torch.randn(total, m, device="cuda").to(torch.bfloat16))
        bq, bsf = operand(torch.randn(total, n, device="cuda").to(torch.bfloat16))
        flop = 2.0 * m * n * total
        for out_dtype in (torch.bfloat16, torch.float32):
            d1 = torch.empty(g, m, n, dtype=out_dtype, device="cuda")
            d2 = torch.empty_like(d1)
            ops.k_grouped_fp8_wgrad_gemm_nt(aq, asf, bq, bsf, d1, ks)
            per_segment(aq, asf, bq, bsf, d2, ks)
            torch.cuda.synchronize()
            if not torch.equal(d1, d2):
                raise SystemExit(f"one launch and per-segment GEMMs differ at {m}x{n}, {ks}")
            fns = {"one": lambda: ops.k_grouped_fp8_wgrad_gemm_nt(aq, asf, bq, bsf, d1, ks),
                   "loop": lambda: per_segment(aq, asf, bq, bsf, d2, ks)}
            epilogue = {"one": "", "loop": ""}
            if out_dtype == torch.bfloat16:   # (the TMA store is for bf16 output)
                fns["staged"], epilogue["staged"] = fns["one"], "0"
            ms = bench_gpu_interleaved(fns, enter={name: (lambda v=v: os.environ.__setitem__(
                "DEEPSTACK_GEMM_TMA_STORE", v)) for name, v in epilogue.items()})
            os.environ["DEEPSTACK_GEMM_TMA_STORE"] = ""
            staged = ms.get("staged")
            table.add(f"{m}x{n}", f"{g}x{expected}", str(out_dtype).split(".")[-1], round(ms["one"] * 1e3, 1),
                      round(flop / ms["one"] / 1e9), round(ms["loop"] * 1e3, 1), round(flop / ms["loop"] / 1e9),
                      round(ms["loop"] / ms["one"], 3), round(staged * 1e3, 1) if staged else "-",
                      round(staged / ms["one"], 3) if staged else "-")
    if not args.print:
        table.save()


if __name__ == "__main__":
    main()
