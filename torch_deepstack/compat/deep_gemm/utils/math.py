"""DeepGEMM's `deep_gemm.utils.math`: integer helpers and the FP8 casts, with DeepGEMM's values bit for bit.

The casts follow DeepGEMM 2.x's formula: sf = max(amax, 1e-4) / 448 per group, q = x * (1 / sf), rounded to
e4m3. They run as plain PyTorch (a few kernels each). torch_deepstack's fused quantisers
(`torch_deepstack.quant.per_token_group_quant_fp8`, `torch_deepstack.gemm.api.per_block_quant_fp8`) are one
kernel but compute x * (448 / amax), so about 0.04% of their bytes sit one e4m3 step away from these results.
UE8M0 scales (powers of two) make both exact and identical.
Results are contiguous, as DeepGEMM's are: the GEMMs convert scales into their kernel layout themselves.
"""
from __future__ import annotations

import torch

from torch_deepstack.gemm.heuristic import cdiv as ceil_div
from torch_deepstack.quant import reference as _quant_ref
from torch_deepstack.quant.scale_layout import FP8_E4M3_MAX as FP8_MAX

_AMAX_FLOOR = 1e-4   # keeps all-zero groups finite (DeepGEMM's clamp)


def align(x: int, y: int) -> int:
    return ceil_div(x, y) * y


def ceil_to_ue8m0(x: torch.Tensor) -> torch.Tensor:
    """|x| rounded up to a power of two, the biased exponent kept in [1, 254] as DeepGEMM does: 0 (and
    denormals) -> 2^-126, inf / nan -> 2^127, so a scale never becomes 0 or inf."""
    return _quant_ref.ceil_to_ue8m0(x.abs(), clamp_exponent=True)


def _cast_groups(xg: torch.Tensor, group_dims, use_ue8m0: bool):
    """Quantise `xg`, whose dims `group_dims` span one group each: (e4m3 like xg, fp32 scales, group dims kept)."""
    amax = xg.abs().float().amax(dim=group_dims, keepdim=True).clamp(min=_AMAX_FLOOR)
    sf = amax / FP8_MAX
    if use_ue8m0:
        sf = ceil_to_ue8m0(sf)
    # reciprocal then multiply (not a division): the rounding DeepGEMM's helper has
    return (xg * sf.reciprocal()).to(torch.float8_e4m3fn), sf


def _check_2d(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name}: x must be 2-D, got shape {tuple(x.shape)}")


def _zero_pad(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """x with `rows` zero rows and `cols` zero columns appended (x itself when both are 0)."""
    return torch.nn.functional.pad(x, (0, cols, 0, rows)) if rows or cols else x


def per_token_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False, gran_k: int = 128,
                          use_packed_ue8m0: bool = False):
    """x [M, K] -> (e4m3 [M, K], fp32 scales [M, ceil(K / gran_k)]) per 1 x gran_k group (K zero-padded)."""
    if use_packed_ue8m0:
        raise NotImplementedError("per_token_cast_to_fp8: packed UE8M0 scales are an SM100 format")
    _check_2d("per_token_cast_to_fp8", x)
    m, k = x.shape
    xp = _zero_pad(x, 0, (-k) % gran_k)
    groups = xp.shape[1] // gran_k
    q, sf = _cast_groups(xp.reshape(m, groups, gran_k), 2, use_ue8m0)
    return q.view(xp.shape)[:, :k].contiguous(), sf.view(m, groups)


def per_channel_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False, gran_k: int = 128):
    """x [M, K] -> (e4m3 [M, K], fp32 scales [ceil(M / gran_k), K]): groups of gran_k rows in each column (the
    weight-gradient operands). DeepGEMM requires M % gran_k == 0; here M is zero-padded instead."""
    _check_2d("per_channel_cast_to_fp8", x)
    m, k = x.shape
    xp = _zero_pad(x, (-m) % gran_k, 0)
    groups = xp.shape[0] // gran_k
    q, sf = _cast_groups(xp.reshape(groups, gran_k, k), 1, use_ue8m0)
    return q.view(xp.shape)[:m], sf.view(groups, k)


def per_block_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False, gran_k: int = 128):
    """x [M, N] -> (e4m3 [M, N], fp32 scales [ceil(M / gran_k), ceil(N / gran_k)]) per gran_k x gran_k block (the
    GEMMs take 128 x 128)."""
    _check_2d("per_block_cast_to_fp8", x)
    m, n = x.shape
    xp = _zero_pad(x, (-m) % gran_k, (-n) % gran_k)
    mb, nb = xp.shape[0] // gran_k, xp.shape[1] // gran_k
    q, sf = _cast_groups(xp.reshape(mb, gran_k, nb, gran_k), (1, 3), use_ue8m0)
    return q.view(xp.shape)[:m, :n].contiguous(), sf.view(mb, nb)
