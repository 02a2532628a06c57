"""FP8 GEMM (1x128 activation / 128x128 weight scales): ours vs cuBLAS blockwise (torch._scaled_mm), bf16 matmul,
and DeepGEMM 2.6.1's numbers measured on this H200 (issue 3), same method: do_bench-style medians with the L2
flushed before every repetition, whole call (host overhead included).

TFLOPS = 2*M*N*K / t (valid rows only for grouped kinds); GB/s counts A + B + D bytes once each.
"""
import argparse

import torch

import torch_deepstack  # noqa: F401
from torch_deepstack.gemm import api, kernels
from torch_deepstack.quant import per_token_group_quant_fp8
from torch_deepstack.testing.bench import BenchTable, bench_gpu

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
    return flops / ms / 1e9


def dense(table, ms_list, nk):
    for m in ms_list:
        for j, (n, k) in enumerate(nk):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            aq, asf = per_token_group_quant_fp8(x)
            bq, bsf = quant_weight(n, k)
            d = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            t = bench_gpu(lambda: torch.ops.deepstack.fp8_gemm_nt(aq, asf, bq, bsf, d))
            flops, nbytes = 2 * m * n * k, m * k + n * k + 2 * m * n
            ours = tflops(flops, t)
            fn, err = cublas_blockwise(aq, asf, bq, bsf)
            cub = tflops(flops, bench_gpu(fn)) if fn else None
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            bf16 = tflops(flops, bench_gpu(lambda: x @ w.T))
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
            t = bench_gpu(lambda: torch.ops.deepstack.m_grouped_fp8_gemm_nt_contiguous(aq, asf, bq, bsf, d, ids))
            flops, nbytes = 2 * m * n * k, m * k + g * n * k + 2 * m * n
            fns = [cublas_blockwise(aq[i * mg:(i + 1) * mg], asf[i * mg:(i + 1) * mg], bq[i], bsf[i])[0]
                   for i in range(g)]
            cub = tflops(flops, bench_gpu(lambda: [f() for f in fns])) if all(fns) else None
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
            t = bench_gpu(lambda: torch.ops.deepstack.m_grouped_fp8_gemm_nt_masked(aq, asf, bq, bsf, d, masked_m, mg))
            flops, nbytes = 2 * g * mg * n * k, g * mg * k + g * n * k + 2 * g * mg * n
            a_rows = [aq[i, :mg] for i in range(g)]
            s_rows = [asf[i, :mg] for i in range(g)]
            fns = [cublas_blockwise(a_rows[i], s_rows[i], bq[i], bsf[i])[0] for i in range(g)]
            cub = tflops(flops, bench_gpu(lambda: [f() for f in fns])) if all(fns) else None
            table.add("masked", f"{g}x{mg} {n}x{k}", "", t * 1e3, tflops(flops, t), nbytes / t / 1e6, "-", "-",
                      cub or "refused", tflops(flops, t) / cub if cub else "-", "-")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a few dense shapes only")
    args = ap.parse_args()
    table = BenchTable("gemm", "fp8_gemm", "FP8 GEMM, 1x128 / 128x128 scales, bf16 out",
                       ["kind", "shape (M x N x K)", "block/stages", "ours us", "ours TFLOPS", "ours GB/s",
                        "DeepGEMM TFLOPS", "ours/DeepGEMM", "cuBLAS blockwise TFLOPS", "ours/cuBLAS",
                        "bf16 TFLOPS"])
    table.notes.append("DeepGEMM column: DeepGEMM 2.6.1 on this H200 (issue 3), not rerun here")
    table.notes.append("cuBLAS column for grouped kinds: a per-expert loop of torch._scaled_mm")
    if args.quick:
        dense(table, [64, 4096], [(2112, 7168), (7168, 16384)])
    else:
        dense(table, [64, 128, 4096], NK)
        grouped(table, [(4, 8192), (8, 4096)], [(4096, 7168), (7168, 2048)])
        masked(table, [(1, 1024), (2, 512), (4, 256)], [(4096, 7168), (7168, 2048)])
    table.save()


if __name__ == "__main__":
    main()
