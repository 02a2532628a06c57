"""The k-grouped weight gradient accumulating into D (DeepGEMM's `c=d`) against the same call without C, through the
core op and compat.deep_gemm's 2-D form: 32 segments of 1024 tokens, fp32 D. CUDA events, median of 20 calls after
3 (no L2 flush: D and C are 1.9-3.8 GB each). `python benchmarks/bench_k_grouped_accumulate.py` on an sm_90 GPU."""
import statistics
import torch
import torch_deepstack  # noqa: F401
from torch_deepstack.compat import deep_gemm as dg
from torch_deepstack.gemm import api

ops = torch.ops.deepstack


def timed(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) * 1e3)
    return statistics.median(ts)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench_k_grouped_accumulate.py needs an sm_90 GPU")
    for m, n, ks in ((7168, 2048, [1024] * 32), (2048, 7168, [1024] * 32), (4096, 7168, [1024] * 32)):
        total = sum(ks)
        x = torch.randn(total, m, device="cuda", dtype=torch.bfloat16)
        y = torch.randn(total, n, device="cuda", dtype=torch.bfloat16)
        qa, sa = ops.per_token_group_quant_fp8_t(x, 1e-4, False)
        qb, sb = ops.per_token_group_quant_fp8_t(y, 1e-4, False)
        qa = qa.as_strided((qa.shape[0], qa.stride(0)), (qa.stride(0), 1))
        qb = qb.as_strided((qb.shape[0], qb.stride(0)), (qb.stride(0), 1))
        d = torch.zeros(len(ks), m, n, device="cuda")
        flops = 2 * m * n * total
        t_core = timed(lambda: api.k_grouped_fp8_wgrad_gemm_nt(qa, sa, qb, sb, ks, c=d, out=d))
        t_nocore = timed(lambda: ops.k_grouped_fp8_wgrad_gemm_nt(qa, sa, qb, sb, d, ks))
        kt = torch.tensor(ks, dtype=torch.int32, device="cuda")
        a2, b2 = (qa.contiguous(), sa), (qb.contiguous(), sb)
        t_compat = timed(lambda: dg.k_grouped_fp8_gemm_nt_contiguous(a2, b2, d, ks, kt, c=d))
        print(f"{m}x{n} 32x1024 fp32: core+c {t_core:.0f} us ({flops / t_core / 1e6:.0f} TFLOPS), op no c {t_nocore:.0f} us "
              f"({flops / t_nocore / 1e6:.0f}), compat 2-D {t_compat:.0f} us ({flops / t_compat / 1e6:.0f}); "
              f"qa {tuple(qa.shape)} {qa.stride()} sa {tuple(sa.shape)} {sa.stride()}", flush=True)


if __name__ == "__main__":
    main()
