"""Typed Python entry points of the FP8 GEMMs (allocate the output when none is given) and the quantisers."""
from __future__ import annotations

import torch

from torch_deepstack._library import kernel_for
from torch_deepstack.gemm import checks
from torch_deepstack.gemm.checks import cdiv

# Each entry point calls `kernel_for(op, tensors)`: in eager CUDA code the op's kernel directly, otherwise the op
# through the dispatcher (compile, subclasses, modes, profiler: see _library.may_skip_dispatcher).


def _call_accumulating(name, a, sfa, b, sfb, d, c, *extra):
    # `c is d` (DeepGEMM's in-place accumulate) becomes accumulate=True: an op must not read an alias of what it
    # writes through a separate argument.
    if c is not None and c.data_ptr() == d.data_ptr() and c.shape == d.shape and c.stride() == d.stride():
        kernel_for(name, a, sfa, b, sfb, d)(a, sfa, b, sfb, d, *extra, c=None, accumulate=True)
    else:
        kernel_for(name, a, sfa, b, sfb, d, c)(a, sfa, b, sfb, d, *extra, c=c)
    return d


def fp8_gemm_nt(a, sfa, b, sfb, c=None, out=None, out_dtype=torch.bfloat16):
    """D = C + A @ B.T with A e4m3 [M, K] (+ fp32 scales [M, ceil(K/128)] per 1x128 group) and B e4m3 [N, K]
    (+ fp32 scales [ceil(N/128), ceil(K/128)] per 128x128 block). Returns D (bf16 or fp32)."""
    d = out if out is not None else torch.empty(a.shape[0], b.shape[0], dtype=out_dtype, device=a.device)
    return _call_accumulating("fp8_gemm_nt", a, sfa, b, sfb, d, c)


def fp8_wgrad_gemm_nt(a, sfa, b, sfb, c=None, out=None, out_dtype=torch.float32):
    """D = C + A @ B.T with 1x128 scales on both operands (the weight-gradient GEMM), accumulated in fp32 and
    stored as fp32 (default) or bf16 (a bf16 weight's gradient without a separate cast). Pass c=out to accumulate
    into out."""
    d = out if out is not None else torch.empty(a.shape[0], b.shape[0], dtype=out_dtype, device=a.device)
    return _call_accumulating("fp8_wgrad_gemm_nt", a, sfa, b, sfb, d, c)


def k_grouped_fp8_wgrad_gemm_nt(a, sfa, b, sfb, ks, c=None, out=None, out_dtype=torch.float32):
    """D[g] = C[g] + A[:, seg_g] @ B[:, seg_g].T for consecutive K segments of lengths ks (multiples of 128, 0
    allowed). a [M, sum(ks)], b [N, sum(ks)], scales [M or N, sum(ks)/128]; D [G, M, N] accumulated in fp32 and
    stored as fp32 (default) or bf16."""
    ks = [int(k) for k in ks]
    d = out if out is not None else torch.empty(len(ks), a.shape[0], b.shape[0], dtype=out_dtype, device=a.device)
    return _call_accumulating("k_grouped_fp8_wgrad_gemm_nt", a, sfa, b, sfb, d, c, ks)


def m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, m_indices, out=None):
    """Rows of A grouped by m_indices (int32 group id per row, -1 = padding, skipped and not written); group g
    multiplies by B[g]. Each group's rows must be padded to a multiple of 128 (get_m_alignment_for_contiguous_layout)."""
    d = out if out is not None else torch.empty(a.shape[0], b.shape[1], dtype=torch.bfloat16, device=a.device)
    kernel_for("m_grouped_fp8_gemm_nt_contiguous", a, sfa, b, sfb, d, m_indices)(a, sfa, b, sfb, d, m_indices)
    return d


def m_indices_from_offsets(ends: torch.Tensor, m_sum: int, alignment: int = 128) -> torch.Tensor:
    """The cumulative-offset layout -> per-row group ids. `ends` int32 [G] holds each group's end row (exclusive);
    group g starts at ends[g-1] rounded up to `alignment`. Rows in the gaps get -1. An end below the one before it
    counts as that one (an empty group), so the ids never go down. Runs on the device, no sync."""
    ends = ends.to(torch.int64)
    if ends.numel():
        ends = torch.cummax(ends, 0).values
    starts = torch.cat([ends.new_zeros(1), (ends[:-1] + alignment - 1) // alignment * alignment])
    rows = torch.arange(m_sum, device=ends.device)
    g = torch.searchsorted(ends, rows, right=True)
    gc = g.clamp_max(ends.numel() - 1)
    valid = (g < ends.numel()) & (rows >= starts[gc])
    return torch.where(valid, gc, -1).to(torch.int32)


def m_grouped_fp8_gemm_nt_contiguous_offsets(a, sfa, b, sfb, ends, out=None, alignment: int = 128):
    """Cumulative-offset form of the contiguous grouped GEMM (DeepGEMM's psum layout): `ends` int [G], one end row
    per group of b (an end below the previous one makes that group empty)."""
    op = "m_grouped_fp8_gemm_nt_contiguous_offsets"
    if not (ends.dim() == 1 and not ends.is_floating_point() and not ends.is_complex()):
        raise TypeError(f"{op}: ends must be a 1-D integer tensor (each group's end row), got {ends.dtype} "
                        f"{tuple(ends.shape)}")
    if b.dim() == 3 and ends.shape[0] != b.shape[0]:
        raise ValueError(f"{op}: ends has {ends.shape[0]} entries but b has G={b.shape[0]} groups")
    if alignment <= 0 or alignment % checks.ID_BLOCK:
        raise ValueError(f"{op}: alignment must be a positive multiple of {checks.ID_BLOCK}, got {alignment}")
    m_indices = m_indices_from_offsets(ends, a.shape[0], alignment)
    # ids in [-1, G) and groups starting at multiples of 128 by construction: no data check (host sync) needed
    checks.IDS_CHECKED.note((m_indices,), (b.shape[0],))
    return m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, m_indices, out)


def m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, masked_m, expected_m: int, out=None):
    """A [G, M_max, K], B [G, N, K]; only the first masked_m[g] rows of each group are computed and written.
    masked_m stays on the device; expected_m is a host hint for the block-size choice (CUDA-graph safe)."""
    d = out if out is not None else torch.empty(a.shape[0], a.shape[1], b.shape[1], dtype=torch.bfloat16,
                                                device=a.device)
    kernel_for("m_grouped_fp8_gemm_nt_masked", a, sfa, b, sfb, d, masked_m)(a, sfa, b, sfb, d, masked_m,
                                                                             int(expected_m))
    return d


def per_block_quant_fp8(x, transpose: bool = False, eps: float = 1e-4, scale_ue8m0: bool = False):
    """x [N, K] -> (q e4m3 [N, K], scales fp32 [ceil(N/128), ceil(K/128)]) per 128x128 block; with transpose=True
    q is [K, N] and scales [ceil(K/128), ceil(N/128)] (the B operand of the data-gradient GEMM)."""
    return kernel_for("per_block_quant_fp8", x)(x, transpose, eps, scale_ue8m0)


def per_block_quant_fp8_dual(x, eps: float = 1e-4, scale_ue8m0: bool = False):
    """Both orientations of per_block_quant_fp8 in one pass over x: (q [N, K], sf [ceil(N/128), ceil(K/128)],
    q^T [K, N], sf^T [ceil(K/128), ceil(N/128)]), each equal to the single-orientation call's result."""
    return kernel_for("per_block_quant_fp8_dual", x)(x, eps, scale_ue8m0)


def per_token_group_quant_fp8_t(x, eps: float = 1e-4, scale_ue8m0: bool = False):
    """x [M, K] -> (q e4m3 [K, M], scales fp32 [K, ceil(M/128)] MN-major), quantised per 128 consecutive rows of
    each column: the operands of the weight-gradient GEMM. q's rows are padded to 16 bytes (zeros)."""
    return kernel_for("per_token_group_quant_fp8_t", x)(x, eps, scale_ue8m0)


def per_token_group_quant_fp8_dual(x, eps: float = 1e-4, scale_ue8m0: bool = False):
    """x [M, K] (K a multiple of 128) in both activation layouts from one pass over x: (q [M, K], per-token 1x128
    scales [M, K/128] MN-major) as per_token_group_quant_fp8 gives them, and (q^T [K, M], scales [K, ceil(M/128)])
    as per_token_group_quant_fp8_t does; bit for bit those ops' results."""
    return kernel_for("per_token_group_quant_fp8_dual", x)(x, eps, scale_ue8m0)


def scales_shape(m: int, k: int) -> tuple[int, int]:
    return m, cdiv(k, 128)


def moe_combine(y, rows, weights, check_rows: bool = True):
    """out[t] = sum_c weights[t, c] * y[rows[t, c]] (rows -1: an empty slot), summed in fp32, in y's dtype: the
    combine of a MoE layer whose expert outputs y [M, hidden] are rows of a sorted layout. weights float32 [T, k];
    each row of y feeds at most one slot. check_rows reads rows on the host once (range, no repeats); callers that
    build rows themselves pass False. Differentiable in y and weights."""
    return kernel_for("moe_combine", y, rows, weights)(y, rows, weights, check_rows)


def swiglu(h):
    """silu(gate) * up of h = [gate | up] ([rows, 2F]), computed in fp32 and rounded once, in one pass; its gradient
    (`swiglu_backward`) is one [rows, 2F] tensor, also one pass. Differentiable."""
    return kernel_for("swiglu", h)(h)
