"""The register-A FP8 few-rows kernel (mla_decode_fp8_regs.cuh, 16 and 32 q rows): no K tile in shared memory, both
wgmma A operands converted from the raw rows (exact e4m3 -> f16), the f16 path's scale handling (per-group S^T folded
in fp32, four scaled P^T copies, per-group running exponents), two worker warpgroups merged per request.

The f16 path's cases (test_mla_fp8_f16_cuda.py: reference cases with the issue's tolerances, scales 2^-22 .. 2^5
changing by page, q rows 2^-30 .. 400 apart, NaN in unused slots, s_k = 0, forced splits, h_kv = 2, causal) run on
this kernel at 16 rows and again at 32 rows, and its results are compared with the shared-memory kernel's. The
32-row cases run in four forms: workers on alternate pages, and the channel-split variant (kernels._FP8_REGS_SPLIT32,
the default since 2026-11-30: both workers on every page, each with two of the four 128-channel groups) plain, with
its row-split softmax (-DDEEPSTACK_FP8R_SPLIT_ROWS=1), with that and one code copy per worker, with LEAN, and in the
split's A/B forms (kernels._FP8_SPLIT32_AB_DEFINES: FAST_SOFTMAX, WK_SHFL, SPLIT_XV, SPLIT_P2VOTE; the last form is
the default build since 2026-11-30 05:16 UTC), all with the same tolerances; the A/B forms are also bit-identical to
the LEAN build. The 16-row cases also run with the raw ring in 2 and 4 stages per page
(kernels._FP8_REGS16_SUBPAGES, -DDEEPSTACK_FP8R_SUBPAGES), which must give bit-identical results.
"""
from __future__ import annotations


import pytest
import torch

import torch_deepstack  # noqa: F401
from tests.mla.mla_data import assert_mla_close, decode_and_reference, make_case, varied_lengths
from tests.mla.test_mla_early_q_cuda import FP8_CASES as SHORT_CASES
from tests.mla.test_mla_early_q_cuda import SHORT_LENS
from tests.mla.test_mla_fp8_f16_cuda import CASES, check_q_rows_far_apart, check_scales_far_apart

pytestmark = pytest.mark.cuda


# kernels._FP8_REGS16_AB_DEFINES ("alt" at 16 rows: no switch)
_R16_FORMS = {"lean": 0, "leanfast": 1, "leanfastshfl": 2}


# kernels._FP8_SPLIT32_AB_DEFINES (32-row split forms: FAST_SOFTMAX, WK_SHFL, both, + SPLIT_XV + SPLIT_P2VOTE)
_R32_FORMS = {"split32fast": 1, "split32shfl": 2, "split32fastshfl": 3, "split32fastxv": 4, "split32fastshflxv": 5}


@pytest.fixture(params=["alt", "split32", "split32rows", "split32rowscopies", "split32lean", "sub2", "sub4",
                        *_R16_FORMS, *_R32_FORMS])
def regs_kernel(request, monkeypatch):
    """Every FP8 few-rows call takes the register-A kernel; at 32 rows the workers on alternate pages, the
    channel-split variant, that variant with its row-split softmax, or with both switches, and that with LEAN, and
    the split's A/B forms (_R32_FORMS; the last is the default build); at 16 rows without the worker-chain switches,
    with LEAN, LEAN + FAST_SOFTMAX, + WK_SHFL (the default build), and the raw ring in 2 or 4 stages per page.
    Returns the form's name."""
    from torch_deepstack.mla import kernels
    monkeypatch.setattr(kernels, "_FP8_SMALL_KERNEL", "regs")
    monkeypatch.setattr(kernels, "_FP8_REGS_SPLIT32", request.param.startswith("split"))
    monkeypatch.setattr(kernels, "_FP8_REGS16_SUBPAGES", int(request.param[3:]) if request.param.startswith("sub")
                        else 1)
    if request.param in _R16_FORMS or request.param == "alt":   # (the sub-page forms: on the default build)
        monkeypatch.setattr(kernels, "_FP8_REGS16_DEFINES", kernels._FP8_REGS16_AB_DEFINES[_R16_FORMS[request.param]]
                            if request.param in _R16_FORMS else ())
    monkeypatch.setattr(kernels, "_FP8_SPLIT32_FORM", 0)   # (DEEPSTACK_MLA_FP8_R32 may pick another default form)
    if request.param.startswith("split"):
        if request.param in _R32_FORMS:
            monkeypatch.setattr(kernels, "_FP8_SPLIT32_DEFINES",
                                kernels._FP8_SPLIT32_AB_DEFINES[_R32_FORMS[request.param] - 1])
        elif request.param == "split32lean":   # both switches and LEAN (the A/B candidate)
            monkeypatch.setattr(kernels, "_FP8_SPLIT32_DEFINES", kernels._FP8_SPLIT32_LEAN_DEFINES)
        else:
            _split_switches(monkeypatch, rows="rows" in request.param, copies="copies" in request.param)
    return request.param


def test_split_32_rows_defaults_to_fast_shfl_xv_p2vote():
    """Switched on, the split builds form 5 (both switches' row split, LEAN, FAST_SOFTMAX, WK_SHFL instead of the
    code copies, SPLIT_XV, SPLIT_P2VOTE), and that kernel and the previous LEAN build are in the prebuild list."""
    from torch_deepstack import jit
    from torch_deepstack.mla import kernels
    assert kernels._FP8_SPLIT32_DEFINES == kernels._FP8_SPLIT32_FAST_DEFINES == kernels._FP8_SPLIT32_AB_DEFINES[4]
    assert kernels._FP8_SPLIT32_LEAN_DEFINES == kernels._FP8_SPLIT_AB_DEFINES[2] + (("DEEPSTACK_FP8R_LEAN", 1),)
    for defines in (kernels._FP8_SPLIT32_DEFINES, kernels._FP8_SPLIT32_LEAN_DEFINES):
        assert kernels.fp8_regs_spec(32, True, defines) in jit.prebuild_specs()


def _split_switches(monkeypatch, rows: int = 1, copies: int = 0) -> None:
    """The split kernel's A/B switches: -DDEEPSTACK_FP8R_SPLIT_ROWS (row-split softmax), -DDEEPSTACK_FP8R_SPLIT_COPIES
    (one code copy per worker), in the order of kernels._FP8_SPLIT_AB_DEFINES (prebuilt)."""
    from torch_deepstack.mla import kernels
    extra = (("DEEPSTACK_FP8R_SPLIT_ROWS", 1),) * bool(rows) + (("DEEPSTACK_FP8R_SPLIT_COPIES", 1),) * bool(copies)
    monkeypatch.setattr(kernels, "_FP8_SPLIT32_DEFINES", extra)
    monkeypatch.setattr(kernels, "_FP8_SPLIT32_FORM", 0)


def _skip_split_at_16_rows(form: str, rows: int) -> None:
    """Skip the forms that do not apply at this row count (they would run the 'alt' kernel again)."""
    if form.startswith("split") and rows <= 16:
        pytest.skip("the channel-split variant is a 32-row kernel (16 rows: same kernel as 'alt')")
    if (form.startswith("sub") or form in _R16_FORMS) and rows > 16:
        pytest.skip("a 16-row switch (32 rows: same kernel as 'alt')")


def test_16_rows_default_to_lean_fast_softmax_wk_shfl():
    """The 16-row build takes LEAN + FAST_SOFTMAX + WK_SHFL, and that kernel is in the prebuild list."""
    from torch_deepstack import jit
    from torch_deepstack.mla import kernels
    assert kernels._FP8_REGS16_DEFINES == kernels._FP8_REGS16_AB_DEFINES[2]
    assert kernels.fp8_regs_spec(16, False, kernels._fp8_regs16_defines()) in jit.prebuild_specs()


def test_subpage_rings_prebuilt_and_fit():
    """The 16-row ring in 2 and 4 stages per page is prebuilt, and the launch passes enough shared memory for it."""
    from torch_deepstack import jit
    from torch_deepstack.mla import kernels
    for sub in (2, 4):
        defines = tuple(kernels._FP8_REGS16_DEFINES) + (("DEEPSTACK_FP8R_SUBPAGES", sub),)
        assert kernels.fp8_regs_spec(16, False, defines) in jit.prebuild_specs()
        assert kernels.fp8_regs_layout_bytes(16, False, sub) <= kernels.fp8_regs_smem_bytes(16) <= 232448


@pytest.mark.parametrize("form", [1, 2])
@pytest.mark.parametrize("h_kv,parts", [(1, 0), (1, 7), (2, 5)])
def test_fp8_regs_fast_softmax_equals_lean(form, h_kv, parts, monkeypatch):
    """FAST_SOFTMAX (a barrier vote skips the max reduction when no running maximum moves: the same decisions) and
    WK_SHFL (the worker index through a shuffle) change no arithmetic: bit-identical to LEAN alone. Scales far apart
    by page make M_g move mid-request, so both softmax paths run."""
    from torch_deepstack.mla import kernels
    monkeypatch.setattr(kernels, "_FP8_SMALL_KERNEL", "regs")
    case = _forms_case(16, h_kv, parts, seed=5)
    _assert_forms_bit_identical(case, lambda f: monkeypatch.setattr(kernels, "_FP8_REGS16_DEFINES",
                                                                    kernels._FP8_REGS16_AB_DEFINES[f]), (0, form))


def test_split32_forms_prebuilt(monkeypatch):
    """Every 32-row split A/B form is in the prebuild list, and _FP8_SPLIT32_FORM picks it."""
    from torch_deepstack import jit
    from torch_deepstack.mla import kernels
    specs = jit.prebuild_specs()
    for k, defines in enumerate(kernels._FP8_SPLIT32_AB_DEFINES, 1):
        assert kernels.fp8_regs_spec(32, True, defines) in specs
        monkeypatch.setattr(kernels, "_FP8_SPLIT32_FORM", k)
        assert kernels._fp8_split32_defines() == defines


@pytest.mark.parametrize("form", sorted(_R32_FORMS.values()))
@pytest.mark.parametrize("h_kv,parts", [(1, 0), (1, 7), (2, 5)])
def test_fp8_split32_forms_equal_default(form, h_kv, parts, monkeypatch):
    """The 32-row split's A/B forms change no arithmetic: FAST_SOFTMAX (each worker's vote skips the max reduction on
    pages that move no running maximum of its rows and no group exponent), WK_SHFL instead of the code copies,
    SPLIT_XV (float4 exchange) and SPLIT_P2VOTE (rescale factors read only when one moved) are bit-identical to the
    LEAN build. Scales far apart by page make M_g move mid-request, so both softmax paths and the rescale run."""
    from torch_deepstack.mla import kernels
    monkeypatch.setattr(kernels, "_FP8_SMALL_KERNEL", "regs")
    monkeypatch.setattr(kernels, "_FP8_REGS_SPLIT32", True)
    monkeypatch.setattr(kernels, "_FP8_SPLIT32_DEFINES", kernels._FP8_SPLIT32_LEAN_DEFINES)
    case = _forms_case(32, h_kv, parts, seed=6)
    _assert_forms_bit_identical(case, lambda f: monkeypatch.setattr(kernels, "_FP8_SPLIT32_FORM", f), (0, form))


@pytest.mark.parametrize("sub", [2, 4])
@pytest.mark.parametrize("h_kv,parts", [(1, 0), (1, 7), (2, 5)])
def test_fp8_regs_subpage_ring_equals_whole_pages(sub, h_kv, parts, monkeypatch):
    """The ring in sub-stages changes only where the bytes wait, not the arithmetic: bit-identical results (short
    last pages whose later sub-stages hold no new bytes, split requests, h_kv 2's per-token copies)."""
    from torch_deepstack.mla import kernels
    monkeypatch.setattr(kernels, "_FP8_SMALL_KERNEL", "regs")
    case = _forms_case(16, h_kv, parts, seed=4, scaled=False, short=(17, 40))   # a page's second half / last quarters empty
    _assert_forms_bit_identical(case, lambda s: monkeypatch.setattr(kernels, "_FP8_REGS16_SUBPAGES", s), (1, sub))


def _forms_case(rows: int, h_kv: int, parts: int, seed: int, scaled: bool = True, short: tuple = (17,)):
    """Six requests (one empty, short ones at index 2, 3, ...) with `rows` q rows per KV head and their metadata for
    `parts` SM parts (0: the GPU's). h_kv = 1 and `scaled`: group magnitudes 1e-4 .. 1e4 changing by page (so M_g
    moves mid-request); otherwise a plain FP8 case."""
    from torch_deepstack.mla import get_mla_metadata
    from tests.mla.test_mla_fp8_f16_cuda import _scaled_fp8_case
    lens = varied_lengths(6, 900, seed=seed, zeros=(1,))
    for i, n in enumerate(short, 2):
        lens[i] = n
    if h_kv == 1 and scaled:
        q, cache, bt, seq = _scaled_fp8_case(lens, 1, rows, seed=seed, q_scale=3e-2)
    else:
        q, cache, bt, seq = make_case(6, 1, rows * h_kv, h_kv, 576, torch.bfloat16, lens, fp8=True, device="cuda",
                                      seed=seed)
    sched, splits = get_mla_metadata(seq, rows, h_kv, num_sm_parts=parts)
    return q, cache, bt, seq, sched, splits


def _assert_forms_bit_identical(case, set_form, forms) -> None:
    """Decode `case` under each of the two forms (set_form(f) selects one) and require identical out and lse."""
    from torch_deepstack.mla import mla_decode_with_kvcache
    q, cache, bt, seq, sched, splits = case
    res = []
    for f in forms:
        set_form(f)
        res.append(mla_decode_with_kvcache(q, cache, bt, seq, 512, sched, splits, is_fp8_kvcache=True))
    assert torch.equal(res[0][0], res[1][0])
    assert torch.equal(res[0][1], res[1][1])


CASES_32 = [  # b, s_q, h_q, h_kv, mean s_k, causal, zero-length requests: 17..32 rows per KV head
    (4, 1, 32, 1, 700, False, (1,)),
    (3, 2, 16, 1, 300, True, (0,)),   # causal, 32 rows
    (2, 1, 64, 2, 200, False, ()),    # h_kv 2 (per-token copies), 32 rows each
    (5, 1, 21, 1, 150, False, (4,)),  # odd h_q: 11 zero rows in the tile
    (2, 1, 32, 1, 2000, False, ()),   # long requests
]


@pytest.mark.parametrize("parts", [0, 7])
@pytest.mark.parametrize("case", CASES + CASES_32, ids=lambda c: f"b{c[0]}sq{c[1]}hq{c[2]}hk{c[3]}")
def test_fp8_regs_matches_reference(case, parts, regs_kernel):
    b, s_q, h_q, h_kv, mean, causal, zeros = case
    _skip_split_at_16_rows(regs_kernel, s_q * h_q // h_kv)
    lens = varied_lengths(b, mean, s_q, seed=21, zeros=zeros)
    q, cache, bt, seq = make_case(b, s_q, h_q, h_kv, 576, torch.bfloat16, lens, fp8=True, device="cuda", seed=21)
    assert_mla_close(*decode_and_reference(q, cache, bt, seq, causal, fp8=True, parts=parts))


@pytest.mark.parametrize("h_q", [16, 32])
@pytest.mark.parametrize("parts", [0, 5])
def test_fp8_regs_scales_far_apart(parts, h_q, regs_kernel):
    """Scales 2^-22 .. 2^5 by page, token and group, a group tiny throughout (see test_mla_fp8_f16_cuda)."""
    _skip_split_at_16_rows(regs_kernel, h_q)
    check_scales_far_apart(h_q, parts)


@pytest.mark.parametrize("h_q", [8, 16])
@pytest.mark.parametrize("parts", [0, 3])
def test_fp8_regs_q_rows_far_apart(parts, h_q, regs_kernel):
    """q rows 2^-30 .. 400 in size and a zero row, causal s_q = 2: 16 and 32 rows."""
    _skip_split_at_16_rows(regs_kernel, 2 * h_q)
    check_q_rows_far_apart(h_q, parts)


@pytest.mark.parametrize("parts", [0, 3, 7])
@pytest.mark.parametrize("case", SHORT_CASES, ids=lambda c: f"sq{c[0]}hq{c[1]}hk{c[2]}")
def test_fp8_regs_many_short_pieces_per_part(case, parts, regs_kernel):
    """Many short requests per SM part (the workers' Q barrier and per-request merges), 16 and 32 rows."""
    s_q, h_q, h_kv, causal = case
    _skip_split_at_16_rows(regs_kernel, s_q * h_q // h_kv)
    lens = [max(s, s_q) if s else 0 for s in SHORT_LENS]
    q, cache, bt, seq = make_case(len(lens), s_q, h_q, h_kv, 576, torch.bfloat16, lens, fp8=True, device="cuda",
                                  seed=13)
    assert_mla_close(*decode_and_reference(q, cache, bt, seq, causal, fp8=True, parts=parts))


@pytest.mark.parametrize("h_q,split,rows_split,copies", [(16, False, 0, 0), (32, False, 0, 0), (32, True, 0, 0),
                                                         (32, True, 1, 0), (32, True, 1, 1)],
                         ids=["16", "32", "32split", "32splitrows", "32splitrowscopies"])
def test_fp8_regs_agrees_with_smem_kernel(h_q, split, rows_split, copies, monkeypatch):
    """Long requests split over many SM parts (worker merges and the combine kernel): the register-A kernel and
    the shared-memory kernel give the same result within the reference tolerances of each other."""
    from torch_deepstack.mla import get_mla_metadata, kernels, mla_decode_with_kvcache
    monkeypatch.setattr(kernels, "_FP8_REGS_SPLIT32", split)
    _split_switches(monkeypatch, rows_split, copies)
    lens = varied_lengths(4, 6000, seed=9)
    q, cache, bt, seq = make_case(4, 1, h_q, 1, 576, torch.bfloat16, lens, fp8=True, device="cuda", seed=9)
    sched, splits = get_mla_metadata(seq, h_q, 1)
    res = {}
    for k in ("regs", "smem"):
        monkeypatch.setattr(kernels, "_FP8_SMALL_KERNEL", k)
        res[k] = mla_decode_with_kvcache(q, cache, bt, seq, 512, sched, splits, is_fp8_kvcache=True)
    assert_mla_close(*res["regs"], *res["smem"])


@pytest.mark.parametrize("rows_split,copies", [(0, 0), (1, 0), (0, 1), (1, 1)],
                         ids=["split32", "split32rows", "split32copies", "split32rowscopies"])
def test_fp8_regs_split32_equals_default_closely(rows_split, copies, monkeypatch):
    """The channel-split variant and the default 32-row kernel on the same inputs (split requests included): the
    same arithmetic up to the fp32 order of S^T's partial sums, so far closer than the reference tolerances."""
    from torch_deepstack.mla import get_mla_metadata, kernels, mla_decode_with_kvcache
    monkeypatch.setattr(kernels, "_FP8_SMALL_KERNEL", "regs")
    _split_switches(monkeypatch, rows_split, copies)
    lens = varied_lengths(6, 1500, seed=3, zeros=(2,))
    q, cache, bt, seq = make_case(6, 1, 32, 1, 576, torch.bfloat16, lens, fp8=True, device="cuda", seed=3)
    sched, splits = get_mla_metadata(seq, 32, 1, num_sm_parts=5)
    res = {}
    for split in (False, True):
        monkeypatch.setattr(kernels, "_FP8_REGS_SPLIT32", split)
        res[split] = mla_decode_with_kvcache(q, cache, bt, seq, 512, sched, splits, is_fp8_kvcache=True)
    (o0, l0), (o1, l1) = res[False], res[True]
    assert torch.equal(torch.isinf(l0), torch.isinf(l1))
    fin = torch.isfinite(l0)
    torch.testing.assert_close(l1[fin], l0[fin], rtol=1e-5, atol=1e-5)
    # Within two bf16 roundings, with an absolute floor of 2^-10 of the largest |out| for elements made small by
    # cancellation (their error follows the scale of their summands). The H200 (03:45 UTC) measured at most 3.8e-6
    # apart here (26 elements beyond 2^-7 relative + 1e-6, all of them < 4e-4 in size; largest |out| 0.013).
    torch.testing.assert_close(o1.float(), o0.float(), rtol=2.0 ** -6, atol=2.0 ** -10 * float(o0.abs().max()))
