"""FP8 GEMM (1x128 activation / 128x128 weight scales): ours vs cuBLAS blockwise (torch._scaled_mm), bf16 matmul,
and DeepGEMM 2.6.1's numbers measured on this H200 (issue 3), same method: do_bench-style medians with the L2
flushed before every repetition, whole call (host overhead included).

Every contender of a shape is timed the same way (`bench_gpu_interleaved`): five rounds, the contenders in turn
(order rotated), each running ~100 ms of its own flushed calls before ten timed repetitions, medians over the pooled
50 samples. `--method sequential` is the earlier method (10 calls of warm-up, then 50 repetitions, ours, then cuBLAS,
then bf16): under the H200's power cap its 10 ms windows read the clock left by the previous workload, so long calls
timed right after the light set-up read up to 13% high and short ones after a bf16 matmul up to 7% low (docs/gemm.md,
"Session of 2026-11-30 04:35-05:12 UTC").

TFLOPS = 2*M*N*K / t (valid rows only for grouped kinds); GB/s counts A + B + D bytes once each.
"""
import argparse
import json

import torch

import torch_deepstack  # noqa: F401
from torch_deepstack.gemm import api, kernels
from torch_deepstack.quant import per_token_group_quant_fp8
from torch_deepstack.testing.bench import BenchTable, bench_gpu, bench_gpu_interleaved

METHOD = "interleaved"
SETTLE_MS = 100.0      # interleaved: GPU time each contender runs before each of its timed rounds
SAMPLES: dict = {}     # shape -> contender -> samples (ms, time order), for --samples


def time_all(shape: str, fns: dict) -> dict:
    """Milliseconds per contender (None where a contender is missing), all timed by the same method."""
    fns = {k: f for k, f in fns.items() if f is not None}
    samples: dict = {}
    if METHOD == "sequential":
        out = {k: bench_gpu(f, samples=samples.setdefault(k, [])) for k, f in fns.items()}
    else:
        out = bench_gpu_interleaved(fns, settle_ms=SETTLE_MS, samples=samples)
    SAMPLES[shape] = samples
    return out

NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
DEEPGEMM_H200 = {  # TFLOPS, issue 3
    64: [149, 252, 178, 346, 221, 164], 128: [268, 485, 309, 640, 449, 295], 4096: [1218, 1288, 1016, 1276, 1315, 1221]}
DEEPGEMM_GROUPED = {(4, 8192, 4096, 7168): 1244, (4, 8192, 7168, 2048): 1169}


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


def dense(table, ms_list, nk):
    for m in ms_list:
        for j, (n, k) in enumerate(nk):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            aq, asf = per_token_group_quant_fp8(x)
            bq, bsf = quant_weight(n, k)
            d = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            fn, err = cublas_blockwise(aq, asf, bq, bsf)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            ms = time_all(f"{m}x{n}x{k}", {"ours": lambda: torch.ops.deepstack.fp8_gemm_nt(aq, asf, bq, bsf, d),
                                           "cublas": fn, "bf16": lambda: x @ w.T})
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
                      nbytes / t / 1e6, ref or "-", ours / ref if ref else "-",
                      cub if cub else f"refused", ours / cub if cub else "-", bf16)


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
            ms = time_all(f"c{g}x{mg}x{n}x{k}", {
                "ours": lambda: torch.ops.deepstack.m_grouped_fp8_gemm_nt_contiguous(aq, asf, bq, bsf, d, ids),
                "cublas": (lambda: [f() for f in fns]) if all(fns) else None})
            t = ms["ours"]
            cub = tflops(flops, ms.get("cublas"))
            ref = DEEPGEMM_GROUPED.get((g, mg, n, k))
            table.add("contiguous", f"{g}x{mg} {n}x{k}", "", t * 1e3, tflops(flops, t), nbytes / t / 1e6,
                      ref or "-", tflops(flops, t) / ref if ref else "-", cub or "refused",
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
            ms = time_all(f"m{g}x{mg}x{n}x{k}", {
                "ours": lambda: torch.ops.deepstack.m_grouped_fp8_gemm_nt_masked(aq, asf, bq, bsf, d, masked_m, mg),
                "cublas": (lambda: [f() for f in fns]) if all(fns) else None})
            t = ms["ours"]
            cub = tflops(flops, ms.get("cublas"))
            table.add("masked", f"{g}x{mg} {n}x{k}", "", t * 1e3, tflops(flops, t), nbytes / t / 1e6, "-", "-",
                      cub or "refused", tflops(flops, t) / cub if cub else "-", "-")


def main():
    global METHOD
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a few dense shapes only")
    ap.add_argument("--method", choices=["interleaved", "sequential"], default="interleaved",
                    help="interleaved (default): every contender timed alike, see the module doc; sequential: the "
                         "earlier method, for comparison")
    ap.add_argument("--ms", default="64,128,4096", help="dense M values")
    ap.add_argument("--dense-only", action="store_true", help="skip the grouped and masked shapes")
    ap.add_argument("--no-save", action="store_true", help="print only (docs/benchmarks.md left as it is)")
    ap.add_argument("--samples", default="", help="write every contender's samples (ms, time order) to this JSON")
    args = ap.parse_args()
    METHOD = args.method
    table = BenchTable("gemm", "fp8_gemm", "FP8 GEMM, 1x128 / 128x128 scales, bf16 out",
                       ["kind", "shape (M x N x K)", "block/stages", "ours us", "ours TFLOPS", "ours GB/s",
                        "DeepGEMM TFLOPS", "ours/DeepGEMM", "cuBLAS blockwise TFLOPS", "ours/cuBLAS",
                        "bf16 TFLOPS"])
    table.notes.append("DeepGEMM column: DeepGEMM 2.6.1 on this H200 (issue 3), not rerun here")
    table.notes.append("cuBLAS column for grouped kinds: a per-expert loop of torch._scaled_mm")
    table.notes.append("timing: " + ("each contender of a shape in turn, 5 rounds (order rotated) of ~100 ms of "
                                     "its own flushed calls, then 10 timed ones; median of the 50 (steady clocks "
                                     "under the power cap)" if METHOD ==
                                     "interleaved" else "10 calls of warm-up, 50 timed, contenders one after another"))
    if args.quick:
        dense(table, [64, 4096], [(2112, 7168), (7168, 16384)])
    else:
        dense(table, [int(v) for v in args.ms.split(",")], NK)
        if not args.dense_only:
            grouped(table, [(4, 8192), (8, 4096)], [(4096, 7168), (7168, 2048)])
            masked(table, [(1, 1024), (2, 512), (4, 256)], [(4096, 7168), (7168, 2048)])
    if args.samples:
        with open(args.samples, "w") as f:
            json.dump(SAMPLES, f)
    if not args.no_save:
        table.save()


if __name__ == "__main__":
    main()
