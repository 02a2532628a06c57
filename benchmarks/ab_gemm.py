"""A/B runs of dense FP8 GEMM kernel variants and block configs: the tool behind the "A/B" numbers in docs/gemm.md.

Every (shape, variant, config) is timed `--reps` times, interleaved so that clock drift hits all of them alike, and the
best median is kept (bench_gpu: L2 flushed before each repetition). Each output is checked against a float64 matmul
of the dequantised operands (cosine difference < 1e-4) before it is timed.

  python benchmarks/ab_gemm.py --ms 4096 --variant staged: --variant direct:DS_DIRECT_EPILOGUE \
      --config 128,128,6 --config 128,192,5

A variant is NAME:DEFINES[:MULTICAST[:TMA_STORE]] (DEFINES as for DEEPSTACK_GEMM_DEFINES, comma-separated;
MULTICAST 1 enables the 2-CTA multicast kernel; TMA_STORE 1/0 forces the TMA-store epilogue on/off wherever it is
possible, empty keeps the default policy). `--shapes 4096x7168x16384,128x24576x1536` times those shapes instead of
--ms x the DeepSeek-V3 (N, K) list. `--prebuild-only` compiles every needed specialisation (nvcc, no GPU needed) into
DEEPSTACK_JIT_CACHE_DIR, so a GPU run can carry the cache and spend no device time compiling. The config column is
the one the call ran (block_m x block_n / stages, "/tma" with the TMA-store epilogue).
"""
from __future__ import annotations

import argparse
import itertools
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from torch_deepstack.gemm import kernels
from torch_deepstack.jit import cache

NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]


def parse_variant(text: str) -> tuple[str, str, str, str]:
    name, _, rest = text.partition(":")
    defines, _, rest = rest.partition(":")
    multicast, _, tma_store = rest.partition(":")
    return name or "default", defines, multicast or "0", tma_store


def select(variant, cfg) -> None:
    """Point the GEMM's environment switches at one variant and config (the plan cache keys on them)."""
    _, defines, multicast, tma_store = variant
    os.environ["DEEPSTACK_GEMM_DEFINES"] = defines
    os.environ["DEEPSTACK_GEMM_MULTICAST"] = multicast
    if tma_store:
        os.environ["DEEPSTACK_GEMM_TMA_STORE"] = tma_store
    else:
        os.environ.pop("DEEPSTACK_GEMM_TMA_STORE", None)
    if cfg:
        os.environ["DEEPSTACK_GEMM_CONFIG"] = ",".join(map(str, cfg))
    else:
        os.environ.pop("DEEPSTACK_GEMM_CONFIG", None)


def prebuild(cases, jobs: int) -> None:
    specs = []
    for (m, n, k), variant, cfg in cases:
        select(variant, cfg)
        specs.append(kernels.choose_spec(kernels.KIND_DENSE, m, 1, n, k, m, False, None, torch.bfloat16, None,
                                         132)[0])
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(cache.build, set(specs)))
    print(f"prebuilt {len(set(specs))} specialisations", flush=True)


def run(shapes, variants, configs, reps: int) -> list:
    from torch_deepstack.gemm import api
    from torch_deepstack.quant import per_token_group_quant_fp8
    from torch_deepstack.testing.bench import bench_gpu

    rows = []
    for m, n, k in shapes:
        aq, asf = per_token_group_quant_fp8(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
        bq, bsf = api.per_block_quant_fp8(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
        a_deq = aq.double() * asf.double().repeat_interleave(128, 1)[:, :k]
        b_deq = bq.double() * bsf.double().repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :k]
        want = (a_deq @ b_deq.T).flatten()
        best: dict = {}
        for _ in range(reps):
            for variant, cfg in itertools.product(variants, configs):
                select(variant, cfg)
                d = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
                try:
                    torch.ops.deepstack.fp8_gemm_nt(aq, asf, bq, bsf, d)
                except Exception as e:  # noqa: BLE001 - e.g. a forced config that exceeds shared memory
                    print(f"skip {m}x{n}x{k} {variant[0]} {cfg}: {str(e)[:80]}")
                    continue
                diff = 1 - torch.nn.functional.cosine_similarity(d.double().flatten(), want, 0).item()
                ok = bool(torch.isfinite(d).all()) and diff < 1e-4
                tflops = 2 * m * n * k / bench_gpu(lambda: torch.ops.deepstack.fp8_gemm_nt(aq, asf, bq, bsf, d)) / 1e9
                _, used, _ = kernels.choose_spec(kernels.KIND_DENSE, m, 1, n, k, m, False, None, torch.bfloat16, None,
                                                 kernels.num_sms(d.device))
                label = f"{used.block_m}x{used.block_n}/{used.stages}{'/tma' if used.tma_store else ''}"
                key = (variant[0], label if cfg is None else f"{label} (forced)")
                prev_tf, prev_ok = best.get(key, (0.0, True))
                best[key] = (max(prev_tf, tflops), prev_ok and ok)
        for (name, cfg), (tflops, ok) in best.items():
            rows.append((f"{m}x{n}x{k}", name, cfg, tflops, ok))
            print(f"{m}x{n}x{k} {name:>16} {str(cfg):>14} {tflops:8.1f} {'ok' if ok else 'WRONG'}", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ms", default="64,128,4096", help="comma-separated M values (DeepSeek-V3 N, K shapes)")
    p.add_argument("--shapes", default="", help="comma-separated MxNxK (replaces --ms)")
    p.add_argument("--variant", action="append", default=None, help="NAME:DEFINES[:MULTICAST[:TMA_STORE]] (repeatable)")
    p.add_argument("--config", action="append", default=[], help="bm,bn,stages forced config (repeatable)")
    p.add_argument("--no-heuristic", action="store_true", help="time only the forced configs")
    p.add_argument("--reps", type=int, default=2, help="interleaved repetitions; the best median is kept")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel nvcc processes")
    p.add_argument("--prebuild-only", action="store_true", help="compile the specialisations and stop (no GPU)")
    args = p.parse_args()
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    else:
        shapes = [(m, n, k) for m in (int(v) for v in args.ms.split(",")) for n, k in NK]
    variants = [parse_variant(v) for v in (args.variant or ["default:"])]
    configs = ([] if args.no_heuristic else [None]) + [tuple(int(v) for v in c.split(",")) for c in args.config]
    prebuild([(s, v, c) for s in shapes for v in variants for c in configs], args.jobs)
    if args.prebuild_only:
        return 0
    rows = run(shapes, variants, configs, args.reps)
    print("\n| M x N x K | variant | config | TFLOPS | correct |\n|---|---|---|---|---|")
    for shape, name, cfg, tflops, ok in rows:
        print(f"| {shape} | {name} | {cfg} | {tflops:.1f} | {ok} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
