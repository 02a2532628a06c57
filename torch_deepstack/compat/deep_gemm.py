"""DeepGEMM's Python API on top of torch_deepstack's FP8 GEMM ops: code written against DeepGEMM runs by changing
one import (`from torch_deepstack.compat import deep_gemm`).

Covered (SM90 semantics, fp32 scales): the v2 names (`fp8_gemm_nt`, `m_grouped_fp8_gemm_nt_contiguous` with the
per-row and the cumulative-offset ("psum") layouts, `m_grouped_fp8_gemm_nt_masked`, `k_grouped_fp8_gemm_nt_contiguous`),
the v1 names (`gemm_fp8_fp8_bf16_nt`, `m_grouped_gemm_fp8_fp8_bf16_nt_contiguous`, `..._masked`,
`wgrad_gemm_fp8_fp8_fp32_nt`, `k_grouped_wgrad_gemm_fp8_fp8_fp32_nt`) and the helpers. Operands are (data, scales)
pairs and D is written in place, as in DeepGEMM. Differences are listed in docs/gemm.md ("DeepGEMM compatibility").
"""
from __future__ import annotations

import torch

from torch_deepstack.gemm import api
from torch_deepstack.gemm.checks import cdiv
from torch_deepstack.gemm.kernels import num_sms as _num_sms
from torch_deepstack.gemm.kernels import set_num_sms as _set_num_sms
from torch_deepstack.gemm.layout import as_mn_major_sf, get_mn_major_tma_aligned_tensor
from torch_deepstack.quant import per_token_group_quant_fp8
from torch_deepstack.quant.reference import ceil_to_ue8m0  # noqa: F401  (re-exported helper)
from torch_deepstack.quant.scale_layout import tma_aligned_size

_ops = torch.ops.deepstack
_M_ALIGNMENT = 128

__all__ = [
    "fp8_gemm_nt", "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked",
    "k_grouped_fp8_gemm_nt_contiguous", "gemm_fp8_fp8_bf16_nt", "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous",
    "m_grouped_gemm_fp8_fp8_bf16_nt_masked", "wgrad_gemm_fp8_fp8_fp32_nt", "k_grouped_wgrad_gemm_fp8_fp8_fp32_nt",
    "per_token_cast_to_fp8", "per_block_cast_to_fp8", "per_channel_cast_to_fp8", "get_mn_major_tma_aligned_tensor",
    "get_col_major_tma_aligned_tensor", "get_tma_aligned_size", "get_m_alignment_for_contiguous_layout",
    "get_mk_alignment_for_contiguous_layout", "transform_sf_into_required_layout", "set_num_sms", "get_num_sms",
    "ceil_div", "calc_diff",
]


def _unsupported(name):
    def fn(*args, **kwargs):
        raise NotImplementedError(f"deep_gemm.{name}: only the NT layout exists for FP8 on SM90 (as in DeepGEMM); "
                                  "transpose the operands to K-major and call fp8_gemm_nt")
    fn.__name__ = name
    return fn


fp8_gemm_nn = _unsupported("fp8_gemm_nn")
fp8_gemm_tn = _unsupported("fp8_gemm_tn")
fp8_gemm_tt = _unsupported("fp8_gemm_tt")


def _per_row_sfb(b, sfb, recipe):
    """True when B's scales are per row (recipe (1, 1, 128), the weight-gradient form)."""
    if recipe is not None:
        if tuple(recipe) not in ((1, 128, 128), (1, 1, 128)):
            raise ValueError(f"deep_gemm: recipe {tuple(recipe)} is not supported on SM90 (use (1, 128, 128) or "
                             f"(1, 1, 128))")
        return tuple(recipe)[1] == 1
    n = b.shape[-2]
    return sfb.shape[-2] == n and n != cdiv(n, 128)


def fp8_gemm_nt(a, b, d, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims="nk",
                disable_ue8m0_cast=False):
    """D = C + A @ B.T; a = (e4m3 [M, K], fp32 scales), b = (e4m3 [N, K], fp32 scales). C may be D."""
    (a_data, sfa), (b_data, sfb) = a, b
    if _per_row_sfb(b_data, sfb, recipe):
        return api.fp8_wgrad_gemm_nt(a_data, sfa, b_data, sfb, c=c, out=d)
    return api.fp8_gemm_nt(a_data, sfa, b_data, sfb, c=c, out=d)


def m_grouped_fp8_gemm_nt_contiguous(a, b, d, grouped_layout, recipe=None, recipe_a=None, recipe_b=None,
                                     compiled_dims="nk", disable_ue8m0_cast=False, use_psum_layout=False,
                                     ensure_zero_padding=True, expected_m_for_psum_layout=None):
    """grouped_layout: int32 [M_sum] group id per row (-1 = padding), or with use_psum_layout=True int32 [G] holding
    each group's end row, groups starting at the previous end rounded up to 128."""
    (a_data, sfa), (b_data, sfb) = a, b
    if use_psum_layout:
        api.m_grouped_fp8_gemm_nt_contiguous_offsets(a_data, sfa, b_data, sfb, grouped_layout, out=d)
    else:
        api.m_grouped_fp8_gemm_nt_contiguous(a_data, sfa, b_data, sfb, grouped_layout, out=d)


def m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, expected_m, recipe=None, recipe_a=None, recipe_b=None,
                                 compiled_dims="nk", disable_ue8m0_cast=False):
    (a_data, sfa), (b_data, sfb) = a, b
    api.m_grouped_fp8_gemm_nt_masked(a_data, sfa, b_data, sfb, masked_m, int(expected_m), out=d)


def k_grouped_fp8_gemm_nt_contiguous(a, b, d, ks, ks_tensor=None, c=None, recipe=(1, 1, 128), compiled_dims="mn"):
    """d[g] = c[g] + A_g @ B_g.T with A = (e4m3 [M, sum(ks)], scales [M, sum(ks)/128]) and B likewise [N, sum(ks)]:
    group g owns columns [sum(ks[:g]), sum(ks[:g+1])). Every ks[g] must be a multiple of 128 (0 allowed)."""
    (a_data, sfa), (b_data, sfb) = a, b
    if a_data.dim() != 2 or b_data.dim() != 2:
        raise ValueError("deep_gemm.k_grouped_fp8_gemm_nt_contiguous: torch_deepstack takes A as [M, sum(ks)] and B "
                         "as [N, sum(ks)] (groups are column segments), not flattened 1-D buffers")
    api.k_grouped_fp8_wgrad_gemm_nt(a_data, sfa, b_data, sfb, list(ks), c=c, out=d)


# ---- v1 names -------------------------------------------------------------------------------------------------

def gemm_fp8_fp8_bf16_nt(lhs, rhs, out):
    fp8_gemm_nt(lhs, rhs, out, recipe=(1, 128, 128))


def m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out, m_indices):
    m_grouped_fp8_gemm_nt_contiguous(lhs, rhs, out, m_indices)


def m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, expected_m):
    m_grouped_fp8_gemm_nt_masked(lhs, rhs, out, masked_m, expected_m)


def wgrad_gemm_fp8_fp8_fp32_nt(lhs, rhs, out):
    """out += lhs @ rhs.T with 1x128 scales on both operands."""
    fp8_gemm_nt(lhs, rhs, out, c=out, recipe=(1, 1, 128))


def k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(lhs, rhs, out, batch_sizes):
    """out[g] += lhs_g @ rhs_g.T for consecutive K segments of lengths batch_sizes."""
    ks = [int(k) for k in batch_sizes]
    k_grouped_fp8_gemm_nt_contiguous(lhs, rhs, out, ks, c=out)


# ---- helpers ----------------------------------------------------------------------------------------------------

def ceil_div(x: int, y: int) -> int:
    return (x + y - 1) // y


def get_tma_aligned_size(x: int, element_size: int) -> int:
    return tma_aligned_size(x, element_size)


def get_m_alignment_for_contiguous_layout() -> int:
    return _M_ALIGNMENT


get_mk_alignment_for_contiguous_layout = get_m_alignment_for_contiguous_layout
get_col_major_tma_aligned_tensor = get_mn_major_tma_aligned_tensor


def set_num_sms(n: int) -> None:
    _set_num_sms(n)


def get_num_sms() -> int:
    return _num_sms(torch.device("cuda", torch.cuda.current_device()))


def per_token_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False, gran_k: int = 128,
                          use_packed_ue8m0: bool = False):
    """x [M, K] -> (e4m3 [M, K], fp32 scales [M, ceil(K/gran_k)]) per 1 x gran_k group (K padded with zeros for the
    cast). The scales come MN-major and TMA-aligned, ready for the kernels (values as DeepGEMM's helper)."""
    if use_packed_ue8m0:
        raise NotImplementedError("per_token_cast_to_fp8: packed UE8M0 scales are an SM100 format")
    if x.dim() != 2:
        raise ValueError(f"per_token_cast_to_fp8: x must be 2-D, got shape {tuple(x.shape)}")
    k = x.shape[1]
    pad = (-k) % gran_k
    xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
    q, s = per_token_group_quant_fp8(xp.contiguous(), gran_k, 1e-4, use_ue8m0)
    return (q[:, :k] if pad else q), s


def per_channel_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False, gran_k: int = 128):
    """x [M, K] -> 1 x gran_k groups along M (per channel): (e4m3 [M, K], fp32 scales [ceil(M/gran_k), K])."""
    if gran_k != 128:
        raise ValueError("per_channel_cast_to_fp8: only gran_k=128 is supported")
    q_t, s_t = api.per_token_group_quant_fp8_t(x, 1e-4, use_ue8m0)      # [K, M], scales [K, M/128]
    return q_t.t(), s_t.t()


def per_block_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False, gran_k: int = 128):
    """x [M, N] -> (e4m3 [M, N], fp32 scales [ceil(M/128), ceil(N/128)]) per 128x128 block."""
    if gran_k != 128:
        raise ValueError("per_block_cast_to_fp8: only 128x128 blocks are supported")
    return api.per_block_quant_fp8(x, False, 1e-4, use_ue8m0)


def transform_sf_into_required_layout(sf, mn, k, recipe, num_groups=None, is_sfa=None, disable_ue8m0_cast=False,
                                      psum_layout=None):
    """SM90 with fp32 scales: per-row (1 x 128) scales become MN-major TMA-aligned; 128 x 128 block scales are used
    as they are."""
    if sf.dtype != torch.float32:
        raise TypeError("transform_sf_into_required_layout: SM90 kernels take float32 scales")
    per_row = sf.shape[-2] == mn and (is_sfa or tuple(recipe)[1] == 1 or mn == 1 or is_sfa is None and mn > 128)
    return as_mn_major_sf(sf) if per_row else sf


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denom) if denom != 0 else 0.0
