"""Fakes of the quantisation ops."""
import torch

from torch_deepstack._library import fake
from torch_deepstack.quant.checks import check_group_quant_input_symbolic as check_group_quant_input
from torch_deepstack.quant.checks import check_swiglu_quant_input
from torch_deepstack.quant.scale_layout import mn_major_tma_aligned_empty


@fake("per_token_group_quant_fp8")
def per_token_group_quant_fp8_fake(x, group_size=128, eps=1e-4, scale_ue8m0=False):
    check_group_quant_input(x, group_size, "per_token_group_quant_fp8")
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scales = mn_major_tma_aligned_empty((*x.shape[:-1], x.shape[-1] // group_size), device=x.device)
    return q, scales


@fake("swiglu_quant_fp8")
def swiglu_quant_fp8_fake(h, eps=1e-4, scale_ue8m0=False):
    check_swiglu_quant_input(h, "swiglu_quant_fp8", check=torch._check)
    f = h.shape[-1] // 2
    q = torch.empty((*h.shape[:-1], f), dtype=torch.float8_e4m3fn, device=h.device)
    return q, mn_major_tma_aligned_empty((*h.shape[:-1], f // 128), device=h.device)
