"""Input builders shared by the FP8 GEMM tests: fresh random bf16 data, quantised with our own ops."""
from __future__ import annotations

import torch

from tests.helpers import fresh_randn
from torch_deepstack.gemm import per_block_quant_fp8, per_token_group_quant_fp8_t
from torch_deepstack.quant import per_token_group_quant_fp8


def quant_a(x):
    """[.., M, K] -> 1x128 per token (MN-major scales). K that is not a multiple of 128 is zero-padded for the
    cast and the values sliced back (a view with a 16-byte aligned row stride, as the GEMM needs)."""
    k = x.shape[-1]
    if k % 128:
        x = torch.nn.functional.pad(x, (0, 128 - k % 128))
    q, s = per_token_group_quant_fp8(x)
    return q[..., :k], s


def quant_b(w):
    return per_block_quant_fp8(w)


def dense_inputs(m, n, k, device):
    a = fresh_randn(m, k, dtype=torch.bfloat16, device=device)
    b = fresh_randn(n, k, dtype=torch.bfloat16, device=device)
    return a, b, quant_a(a), quant_b(b)


def grouped_b(g, n, k, device):
    b = fresh_randn(g, n, k, dtype=torch.bfloat16, device=device)
    qs = [quant_b(b[i]) for i in range(g)]
    return b, torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])


def random_group_sizes(g, expected, generator=None, with_empty=True):
    """expected * U(0.7, 1.3) per group, with group 1 empty (when g > 1) to exercise empty groups."""
    u = torch.rand(g, generator=generator) * 0.6 + 0.7
    sizes = [int(expected * float(x)) for x in u]
    if with_empty and g > 1:
        sizes[1] = 0
    return sizes


def contiguous_layout(sizes, alignment=128):
    ids = []
    for i, s in enumerate(sizes):
        pad = (s + alignment - 1) // alignment * alignment
        ids += [i] * s + [-1] * (pad - s)
    return torch.tensor(ids, dtype=torch.int32)


def wgrad_operand(t2d):
    """[M, C] -> transposed 1x128-along-M operand [C, align(M, 16)] (zero padded) and its scales."""
    q, s = per_token_group_quant_fp8_t(t2d)
    return q.as_strided((q.shape[0], q.stride(0)), (q.stride(0), 1)), s
