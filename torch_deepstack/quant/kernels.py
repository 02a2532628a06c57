"""CUDA faces of the quantisation ops: validate, allocate, pick the specialisation, launch."""
from __future__ import annotations

import torch

from torch_deepstack._library import cuda_kernel
from torch_deepstack.jit import KernelSpec, get_kernel, register_prebuild
from torch_deepstack.quant.checks import check_group_quant_input
from torch_deepstack.quant.scale_layout import mn_major_tma_aligned_empty

_CTYPE = {torch.bfloat16: "__nv_bfloat16", torch.float16: "__half", torch.float32: "float"}
_HEADER = "quant/per_token_group_quant_fp8.cuh"
_THREADS, _ITERS = 256, 4
_SIGNATURE = "pppiiillilf"   # x, q, scales, rows, rows_per_batch, K, x strides (b, m), m_aligned, batch stride, eps


def group_quant_spec(dtype: torch.dtype, group_size: int, ue8m0: bool) -> KernelSpec:
    return KernelSpec(_HEADER, "deepstack::per_token_group_quant_fp8_kernel", (_CTYPE[dtype], group_size, ue8m0))


@register_prebuild("quant")
def _prebuild():
    return [group_quant_spec(d, g, u) for d in _CTYPE for g in (128,) for u in (False, True)]


@cuda_kernel("per_token_group_quant_fp8")
def per_token_group_quant_fp8_cuda(x: torch.Tensor, group_size: int = 128, eps: float = 1e-4,
                                   scale_ue8m0: bool = False):
    op = "per_token_group_quant_fp8"
    check_group_quant_input(x, group_size, op)
    if x.dim() == 2:
        batches, m, k = 1, x.shape[0], x.shape[1]
        sb, sm = 0, x.stride(0)
    else:
        batches, m, k = x.shape
        sb, sm = x.stride(0), x.stride(1)
    if (x.data_ptr() % 16) or any((s * x.element_size()) % 16 for s in (sb, sm)):
        raise ValueError(f"{op}: x rows must start on 16-byte boundaries (data_ptr {x.data_ptr()}, strides "
                         f"{x.stride()}); call .contiguous() first")
    groups = k // group_size
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scales = mn_major_tma_aligned_empty((*x.shape[:-1], groups), device=x.device)
    rows = batches * m
    if rows == 0 or groups == 0:
        return q, scales
    kernel = get_kernel(group_quant_spec(x.dtype, group_size, scale_ue8m0), _SIGNATURE)
    lanes = group_size // (16 // x.element_size())
    rows_per_block = (_THREADS // lanes) * _ITERS
    m_aligned = scales.stride(-1)
    batch_stride = scales.stride(0) if x.dim() == 3 else 0
    kernel.launch(((rows + rows_per_block - 1) // rows_per_block, groups), _THREADS,
                  x, q, scales, rows, m, k, sb, sm, m_aligned, batch_stride, float(eps))
    return q, scales
