"""Fakes of the compile-integration ops."""
import torch

from torch_deepstack._library import fake


@fake("fp8_linear")
def fp8_linear_fake(x, weight, bias=None):
    torch._check(weight.dim() == 2 and x.shape[-1] == weight.shape[1],
                 lambda: f"fp8_linear: weight must be [N, K] with K = x.shape[-1], got {list(weight.shape)}")
    torch._check(x.dtype in (torch.bfloat16, torch.float32) and weight.dtype == x.dtype,
                 lambda: f"fp8_linear: x and weight must both be bfloat16 or float32, got {x.dtype}, {weight.dtype}")
    return x.new_empty(*x.shape[:-1], weight.shape[0])
