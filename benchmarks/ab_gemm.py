"""A/B runs of dense FP8 GEMM kernel variants and block configs: the tool behind the "A/B" numbers in docs/gemm.md.

Every (shape, variant, config) is timed `--reps` times, interleaved so that clock drift hits all of them alike, and the
best median is kept (bench_gpu: L2 flushed before each repetition). Each output is checked against a float64 matmul
of the dequantised operands (cosine difference < 1e-4) before it is timed. Those 10 ms windows right after the check
read the boost clock the light check leaves; `--steady` times each variant after ~100 ms of its own calls instead
(bench_gpu_interleaved), the state a long run sits in at the H200's power cap: use it for throughput claims.

  python benchmarks/ab_gemm.py --ms 4096 --variant staged: --variant direct:DS_DIRECT_EPILOGUE \
      --config 128,128,6 --config 128,192,5

A variant is NAME:DEFINES[:MULTICAST[:TMA_STORE[:SPLIT_TAIL]]] (DEFINES as for DEEPSTACK_GEMM_DEFINES, comma-separated;
MULTICAST 1 enables the 2-CTA multicast kernel; TMA_STORE 1/0 forces the TMA-store epilogue on/off wherever it is
possible, empty keeps the default policy; SPLIT_TAIL 1 splits off the last N % 128 columns of dense GEMMs where
that pays in waves, kernels.split_tail_columns; 0 or empty: one launch, the default). `--shapes 4096x7168x16384,128x24576x1536` times those shapes instead of
--ms x the DeepSeek-V3 (N, K) list; a shape written cGxMGxNxK (contiguous: G groups of MG rows, all valid) or mGxMGxNxK
(masked: G groups of M_max = 4096 rows, MG of them valid, expected_m = MG) times that grouped kind, and rGxMGxNxK the
contiguous kind with MoE-like groups: MG x U(0.7, 1.3) rows each (a fixed draw), padded to 128 (TFLOPS count valid
rows). `--prebuild-only` compiles every needed specialisation (nvcc, no GPU needed) into
DEEPSTACK_JIT_CACHE_DIR, so a GPU run can carry the cache and spend no device time compiling. The config column is
the one the call ran (block_m x block_n / stages, "/tma" with the TMA-store epilogue).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from torch_deepstack.gemm import kernels
from torch_deepstack.jit import cache

NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]


def parse_variant(text: str) -> tuple[str, str, str, str, str]:
    name, _, rest = text.partition(":")
    defines, _, rest = rest.partition(":")
    multicast, _, rest = rest.partition(":")
    tma_store, _, split_tail = rest.partition(":")
    return name or "default", defines, multicast or "0", tma_store, split_tail or "0"


def select(variant, cfg) -> None:
    """Point the GEMM's environment switches at one variant and config (the plan cache keys on them)."""
    _, defines, multicast, tma_store, split_tail = variant
    os.environ["DEEPSTACK_GEMM_DEFINES"] = defines
    os.environ["DEEPSTACK_GEMM_SPLIT_TAIL"] = split_tail
    os.environ["DEEPSTACK_GEMM_MULTICAST"] = multicast
    if tma_store:
        os.environ["DEEPSTACK_GEMM_TMA_STORE"] = tma_store
    else:
        os.environ.pop("DEEPSTACK_GEMM_TMA_STORE", None)
    if cfg:
        os.environ["DEEPSTACK_GEMM_CONFIG"] = ",".join(map(str, cfg))
    else:
        os.environ.pop("DEEPSTACK_GEMM_CONFIG", None)


MASKED_M_MAX = 4096
RANDOM_CONTIG = 100     # shape kind of rGxMGxNxK: the contiguous kind with random group sizes


@functools.lru_cache(maxsize=None)
def contiguous_ids(kind: int, g: int, mg: int) -> torch.Tensor:
    """m_indices of a contiguous shape (CPU; callers copy, never modify): cGxMG... G groups of MG rows, all valid;
    rGxMG... group i has int(MG x U(0.7, 1.3)) rows (a seeded draw), padded to 128 with -1."""
    if kind == kernels.KIND_CONTIGUOUS:
        return torch.arange(g, dtype=torch.int32).repeat_interleave(mg)
    u = torch.rand(g, generator=torch.Generator().manual_seed(1000 * g + mg)) * 0.6 + 0.7
    ids = []
    for i, x in enumerate(u.tolist()):
        rows = int(mg * x)
        ids += [i] * rows + [-1] * ((rows + 127) // 128 * 128 - rows)
    return torch.tensor(ids, dtype=torch.int32)


def shape_flops(shape) -> int:
    kind, g, mg, n, k = shape
    rows = int((contiguous_ids(kind, g, mg) >= 0).sum()) if kind == RANDOM_CONTIG else g * mg
    return 2 * rows * n * k


def parse_shape(text: str) -> tuple:
    """(kind, groups, rows per group, N, K): 'MxNxK' dense, 'cGxMGxNxK' contiguous, 'mGxMGxNxK' masked."""
    kind = {"c": kernels.KIND_CONTIGUOUS, "m": kernels.KIND_MASKED, "r": RANDOM_CONTIG}.get(text[0], kernels.KIND_DENSE)
    dims = [int(v) for v in (text[1:] if kind != kernels.KIND_DENSE else text).split("x")]
    return (kind, 1, *dims) if kind == kernels.KIND_DENSE else (kind, *dims)


def shape_name(shape) -> str:
    kind, g, mg, n, k = shape
    prefix = {kernels.KIND_DENSE: "", kernels.KIND_CONTIGUOUS: "c", kernels.KIND_MASKED: "m", RANDOM_CONTIG: "r"}[kind]
    return f"{prefix}{'' if kind == kernels.KIND_DENSE else f'{g}x'}{mg}x{n}x{k}"


def spec_args(shape) -> tuple:
    """choose_spec's arguments for a shape: (kind, m_rows, groups, n, k, expected_m)."""
    kind, g, mg, n, k = shape
    if kind == kernels.KIND_MASKED:
        return kind, MASKED_M_MAX, g, n, k, mg
    if kind == RANDOM_CONTIG:
        m = contiguous_ids(kind, g, mg).numel()
        return kernels.KIND_CONTIGUOUS, m, g, n, k, m
    return kind, g * mg, g, n, k, g * mg


def prebuild(cases, jobs: int) -> None:
    specs = []
    for shape, variant, cfg in cases:
        select(variant, cfg)
        kind, m_rows, g, n, k, em = spec_args(shape)
        specs.append(kernels.choose_spec(kind, m_rows, g, n, k, em, False, None, torch.bfloat16, None, 132)[0])
        tail = kernels.split_tail_columns(m_rows, n, k, 132) if kind == kernels.KIND_DENSE else 0
        for cols in ((n - tail, tail) if tail else ()):
            specs.append(kernels.choose_spec(kind, m_rows, g, cols, k, em, False, None, torch.bfloat16, None, 132)[0])
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(cache.build, set(specs)))
    print(f"prebuilt {len(set(specs))} specialisations", flush=True)


def make_call(shape, check_rows: int = 0):
    """(call, check, d): call runs the op once on fresh random data into d; check() returns the largest cosine
    difference of a group's valid rows against a float64 matmul of the dequantised operands (inf if one is not
    finite: poison d with NaN before the call). check_rows > 0 checks that many evenly spaced rows per group (the
    first and last included) instead of all: float64 on all rows of a 32768-row call takes tens of seconds."""
    from torch_deepstack.gemm import api
    from torch_deepstack.quant import per_token_group_quant_fp8

    kind, g, mg, n, k = shape
    contiguous = kind in (kernels.KIND_CONTIGUOUS, RANDOM_CONTIG)
    ids = contiguous_ids(kind, g, mg).cuda() if contiguous else None
    m_max = MASKED_M_MAX if kind == kernels.KIND_MASKED else g * mg if ids is None else ids.numel()
    x = torch.randn(*((g, m_max) if kind == kernels.KIND_MASKED else (m_max,)), k, device="cuda",
                    dtype=torch.bfloat16)
    aq, asf = per_token_group_quant_fp8(x)
    qs = [api.per_block_quant_fp8(torch.randn(n, k, device="cuda", dtype=torch.bfloat16)) for _ in range(g)]
    bq, bsf = (qs[0] if kind == kernels.KIND_DENSE else
               (torch.stack([q for q, _ in qs]), torch.stack([s_ for _, s_ in qs])))
    d = torch.full((*aq.shape[:-1], n), float("nan"), device="cuda", dtype=torch.bfloat16)
    ops = torch.ops.deepstack
    if kind == kernels.KIND_DENSE:
        def call():
            ops.fp8_gemm_nt(aq, asf, bq, bsf, d)
    elif contiguous:
        def call():
            ops.m_grouped_fp8_gemm_nt_contiguous(aq, asf, bq, bsf, d, ids)
    else:
        masked_m = torch.full((g,), mg, device="cuda", dtype=torch.int32)

        def call():
            ops.m_grouped_fp8_gemm_nt_masked(aq, asf, bq, bsf, d, masked_m, mg)

    def dequant(q, s, rows_per_scale):
        s = s.double().repeat_interleave(128, -1)[..., :k]
        if rows_per_scale > 1:
            s = s.repeat_interleave(rows_per_scale, -2)[..., :q.shape[-2], :]
        return q.double() * s

    def check() -> float:
        diffs = []
        for i in range(g):
            if kind == kernels.KIND_DENSE:
                a_i, sa_i, d_i = aq, asf, d
            elif contiguous:
                rows_i = (ids == i).nonzero().flatten()
                a_i, sa_i, d_i = aq[rows_i], asf[rows_i], d[rows_i]
            else:
                a_i, sa_i, d_i = aq[i, :mg], asf[i, :mg], d[i, :mg]
            b_i, sb_i = (bq, bsf) if kind == kernels.KIND_DENSE else (bq[i], bsf[i])
            if 0 < check_rows < a_i.shape[0]:
                rows = torch.linspace(0, a_i.shape[0] - 1, check_rows, device="cuda").long()
                a_i, sa_i, d_i = a_i[rows], sa_i[rows], d_i[rows]
            want = (dequant(a_i, sa_i, 1) @ dequant(b_i, sb_i, 128).T).flatten()
            got = d_i.double().flatten()
            if not torch.isfinite(got).all():
                return float("inf")
            diffs.append(1 - torch.nn.functional.cosine_similarity(got, want, 0).item())
        return max(diffs)

    return call, check, d


def label_of(shape, cfg) -> str:
    """The config column: what the call ran (block_m x block_n / stages, /tma), '(forced)' for --config ones."""
    kind, g, mg, n, k = shape
    _, used, _ = kernels.choose_spec(*spec_args(shape), False, None, torch.bfloat16, None, 132)
    label = f"{used.block_m}x{used.block_n}/{used.stages}{'/tma' if used.tma_store else ''}"
    if kind == kernels.KIND_DENSE and kernels.split_tail_columns(mg, n, k, 132):
        label += f" +{n % 128} cols"
    return label if cfg is None else f"{label} (forced)"


def run_steady(shapes, variants, configs, check_rows: int = 0) -> list:
    """Every (variant, config) of a shape timed by bench_gpu_interleaved: rounds in turn, each after ~100 ms of its
    own calls, so each variant is timed at its own steady clock under the power cap (the default run's 10 ms windows
    after the correctness check read boost clocks)."""
    from torch_deepstack.testing.bench import bench_gpu_interleaved

    rows = []
    for shape in shapes:
        kind, g, mg, n, k = shape
        call, check, d = make_call(shape, check_rows)
        name = shape_name(shape)
        fns, enter, ok = {}, {}, {}
        for variant, cfg in itertools.product(variants, configs):
            good = _select_and_check(name, variant, cfg, call, check, d)
            if good is None:
                continue
            key = (variant[0], label_of(shape, cfg))
            ok[key] = good
            fns[key], enter[key] = call, (lambda v=variant, c=cfg: select(v, c))
        ms = bench_gpu_interleaved(fns, enter=enter)
        for key, t in ms.items():
            rows.append((name, key[0], key[1], shape_flops(shape) / t / 1e9, ok[key]))
            print(f"{name} {key[0]:>16} {key[1]:>14} {rows[-1][3]:8.1f} {'ok' if ok[key] else 'WRONG'}", flush=True)
    return rows


def _select_and_check(name, variant, cfg, call, check, d):
    """Select the variant and config, run it once on a NaN-poisoned output: whether it matches the reference, or
    None when it cannot run (e.g. a forced config that exceeds shared memory)."""
    select(variant, cfg)
    d.fill_(float("nan"))
    try:
        call()
    except Exception as e:  # noqa: BLE001
        print(f"skip {name} {variant[0]} {cfg}: {str(e)[:80]}")
        return None
    return check() < 1e-4


def run(shapes, variants, configs, reps: int, graph: bool = False, check_rows: int = 0) -> list:
    from torch_deepstack.testing.bench import bench_gpu

    rows = []
    for shape in shapes:
        kind, g, mg, n, k = shape
        flops = shape_flops(shape)
        call, check, d = make_call(shape, check_rows)
        name = shape_name(shape)
        best: dict = {}
        for _ in range(reps):
            for variant, cfg in itertools.product(variants, configs):
                ok = _select_and_check(name, variant, cfg, call, check, d)
                if ok is None:
                    continue
                tflops = flops / bench_gpu(call, use_graph=graph) / 1e9
                key = (variant[0], label_of(shape, cfg))
                prev_tf, prev_ok = best.get(key, (0.0, True))
                best[key] = (max(prev_tf, tflops), prev_ok and ok)
        for (vname, cfg), (tflops, ok) in best.items():
            rows.append((name, vname, cfg, tflops, ok))
            print(f"{name} {vname:>16} {str(cfg):>14} {tflops:8.1f} {'ok' if ok else 'WRONG'}", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ms", default="64,128,4096", help="comma-separated M values (DeepSeek-V3 N, K shapes)")
    p.add_argument("--shapes", default="", help="comma-separated MxNxK, cGxMGxNxK or mGxMGxNxK (replaces --ms)")
    p.add_argument("--variant", action="append", default=None, help="NAME:DEFINES[:MULTICAST[:TMA_STORE]] (repeatable)")
    p.add_argument("--config", action="append", default=[], help="bm,bn,stages forced config (repeatable)")
    p.add_argument("--no-heuristic", action="store_true", help="time only the forced configs")
    p.add_argument("--reps", type=int, default=2, help="interleaved repetitions; the best median is kept")
    p.add_argument("--steady", action="store_true",
                   help="time every variant at its own steady clock (bench_gpu_interleaved; --reps and --graph unused)")
    p.add_argument("--graph", action="store_true",
                   help="time CUDA-graph replays of the call (kernel time without the host path; L2 still flushed)")
    p.add_argument("--check-rows", type=int, default=0,
                   help="check only this many evenly spaced rows per group against float64 (0: all rows)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel nvcc processes")
    p.add_argument("--prebuild-only", action="store_true", help="compile the specialisations and stop (no GPU)")
    args = p.parse_args()
    if args.shapes:
        shapes = [parse_shape(s) for s in args.shapes.split(",")]
    else:
        shapes = [(kernels.KIND_DENSE, 1, m, n, k) for m in (int(v) for v in args.ms.split(",")) for n, k in NK]
    variants = [parse_variant(v) for v in (args.variant or ["default:"])]
    configs = ([] if args.no_heuristic else [None]) + [tuple(int(v) for v in c.split(",")) for c in args.config]
    prebuild([(s, v, c) for s in shapes for v in variants for c in configs], args.jobs)
    if args.prebuild_only:
        return 0
    rows = (run_steady(shapes, variants, configs, args.check_rows) if args.steady else
            run(shapes, variants, configs, args.reps, args.graph, args.check_rows))
    print("\n| M x N x K | variant | config | TFLOPS | correct |\n|---|---|---|---|---|")
    for shape, name, cfg, tflops, ok in rows:
        print(f"| {shape} | {name} | {cfg} | {tflops:.1f} | {ok} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
