"""ncu target: the weight-gradient GEMM (1D1D: 1x128 scales on both operands, run-time K) against the forward GEMM
(1D2D: 128x128 weight blocks) at the same M x N x K, one launch each after warm-up, inside cudaProfilerStart/Stop,
so `ncu --profile-from-start off` profiles exactly those launches (wgrad, forward, forward with the plain epilogue).

  ncu --clock-control none --profile-from-start off --section SpeedOfLight --section WarpStateStats \\
      python benchmarks/ncu_wgrad.py 4096x7168x1024
"""
from __future__ import annotations

import os
import sys

import torch

import torch_deepstack  # noqa: F401
from torch_deepstack.gemm.api import per_block_quant_fp8
from torch_deepstack.quant.api import per_token_group_quant_fp8
from torch_deepstack.testing.bench import profile_one_call

from bench_k_grouped import operand

ops = torch.ops.deepstack


def main() -> None:
    m, n, k = (int(v) for v in sys.argv[1].split("x"))
    d = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    # wgrad: A = dY^T [M, K] and B = X^T [N, K], both quantised along K (the token dimension) in 1x128 groups
    aq, asf = operand(torch.randn(k, m, device="cuda").to(torch.bfloat16))
    bq, bsf = operand(torch.randn(k, n, device="cuda").to(torch.bfloat16))
    profile_one_call(f"wgrad {m}x{n}x{k}", lambda: ops.fp8_wgrad_gemm_nt(aq, asf, bq, bsf, d))
    xq, xsf = per_token_group_quant_fp8(torch.randn(m, k, device="cuda").to(torch.bfloat16))
    wq, wsf = per_block_quant_fp8(torch.randn(n, k, device="cuda").to(torch.bfloat16))
    profile_one_call(f"forward {m}x{n}x{k}", lambda: ops.fp8_gemm_nt(xq, xsf, wq, wsf, d))
    os.environ["DEEPSTACK_GEMM_TMA_STORE"] = "0"
    profile_one_call(f"forward, plain epilogue {m}x{n}x{k}", lambda: ops.fp8_gemm_nt(xq, xsf, wq, wsf, d))


if __name__ == "__main__":
    main()
