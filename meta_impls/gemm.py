"""Fakes of the FP8 GEMM ops (they mutate `d` and return nothing) and of the GEMM-side quantisation ops."""
import torch

from torch_deepstack._library import fake
from torch_deepstack.gemm import checks
from torch_deepstack.gemm.checks import FP8, cdiv, check_dual_token_quant_input, check_quant_input
from torch_deepstack.gemm.reference import transposed_quant_empty
from torch_deepstack.quant.scale_layout import mn_major_tma_aligned_empty


@fake("fp8_gemm_nt")
def fp8_gemm_nt_fake(a, sfa, b, sfb, d, c=None, accumulate=False):
    checks.check_dense("fp8_gemm_nt", a, sfa, b, sfb, d, c)


@fake("fp8_wgrad_gemm_nt")
def fp8_wgrad_gemm_nt_fake(a, sfa, b, sfb, d, c=None, accumulate=False):
    checks.check_dense("fp8_wgrad_gemm_nt", a, sfa, b, sfb, d, c, sf_b_per_row=True)


@fake("k_grouped_fp8_wgrad_gemm_nt")
def k_grouped_fp8_wgrad_gemm_nt_fake(a, sfa, b, sfb, d, ks, c=None, accumulate=False):
    checks.check_k_grouped("k_grouped_fp8_wgrad_gemm_nt", a, sfa, b, sfb, d, ks, c)


@fake("m_grouped_fp8_gemm_nt_contiguous")
def m_grouped_contiguous_fake(a, sfa, b, sfb, d, m_indices):
    checks.check_contiguous("m_grouped_fp8_gemm_nt_contiguous", a, sfa, b, sfb, d, m_indices)


@fake("m_grouped_fp8_gemm_nt_masked")
def m_grouped_masked_fake(a, sfa, b, sfb, d, masked_m, expected_m):
    checks.check_masked("m_grouped_fp8_gemm_nt_masked", a, sfa, b, sfb, d, masked_m, expected_m)


@fake("per_block_quant_fp8")
def per_block_quant_fp8_fake(x, transpose=False, eps=1e-4, scale_ue8m0=False):
    check_quant_input("per_block_quant_fp8", x)
    n, k = x.shape
    if transpose:
        return (torch.empty(k, n, dtype=FP8, device=x.device),
                torch.empty(cdiv(k, 128), cdiv(n, 128), dtype=torch.float32, device=x.device))
    return (torch.empty(n, k, dtype=FP8, device=x.device),
            torch.empty(cdiv(n, 128), cdiv(k, 128), dtype=torch.float32, device=x.device))


@fake("per_block_quant_fp8_dual")
def per_block_quant_fp8_dual_fake(x, eps=1e-4, scale_ue8m0=False):
    check_quant_input("per_block_quant_fp8_dual", x)
    n, k = x.shape
    nb, kb = cdiv(n, 128), cdiv(k, 128)
    return (torch.empty(n, k, dtype=FP8, device=x.device), torch.empty(nb, kb, dtype=torch.float32, device=x.device),
            torch.empty(k, n, dtype=FP8, device=x.device), torch.empty(kb, nb, dtype=torch.float32, device=x.device))


@fake("per_token_group_quant_fp8_dual")
def per_token_group_quant_fp8_dual_fake(x, eps=1e-4, scale_ue8m0=False):
    check_dual_token_quant_input("per_token_group_quant_fp8_dual", x)
    m, k = x.shape
    return (torch.empty(m, k, dtype=FP8, device=x.device), mn_major_tma_aligned_empty((m, k // 128), x.device),
            *transposed_quant_empty(m, k, x.device))


@fake("per_token_group_quant_fp8_t")
def per_token_group_quant_fp8_t_fake(x, eps=1e-4, scale_ue8m0=False):
    check_quant_input("per_token_group_quant_fp8_t", x)
    return transposed_quant_empty(x.shape[0], x.shape[1], x.device)


@fake("moe_combine")
def moe_combine_fake(y, rows, weights, check_rows=True):
    checks.check_moe_combine("moe_combine", y, rows, weights)
    return y.new_empty(rows.shape[0], y.shape[1])


@fake("moe_combine_weight_grad")
def moe_combine_weight_grad_fake(grad, y, rows):
    checks.check_moe_combine_weight_grad("moe_combine_weight_grad", grad, y, rows)
    return y.new_empty(rows.shape, dtype=torch.float32)


@fake("swiglu")
def swiglu_fake(h):
    checks.check_swiglu("swiglu", h)
    return h.new_empty(h.shape[0], h.shape[1] // 2)


@fake("swiglu_backward")
def swiglu_backward_fake(grad, h):
    checks.check_swiglu("swiglu_backward", h, grad)
    return h.new_empty(h.shape)
