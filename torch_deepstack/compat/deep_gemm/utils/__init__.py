"""DeepGEMM's `deep_gemm.utils`: the math and layout helpers (also re-exported by `deep_gemm` itself)."""
from torch_deepstack.compat.deep_gemm.utils import layout, math  # noqa: F401  (submodules, as DeepGEMM has them)
from torch_deepstack.compat.deep_gemm.utils.layout import (  # noqa: F401
    get_col_major_tma_aligned_tensor, get_k_alignment_for_contiguous_layout, get_m_alignment_for_contiguous_layout,
    get_mk_alignment_for_contiguous_layout, get_mn_major_tma_aligned_tensor, get_tma_aligned_size,
    set_mk_alignment_for_contiguous_layout, transform_sf_into_required_layout,
)
from torch_deepstack.compat.deep_gemm.utils.math import (  # noqa: F401
    align, ceil_div, ceil_to_ue8m0, per_block_cast_to_fp8, per_channel_cast_to_fp8, per_token_cast_to_fp8,
)

__all__ = [
    "align", "ceil_div", "ceil_to_ue8m0", "per_token_cast_to_fp8", "per_channel_cast_to_fp8", "per_block_cast_to_fp8",
    "get_tma_aligned_size", "get_mn_major_tma_aligned_tensor", "get_col_major_tma_aligned_tensor",
    "get_mk_alignment_for_contiguous_layout", "set_mk_alignment_for_contiguous_layout",
    "get_m_alignment_for_contiguous_layout", "get_k_alignment_for_contiguous_layout",
    "transform_sf_into_required_layout",
]
