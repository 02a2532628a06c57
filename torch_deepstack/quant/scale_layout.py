"""The scale layout the FP8 GEMM kernels read (SM90, following DeepGEMM's "SFA" convention).

Scales of a [M, K] activation quantised per 1x128 group have the logical shape [M, G] with G = K / 128, but are
stored *MN-major* and *TMA-aligned*: element (m, g) lives at offset g * align(M, 4) + m, i.e. strides (1, align(M, 4)).
So each column of scales (one K group for every row) is contiguous and starts on a 16-byte boundary, which is what a
TMA load of a [BLOCK_M] scale vector needs. Rows m in [M, align(M, 4)) are padding and never read.
With a leading batch dimension ([B, M, G], the masked grouped layout) each batch entry is transposed separately:
strides (G * align(M, 4), 1, align(M, 4)).
"""
from __future__ import annotations

import torch

FP8_E4M3_MAX = 448.0
TMA_ALIGNMENT_BYTES = 16


def tma_aligned_size(n, element_size: int = 4):
    """Round n up so that n * element_size is a multiple of 16 bytes (works on SymInts)."""
    align = TMA_ALIGNMENT_BYTES // element_size
    return (n + align - 1) // align * align


def mn_major_tma_aligned_empty(shape, device, dtype=torch.float32) -> torch.Tensor:
    """An uninitialised [..., M, G] tensor with the MN-major TMA-aligned strides described above."""
    *batch, m, g = shape
    m_al = tma_aligned_size(m, dtype.itemsize)
    strides = [1, m_al]
    if batch:
        assert len(batch) == 1, "at most one batch dimension"
        strides = [g * m_al] + strides
    return torch.empty_strided(tuple(shape), tuple(strides), device=device, dtype=dtype)
