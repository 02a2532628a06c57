"""Input validation shared by the quantisation ops: clear Python errors instead of CUDA crashes."""
from __future__ import annotations

import torch

SUPPORTED_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_group_quant_input(x: torch.Tensor, group_size: int, op: str) -> None:
    torch._check(x.dim() in (2, 3), lambda: f"{op}: x must have shape [M, K] or [B, M, K] (got {x.dim()} dims)")
    torch._check(x.dtype in SUPPORTED_INPUT_DTYPES,
                 lambda: f"{op}: x must be bfloat16, float16 or float32, got {x.dtype}")
    torch._check(group_size in (32, 64, 128),
                 lambda: f"{op}: group_size must be 32, 64 or 128, got {group_size}")
    torch._check(x.shape[-1] % group_size == 0,
                 lambda: f"{op}: the last dim K={x.shape[-1]} of x must be a multiple of group_size={group_size}")
    torch._check(x.stride(-1) == 1, lambda: f"{op}: x must be contiguous in its last dim (stride {x.stride(-1)})")
