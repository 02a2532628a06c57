"""Typed Python entry points for the quantisation ops."""
from __future__ import annotations

import torch

from torch_deepstack._library import kernel_for


def per_token_group_quant_fp8(x: torch.Tensor, group_size: int = 128, eps: float = 1e-4,
                              scale_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise `x` ([M, K] or [B, M, K], bf16/fp16/fp32) to e4m3 per 1 x `group_size` group.

    Returns `(q, scales)`: q has x's shape in float8_e4m3fn; scales is fp32 [..., M, K // group_size] with
    scale = max(amax, eps) / 448 (rounded up to a power of two if `scale_ue8m0`), stored MN-major and
    TMA-aligned (see torch_deepstack.quant.scale_layout). Dequantise with q.float() * scale.
    """
    return kernel_for("per_token_group_quant_fp8", x)(x, group_size, eps, scale_ue8m0)


def swiglu_quant_fp8(h: torch.Tensor, eps: float = 1e-4, scale_ue8m0: bool = False):
    """A SwiGLU activation straight to the next GEMM's FP8 operand: h [M, 2F] or [B, M, 2F] (gate columns, then
    up columns; F a multiple of 128) -> silu(gate) * up computed in fp32 and quantised per 1x128 group, as
    `per_token_group_quant_fp8` would quantise it: (q [..., F] e4m3, scales [..., F / 128] MN-major). One pass
    over h instead of silu, multiply and quantise (three)."""
    return kernel_for("swiglu_quant_fp8", h)(h, eps, scale_ue8m0)
