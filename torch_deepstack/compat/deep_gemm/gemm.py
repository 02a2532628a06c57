"""DeepGEMM's dense and m-grouped FP8 GEMM call forms (2.x names, 1.x names) on torch_deepstack's ops.

Operands are (e4m3 data, fp32 scales) pairs and D is written in place. Scales may come in any layout: the ops
convert them into the kernel layout (one copy when needed).
"""
from __future__ import annotations

import torch

from torch_deepstack.compat.deep_gemm.utils.layout import get_mk_alignment_for_contiguous_layout
from torch_deepstack.gemm import api
from torch_deepstack.gemm.checks import cdiv
from torch_deepstack.gemm.kernels import num_sms as _num_sms
from torch_deepstack.gemm.kernels import set_num_sms as _set_num_sms


def _unsupported(name):
    def fn(*args, **kwargs):
        raise NotImplementedError(f"deep_gemm.{name}: only the NT layout exists for FP8 on SM90 (as in DeepGEMM); "
                                  "transpose the operands to K-major and call fp8_gemm_nt")
    fn.__name__ = name
    return fn


fp8_gemm_nn = _unsupported("fp8_gemm_nn")
fp8_gemm_tn = _unsupported("fp8_gemm_tn")
fp8_gemm_tt = _unsupported("fp8_gemm_tt")
m_grouped_fp8_gemm_nn_contiguous = _unsupported("m_grouped_fp8_gemm_nn_contiguous")


def _per_row_sfb(b, sfb, recipe, recipe_a, recipe_b):
    """True when B's scales are per row (1 x 128, the weight-gradient form) rather than 128 x 128 blocks."""
    if recipe is not None:
        if tuple(recipe) not in ((1, 128, 128), (1, 1, 128)):
            raise ValueError(f"deep_gemm: recipe {tuple(recipe)} is not supported on SM90 (use (1, 128, 128) or "
                             f"(1, 1, 128))")
        return tuple(recipe)[1] == 1
    if recipe_b is not None:
        if recipe_a is not None and tuple(recipe_a) != (1, 128):
            raise ValueError(f"deep_gemm: recipe_a {tuple(recipe_a)} is not supported on SM90 (use (1, 128))")
        if tuple(recipe_b) not in ((1, 128), (128, 128)):
            raise ValueError(f"deep_gemm: recipe_b {tuple(recipe_b)} is not supported on SM90 (use (1, 128) or "
                             f"(128, 128))")
        return tuple(recipe_b)[0] == 1
    n = b.shape[-2]
    return sfb.shape[-2] == n and n != cdiv(n, 128)


def fp8_gemm_nt(a, b, d, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims="nk",
                disable_ue8m0_cast=False):
    """D = C + A @ B.T; a = (e4m3 [M, K], fp32 scales), b = (e4m3 [N, K], fp32 scales). C may be D."""
    (a_data, sfa), (b_data, sfb) = a, b
    if _per_row_sfb(b_data, sfb, recipe, recipe_a, recipe_b):
        return api.fp8_wgrad_gemm_nt(a_data, sfa, b_data, sfb, c=c, out=d)
    return api.fp8_gemm_nt(a_data, sfa, b_data, sfb, c=c, out=d)


def m_grouped_fp8_gemm_nt_contiguous(a, b, d, grouped_layout, recipe=None, recipe_a=None, recipe_b=None,
                                     compiled_dims="nk", disable_ue8m0_cast=False, use_psum_layout=False,
                                     ensure_zero_padding=True, expected_m_for_psum_layout=None):
    """grouped_layout: int32 [M_sum] group id per row (-1 = padding), or with use_psum_layout=True int32 [G] holding
    each group's end row, groups starting at the previous end rounded up to get_mk_alignment_for_contiguous_layout()."""
    (a_data, sfa), (b_data, sfb) = a, b
    if use_psum_layout:
        api.m_grouped_fp8_gemm_nt_contiguous_offsets(a_data, sfa, b_data, sfb, grouped_layout, out=d,
                                                     alignment=get_mk_alignment_for_contiguous_layout())
    else:
        api.m_grouped_fp8_gemm_nt_contiguous(a_data, sfa, b_data, sfb, grouped_layout, out=d)


def m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, expected_m, recipe=None, recipe_a=None, recipe_b=None,
                                 compiled_dims="nk", disable_ue8m0_cast=False):
    (a_data, sfa), (b_data, sfb) = a, b
    api.m_grouped_fp8_gemm_nt_masked(a_data, sfa, b_data, sfb, masked_m, int(expected_m), out=d)


# the name vLLM and SGLang look up (DeepGEMM 2.0's spelling)
fp8_m_grouped_gemm_nt_masked = m_grouped_fp8_gemm_nt_masked


def set_num_sms(n: int) -> None:
    _set_num_sms(n)


def get_num_sms() -> int:
    return _num_sms(torch.device("cuda", torch.cuda.current_device()))


# ---- 1.x names ------------------------------------------------------------------------------------------------

def gemm_fp8_fp8_bf16_nt(lhs, rhs, out):
    fp8_gemm_nt(lhs, rhs, out, recipe=(1, 128, 128))


def m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out, m_indices):
    m_grouped_fp8_gemm_nt_contiguous(lhs, rhs, out, m_indices)


def m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, expected_m):
    m_grouped_fp8_gemm_nt_masked(lhs, rhs, out, masked_m, expected_m)


def wgrad_gemm_fp8_fp8_fp32_nt(lhs, rhs, out):
    """out += lhs @ rhs.T with 1x128 scales on both operands."""
    fp8_gemm_nt(lhs, rhs, out, c=out, recipe=(1, 1, 128))
