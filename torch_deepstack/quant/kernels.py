"""CUDA faces of the quantisation ops: validate, allocate, pick the specialisation, launch."""
from __future__ import annotations

import torch

from torch_deepstack.checks import check_eps
from torch_deepstack._library import cuda_kernel
from torch_deepstack.jit import KernelSpec, get_kernel, register_prebuild
from torch_deepstack.memo import BoundedMemo
from torch_deepstack.quant.checks import check_group_quant_input, check_swiglu_quant_input
from torch_deepstack.quant.scale_layout import mn_major_tma_aligned_empty

_CTYPE = {torch.bfloat16: "__nv_bfloat16", torch.float16: "__half", torch.float32: "float"}
_HEADER = "quant/per_token_group_quant_fp8.cuh"
_THREADS = 256
# Rows in flight per thread and cache hints: chosen by `benchmarks/bench_quant.py --sweep` on an H200.
ITERS, STREAMING = 2, False
# x, q, scales, rows, rows_per_batch, K, x strides (b, m), m_aligned, batch stride, eps, up_offset (SwiGLU)
_SIGNATURE = "pppiiillilfl"


def group_quant_spec(dtype: torch.dtype, group_size: int, ue8m0: bool, iters: int = None,
                     streaming: bool = None, swiglu: bool = False) -> KernelSpec:
    iters = ITERS if iters is None else iters
    streaming = STREAMING if streaming is None else streaming
    return KernelSpec(_HEADER, "deepstack::per_token_group_quant_fp8_kernel",
                      (_CTYPE[dtype], group_size, ue8m0, iters, streaming) + ((True,) if swiglu else ()))


def launch_group_quant(kernel, x, q, scales, group_size: int, iters: int, eps: float) -> None:
    """Launch one per-token-group quant specialisation (x already validated, outputs allocated). K is q's width:
    x's too, or half of it for the SwiGLU form (gate columns [0, K), up columns [K, 2K))."""
    eps = check_eps("quantisation", eps)
    k = q.shape[-1]
    if x.dim() == 2:
        batches, m = 1, x.shape[0]
        sb, sm = 0, x.stride(0)
    else:
        batches, m = x.shape[:2]
        sb, sm = x.stride(0), x.stride(1)
    rows, groups = batches * m, k // group_size
    if rows == 0 or groups == 0:
        return
    lanes = group_size // (16 // x.element_size())
    rows_per_block = (_THREADS // lanes) * iters
    batch_stride = scales.stride(0) if x.dim() == 3 else 0
    kernel.launch(((rows + rows_per_block - 1) // rows_per_block) * groups, _THREADS,
                  x, q, scales, rows, m, k, sb, sm, scales.stride(-1), batch_stride, float(eps), k)


@register_prebuild("quant")
def _prebuild():
    return [group_quant_spec(d, g, u) for d in _CTYPE for g in (128,) for u in (False, True)] + \
        [group_quant_spec(torch.bfloat16, 128, False, swiglu=True)]


# Plans by input layout (shape, strides, dtype, group size, scale form, 16-byte aligned start): the checks and the
# kernel lookup run on a layout's first call; later calls allocate and launch.
_PLANS = BoundedMemo()


def _check_input(op, x, group_size):
    check_group_quant_input(x, group_size, op)
    _check_rows_aligned(op, x)


def _check_rows_aligned(op, x, name="x"):
    # (the stride of a dimension of size 1 is never used: a single row may come from a wider tensor)
    if (x.data_ptr() % 16) or any((s * x.element_size()) % 16 for s, n in zip(x.stride()[:-1], x.shape[:-1])
                                  if n > 1):
        raise ValueError(f"{op}: {name} rows must start on 16-byte boundaries (data_ptr {x.data_ptr()}, strides "
                         f"{x.stride()}); call .contiguous() first")


@cuda_kernel("per_token_group_quant_fp8")
def per_token_group_quant_fp8_cuda(x: torch.Tensor, group_size: int = 128, eps: float = 1e-4,
                                   scale_ue8m0: bool = False):
    key = (x.shape, x.stride(), x.dtype, group_size, scale_ue8m0, x.data_ptr() % 16)
    kernel = _PLANS.get(key)
    if kernel is None:
        _check_input("per_token_group_quant_fp8", x, group_size)
        kernel = _PLANS.remember(key, x.numel() and get_kernel(group_quant_spec(x.dtype, group_size, scale_ue8m0),
                                                               _SIGNATURE))   # (0: empty, nothing to launch)
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scales = mn_major_tma_aligned_empty((*x.shape[:-1], x.shape[-1] // group_size), device=x.device)
    if kernel:
        launch_group_quant(kernel, x, q, scales, group_size, ITERS, eps)
    return q, scales


@cuda_kernel("swiglu_quant_fp8")
def swiglu_quant_fp8_cuda(h: torch.Tensor, eps: float = 1e-4, scale_ue8m0: bool = False):
    key = ("swiglu", h.shape, h.stride(), h.dtype, scale_ue8m0, h.data_ptr() % 16)
    kernel = _PLANS.get(key)
    if kernel is None:
        check_swiglu_quant_input(h, "swiglu_quant_fp8")
        _check_rows_aligned("swiglu_quant_fp8", h, "h")
        kernel = _PLANS.remember(key, h.numel() and get_kernel(group_quant_spec(h.dtype, 128, scale_ue8m0,
                                                                                swiglu=True), _SIGNATURE))
    f = h.shape[-1] // 2
    q = torch.empty((*h.shape[:-1], f), dtype=torch.float8_e4m3fn, device=h.device)
    scales = mn_major_tma_aligned_empty((*h.shape[:-1], f // 128), device=h.device)
    if kernel:
        launch_group_quant(kernel, h, q, scales, 128, ITERS, eps)
    return q, scales
