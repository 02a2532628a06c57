"""Scale-factor layouts of the FP8 GEMMs and the one-pass conversions into them.

Kernel layouts (SM90, DeepGEMM's conventions):
  - SFA, and SFB of the weight-gradient GEMMs (1x128 groups): fp32 [..., MN, ceil(K/128)], MN-major and TMA-aligned
    (strides (1, align(MN, 4)), with a leading group dim of stride ceil(K/128) * align(MN, 4)); see
    torch_deepstack.quant.scale_layout.
  - SFB of the inference GEMMs (128x128 blocks): fp32 [..., ceil(N/128), ceil(K/128)] in any strides (read with
    plain loads), so both the row-major and the transposed form work as they are.

Users usually hold row-major SFA ([M, K/128] contiguous, what a naive per-token cast returns). `as_mn_major_sf`
converts any layout with ONE strided copy kernel (no transpose/pad/contiguous chain), and returns the input
unchanged when it already has the kernel layout.
"""
from __future__ import annotations

import torch

from torch_deepstack.quant.scale_layout import mn_major_tma_aligned_empty, tma_aligned_size


def is_mn_major_tma_aligned(sf: torch.Tensor) -> bool:
    if sf.dtype != torch.float32 or sf.dim() not in (2, 3):
        return False
    mn, g = sf.shape[-2], sf.shape[-1]
    m_al = tma_aligned_size(mn, 4)
    if sf.stride(-2) != 1 and mn > 1:
        return False
    if sf.stride(-1) != m_al and g > 1:
        return False
    if sf.dim() == 3 and sf.shape[0] > 1 and sf.stride(0) != g * m_al:
        return False
    return sf.data_ptr() % 16 == 0


def as_mn_major_sf(sf: torch.Tensor) -> torch.Tensor:
    """`sf` in the MN-major TMA-aligned layout (a copy only when needed; the copy is one kernel)."""
    if is_mn_major_tma_aligned(sf):
        return sf
    out = mn_major_tma_aligned_empty(tuple(sf.shape), device=sf.device)
    out.copy_(sf)
    return out


def get_mn_major_tma_aligned_tensor(sf: torch.Tensor) -> torch.Tensor:
    """DeepGEMM's helper name: fp32 [.., MN, G] -> the same values, MN-major and TMA-aligned."""
    if sf.dtype != torch.float32:
        raise TypeError(f"get_mn_major_tma_aligned_tensor: scales must be float32, got {sf.dtype}")
    if sf.dim() not in (2, 3):
        raise ValueError(f"get_mn_major_tma_aligned_tensor: scales must be [MN, G] or [B, MN, G], got {tuple(sf.shape)}")
    return as_mn_major_sf(sf)
