"""`deepstack::fp8_linear`: y = x @ W.T + b computed in FP8 (DeepSeek-V3 recipe), as ONE functional op.

The FP8 GEMM ops write into a preallocated output (like DeepGEMM), which graph rewrites would have to wrap in
auto_functionalized; this op composes quantisation and GEMM behind a functional schema, so an Inductor pattern
can swap it for `F.linear` directly. It quantises the weight on every call: for repeated inference prefer
`quantize_` (weights cached by FP8Linear). The same body serves CPU and CUDA because each inner op dispatches to
its own reference or kernel.
"""
from __future__ import annotations

import torch

from torch_deepstack._library import cuda_kernel, reference, sample_inputs

SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)


def check_fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias, op: str = "fp8_linear") -> None:
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype != x.dtype:
        raise TypeError(f"{op}: x and weight must both be bfloat16 or float32, got {x.dtype} and {weight.dtype}")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: weight must be [N, K] with K = x.shape[-1] = {x.shape[-1]}, got {list(weight.shape)}")
    if weight.shape[0] % 128 or weight.shape[1] % 128:
        raise ValueError(f"{op}: N={weight.shape[0]} and K={weight.shape[1]} must be multiples of 128")
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or bias.dtype != x.dtype):
        raise ValueError(f"{op}: bias must be {x.dtype} [N] = [{weight.shape[0]}], got {bias.dtype} "
                         f"{list(bias.shape)}")


def _fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    check_fp8_linear(x, weight, bias)
    ops = torch.ops.deepstack
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    xq, xs = ops.per_token_group_quant_fp8(x2)
    wq, ws = ops.per_block_quant_fp8(weight.contiguous())
    out = torch.empty(x2.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    ops.fp8_gemm_nt(xq, xs, wq, ws, out)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


reference("fp8_linear")(_fp8_linear)
cuda_kernel("fp8_linear")(_fp8_linear)


@sample_inputs("fp8_linear")
def _samples(device):
    out = []
    for lead, n, k, dtype, bias in [((5,), 128, 256, torch.bfloat16, True), ((2, 3), 256, 128, torch.float32, False),
                                    ((1,), 384, 384, torch.bfloat16, False)]:
        x = torch.randn(*lead, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5
        b = torch.randn(n, device=device, dtype=dtype) if bias else None
        out.append(((x, w, b), {}))
    return out
