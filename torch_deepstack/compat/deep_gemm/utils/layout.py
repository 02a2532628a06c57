"""DeepGEMM's `deep_gemm.utils.layout`: scale-factor layouts and the contiguous-layout alignment (SM90, fp32
scales)."""
from __future__ import annotations

import torch

from torch_deepstack.gemm.layout import as_mn_major_sf
from torch_deepstack.gemm.layout import get_mn_major_tma_aligned_tensor  # noqa: F401  (DeepGEMM's name)
from torch_deepstack.quant.scale_layout import tma_aligned_size

# Our kernels take one group per 128-row (m-grouped) or 128-deep (k-grouped) block, so any multiple of 128 keeps
# groups block-aligned; DeepGEMM's smaller SM100 alignments cannot be honoured.
_BLOCK = 128
_mk_alignment = _BLOCK


def get_tma_aligned_size(x: int, element_size: int) -> int:
    return tma_aligned_size(x, element_size)


def get_mk_alignment_for_contiguous_layout() -> int:
    """Rows (m-grouped) or K (k-grouped) each group is padded to in the contiguous layouts; 128 unless set."""
    return _mk_alignment


def set_mk_alignment_for_contiguous_layout(new_value: int) -> None:
    """Set the group alignment of the contiguous layouts (used by the psum form's group starts); a positive
    multiple of 128."""
    global _mk_alignment
    if int(new_value) <= 0 or int(new_value) % _BLOCK:
        raise ValueError(f"set_mk_alignment_for_contiguous_layout: torch_deepstack's SM90 kernels need groups "
                         f"aligned to a multiple of {_BLOCK}, got {new_value}")
    _mk_alignment = int(new_value)


get_m_alignment_for_contiguous_layout = get_mk_alignment_for_contiguous_layout
get_k_alignment_for_contiguous_layout = get_mk_alignment_for_contiguous_layout
get_col_major_tma_aligned_tensor = get_mn_major_tma_aligned_tensor   # the 1.x name


def _granularity(recipe, is_sfa):
    """(gran_mn, gran_k) of a DeepGEMM recipe: (gran_m, gran_n, gran_k) needs is_sfa; (gran_mn, gran_k) must come
    without it."""
    recipe = tuple(recipe)
    if len(recipe) == 3:
        if is_sfa is None:
            raise ValueError("transform_sf_into_required_layout: a 3-element recipe needs is_sfa (True for A's "
                             "scales, False for B's)")
        return (recipe[0] if is_sfa else recipe[1]), recipe[2]
    if len(recipe) == 2:
        if is_sfa is not None:
            raise ValueError("transform_sf_into_required_layout: a 2-element recipe (gran_mn, gran_k) takes no is_sfa")
        return recipe
    raise ValueError(f"transform_sf_into_required_layout: recipe must have 2 or 3 elements, got {recipe}")


def transform_sf_into_required_layout(sf, mn, k, recipe, num_groups=None, is_sfa=None, disable_ue8m0_cast=False,
                                      psum_layout=None):
    """fp32 scales into the layout the SM90 kernels read: per-row (gran_mn 1, gran_k 128) ones become MN-major and
    TMA-aligned, 128 x 128 block ones stay as they are. sf is [ceil(mn/gran_mn), ceil(k/gran_k)], with a leading
    [num_groups] when num_groups is given."""
    gran_mn, gran_k = _granularity(recipe, is_sfa)
    if sf.dtype != torch.float32:
        raise TypeError(f"transform_sf_into_required_layout: SM90 kernels take float32 scales, got {sf.dtype}")
    expected = (-(-mn // gran_mn), -(-k // gran_k))
    if num_groups is not None:
        expected = (num_groups, *expected)
    if tuple(sf.shape) != expected:
        raise ValueError(f"transform_sf_into_required_layout: sf must have shape {expected} for mn={mn}, k={k}, "
                         f"granularity ({gran_mn}, {gran_k})" + (f", num_groups={num_groups}" if num_groups else "")
                         + f"; got {tuple(sf.shape)}")
    if (gran_mn, gran_k) == (1, _BLOCK):
        return as_mn_major_sf(sf)
    if (gran_mn, gran_k) == (_BLOCK, _BLOCK):
        return sf
    raise ValueError(f"transform_sf_into_required_layout: granularity ({gran_mn}, {gran_k}) is not supported on "
                     f"SM90 with fp32 scales (use (1, 128) or (128, 128))")
