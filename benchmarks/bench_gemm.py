"""FP8 GEMM (1x128 activation / 128x128 weight scales): ours vs cuBLAS blockwise (torch._scaled_mm), bf16 matmul,
and DeepGEMM 2.6.1's numbers measured on this H200 (issue 3), same method: do_bench-style medians with the L2
flushed before every repetition, whole call (host overhead included).

Every contender of a shape is timed the same way (`bench_gpu_interleaved`): five rounds, the contenders in turn
(order rotated), each running ~100 ms of its own flushed calls before ten timed repetitions, medians over the pooled
50 samples. `--method sequential` is the earlier method (10 calls of warm-up, then 50 repetitions, ours, then cuBLAS,
then bf16): under the H200's power cap its 10 ms windows read the clock left by the previous workload, so long calls
timed right after the light set-up read up to 13% high and short ones after a bf16 matmul up to 7% low (docs/gemm.md,
"Session of 2026-11-30 04:35-05:12 UTC").

DeepGEMM itself joins a run as a fourth contender when a real `deep_gemm` package imports (issue 3's reference
numbers come from DeepGEMM 2.6.1 timed by another method, so the live column is the like-for-like one): on the GPU
machine, carry the SGLang build's wheels: `sgl-deep-gemm==0.1.3` (its `_C.so` links torch and resolves against
torch 2.10 / 2.11; its later builds need a newer torch) and `apache-tvm-ffi==0.1.9`. Its kernels are JIT-compiled
with nvcc on first use (`DG_JIT_CACHE_DIR` keeps them; `--deepgemm-warm I/N` compiles them in parallel).
Each live call gets its scales in DeepGEMM's own SM90 layout, prepared once outside the timed call, and its output
is checked against ours (calc_diff) before it is timed.

TFLOPS = 2*M*N*K / t (valid rows only for grouped kinds); GB/s counts A + B + D bytes once each.
"""
import argparse
import json

import torch

import torch_deepstack  # noqa: F401
from torch_deepstack.gemm import api, kernels
from torch_deepstack.quant import per_token_group_quant_fp8
from torch_deepstack.testing.bench import BenchTable, bench_do_bench, bench_gpu, bench_gpu_interleaved

METHOD = "interleaved"
SETTLE_MS = 100.0      # interleaved: GPU time each contender runs before each of its timed rounds
SAMPLES: dict = {}     # shape -> contender -> samples (ms, time order), for --samples


def time_all(shape: str, fns: dict) -> dict:
    """Milliseconds per contender (None where a contender is missing), all timed by the same method."""
    fns = {k: f for k, f in fns.items() if f is not None}
    samples: dict = {}
    if METHOD == "sequential":
        out = {k: bench_gpu(f, samples=samples.setdefault(k, [])) for k, f in fns.items()}
    elif METHOD == "do_bench":
        out = bench_do_bench(fns, samples=samples)
    else:
        out = bench_gpu_interleaved(fns, settle_ms=SETTLE_MS, samples=samples)
    SAMPLES[shape] = samples
    return out

NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
DEEPGEMM_H200 = {  # TFLOPS, issue 3
    64: [149, 252, 178, 346, 221, 164], 128: [268, 485, 309, 640, 449, 295], 4096: [1218, 1288, 1016, 1276, 1315, 1221]}
DEEPGEMM_GROUPED = {(4, 8192, 4096, 7168): 1244, (4, 8192, 7168, 2048): 1169}


def live_deepgemm(enabled: bool = True):
    """The real DeepGEMM package if one imports (not ours: torch_deepstack.compat.deep_gemm), else None."""
    if not enabled:
        return None
    try:
        import deep_gemm
    except Exception as e:  # noqa: BLE001 - an optional contender; say why it is absent
        print(f"live DeepGEMM: not available ({type(e).__name__}: {str(e)[:80]})")
        return None
    print(f"live DeepGEMM: {getattr(deep_gemm, '__file__', '?')}")
    return deep_gemm


DG = None  # set in main()


def deepgemm_call(kind: str, aq, asf, bq, bsf, d, *args):
    """A live DeepGEMM call of `kind` (dense, contiguous: args = (group ids,), masked: (masked_m, expected_m)) into
    d, SM90 form: fp32 scales, sfa in its MN-major TMA-aligned layout, prepared here once, outside the timed call."""
    sfa = DG.get_mn_major_tma_aligned_tensor(asf.contiguous())
    if kind == "dense":
        fn = DG.fp8_gemm_nt
    elif kind == "contiguous":
        fn = DG.m_grouped_fp8_gemm_nt_contiguous
    else:  # (the SGLang 0.1.x builds export the masked GEMM under its older name only)
        fn = getattr(DG, "m_grouped_fp8_gemm_nt_masked", None) or DG.fp8_m_grouped_gemm_nt_masked
    return lambda: fn((aq, sfa), (bq, bsf), d, *args, disable_ue8m0_cast=True)


def deepgemm_contender(kind: str, aq, asf, bq, bsf, d_ours, *args, rows=None):
    """The live DeepGEMM call for the time_all table, or None: no DeepGEMM, a failing call (reason printed), or an
    output that disagrees with ours (d_ours, already computed; rows: the valid part) by calc_diff >= 1e-3."""
    if DG is None:
        return None
    from torch_deepstack.compat.deep_gemm import calc_diff
    try:
        d = torch.empty_like(d_ours)
        call = deepgemm_call(kind, aq, asf, bq, bsf, d, *args)
        call()
    except Exception as e:  # noqa: BLE001 - an optional contender must not stop the run
        print(f"live DeepGEMM {kind}: {type(e).__name__}: {str(e)[:200]}")
        return None
    if rows is None:
        rows = slice(None)
    diff = calc_diff(d_ours[rows].float(), d[rows].float())
    if not diff < 1e-3:
        print(f"live DeepGEMM {kind}: output disagrees with ours (calc_diff {diff:.2e}); not timed")
        return None
    return call


def quant_weight(n, k, groups=None):
    if groups is None:
        return api.per_block_quant_fp8(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
    qs = [api.per_block_quant_fp8(torch.randn(n, k, device="cuda", dtype=torch.bfloat16)) for _ in range(groups)]
    return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])


def cublas_blockwise(aq, asf, bq, bsf):
    """torch._scaled_mm with 1x128 / 128x128 scales: scale_a (M, K/128) M-major, scale_b (K/128, N/128)."""
    m, k = aq.shape
    sa = torch.empty(k // 128, m, device="cuda").t()
    sa.copy_(asf)
    sb = bsf.contiguous().t()
    try:
        torch._scaled_mm(aq, bq.t(), sa, sb, out_dtype=torch.bfloat16)
    except Exception as e:  # noqa: BLE001 - cuBLAS refuses some shapes; report it
        return None, str(e).splitlines()[0][:60]
    return (lambda: torch._scaled_mm(aq, bq.t(), sa, sb, out_dtype=torch.bfloat16)), None


def tflops(flops, ms):
    """TFLOPS of a time in ms; None for a contender that did not run (time_all leaves it out)."""
    return None if ms is None else flops / ms / 1e9


def live_cols(ours, live):
    """The live DeepGEMM columns: its TFLOPS in this run and ours over it ("-" when it did not run)."""
    return (live, ours / live) if live else ("-", "-")


def dense(table, ms_list, nk):
    for m in ms_list:
        for j, (n, k) in enumerate(nk):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            aq, asf = per_token_group_quant_fp8(x)
            bq, bsf = quant_weight(n, k)
            d = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            fn, err = cublas_blockwise(aq, asf, bq, bsf)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            torch.ops.deepstack.fp8_gemm_nt(aq, asf, bq, bsf, d)   # (ours first: the live contender is checked on d)
            ms = time_all(f"{m}x{n}x{k}", {"ours": lambda: torch.ops.deepstack.fp8_gemm_nt(aq, asf, bq, bsf, d),
                                           "deepgemm": deepgemm_contender("dense", aq, asf, bq, bsf, d),
                                           "cublas": fn, "bf16": lambda: x @ w.T})
            live = tflops(2 * m * n * k, ms.get("deepgemm"))
            t = ms["ours"]
            flops, nbytes = 2 * m * n * k, m * k + n * k + 2 * m * n
            ours = tflops(flops, t)
            cub = tflops(flops, ms.get("cublas"))
            bf16 = tflops(flops, ms["bf16"])
            ref = DEEPGEMM_H200.get(m, [None] * 6)[NK.index((n, k))] if (n, k) in NK else None
            cfg = kernels.choose_spec(kernels.KIND_DENSE, m, 1, n, k, m, False, None, torch.bfloat16, None,
                                      kernels.num_sms(torch.device("cuda")))[1]
            epi = "/tma" if cfg.tma_store else ""
            tail = kernels.split_tail_columns(m, n, k, kernels.num_sms(torch.device("cuda")))
            epi += f" +{tail} cols" if tail else ""   # last N % 128 columns as a second launch
            table.add("dense", f"{m}x{n}x{k}", f"{cfg.block_m}x{cfg.block_n}/{cfg.stages}{epi}", t * 1e3, ours,
                      nbytes / t / 1e6, ref or "-", ours / ref if ref else "-", *live_cols(ours, live),
                      cub if cub else "refused", ours / cub if cub else "-", bf16)


def grouped(table, configs, nk):
    for g, mg in configs:
        for n, k in nk:
            m = g * mg
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            aq, asf = per_token_group_quant_fp8(x)
            bq, bsf = quant_weight(n, k, g)
            ids = torch.arange(g, device="cuda", dtype=torch.int32).repeat_interleave(mg)
            d = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            flops, nbytes = 2 * m * n * k, m * k + g * n * k + 2 * m * n
            fns = [cublas_blockwise(aq[i * mg:(i + 1) * mg], asf[i * mg:(i + 1) * mg], bq[i], bsf[i])[0]
                   for i in range(g)]
            torch.ops.deepstack.m_grouped_fp8_gemm_nt_contiguous(aq, asf, bq, bsf, d, ids)
            ms = time_all(f"c{g}x{mg}x{n}x{k}", {
                "ours": lambda: torch.ops.deepstack.m_grouped_fp8_gemm_nt_contiguous(aq, asf, bq, bsf, d, ids),
                "deepgemm": deepgemm_contender("contiguous", aq, asf, bq, bsf, d, ids),
                "cublas": (lambda: [f() for f in fns]) if all(fns) else None})
            t = ms["ours"]
            cub = tflops(flops, ms.get("cublas"))
            ref = DEEPGEMM_GROUPED.get((g, mg, n, k))
            table.add("contiguous", f"{g}x{mg} {n}x{k}", "", t * 1e3, tflops(flops, t), nbytes / t / 1e6,
                      ref or "-", tflops(flops, t) / ref if ref else "-",
                      *live_cols(tflops(flops, t), tflops(flops, ms.get("deepgemm"))), cub or "refused",
                      tflops(flops, t) / cub if cub else "-", "-")


def masked(table, configs, nk, m_max=4096):
    for g, mg in configs:
        for n, k in nk:
            x = torch.randn(g, m_max, k, device="cuda", dtype=torch.bfloat16)
            aq, asf = per_token_group_quant_fp8(x)
            bq, bsf = quant_weight(n, k, g)
            masked_m = torch.full((g,), mg, device="cuda", dtype=torch.int32)
            d = torch.empty(g, m_max, n, device="cuda", dtype=torch.bfloat16)
            flops, nbytes = 2 * g * mg * n * k, g * mg * k + g * n * k + 2 * g * mg * n
            a_rows = [aq[i, :mg] for i in range(g)]
            s_rows = [asf[i, :mg] for i in range(g)]
            fns = [cublas_blockwise(a_rows[i], s_rows[i], bq[i], bsf[i])[0] for i in range(g)]
            torch.ops.deepstack.m_grouped_fp8_gemm_nt_masked(aq, asf, bq, bsf, d, masked_m, mg)
            ms = time_all(f"m{g}x{mg}x{n}x{k}", {
                "ours": lambda: torch.ops.deepstack.m_grouped_fp8_gemm_nt_masked(aq, asf, bq, bsf, d, masked_m, mg),
                "deepgemm": deepgemm_contender("masked", aq, asf, bq, bsf, d, masked_m, mg,
                                               rows=(slice(None), slice(0, mg))),
                "cublas": (lambda: [f() for f in fns]) if all(fns) else None})
            t = ms["ours"]
            cub = tflops(flops, ms.get("cublas"))
            table.add("masked", f"{g}x{mg} {n}x{k}", "", t * 1e3, tflops(flops, t), nbytes / t / 1e6, "-", "-",
                      *live_cols(tflops(flops, t), tflops(flops, ms.get("deepgemm"))), cub or "refused",
                      tflops(flops, t) / cub if cub else "-", "-")


def warm_deepgemm(shard: str, ms_list, grouped_too: bool) -> None:
    """JIT-compile a live DeepGEMM's kernels for this run's shapes, shard I of N (`--deepgemm-warm I/N`): N
    processes started side by side fill DG_JIT_CACHE_DIR in parallel (one nvcc compile per kernel), so the timed
    run finds them built."""
    import time
    i, n_shards = (int(v) for v in shard.split("/"))
    plan = [("dense", m, 1, n, k) for m in ms_list for n, k in NK]
    if grouped_too:
        plan += [("contiguous", mg, g, n, k) for g, mg in GROUPED for n, k in GROUPED_NK]
        plan += [("masked", mg, g, n, k) for g, mg in MASKED for n, k in GROUPED_NK]
    for kind, m, g, n, k in plan[i::n_shards]:
        t0 = time.perf_counter()
        rows = (g, 4096) if kind == "masked" else (g * m,)
        aq, asf = per_token_group_quant_fp8(torch.randn(*rows, k, device="cuda", dtype=torch.bfloat16))
        bq, bsf = quant_weight(n, k, None if kind == "dense" else g)
        d = torch.empty(*rows, n, device="cuda", dtype=torch.bfloat16)
        args = {"dense": (), "contiguous": (torch.arange(g, device="cuda", dtype=torch.int32).repeat_interleave(m),),
                "masked": (torch.full((g,), m, device="cuda", dtype=torch.int32), m)}[kind]
        deepgemm_call(kind, aq, asf, bq, bsf, d, *args)()
        torch.cuda.synchronize()
        print(f"DeepGEMM warm {kind} {g}x{m}x{n}x{k}: {time.perf_counter() - t0:.1f} s", flush=True)


GROUPED = [(4, 8192), (8, 4096)]
MASKED = [(1, 1024), (2, 512), (4, 256)]
GROUPED_NK = [(4096, 7168), (7168, 2048)]


def deepgemm_wheel() -> str:
    """Which build the live DeepGEMM is, when it is SGLang's wheel (the one that loads into torch 2.10 / 2.11)."""
    from importlib import metadata
    try:
        metadata.version("sgl-deep-gemm")
    except metadata.PackageNotFoundError:
        return ""
    return ": SGLang's DeepGEMM build, wheel sgl-deep-gemm"


def main():
    global METHOD
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a few dense shapes only")
    ap.add_argument("--method", choices=["interleaved", "sequential", "do_bench"], default="interleaved",
                    help="interleaved (default): every contender timed alike, see the module doc; sequential: the "
                         "earlier method, for comparison; do_bench: triton's do_bench, the method of issue 3's "
                         "DeepGEMM numbers (3 rounds, order rotated)")
    ap.add_argument("--ms", default="64,128,4096", help="dense M values")
    ap.add_argument("--dense-only", action="store_true", help="skip the grouped and masked shapes")
    ap.add_argument("--contiguous-only", action="store_true",
                    help="only the grouped contiguous shapes (use with --no-save: the table would lose the others)")
    ap.add_argument("--masked-only", action="store_true",
                    help="only the masked shapes (use with --no-save: the table would lose the others)")
    ap.add_argument("--no-save", action="store_true", help="print only (docs/benchmarks.md left as it is)")
    ap.add_argument("--samples", default="", help="write every contender's samples (ms, time order) to this JSON")
    ap.add_argument("--no-deepgemm", action="store_true", help="leave out a live DeepGEMM even if it imports")
    ap.add_argument("--deepgemm-warm", default="", metavar="I/N",
                    help="only JIT-compile shard I of N of a live DeepGEMM's kernels for this run, then exit")
    args = ap.parse_args()
    METHOD = args.method
    global DG
    DG = live_deepgemm(not args.no_deepgemm)
    if args.deepgemm_warm:
        if DG is not None:
            warm_deepgemm(args.deepgemm_warm, [int(v) for v in args.ms.split(",")], not args.dense_only)
        return
    # (the do_bench run is a table of its own beside the main one, which stays the interleaved method's)
    table = BenchTable("gemm", "fp8_gemm" if METHOD == "interleaved" else f"fp8_gemm_{METHOD}",
                       "FP8 GEMM, 1x128 / 128x128 scales, bf16 out" + (
                           "" if METHOD == "interleaved" else f" (timed by the {METHOD} method)"),
                       ["kind", "shape (M x N x K)", "block/stages", "ours us", "ours TFLOPS", "ours GB/s",
                        "DeepGEMM (issue) TFLOPS", "ours/DeepGEMM (issue)", "DeepGEMM here TFLOPS",
                        "ours/DeepGEMM here", "cuBLAS blockwise TFLOPS", "ours/cuBLAS",
                        "bf16 TFLOPS"])
    table.notes.append("DeepGEMM (issue) column: DeepGEMM 2.6.1 on this H200 (issue 3), timed by its own method")
    table.notes.append("DeepGEMM here: " + (f"live in this run, timed like ours ({DG.__name__} "
                                             f"{getattr(DG, '__version__', '')}{deepgemm_wheel()})" if DG
                                             else "not installed"))
    table.notes.append("cuBLAS column for grouped kinds: a per-expert loop of torch._scaled_mm")
    table.notes.append("timing: " + {
        "interleaved": "each contender of a shape in turn, 5 rounds (order rotated) of ~100 ms of its own flushed "
                       "calls, then 10 timed ones; median of the 50 (steady clocks under the power cap)",
        "sequential": "10 calls of warm-up, 50 timed, contenders one after another",
        "do_bench": "triton.testing.do_bench (25 ms warm-up, ~100 ms of L2-cleared repetitions, median) per "
                    "contender, 3 rounds with the order rotated, median of the rounds"}[METHOD])
    if args.quick:
        dense(table, [64, 4096], [(2112, 7168), (7168, 16384)])
    elif args.contiguous_only:
        grouped(table, GROUPED, GROUPED_NK)
    elif args.masked_only:
        masked(table, MASKED, GROUPED_NK)
    else:
        dense(table, [int(v) for v in args.ms.split(",")], NK)
        if not args.dense_only:
            grouped(table, GROUPED, GROUPED_NK)
            masked(table, MASKED, GROUPED_NK)
    if args.samples:
        with open(args.samples, "w") as f:
            json.dump(SAMPLES, f)
    if not args.no_save:
        table.save()


if __name__ == "__main__":
    main()
