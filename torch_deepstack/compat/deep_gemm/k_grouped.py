"""DeepGEMM's k-grouped FP8 GEMM (the MoE weight gradient): D[g] = C[g] + A_g @ B_g.T, group g owning ks[g] of
the summed K.

torch_deepstack's op takes A as [M, sum(ks)] and B as [N, sum(ks)], group g being a column segment, so every
group shares one row stride. Accepted here as well:
  - DeepGEMM's NT form: A and B flat 1-D buffers, group g a row-major [MN, ks[g]] block at element offset
    MN * sum(ks[:g]). Each group has its own row stride (ks[g]), which one kernel launch over column segments
    cannot read, so A and B are repacked once into column segments (`flat_groups_to_columns`: one copy kernel).
  - the TN form: A as [sum(ks), M], B as [sum(ks), N] (MN-major); transposed into K-major once.
Scales: [MN, sum(ks)/128] (2.x NT) or [sum(ks)/128, MN] (1.x and TN), recognised by shape; a square one is read
in the entry point's own orientation. Every ks[g] must be a multiple of 128 (0 allowed).
"""
from __future__ import annotations

import math

import torch

from torch_deepstack.gemm import api
from torch_deepstack.memo import BoundedMemo

_TILE = 128   # K granule of the kernels: every group block starts and ends on one

# (group sizes, MN, row width, device) -> int64 [2, T] per destination row-column: source row of its MN row 0, and
# the row step between MN rows.
_ROW_SOURCES = BoundedMemo(256)


def _row_sources(ks: tuple, mn: int, width: int, device: torch.device) -> torch.Tensor:
    key = (ks, mn, width, device)
    src = _ROW_SOURCES.get(key)
    if src is None:
        base, step, start = [], [], 0
        for k in ks:
            cols = k // width
            # a group block is MN rows of `cols` width-element pieces, from piece MN * start of the flat buffer
            base += [mn * start + t for t in range(cols)]
            step += [cols] * cols
            start += cols
        host = torch.tensor([base, step], dtype=torch.int64)
        if device.type == "cuda":   # pinned and asynchronous: no host sync (as the op's own segment bounds)
            host = host.pin_memory()
        src = _ROW_SOURCES.remember(key, host.to(device, non_blocking=True))
    return src


def _as_int64(flat: torch.Tensor) -> torch.Tensor:
    """The fp8 buffer seen as int64 (8 bytes a copy element: byte-wise copies run several times slower)."""
    if not flat.is_contiguous() or flat.storage_offset() % 8:
        flat = flat.clone()
    return flat.view(torch.int64)


def flat_groups_to_columns(flat: torch.Tensor, ks, mn: int, name: str = "a", op: str = "deep_gemm k-grouped"
                           ) -> torch.Tensor:
    """DeepGEMM's flat k-grouped operand (group g: a row-major [mn, ks[g]] block after the previous ones) ->
    [mn, sum(ks)] with group g in columns [sum(ks[:g]), sum(ks[:g+1])). One copy kernel whatever the number of
    groups: a strided copy when all non-empty groups have one size, else a gather of row pieces as wide as the
    sizes' common divisor allows (measured on an H200, 235 MB: ~0.12 ms and ~1.1 ms with 128-wide pieces)."""
    ks = tuple(int(k) for k in ks)
    sum_k = sum(ks)
    if flat.dtype != torch.float8_e4m3fn:
        raise TypeError(f"{op}: {name} must be torch.float8_e4m3fn, got {flat.dtype}")
    if flat.numel() != mn * sum_k:
        raise ValueError(f"{op}: flat {name} must have numel = MN * sum(ks) = {mn} * {sum_k} = "
                         f"{mn * sum_k}, got {flat.numel()}")
    if flat.numel() == 0:
        return flat.new_empty(mn, sum_k)
    words = _as_int64(flat)
    sizes = tuple(k for k in ks if k)
    if len(set(sizes)) == 1:   # [G, mn, k] -> [mn, G, k]
        out = words.view(len(sizes), mn, sizes[0] // 8).permute(1, 0, 2).reshape(mn, sum_k // 8)
    else:
        width = _TILE * math.gcd(*(k // _TILE for k in sizes))
        src = _row_sources(sizes, mn, width, flat.device)
        rows = src[0] + torch.arange(mn, device=flat.device).unsqueeze(1) * src[1]      # [mn, sum_k / width]
        out = words.view(-1, width // 8).index_select(0, rows.view(-1))
    return out.view(torch.float8_e4m3fn).view(mn, sum_k)


def _scales(sf: torch.Tensor, mn: int, tiles: int, k_rows_first: bool, op: str, name: str) -> torch.Tensor:
    """sf as [MN, T] (a view): given [MN, T] or [T, MN]; a square one is taken as [T, MN] when k_rows_first."""
    if tuple(sf.shape) == (mn, tiles) and not (k_rows_first and mn == tiles):
        return sf
    if tuple(sf.shape) == (tiles, mn):
        return sf.T
    raise ValueError(f"{op}: {name}'s scales must be [MN, sum(ks)/128] = [{mn}, {tiles}] or [sum(ks)/128, MN] = "
                     f"[{tiles}, {mn}], got {tuple(sf.shape)}")


def _operand(pair, ks, mn: int, mn_major: bool, sf_k_rows_first: bool, op: str, name: str):
    """One (data, scales) operand in the op's layout: data [MN, sum(ks)] K-major, scales [MN, sum(ks)/128]."""
    data, sf = pair
    sum_k = sum(ks)
    if data.dim() == 1:
        data = flat_groups_to_columns(data, ks, mn, name, op)
    elif data.dim() == 2 and mn_major:
        if tuple(data.shape) != (sum_k, mn):
            raise ValueError(f"{op}: {name} must be [sum(ks), MN] = [{sum_k}, {mn}], got {tuple(data.shape)}")
        data = data.T.contiguous()
    elif data.dim() != 2:
        raise ValueError(f"{op}: {name} must be flat (1-D, DeepGEMM's layout) or [MN, sum(ks)], got "
                         f"{tuple(data.shape)}")
    return data, _scales(sf, mn, sum_k // _TILE, sf_k_rows_first, op, name)


def _k_grouped(op, a, b, d, ks, c, mn_major=False, sf_k_rows_first=False):
    if any(k < 0 or k % _TILE for k in ks) or not ks:
        raise ValueError(f"{op}: ks must list each group's K, each a multiple of {_TILE} (0 allowed), got {list(ks)}")
    if d.dim() != 3 or d.shape[0] != len(ks):
        raise ValueError(f"{op}: d must be [G, M, N] with G = len(ks) = {len(ks)}, got {tuple(d.shape)}")
    _, m, n = d.shape
    a_data, sfa = _operand(a, ks, m, mn_major, sf_k_rows_first, op, "a")
    b_data, sfb = _operand(b, ks, n, mn_major, sf_k_rows_first, op, "b")
    api.k_grouped_fp8_wgrad_gemm_nt(a_data, sfa, b_data, sfb, list(ks), c=c, out=d)


def _resolve_ks(op, ks, ks_cpu, ks_tensor, grouped_layout, use_psum_layout, recipe):
    if use_psum_layout:
        raise NotImplementedError(f"{op}: the psum layout is not supported (DeepGEMM's SM90 form has none either); "
                                  f"pass each group's K in ks")
    if tuple(recipe) != (1, 1, _TILE):
        raise ValueError(f"{op}: recipe must be (1, 1, 128) on SM90, got {tuple(recipe)}")
    ks = ks if ks is not None else ks_cpu
    if ks is None:   # only the device tensor given: read it (one host sync)
        layout = ks_tensor if ks_tensor is not None else grouped_layout
        if layout is None:
            raise TypeError(f"{op}: pass ks (each group's K, a list of ints)")
        ks = layout.tolist()
    return [int(k) for k in ks]


def k_grouped_fp8_gemm_nt_contiguous(a, b, d, ks=None, ks_tensor=None, c=None, recipe=(1, 1, 128),
                                     compiled_dims="mn", use_psum_layout=False, *, ks_cpu=None, grouped_layout=None):
    """DeepGEMM's NT k-grouped GEMM. Takes its flat layout (one repack copy of A and B, see the module docstring)
    or torch_deepstack's [MN, sum(ks)] one (no copy). The newer keywords ks_cpu / grouped_layout name ks /
    ks_tensor; the device tensor is only read when ks is missing. C may be D (accumulate) or None (D = A @ B.T)."""
    op = "k_grouped_fp8_gemm_nt_contiguous"
    ks = _resolve_ks(op, ks, ks_cpu, ks_tensor, grouped_layout, use_psum_layout, recipe)
    _k_grouped(op, a, b, d, ks, c)


def k_grouped_fp8_gemm_tn_contiguous(a, b, d, ks=None, ks_tensor=None, c=None, recipe=(1, 1, 128),
                                     compiled_dims="mn", use_psum_layout=False, *, ks_cpu=None, grouped_layout=None):
    """DeepGEMM's TN k-grouped GEMM: A [sum(ks), M] and B [sum(ks), N] MN-major, scales [sum(ks)/128, MN]. SM90
    kernels read K-major operands, so A and B are transposed once (one copy each)."""
    op = "k_grouped_fp8_gemm_tn_contiguous"
    ks = _resolve_ks(op, ks, ks_cpu, ks_tensor, grouped_layout, use_psum_layout, recipe)
    _k_grouped(op, a, b, d, ks, c, mn_major=True, sf_k_rows_first=True)


def k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(lhs, rhs, out, batch_sizes):
    """DeepGEMM 1.x: out[g] += lhs_g @ rhs_g.T for K segments of lengths batch_sizes; operands flat (1.x layout,
    scales [sum(K)/128, MN]) or [MN, sum(K)]."""
    _k_grouped("k_grouped_wgrad_gemm_fp8_fp8_fp32_nt", lhs, rhs, out, [int(k) for k in batch_sizes], out,
               sf_k_rows_first=True)
