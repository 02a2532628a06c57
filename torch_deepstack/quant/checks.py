"""Input validation shared by the quantisation ops: clear Python errors instead of CUDA crashes.

`check_group_quant_input` uses plain Python tests (fast: this runs on every eager call); the fakes use
`check_group_quant_input_symbolic`, built on torch._check, which also works on symbolic shapes.
"""
from __future__ import annotations

import torch

SUPPORTED_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SUPPORTED_GROUP_SIZES = (32, 64, 128)


def check_group_quant_input(x: torch.Tensor, group_size: int, op: str) -> None:
    if x.dim() not in (2, 3):
        raise ValueError(f"{op}: x must have shape [M, K] or [B, M, K] (got {x.dim()} dims)")
    if x.dtype not in SUPPORTED_INPUT_DTYPES:
        raise TypeError(f"{op}: x must be bfloat16, float16 or float32, got {x.dtype}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"{op}: group_size must be 32, 64 or 128, got {group_size}")
    if x.shape[-1] % group_size:
        raise ValueError(f"{op}: the last dim K={x.shape[-1]} of x must be a multiple of group_size={group_size}")
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        raise ValueError(f"{op}: x must be contiguous in its last dim (stride {x.stride(-1)})")


def check_group_quant_input_symbolic(x: torch.Tensor, group_size: int, op: str) -> None:
    torch._check(x.dim() in (2, 3), lambda: f"{op}: x must have shape [M, K] or [B, M, K] (got {x.dim()} dims)")
    torch._check(x.dtype in SUPPORTED_INPUT_DTYPES,
                 lambda: f"{op}: x must be bfloat16, float16 or float32, got {x.dtype}")
    torch._check(group_size in SUPPORTED_GROUP_SIZES,
                 lambda: f"{op}: group_size must be 32, 64 or 128, got {group_size}")
    torch._check(x.shape[-1] % group_size == 0,
                 lambda: f"{op}: the last dim K={x.shape[-1]} of x must be a multiple of group_size={group_size}")
    torch._check(x.stride(-1) == 1, lambda: f"{op}: x must be contiguous in its last dim (stride {x.stride(-1)})")


def check_swiglu_quant_input(h: torch.Tensor, op: str, check=None) -> None:
    """h [..., 2F]: gate columns then up columns, F a multiple of 128 (one scale per 128 activations)."""
    check = check or _raise_unless
    check(h.dim() in (2, 3), lambda: f"{op}: h must have shape [M, 2F] or [B, M, 2F] (got {h.dim()} dims)")
    check(h.dtype in SUPPORTED_INPUT_DTYPES, lambda: f"{op}: h must be bfloat16, float16 or float32, got {h.dtype}")
    check(h.shape[-1] % 256 == 0, lambda: f"{op}: h's last dim 2F={h.shape[-1]} must be a multiple of 256 (gate "
                                          f"and up halves of F = a multiple of 128 columns)")
    check(h.stride(-1) == 1 or h.shape[-1] <= 1,
          lambda: f"{op}: h must be contiguous in its last dim (stride {h.stride(-1)})")


def _raise_unless(cond, msg):
    if not cond:
        raise ValueError(msg())
