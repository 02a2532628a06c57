"""Input validation of the FP8 GEMM ops: every constraint named in one place, with errors that name the argument.

Constraints (SM90 kernels; the CPU reference accepts the same inputs):
  - A and B are float8_e4m3fn, contiguous in K (stride(-1) == 1). K % 16 == 0 and every row stride is a multiple of
    16 elements, with 16-byte aligned base pointers: TMA reads rows in 16-byte units. K need not be a multiple
    of 128: the last 128-wide K slice is zero-filled.
  - M >= 0 and N >= 0 are free (an empty D is a no-op). Output D is bf16 or fp32 (fp32 only for the
    weight-gradient GEMMs), contiguous in N; when N is even its row stride must be even (pairs of columns are
    stored together).
  - Scales are float32. SFA [.., M, ceil(K/128)] in any layout (converted in one copy when it is not MN-major
    TMA-aligned). SFB [.., ceil(N/128), ceil(K/128)] in any strides (1D2D), or [N, ceil(K/128)] per row (wgrad).
  - Contiguous grouped: m_indices values in [-1, G), and each 128-row block of A holds rows of at most one group
    (plus -1 padding rows): the kernel takes one group per block (data check, `check_m_indices_values`).
  - Masked grouped: masked_m[g] > M_max counts as M_max (the kernel never writes past a group's rows).
"""
from __future__ import annotations

import os

import torch

from torch_deepstack.checks import CheckedData, check_same_device  # noqa: F401  (re-exported for the area)

FP8 = torch.float8_e4m3fn
OUT_DTYPES = (torch.bfloat16, torch.float32)


def cdiv(a, b):
    return (a + b - 1) // b


def _check(cond, msg):
    """`msg` is a callable, so the eager fast path builds no strings; symbolic conditions go to torch._check."""
    if cond is True:
        return
    if cond is False:
        raise RuntimeError(msg())
    torch._check(cond, msg)


def check_fp8_operand(op: str, name: str, t: torch.Tensor, dims: int) -> None:
    _check(t.dtype == FP8, lambda: f"{op}: {name} must be torch.float8_e4m3fn, got {t.dtype}")
    _check(t.dim() == dims, lambda: f"{op}: {name} must have {dims} dims, got shape {tuple(t.shape)}")
    _check(t.stride(-1) == 1, lambda: f"{op}: {name} must be contiguous in K (stride(-1) == 1), got strides {t.stride()}")
    _check(t.shape[-1] % 16 == 0,
           lambda: f"{op}: K={t.shape[-1]} must be a multiple of 16 (FP8 rows are read in 16-byte TMA units)")
    n_el = t.numel()
    if type(n_el) is int and n_el == 0:   # nothing is read (K = 0: D = C or zeros): any strides
        return
    for s in t.stride()[:-1]:
        _check(s % 16 == 0, lambda: f"{op}: {name} row strides must be multiples of 16 elements, got {t.stride()}")


def check_scales(op: str, name: str, sf: torch.Tensor, shape: tuple) -> None:
    _check(sf.dtype == torch.float32, lambda: f"{op}: {name} must be float32, got {sf.dtype}")
    _check(tuple(sf.shape) == tuple(shape), lambda: f"{op}: {name} must have shape {tuple(shape)}, got {tuple(sf.shape)}")


def check_out(op: str, name: str, d: torch.Tensor, shape: tuple, dtypes=OUT_DTYPES) -> None:
    _check(d.dtype in dtypes, lambda: f"{op}: {name} must be one of {dtypes}, got {d.dtype}")
    _check(tuple(d.shape) == tuple(shape), lambda: f"{op}: {name} must have shape {tuple(shape)}, got {tuple(d.shape)}")
    n_el = d.numel()
    if type(n_el) is int and n_el == 0:   # nothing is stored (M or N = 0): any strides (symbolic sizes: no guard)
        return
    _check(d.stride(-1) == 1, lambda: f"{op}: {name} must be contiguous in N (stride(-1) == 1), got strides {d.stride()}")
    if shape[-1] % 2 == 0:
        _check(all(s % 2 == 0 for s in d.stride()[:-1]),
               lambda: f"{op}: {name} row strides must be even when N is even, got {d.stride()}")


def check_dense(op, a, sfa, b, sfb, d, c, sf_b_per_row=False, out_dtypes=OUT_DTYPES):
    check_fp8_operand(op, "a", a, 2)
    check_fp8_operand(op, "b", b, 2)
    m, k = a.shape
    n = b.shape[0]
    _check(b.shape[1] == k, lambda: f"{op}: a is [M, K]=[{m}, {k}] but b is {tuple(b.shape)}; b must be [N, K]")
    kb = cdiv(k, 128)
    check_scales(op, "sfa", sfa, (m, kb))
    check_scales(op, "sfb", sfb, (n, kb) if sf_b_per_row else (cdiv(n, 128), kb))
    check_out(op, "d", d, (m, n), out_dtypes)
    if c is not None:
        check_out(op, "c", c, (m, n))
    check_same_device(op, a=a, sfa=sfa, b=b, sfb=sfb, d=d, c=c)


def check_grouped_b(op, b, sfb, k):
    check_fp8_operand(op, "b", b, 3)
    g, n, kk = b.shape
    _check(kk == k, lambda: f"{op}: a has K={k} but b is {tuple(b.shape)}; b must be [G, N, K]")
    check_scales(op, "sfb", sfb, (g, cdiv(n, 128), cdiv(k, 128)))
    return g, n


def check_contiguous(op, a, sfa, b, sfb, d, m_indices):
    check_fp8_operand(op, "a", a, 2)
    m, k = a.shape
    g, n = check_grouped_b(op, b, sfb, k)
    check_scales(op, "sfa", sfa, (m, cdiv(k, 128)))
    check_out(op, "d", d, (m, n), (torch.bfloat16,))
    _check(m_indices.dtype == torch.int32 and tuple(m_indices.shape) == (m,),
           lambda: f"{op}: m_indices must be int32 [M_sum]=[{m}] (group id per row, -1 for padding), got "
           f"{m_indices.dtype} {tuple(m_indices.shape)}")
    check_same_device(op, a=a, sfa=sfa, b=b, sfb=sfb, d=d, m_indices=m_indices)


# Group-id tensors that passed check_m_indices_values, at their versions (FP8Experts notes the layouts it builds).
IDS_CHECKED = CheckedData()
ID_BLOCK = 128   # rows per block that may hold only one group (get_m_alignment_for_contiguous_layout)


def check_m_indices_values(op: str, m_indices: torch.Tensor, num_groups: int) -> None:
    """Reads the ids (one host sync on a GPU): each in [-1, num_groups), and at most one group per 128-row block,
    since the kernel multiplies a block's rows by one group's B (a group starting mid-block, after another group's
    rows, would use the wrong B)."""
    if m_indices.numel() == 0:
        return
    ids = m_indices.long()
    blocks = torch.nn.functional.pad(ids, (0, (-ids.numel()) % ID_BLOCK), value=-1).view(-1, ID_BLOCK)
    hi = blocks.max(1).values
    lo = torch.where(blocks >= 0, blocks, torch.full_like(blocks, num_groups)).min(1).values
    nb = blocks.shape[0]
    mixed = (hi >= 0) & (lo != hi)
    first_mixed = torch.where(mixed, torch.arange(nb, device=ids.device), nb).min()
    lo_all, hi_all, first_mixed = torch.stack([ids.min(), ids.max(), first_mixed]).tolist()   # the one sync
    if lo_all < -1 or hi_all >= num_groups:
        raise ValueError(f"{op}: m_indices holds group ids in [{lo_all}, {hi_all}]; valid are -1 (padding row) and "
                         f"0..{num_groups - 1} (b has G={num_groups} groups)")
    if first_mixed < nb:
        r = first_mixed * ID_BLOCK
        raise ValueError(f"{op}: m_indices rows {r}..{r + ID_BLOCK - 1} hold more than one group id; each group's rows "
                         f"must start at a multiple of {ID_BLOCK} (pad with -1 rows, "
                         f"get_m_alignment_for_contiguous_layout)")


def check_m_indices_once(op: str, m_indices: torch.Tensor, num_groups: int) -> None:
    """check_m_indices_values unless these ids passed at their current version; skipped during CUDA-graph capture
    (no host sync there, as the MLA and EP data checks) and with DEEPSTACK_GEMM_CHECK_IDS=0 (for callers that pass
    new, known-good id tensors every call and cannot afford the sync)."""
    if os.environ.get("DEEPSTACK_GEMM_CHECK_IDS", "1") == "0":
        return
    IDS_CHECKED.check_eager((m_indices,), (num_groups,), lambda: check_m_indices_values(op, m_indices, num_groups))


def check_masked(op, a, sfa, b, sfb, d, masked_m, expected_m):
    check_fp8_operand(op, "a", a, 3)
    ga, m, k = a.shape
    g, n = check_grouped_b(op, b, sfb, k)
    _check(ga == g, lambda: f"{op}: a has {ga} groups but b has {g}")
    check_scales(op, "sfa", sfa, (g, m, cdiv(k, 128)))
    check_out(op, "d", d, (g, m, n), (torch.bfloat16,))
    _check(d.stride(0) == m * d.stride(1), lambda: f"{op}: d groups must be packed (stride(0) == M_max * stride(1)), got {d.stride()}")
    _check(a.stride(0) == m * a.stride(1), lambda: f"{op}: a groups must be packed (stride(0) == M_max * stride(1)), got {a.stride()}")
    _check(masked_m.dtype == torch.int32 and tuple(masked_m.shape) == (g,),
           lambda: f"{op}: masked_m must be int32 [G]=[{g}], got {masked_m.dtype} {tuple(masked_m.shape)}")
    _check(expected_m >= 0, lambda: f"{op}: expected_m must be >= 0, got {expected_m}")
    check_same_device(op, a=a, sfa=sfa, b=b, sfb=sfb, d=d, masked_m=masked_m)


def check_k_grouped(op, a, sfa, b, sfb, d, ks, c):
    check_fp8_operand(op, "a", a, 2)
    check_fp8_operand(op, "b", b, 2)
    m, k_sum = a.shape
    n = b.shape[0]
    _check(b.shape[1] == k_sum, lambda: f"{op}: a is [M, sum(ks)]={tuple(a.shape)}, b must be [N, {k_sum}], got {tuple(b.shape)}")
    _check(len(ks) >= 1 and all(int(x) >= 0 and int(x) % 128 == 0 for x in ks),
           lambda: f"{op}: ks must list each group's K, each a multiple of 128 (0 allowed), got {list(ks)}")
    _check(sum(int(x) for x in ks) == k_sum, lambda: f"{op}: sum(ks)={sum(int(x) for x in ks)} must equal a.shape[1]={k_sum}")
    check_scales(op, "sfa", sfa, (m, k_sum // 128))
    check_scales(op, "sfb", sfb, (n, k_sum // 128))
    check_out(op, "d", d, (len(ks), m, n))   # fp32, or bf16 (a bf16 weight's gradient without a separate cast)
    if c is not None:
        check_out(op, "c", c, (len(ks), m, n))
    check_same_device(op, a=a, sfa=sfa, b=b, sfb=sfb, d=d, c=c)


def check_quant_input(op: str, x: torch.Tensor) -> None:
    """The GEMM-side quantisers' input: 2-D bf16 / fp16 / fp32."""
    torch._check(x.dim() == 2, lambda: f"{op}: x must be 2-D [rows, cols], got shape {tuple(x.shape)}")
    torch._check(x.dtype in (torch.bfloat16, torch.float16, torch.float32),
                 lambda: f"{op}: x must be bfloat16, float16 or float32, got {x.dtype}")


def check_dual_token_quant_input(op: str, x: torch.Tensor) -> None:
    """per_token_group_quant_fp8_dual's input: as check_quant_input, and K a multiple of 128."""
    check_quant_input(op, x)
    torch._check(x.shape[1] % 128 == 0,
                 lambda: f"{op}: x's last dim K={x.shape[1]} must be a multiple of 128 (the per-token 1x128 groups)")


MOE_COMBINE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_moe_y_rows(op: str, y, rows) -> None:
    _check(y.dim() == 2, lambda: f"{op}: y must be [rows, hidden], got shape {tuple(y.shape)}")
    _check(y.dtype in MOE_COMBINE_DTYPES, lambda: f"{op}: y must be one of {MOE_COMBINE_DTYPES}, got {y.dtype}")
    _check(rows.dim() == 2 and rows.dtype in (torch.int32, torch.int64),
           lambda: f"{op}: rows must be int32/int64 [tokens, k], got {rows.dtype} {tuple(rows.shape)}")


def check_moe_combine(op: str, y, rows, weights) -> None:
    """Shapes and dtypes of moe_combine (the rows' values are checked separately: that reads them)."""
    _check_moe_y_rows(op, y, rows)
    _check(weights.dtype == torch.float32,
           lambda: f"{op}: weights must be float32 (call .float()), got {weights.dtype}")
    _check(tuple(weights.shape) == tuple(rows.shape),
           lambda: f"{op}: weights must have rows' shape {tuple(rows.shape)}, got {tuple(weights.shape)}")
    check_same_device(op, y=y, rows=rows, weights=weights)


def check_moe_rows(op: str, rows: torch.Tensor, num_rows: int) -> None:
    """rows' values: each in [-1, num_rows) and no row of y named twice (the backward gathers each row's gradient
    from the one slot that reads it). One host sync: both counts come back together."""
    flat = rows.reshape(-1).long()
    in_range = (flat >= -1) & (flat < num_rows)
    # uses per row of y, empty and bad slots in a spare entry (no boolean indexing or bincount: both would sync)
    uses = torch.zeros(num_rows + 1, dtype=torch.int32, device=rows.device).scatter_add_(
        0, torch.where(in_range & (flat >= 0), flat, num_rows), torch.ones_like(flat, dtype=torch.int32))
    n_bad, n_dup = torch.stack([in_range.logical_not().sum(), uses[:num_rows].gt(1).sum()]).tolist()
    if n_bad:
        raise ValueError(f"{op}: rows holds {n_bad} values outside [-1, {num_rows}) (y has {num_rows} rows; -1 "
                         f"marks an empty slot)")
    if n_dup:
        raise ValueError(f"{op}: rows names {n_dup} row(s) of y more than once; each row of y may feed one "
                         f"(token, slot)")


# rows tensors known to lie in [-1, len(y)) at their versions: checked by moe_combine, or built so (FP8Experts).
ROWS_CHECKED = CheckedData()


def check_moe_rows_range(op: str, rows: torch.Tensor, num_rows: int) -> None:
    """rows' values in [-1, num_rows) (duplicates allowed). One host sync on a GPU."""
    if rows.numel() == 0:
        return
    lo, hi = torch.stack([rows.min(), rows.max()]).tolist()
    if lo < -1 or hi >= num_rows:
        raise ValueError(f"{op}: rows holds values in [{lo}, {hi}]; valid are -1 (empty slot) and 0..{num_rows - 1} "
                         f"(y has {num_rows} rows)")


def check_moe_rows_range_once(op: str, rows: torch.Tensor, num_rows: int) -> None:
    """check_moe_rows_range unless these rows passed (or were noted) at their version; not under CUDA-graph capture."""
    ROWS_CHECKED.check_eager((rows,), (num_rows,), lambda: check_moe_rows_range(op, rows, num_rows))


def check_moe_combine_weight_grad(op: str, grad, y, rows) -> None:
    _check_moe_y_rows(op, y, rows)
    _check(grad.dtype == y.dtype and grad.dim() == 2 and grad.shape[0] == rows.shape[0]
           and grad.shape[1] == y.shape[1],
           lambda: f"{op}: grad must be {y.dtype} [{rows.shape[0]}, {y.shape[1]}] (the combine output's gradient), "
           f"got {grad.dtype} {tuple(grad.shape)}")
    check_same_device(op, grad=grad, y=y, rows=rows)


def check_swiglu(op: str, h, grad=None) -> None:
    """h [rows, 2F] (gate columns, then up columns) contiguous in its last dim; grad, if given, [rows, F] like h."""
    _check(h.dim() == 2 and h.shape[1] % 2 == 0,
           lambda: f"{op}: h must be [rows, 2F] (gate columns, then up columns), got shape {tuple(h.shape)}")
    _check(h.dtype in MOE_COMBINE_DTYPES, lambda: f"{op}: h must be one of {MOE_COMBINE_DTYPES}, got {h.dtype}")
    _check(h.stride(1) == 1 or h.shape[1] <= 1, lambda: f"{op}: h must be contiguous in its last dim, got strides "
                                                         f"{h.stride()}")
    if grad is not None:
        _check(grad.dtype == h.dtype and tuple(grad.shape) == (h.shape[0], h.shape[1] // 2),
               lambda: f"{op}: grad must be {h.dtype} [{h.shape[0]}, {h.shape[1] // 2}], got {grad.dtype} "
               f"{tuple(grad.shape)}")
        check_same_device(op, grad=grad, h=h)
