"""FP8 GEMM kernels on the GPU: accuracy vs fp32 matmul of the unquantised inputs, every output element written
(or, for grouped kinds, exactly the valid rows), clear errors, CUDA-graph capture of the masked kind."""
import pytest
import torch

import torch_deepstack  # noqa: F401
from tests.gemm.util import (contiguous_layout, dense_inputs, grouped_b, quant_a, random_group_sizes,
                             wgrad_operand)
from tests.helpers import calc_diff, fresh_randn, poison_, poisoned_empty
from torch_deepstack.gemm import reference as ref
from torch_deepstack.gemm import api
from torch_deepstack.gemm.kernels import k_grouped_per_segment

pytestmark = pytest.mark.cuda
ops = torch.ops.deepstack
DEV = "cuda"
M_VALUES = (1, 7, 64, 65, 129, 4095, 4096)
NK = ((2112, 7168), (200, 256), (576, 7168), (7168, 2048), (24576, 1536), (4096, 7168))


def _check_dense(m, n, k, out_dtype=torch.bfloat16, with_c=False):
    a, b, (aq, asf), (bq, bsf) = dense_inputs(m, n, k, DEV)
    c = fresh_randn(m, n, dtype=out_dtype, device=DEV) if with_c else None
    d = poisoned_empty(m, n, dtype=out_dtype, device=DEV)
    ops.fp8_gemm_nt(aq, asf, bq, bsf, d, c)
    torch.cuda.synchronize()
    assert not d.isnan().any(), f"unwritten outputs at M={m} N={n} K={k}"
    want = a.float() @ b.float().T + (c.float() if with_c else 0)
    diff = calc_diff(d, want)
    assert diff < 1e-3, f"M={m} N={n} K={k}: calc_diff {diff:.2e}"
    # Against the op's own reference (same quantised inputs): only output rounding apart.
    d_ref = torch.empty_like(d)
    ref.fp8_gemm_nt_ref(aq, asf, bq, bsf, d_ref, c)
    torch.testing.assert_close(d.float(), d_ref.float(), rtol=2e-2, atol=1e-2 * float(d_ref.abs().max()) + 1e-6)


@pytest.mark.parametrize("n,k", NK)
@pytest.mark.parametrize("m", M_VALUES)
def test_dense_bf16(m, n, k):
    _check_dense(m, n, k)


@pytest.mark.parametrize("m,n,k", [(129, 200, 256), (4096, 2112, 7168), (7, 7168, 2048), (65, 4000, 512)])
def test_dense_fp32_out_with_c(m, n, k):
    _check_dense(m, n, k, torch.float32, with_c=True)
    _check_dense(m, n, k, torch.bfloat16, with_c=True)


def _runs_by_multicast(monkeypatch, m, n, k, aq, asf, bq, bsf, values, check_plan=None):
    """One dense bf16 call per DEEPSTACK_GEMM_MULTICAST value into a poisoned D; every element must be written.
    check_plan(value, plan) sees the launch plan each value gets."""
    from torch_deepstack.gemm import kernels
    outs = {}
    for mc in values:
        monkeypatch.setenv("DEEPSTACK_GEMM_MULTICAST", mc)
        if check_plan is not None:
            check_plan(mc, kernels._plan(kernels.KIND_DENSE, aq.device, m, 1, n, k, m, False, None, torch.bfloat16,
                                         None))
        d = poisoned_empty(m, n, dtype=torch.bfloat16, device=DEV)
        ops.fp8_gemm_nt(aq, asf, bq, bsf, d)
        torch.cuda.synchronize()
        assert not d.isnan().any(), f"unwritten outputs (multicast={mc})"
        outs[mc] = d
    return outs


@pytest.mark.parametrize("cfg", ["128,128,6", "128,64,8", "128,160,5"])
@pytest.mark.parametrize("m,n,k", [(129, 200, 384), (300, 4096, 1024), (700, 7168, 2048), (4095, 256, 128)])
def test_dense_multicast_clusters_match_single_ctas(monkeypatch, cfg, m, n, k):
    """2-CTA clusters sharing B by multicast, odd cluster counts included (a CTA whose M-block is past M still
    loads its half of B for its peer): every valid row written, and bit-identical to the plain kernel."""
    monkeypatch.setenv("DEEPSTACK_GEMM_CONFIG", cfg)
    a, b, (aq, asf), (bq, bsf) = dense_inputs(m, n, k, DEV)

    def check_plan(mc, plan):
        assert plan[-1] == (2 if mc == "1" else 1)
    outs = _runs_by_multicast(monkeypatch, m, n, k, aq, asf, bq, bsf, ("1", "0"), check_plan)
    assert torch.equal(outs["1"], outs["0"])
    assert calc_diff(outs["1"], a.float() @ b.float().T) < 1e-3


@pytest.mark.parametrize("cfg", ["64,16,10", "64,64,10", "64,112,9", "64,128,8"])
@pytest.mark.parametrize("m,n,k", [(1, 2112, 7168), (64, 200, 384), (65, 4000, 512), (129, 7168, 2048)])
def test_dense_64_row_clusters_sharing_a_match_single_ctas(monkeypatch, cfg, m, n, k):
    """64-row tiles in 2-CTA clusters sharing A (each CTA multicasts 32 of the 64 rows; opt-in): bit-identical to the
    plain kernel, every valid element written, nothing past M or N; an odd number of N-blocks (200 / 64, 4000 / 112,
    7168 / 112 = 64 pairs exactly, 2112 / 16) leaves the last cluster's second CTA without columns where it is odd."""
    monkeypatch.setenv("DEEPSTACK_GEMM_CONFIG", cfg)
    bn = int(cfg.split(",")[1])
    a, b, (aq, asf), (bq, bsf) = dense_inputs(m, n, k, DEV)

    def check_plan(mc, plan):
        assert plan[-1] == (2 if mc == "1" and n > bn else 1)
    outs = _runs_by_multicast(monkeypatch, m, n, k, aq, asf, bq, bsf, ("1", "0"), check_plan)
    assert torch.equal(outs["1"], outs["0"])
    assert calc_diff(outs["1"], a.float() @ b.float().T) < 1e-3


@pytest.mark.parametrize("cfg", ["128,128,6", "128,192,5", "64,128,8", "128,64,8"])
@pytest.mark.parametrize("m,n,k", [(129, 200, 384), (4095, 2112, 1024)])
def test_dense_tma_store_epilogue_matches_plain(monkeypatch, cfg, m, n, k):
    """The TMA-store epilogue gives the plain kernel's bits: every element written, nothing past N or M (TMA clips
    the boxes), and with a D row pitch that is not 16-byte aligned the kernel falls back to direct stores. Tiles
    past M and several tiles per CTA included (4095 rows, 200 columns)."""
    from torch_deepstack.gemm import kernels
    monkeypatch.setenv("DEEPSTACK_GEMM_CONFIG", cfg)
    a, b, (aq, asf), (bq, bsf) = dense_inputs(m, n, k, DEV)
    outs = {}
    for tma in ("0", "1"):
        monkeypatch.setenv("DEEPSTACK_GEMM_TMA_STORE", tma)
        plan_cfg = kernels._plan(kernels.KIND_DENSE, aq.device, m, 1, n, k, m, False, None, torch.bfloat16, None)[1]
        assert plan_cfg.tma_store == (tma == "1")
        for pad in (0, 2):                           # pad 2: row pitch n + 2 elements, not 16-byte aligned
            buf = poisoned_empty(m + 1, n + pad, dtype=torch.bfloat16, device=DEV)
            d = buf[:m, :n]
            ops.fp8_gemm_nt(aq, asf, bq, bsf, d)
            torch.cuda.synchronize()
            assert not d.isnan().any(), f"unwritten outputs (tma={tma}, pad={pad})"
            assert buf[m:].isnan().all() and buf[:, n:].isnan().all(), "written past M or N"
            outs[(tma, pad)] = d.clone()
    for key, d in outs.items():
        assert torch.equal(d, outs[("0", 0)]), f"{key} differs from the plain kernel"
    assert calc_diff(outs[("0", 0)], a.float() @ b.float().T) < 1e-3


def _padded_run(aq, asf, bq, bsf, m, n, pad, what):
    """fp8_gemm_nt into the [M, N] corner of a NaN-poisoned [M + 1, N + pad + 8] buffer (pad 2: a D row pitch that
    is not 16-byte aligned): every element written, nothing past M or N. Returns D."""
    buf = poisoned_empty(m + 1, n + pad + 8, dtype=torch.bfloat16, device=aq.device)
    d = buf[:m, :n]
    ops.fp8_gemm_nt(aq, asf, bq, bsf, d)
    if aq.is_cuda:
        torch.cuda.synchronize(aq.device)
    assert not d.isnan().any(), f"unwritten outputs ({what}, pad={pad})"
    assert buf[m:].isnan().all() and buf[:, n:].isnan().all(), f"written past M or N ({what}, pad={pad})"
    return d.clone()


@pytest.mark.parametrize("cfg", ["128,112,6", "128,144,6", "128,160,5", "128,176,5", "128,192,5", "64,112,8",
                                 "64,176,6"])
@pytest.mark.parametrize("m,n,k", [(4095, 2000, 1152), (300, 1000, 640)])
def test_odd_widths_match_runtime_scale_pick_and_plain_epilogue(monkeypatch, cfg, m, n, k):
    """Widths that are not multiples of 64 (tiles start at every offset inside a 128-wide B scale block; 176-wide ones
    span three blocks): the main loop specialised on that offset, with the TMA-store epilogue (unswizzled 16 x BLOCK_N
    boxes) or the staged one, with the pipelined promotion where the tile is at most 128 wide, gives the bits of the
    run-time scale pick with the serial promotion and the staged epilogue. Rows past M (4095, 300), columns past N
    (2000, 1000), 9 and 5 K slices (pipelined trips of 8 and 4 plus one slice alone); nothing written past M or N."""
    from torch_deepstack.gemm import kernels
    monkeypatch.setenv("DEEPSTACK_GEMM_CONFIG", cfg)
    a, b, (aq, asf), (bq, bsf) = dense_inputs(m, n, k, DEV)
    outs = {}
    for name, defines, tma in (("runtime-serial-plain", "DS_SFB_RUNTIME,DS_SERIAL_PROMOTE", "0"),
                               ("plain", "", "0"), ("tma", "", "1")):
        monkeypatch.setenv("DEEPSTACK_GEMM_DEFINES", defines)
        monkeypatch.setenv("DEEPSTACK_GEMM_TMA_STORE", tma)
        plan_cfg = kernels._plan(kernels.KIND_DENSE, aq.device, m, 1, n, k, m, False, None, torch.bfloat16, None)[1]
        assert plan_cfg.tma_store == (tma == "1")
        for pad in (0, 2) if tma == "1" else (0,):   # pad 2: unaligned row pitch, direct stores
            outs[(name, pad)] = _padded_run(aq, asf, bq, bsf, m, n, pad, name)
    for key, d in outs.items():
        assert torch.equal(d, outs[("runtime-serial-plain", 0)]), f"{key} differs from the run-time scale pick"
    assert calc_diff(outs[("tma", 0)], a.float() @ b.float().T) < 1e-3


@pytest.mark.parametrize("bn", [128, 64])
@pytest.mark.parametrize("m,n,k", [(129, 200, 384), (300, 4096, 1024), (4095, 2112, 1152), (4096, 7168, 2048),
                                   (700, 1000, 640)])
def test_dense_256_row_tiles_match_128_row_tiles(monkeypatch, bn, m, n, k):
    """256-row tiles (two 64-row waves per math warpgroup, the TMA-store epilogue), alone and in 2-CTA clusters
    sharing A by multicast, give the bits of 128-row tiles of the same width: every element written, nothing past M
    or N (partial last M-blocks: 129, 300, 4095, 700 rows; columns past N: 200, 2112, 1000; an odd number of N-blocks,
    2112 / 128 and 2112 / 64, leaves the last cluster's second CTA without columns), the direct-store fallback for a
    D pitch that is not 16-byte aligned, and several tiles per CTA (4096 x 7168). Also with the B-scale lanes
    (DS_SFB_LANES: a tile's B scales read a tile ahead; in a cluster, of the CTA's own N-block of the pair)."""
    from torch_deepstack.gemm import kernels
    a, b, (aq, asf), (bq, bsf) = dense_inputs(m, n, k, DEV)
    outs = {}
    for cfg, mc, defines in ((f"128,{bn},5", "0", ""), (f"256,{bn},3", "0", ""), (f"256,{bn},3", "1", ""),
                             (f"256,{bn},3", "0", "DS_SFB_LANES"), (f"256,{bn},3", "1", "DS_SFB_LANES")):
        monkeypatch.setenv("DEEPSTACK_GEMM_CONFIG", cfg)
        monkeypatch.setenv("DEEPSTACK_GEMM_MULTICAST", mc)
        monkeypatch.setenv("DEEPSTACK_GEMM_DEFINES", defines)
        plan = kernels._plan(kernels.KIND_DENSE, aq.device, m, 1, n, k, m, False, None, torch.bfloat16, None)
        assert (plan[1].block_m, plan[1].tma_store) == (int(cfg.split(",")[0]), True)
        assert plan[-1] == (2 if mc == "1" and n > bn else 1)
        for pad in (0, 2):                           # pad 2: row pitch n + 2 elements, not 16-byte aligned
            outs[(cfg, mc, defines, pad)] = _padded_run(aq, asf, bq, bsf, m, n, pad,
                                                        f"{cfg}, multicast {mc} {defines}")
    for key, d in outs.items():
        assert torch.equal(d, outs[(f"128,{bn},5", "0", "", 0)]), f"{key} differs from 128-row tiles"
    assert calc_diff(outs[(f"256,{bn},3", "1", "", 0)], a.float() @ b.float().T) < 1e-3


@pytest.mark.parametrize("m,n,k", [(4096, 3136, 1024), (2000, 3120, 384), (4095, 1568, 256)])
@pytest.mark.parametrize("out_dtype,with_c", [(torch.bfloat16, False), (torch.float32, True)])
def test_dense_split_tail_matches_one_launch(monkeypatch, m, n, k, out_dtype, with_c):
    """Split tail (opt-in, DEEPSTACK_GEMM_SPLIT_TAIL=1): these 128x128 shapes run their last 64 / 48 / 32 columns as
    a second GEMM (narrow tiles); every element written, nothing past N or M (4095 rows: a partial last M-block),
    bit-identical to the single 128x128 launch (C included). (N = 2112 no longer splits: the heuristic takes 128x176
    tiles there.)"""
    from torch_deepstack.gemm import kernels
    a, b, (aq, asf), (bq, bsf) = dense_inputs(m, n, k, DEV)
    c = fresh_randn(m, n, dtype=out_dtype, device=DEV) if with_c else None
    outs = {}
    for split in ("1", "0"):
        monkeypatch.setenv("DEEPSTACK_GEMM_SPLIT_TAIL", split)
        assert (kernels.split_tail_columns(m, n, k, kernels.num_sms(aq.device)) == n % 128) == (split == "1")
        buf = poisoned_empty(m + 1, n + 8, dtype=out_dtype, device=DEV)
        d = buf[:m, :n]
        ops.fp8_gemm_nt(aq, asf, bq, bsf, d, c)
        torch.cuda.synchronize()
        assert not d.isnan().any(), f"unwritten outputs (split={split})"
        assert buf[m:].isnan().all() and buf[:, n:].isnan().all(), "written past M or N"
        outs[split] = d.clone()
    assert torch.equal(outs["1"], outs["0"])
    want = a.float() @ b.float().T + (c.float() if with_c else 0)
    assert calc_diff(outs["1"], want) < 1e-3


@pytest.mark.parametrize("m,n,k", [(129, 200, 1152), (300, 4096, 1024), (4095, 3136, 640), (64, 7168, 2048),
                                   (700, 576, 384), (129, 576, 1536), (300, 4096, 2688)])
def test_pipelined_promotion_matches_serial(monkeypatch, m, n, k):
    """Tiles at most 128 wide promote slice i while the wgmmas of slice i + 1 run (128-row tiles: trips of eight
    slices, one of four, the rest one at a time; 64-row tiles: trips of four): same operations in the same order as
    the serial loop, so bit-identical, for K-slice counts 9, 8, 5, 16, 3, 12 and 21, 64- and 128-row tiles, and the
    contiguous kind."""
    _, _, (aq, asf), (bq, bsf) = dense_inputs(m, n, k, DEV)
    ids = torch.arange(m, device=DEV, dtype=torch.int32) // 128 % 2
    ids[ids.numel() // 2:][:64] = -1
    _, bq2, bsf2 = grouped_b(2, n, k, DEV)
    outs = {}
    for defines in ("", "DS_SERIAL_PROMOTE"):
        monkeypatch.setenv("DEEPSTACK_GEMM_DEFINES", defines)
        d = poisoned_empty(m, n, dtype=torch.bfloat16, device=DEV)
        ops.fp8_gemm_nt(aq, asf, bq, bsf, d)
        dc = poisoned_empty(m, n, dtype=torch.bfloat16, device=DEV)
        ops.m_grouped_fp8_gemm_nt_contiguous(aq, asf, bq2, bsf2, dc, ids)
        torch.cuda.synchronize()
        assert not d.isnan().any() and not dc[ids >= 0].isnan().any() and dc[ids < 0].isnan().all()
        outs[defines] = (d, dc)
    assert torch.equal(outs[""][0], outs["DS_SERIAL_PROMOTE"][0])
    assert torch.equal(outs[""][1].nan_to_num(7.0), outs["DS_SERIAL_PROMOTE"][1].nan_to_num(7.0))


def _run_all_kinds(aq, asf, bq2, bsf2, ids, aq3, asf3, masked_m, n):
    """Dense (B = bq2[0]), contiguous (ids) and masked (aq3, masked_m) calls into poisoned outputs."""
    d = poisoned_empty(aq.shape[0], n, dtype=torch.bfloat16, device=DEV)
    ops.fp8_gemm_nt(aq, asf, bq2[0], bsf2[0], d)
    dc = poisoned_empty(aq.shape[0], n, dtype=torch.bfloat16, device=DEV)
    ops.m_grouped_fp8_gemm_nt_contiguous(aq, asf, bq2, bsf2, dc, ids)
    dm = poisoned_empty(aq3.shape[0], aq3.shape[1], n, dtype=torch.bfloat16, device=DEV)
    ops.m_grouped_fp8_gemm_nt_masked(aq3, asf3, bq2, bsf2, dm, masked_m, int(masked_m.float().mean()))
    torch.cuda.synchronize()
    return d, dc, dm


def _grouped_inputs(m, n, k, sizes):
    _, _, (aq, asf), _ = dense_inputs(m, n, k, DEV)
    ids = contiguous_layout(sizes).to(DEV)
    assert ids.numel() <= m
    ids = torch.cat([ids, torch.full((m - ids.numel(),), -1, dtype=torch.int32, device=DEV)])
    _, bq2, bsf2 = grouped_b(len(sizes), n, k, DEV)
    aq3, asf3 = quant_a(fresh_randn(len(sizes), 300, k, dtype=torch.bfloat16, device=DEV))
    masked_m = torch.tensor([min(s, 300) for s in sizes], dtype=torch.int32, device=DEV)
    return aq, asf, bq2, bsf2, ids, aq3, asf3, masked_m


def _check_written(d, dc, dm, ids, masked_m):
    assert not d.isnan().any(), "dense: unwritten outputs"
    assert not dc[ids >= 0].isnan().any() and dc[ids < 0].isnan().all(), "contiguous: wrong rows written"
    for g, s in enumerate(masked_m.tolist()):
        assert not dm[g, :s].isnan().any() and dm[g, s:].isnan().all(), f"masked group {g}: wrong rows written"


@pytest.mark.parametrize("cfg", ["128,128,6", "128,64,8", "128,192,5", "128,112,6"])
@pytest.mark.parametrize("m,n,k", [(1100, 4096, 1024), (1100, 576, 384)])
def test_grouped_tma_store_matches_plain(monkeypatch, cfg, m, n, k):
    """TMA-store epilogue for the grouped kinds: a warp stores its 16 rows by TMA only when all are valid, others
    take the staged stores through the same buffer. Group sizes that are not multiples of 16 (padding rows inside
    a warp's rows), an empty group, masked counts inside a warp: bit-identical to the plain epilogue, padding rows
    and rows past masked_m never written."""
    from torch_deepstack.gemm import kernels
    monkeypatch.setenv("DEEPSTACK_GEMM_CONFIG", cfg)
    args = _grouped_inputs(m, n, k, [157, 0, 201, 77, 300])
    outs = {}
    for tma in ("0", "1"):
        monkeypatch.setenv("DEEPSTACK_GEMM_TMA_STORE", tma)
        for kind, rows in ((kernels.KIND_CONTIGUOUS, m), (kernels.KIND_MASKED, 300)):
            plan_cfg = kernels._plan(kind, args[0].device, rows, 5, n, k, m if kind == kernels.KIND_CONTIGUOUS
                                     else int(args[7].float().mean()), False, None, torch.bfloat16, None)[1]
            # (grouped kinds keep the plain epilogue on 192-wide tiles, whose TMA-store form spills)
            assert plan_cfg.tma_store == (tma == "1" and cfg != "128,192,5")
        outs[tma] = _run_all_kinds(*args, n)
        _check_written(*outs[tma], args[4], args[7])
    for new, old in zip(outs["1"], outs["0"]):
        assert torch.equal(new.nan_to_num(7.0), old.nan_to_num(7.0))


@pytest.mark.parametrize("cfg,tma", [("128,128,6", "1"), ("128,128,6", "0"), ("64,128,8", "0")])
def test_contiguous_id_lookahead_matches_load_at_start(monkeypatch, cfg, tma):
    """The contiguous kind's math warps load a tile's group ids one tile ahead: bit-identical to loading them when
    the tile starts (DS_NO_ID_LOOKAHEAD), and so is the opt-in lookahead in the producer (DS_PRODUCER_ID_LOOKAHEAD),
    with padding blocks between groups (skipped tiles), groups whose padding sits inside a warp's 16 rows, an empty
    group, rows past M in the last block, and 7 CTAs (many tiles per CTA, so every lookahead crosses tiles);
    padding rows never written, valid rows all written."""
    from torch_deepstack.gemm import kernels
    # groups 0 (157 rows) and 1 (empty), two padding blocks, groups 2-4; the last group ends at M = 1196, inside
    # its last 128-row block
    m, n, k = 1196, 576, 384
    _, _, (aq, asf), _ = dense_inputs(m, n, k, DEV)
    ids = torch.cat([contiguous_layout([157, 0]), torch.full((256,), -1, dtype=torch.int32),
                     contiguous_layout([0, 0, 201, 77, 300])])[:m].to(DEV)
    _, bq5, bsf5 = grouped_b(5, n, k, DEV)
    monkeypatch.setenv("DEEPSTACK_GEMM_CONFIG", cfg)
    monkeypatch.setenv("DEEPSTACK_GEMM_TMA_STORE", tma)
    monkeypatch.setattr(kernels, "_NUM_SMS_OVERRIDE", 7)   # (kernels.set_num_sms, undone after the test)
    controls = ("DS_NO_ID_LOOKAHEAD", "DS_PRODUCER_ID_LOOKAHEAD", "DS_ID_LOOKAHEAD1")
    outs = {}
    for defines in (*controls, ""):
        monkeypatch.setenv("DEEPSTACK_GEMM_DEFINES", defines)
        d = poisoned_empty(m, n, dtype=torch.bfloat16, device=DEV)
        ops.m_grouped_fp8_gemm_nt_contiguous(aq, asf, bq5, bsf5, d, ids)
        torch.cuda.synchronize()
        assert not d[ids >= 0].isnan().any() and d[ids < 0].isnan().all(), f"{defines}: wrong rows written"
        outs[defines] = d
    for defines in controls:
        assert torch.equal(outs[""].nan_to_num(7.0), outs[defines].nan_to_num(7.0)), defines
    want = torch.zeros_like(outs[""])
    ref.m_grouped_contiguous_ref(aq, asf, bq5, bsf5, want, ids)
    assert calc_diff(outs[""][ids >= 0], want[ids >= 0]) < 1e-5


@pytest.mark.parametrize("layout", ["padding", "random"])
@pytest.mark.parametrize("n,k,sms", [(576, 384, 7), (4096, 1024, 7), (2000, 640, None)])
def test_contiguous_256_row_tiles_match_128_row_tiles(monkeypatch, layout, n, k, sms):
    """256-row tiles for the contiguous kind: a tile whose 128-row halves hold two groups runs one pass over K per
    half (each with its own B; "padding": rows 768-1023 are groups 3 | 4, "random": nine groups at U(0.7, 1.3) x 200
    rows, an empty one, so about half the group boundaries fall inside a tile), a padding block as either half or as
    both (a skipped tile), padding rows inside a warp's 16 (staged stores), a last half past M or partly past it, and
    7 CTAs (many tiles per CTA, so the halves' id lookahead crosses tiles). Bit-identical to 128-row tiles; padding
    rows never written, valid rows all written."""
    from torch_deepstack.gemm import kernels
    if layout == "padding":   # groups 0 (157 rows), 1 (empty), two padding blocks, groups 2-4; M ends inside group 4
        ids = torch.cat([contiguous_layout([157, 0]), torch.full((256,), -1, dtype=torch.int32),
                         contiguous_layout([0, 0, 201, 77, 300])])[:1196]
    else:
        ids = contiguous_layout(random_group_sizes(9, 200))
        ids = torch.cat([ids, torch.full((128,), -1, dtype=torch.int32)])   # ends with a padding half
    ids = ids.to(DEV)
    m, groups = ids.numel(), int(ids.max()) + 1
    _, _, (aq, asf), _ = dense_inputs(m, n, k, DEV)
    _, bq, bsf = grouped_b(groups, n, k, DEV)
    if sms:
        monkeypatch.setattr(kernels, "_NUM_SMS_OVERRIDE", sms)   # (kernels.set_num_sms, undone after the test)
    outs = {}
    for cfg in ("128,128,5", "256,128,3"):
        monkeypatch.setenv("DEEPSTACK_GEMM_CONFIG", cfg)
        plan = kernels._plan(kernels.KIND_CONTIGUOUS, aq.device, m, groups, n, k, m, False, None, torch.bfloat16,
                             None)
        assert (plan[1].block_m, plan[1].tma_store) == (int(cfg.split(",")[0]), True)
        d = poisoned_empty(m, n, dtype=torch.bfloat16, device=DEV)
        ops.m_grouped_fp8_gemm_nt_contiguous(aq, asf, bq, bsf, d, ids)
        torch.cuda.synchronize()
        assert not d[ids >= 0].isnan().any() and d[ids < 0].isnan().all(), f"{cfg}: wrong rows written"
        outs[cfg] = d
    assert torch.equal(outs["256,128,3"].nan_to_num(7.0), outs["128,128,5"].nan_to_num(7.0))
    want = torch.zeros_like(outs["256,128,3"])
    ref.m_grouped_contiguous_ref(aq, asf, bq, bsf, want, ids)
    assert calc_diff(outs["256,128,3"][ids >= 0], want[ids >= 0]) < 1e-5


def _check_define_matches_default(monkeypatch, define, cfg, tma, k, base=""):
    from torch_deepstack.gemm import kernels
    m, n = 1100, 576
    monkeypatch.setenv("DEEPSTACK_GEMM_CONFIG", cfg)
    monkeypatch.setenv("DEEPSTACK_GEMM_TMA_STORE", tma)
    args = _grouped_inputs(m, n, k, [157, 0, 201, 77, 300])
    monkeypatch.setattr(kernels, "_NUM_SMS_OVERRIDE", 7)   # (kernels.set_num_sms, undone after the test)
    outs = {}
    for defines in (base, define):
        monkeypatch.setenv("DEEPSTACK_GEMM_DEFINES", defines)
        outs[defines] = _run_all_kinds(*args, n)
        _check_written(*outs[defines], args[4], args[7])
    for new, old in zip(outs[define], outs[base]):
        assert torch.equal(new.nan_to_num(7.0), old.nan_to_num(7.0))


@pytest.mark.parametrize("cfg,tma", [("128,128,6", "1"), ("64,128,8", "0"), ("128,176,5", "0")])
def test_fast_tile_placement_matches_divisions(monkeypatch, cfg, tma):
    """Tile placement by multiply-and-shift with the kernel's fixed divisors (FastDiv; the contiguous kind's default,
    DS_FAST_PLACE for dense and contiguous alike) against the generic divisions (DS_SLOW_PLACE): 4500 rows, so
    several bands of 16 M-blocks and a partial last one, an empty group and padding blocks, 7 CTAs; dense,
    contiguous and masked outputs bit-identical, exactly the valid rows written."""
    from torch_deepstack.gemm import kernels
    m, n, k = 4500, 576, 384
    monkeypatch.setenv("DEEPSTACK_GEMM_CONFIG", cfg)
    monkeypatch.setenv("DEEPSTACK_GEMM_TMA_STORE", tma)
    monkeypatch.setattr(kernels, "_NUM_SMS_OVERRIDE", 7)   # (kernels.set_num_sms, undone after the test)
    args = _grouped_inputs(m, n, k, [1500, 0, 901, 77, 1300])
    outs = {}
    for defines in ("DS_SLOW_PLACE", "DS_FAST_PLACE"):
        monkeypatch.setenv("DEEPSTACK_GEMM_DEFINES", defines)
        outs[defines] = _run_all_kinds(*args, n)
        _check_written(*outs[defines], args[4], args[7])
    for new, old in zip(outs["DS_FAST_PLACE"], outs["DS_SLOW_PLACE"]):
        assert torch.equal(new.nan_to_num(7.0), old.nan_to_num(7.0))


# Tile configs for the main-loop switch tests: pipelined 128-, 64- and 112-wide loops, the serial 176-wide one
# (tiles over up to three scale blocks), with and without the TMA-store epilogue.
_LOOP_CFGS = [("128,128,6", "1"), ("128,176,5", "0"), ("64,128,8", "0"), ("64,112,8", "0")]


@pytest.mark.parametrize("cfg,tma", [("128,128,6", "1"), ("128,128,6", "0"), ("64,128,8", "0")])
def test_sched_warp_matches_default(monkeypatch, cfg, tma):
    """Experiment DS_SCHED_WARP (a scheduler thread resolves each tile's group ahead into a shared-memory ring for
    the producer): dense, contiguous (padding inside warps, an empty group) and masked outputs bit-identical to the
    default kernel, exactly the valid rows written, with 7 CTAs (many tiles per CTA, the ring wraps)."""
    _check_define_matches_default(monkeypatch, "DS_SCHED_WARP", cfg, tma, 384)


@pytest.mark.parametrize("k", [384, 4224])
@pytest.mark.parametrize("cfg,tma", _LOOP_CFGS)
def test_sfb_lanes_match_per_slice_loads(monkeypatch, cfg, tma, k):
    """B-scale lanes (B scales read a tile ahead into registers, one slice per lane, shuffled to the slices; the
    contiguous kind's default, DS_SFB_LANES for every kind): bit-identical to the per-slice loads (DS_NO_SFB_LANES)
    for dense, contiguous (a padding block, an empty group) and masked calls; 3 and 33 K slices (one and two
    registers per scale block), tiles within one scale block and 176-wide ones spanning up to three, 7 CTAs (many
    tiles per CTA)."""
    _check_define_matches_default(monkeypatch, "DS_SFB_LANES", cfg, tma, k, base="DS_NO_SFB_LANES")


@pytest.mark.parametrize("k", [384, 4224])
@pytest.mark.parametrize("cfg,tma", _LOOP_CFGS)
def test_id_lookahead2_matches_one_tile_lookahead(monkeypatch, cfg, tma, k):
    """The two-tile id lookahead (default: the contiguous kind's math warps hold ids two tiles ahead and fetch a
    tile's B scales a whole tile ahead): dense, contiguous (padding inside warps' rows, an empty group) and masked
    outputs bit-identical to the one-tile lookahead (DS_ID_LOOKAHEAD1), exactly the valid rows written; 3 and 33 K
    slices, tiles spanning one to three scale blocks, 7 CTAs (every lookahead crosses tiles). Padding blocks between
    groups: test_contiguous_id_lookahead_matches_load_at_start."""
    _check_define_matches_default(monkeypatch, "DS_ID_LOOKAHEAD1", cfg, tma, k)


@pytest.mark.parametrize("k", [384, 4224])
@pytest.mark.parametrize("cfg,tma", _LOOP_CFGS)
def test_lean_slice_matches_full_slice_bookkeeping(monkeypatch, cfg, tma, k):
    """Lean slices (default: stage descriptors from stage 0's, B-scale pointers walked per slice): dense,
    contiguous and masked outputs bit-identical to the per-slice rebuild (DS_NO_LEAN_SLICE); the pipelined
    (128/64/112 wide) and serial (176 wide, up to three scale blocks) loops, 3 and 33 K slices (every stage of the
    ring many times), 7 CTAs."""
    _check_define_matches_default(monkeypatch, "DS_NO_LEAN_SLICE", cfg, tma, k)


@pytest.mark.parametrize("cfg", ["128,128,6", "128,160,5"])
@pytest.mark.parametrize("m,n,k", [(129, 200, 384), (700, 7168, 2048), (4095, 256, 128), (300, 4096, 4224)])
def test_multicast_tma_store_matches_single_ctas(monkeypatch, cfg, m, n, k):
    """Experiment DEEPSTACK_GEMM_MULTICAST=2 (2-CTA multicast of B with the TMA-store epilogue): the plan takes
    clusters and the TMA store, every element written, bit-identical to single CTAs; odd M-block counts (the last
    cluster's second CTA lies past M and stores nothing), a 160-wide tile (unswizzled store boxes), N % 128 != 0."""
    monkeypatch.setenv("DEEPSTACK_GEMM_CONFIG", cfg)
    a, b, (aq, asf), (bq, bsf) = dense_inputs(m, n, k, DEV)

    def check_plan(mc, plan):
        assert (plan[5] == 2 and plan[1].tma_store) == (mc == "2")
    outs = _runs_by_multicast(monkeypatch, m, n, k, aq, asf, bq, bsf, ("2", "0"), check_plan)
    assert torch.equal(outs["2"], outs["0"])


@pytest.mark.parametrize("cfg", ["128,176,5", "128,112,6"])
def test_grouped_odd_widths_match_runtime_scale_pick(monkeypatch, cfg):
    """The heuristic may give the grouped kinds 176-wide tiles too (wave fill): contiguous and masked kinds at 176
    (three B scale blocks per tile at some offsets) and 112, N = 2000 (every tile offset), 9 K slices: bit-identical
    to the run-time scale pick with the serial promotion, exactly the valid rows written, and within output rounding
    of the reference op on the same quantised inputs."""
    m, n, k = 1100, 2000, 1152
    monkeypatch.setenv("DEEPSTACK_GEMM_CONFIG", cfg)
    args = _grouped_inputs(m, n, k, [157, 0, 201, 77, 300])
    aq, asf, bq2, bsf2, ids, aq3, asf3, masked_m = args
    outs = {}
    for defines in ("DS_SFB_RUNTIME,DS_SERIAL_PROMOTE", ""):
        monkeypatch.setenv("DEEPSTACK_GEMM_DEFINES", defines)
        outs[defines] = _run_all_kinds(*args, n)
        _check_written(*outs[defines], ids, masked_m)
    for new, old in zip(outs[""], outs["DS_SFB_RUNTIME,DS_SERIAL_PROMOTE"]):
        assert torch.equal(new.nan_to_num(7.0), old.nan_to_num(7.0))
    _, dc, dm = outs[""]
    want_c = torch.zeros_like(dc)
    ref.m_grouped_contiguous_ref(aq, asf, bq2, bsf2, want_c, ids)
    assert calc_diff(dc[ids >= 0], want_c[ids >= 0]) < 1e-5
    want_m = torch.zeros_like(dm)
    ref.m_grouped_masked_ref(aq3, asf3, bq2, bsf2, want_m, masked_m, int(masked_m.float().mean()))
    for g, rows in enumerate(masked_m.tolist()):
        if rows:
            assert calc_diff(dm[g, :rows], want_m[g, :rows]) < 1e-5, f"masked group {g}"


def test_dense_odd_n_and_short_k():
    _check_dense(33, 129, 16)
    _check_dense(130, 77, 144)


def test_dense_accumulate_in_place_and_row_major_scales():
    m, n, k = 300, 384, 1024
    a, b, (aq, asf), (bq, bsf) = dense_inputs(m, n, k, DEV)
    d0 = fresh_randn(m, n, device=DEV)
    d = d0.clone()
    api.fp8_gemm_nt(aq, asf.contiguous(), bq, bsf.t().contiguous().t(), c=d, out=d)  # c is d: accumulate
    want = d0 + a.float() @ b.float().T
    assert calc_diff(d, want) < 1e-3


def test_deterministic_and_batch_invariant(monkeypatch):
    m, n, k = 512, 2112, 7168
    _, _, (aq, asf), (bq, bsf) = dense_inputs(m, n, k, DEV)
    d1 = api.fp8_gemm_nt(aq, asf, bq, bsf)
    d2 = api.fp8_gemm_nt(aq, asf, bq, bsf)
    assert torch.equal(d1, d2)
    # With one block config (the heuristic may pick another for another M), a row's result does not depend on the
    # other rows of the batch.
    monkeypatch.setenv("DEEPSTACK_GEMM_CONFIG", "64,96,8")
    full = api.fp8_gemm_nt(aq, asf, bq, bsf)
    part = api.fp8_gemm_nt(aq[:65].contiguous(), asf[:65], bq, bsf)
    assert torch.equal(part, full[:65])
    assert calc_diff(full, d1) < 1e-5


@pytest.mark.parametrize("g,expected,n,k", [(4, 512, 4096, 7168), (8, 300, 7168, 2048), (3, 100, 200, 256)])
def test_m_grouped_contiguous(g, expected, n, k):
    sizes = random_group_sizes(g, expected)
    ids = contiguous_layout(sizes).to(DEV)
    m = ids.numel()
    a = fresh_randn(m, k, dtype=torch.bfloat16, device=DEV)
    aq, asf = quant_a(a)
    b, bq, bsf = grouped_b(g, n, k, DEV)
    d = poisoned_empty(m, n, dtype=torch.bfloat16, device=DEV)
    ops.m_grouped_fp8_gemm_nt_contiguous(aq, asf, bq, bsf, d, ids)
    valid = ids >= 0
    assert d[~valid].isnan().all(), "padding rows must not be written"
    assert not d[valid].isnan().any(), "valid rows must all be written"
    for i in range(g):
        rows = ids == i
        if rows.any():
            diff = calc_diff(d[rows], a[rows].float() @ b[i].float().T)
            assert diff < 1e-3, f"group {i}: calc_diff {diff:.2e}"
    # The cumulative-offset form gives the same result.
    ends = torch.tensor([sum((s + 127) // 128 * 128 for s in sizes[:i]) + sizes[i] for i in range(g)],
                        dtype=torch.int32, device=DEV)
    assert torch.equal(api.m_indices_from_offsets(ends, m), ids)
    d2 = poison_(torch.empty_like(d))
    api.m_grouped_fp8_gemm_nt_contiguous_offsets(aq, asf, bq, bsf, ends, out=d2)
    assert torch.equal(d2[valid], d[valid]) and d2[~valid].isnan().all()


@pytest.mark.parametrize("g,m_max,expected,n,k", [(6, 512, 100, 4096, 7168), (4, 256, 200, 7168, 2048),
                                                  (3, 70, 20, 200, 256)])
def test_m_grouped_masked(g, m_max, expected, n, k):
    sizes = [min(m_max, s) for s in random_group_sizes(g, expected)]
    masked_m = torch.tensor(sizes, dtype=torch.int32, device=DEV)
    a = fresh_randn(g, m_max, k, dtype=torch.bfloat16, device=DEV)
    aq, asf = quant_a(a)
    b, bq, bsf = grouped_b(g, n, k, DEV)
    d = poisoned_empty(g, m_max, n, dtype=torch.bfloat16, device=DEV)
    ops.m_grouped_fp8_gemm_nt_masked(aq, asf, bq, bsf, d, masked_m, expected)
    for i, s in enumerate(sizes):
        assert d[i, s:].isnan().all(), f"group {i}: rows past masked_m={s} were written"
        assert not d[i, :s].isnan().any(), f"group {i}: valid rows unwritten"
        if s:
            assert calc_diff(d[i, :s], a[i, :s].float() @ b[i].float().T) < 1e-3


@pytest.mark.parametrize("m_max,n,k", [(70, 2112, 7168), (256, 4096, 512), (200, 576, 256)])
def test_masked_m_above_m_max_stays_in_its_group(m_max, n, k):
    """masked_m > M_max means the whole group (as the reference clamps); the kernel once bounded the rows by
    masked_m alone and wrote the last partial M-block's rows into the next group or past D's end."""
    g = 3
    a = fresh_randn(g, m_max, k, dtype=torch.bfloat16, device=DEV)
    aq, asf = quant_a(a)
    b, bq, bsf = grouped_b(g, n, k, DEV)
    counts = [m_max + 29, m_max, 4 * m_max + 3]
    masked_m = torch.tensor(counts, dtype=torch.int32, device=DEV)
    buf = poisoned_empty(g * m_max + 256, n, dtype=torch.bfloat16, device=DEV)   # room to catch stray rows
    d = buf[: g * m_max].view(g, m_max, n)
    ops.m_grouped_fp8_gemm_nt_masked(aq, asf, bq, bsf, d, masked_m, m_max)
    torch.cuda.synchronize()
    assert buf[g * m_max:].isnan().all(), "rows written past D's end"
    for i in range(g):
        assert not d[i].isnan().any(), f"group {i}: rows unwritten"
        assert calc_diff(d[i], a[i].float() @ b[i].float().T) < 1e-3, f"group {i}: wrong rows (another group's?)"


def test_masked_cuda_graph_replay_with_new_counts():
    g, m_max, n, k = 4, 256, 2112, 7168
    a = fresh_randn(g, m_max, k, dtype=torch.bfloat16, device=DEV)
    aq, asf = quant_a(a)
    b, bq, bsf = grouped_b(g, n, k, DEV)
    masked_m = torch.tensor([256, 0, 17, 100], dtype=torch.int32, device=DEV)
    d = torch.empty(g, m_max, n, dtype=torch.bfloat16, device=DEV)
    ops.m_grouped_fp8_gemm_nt_masked(aq, asf, bq, bsf, d, masked_m, 128)   # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.m_grouped_fp8_gemm_nt_masked(aq, asf, bq, bsf, d, masked_m, 128)
    masked_m.copy_(torch.tensor([5, 200, 0, 256], dtype=torch.int32))
    poison_(d)
    graph.replay()
    torch.cuda.synchronize()
    for i, s in enumerate([5, 200, 0, 256]):
        assert d[i, s:].isnan().all() and not d[i, :s].isnan().any()
        if s:
            assert calc_diff(d[i, :s], a[i, :s].float() @ b[i].float().T) < 1e-3


@pytest.mark.parametrize("tokens,n,k", [(4096, 7168, 2048), (1000, 576, 7168), (130, 256, 384)])
def test_wgrad(tokens, n, k):
    dy = fresh_randn(tokens, n, dtype=torch.bfloat16, device=DEV)
    x = fresh_randn(tokens, k, dtype=torch.bfloat16, device=DEV)
    aq, asf = wgrad_operand(dy)
    bq, bsf = wgrad_operand(x)
    d0 = fresh_randn(n, k, device=DEV)
    d = d0.clone()
    ops.fp8_wgrad_gemm_nt(aq, asf, bq, bsf, d, None, True)
    assert calc_diff(d - d0, dy.float().T @ x.float()) < 1e-3
    d2 = poisoned_empty(n, k, dtype=torch.float32, device=DEV)
    ops.fp8_wgrad_gemm_nt(aq, asf, bq, bsf, d2)
    assert not d2.isnan().any() and calc_diff(d2, dy.float().T @ x.float()) < 1e-3


@pytest.mark.parametrize("tokens,n,k", [(4096, 7168, 2048), (1000, 576, 7168), (130, 256, 384)])
def test_wgrad_bf16_out(tokens, n, k):
    """bf16 D (FP8Linear's bf16 weight gradient): the fp32 result rounded once, bit for bit; accumulating into a
    bf16 D adds in fp32 before that rounding."""
    dy = fresh_randn(tokens, n, dtype=torch.bfloat16, device=DEV)
    x = fresh_randn(tokens, k, dtype=torch.bfloat16, device=DEV)
    aq, asf = wgrad_operand(dy)
    bq, bsf = wgrad_operand(x)
    d32 = poisoned_empty(n, k, dtype=torch.float32, device=DEV)
    ops.fp8_wgrad_gemm_nt(aq, asf, bq, bsf, d32)
    d16 = poisoned_empty(n, k, dtype=torch.bfloat16, device=DEV)
    ops.fp8_wgrad_gemm_nt(aq, asf, bq, bsf, d16)
    assert torch.equal(d16, d32.to(torch.bfloat16))
    d0 = fresh_randn(n, k, dtype=torch.bfloat16, device=DEV)
    acc = d0.clone()
    ops.fp8_wgrad_gemm_nt(aq, asf, bq, bsf, acc, None, True)
    assert calc_diff(acc, d0.float() + d32) < 1e-5


@pytest.mark.parametrize("tokens", [130, 1000, 4224, 8832])
@pytest.mark.parametrize("n,k", [(576, 384), (256, 7168)])
def test_wgrad_pipe_matches_serial(monkeypatch, tokens, n, k):
    """The weight-gradient kernel's pipelined promotion (the default; its B scales in twice the shared-memory
    slots) is bit-identical to the serial loop (DS_SERIAL_PROMOTE) with and without accumulation; 2 to 69 K slices
    (trips of 8 and 4 and the one-slice tail), 7 CTAs (many tiles per CTA: the slot parity runs on across tiles)."""
    from torch_deepstack.gemm import kernels
    dy = fresh_randn(tokens, n, dtype=torch.bfloat16, device=DEV)
    x = fresh_randn(tokens, k, dtype=torch.bfloat16, device=DEV)
    aq, asf = wgrad_operand(dy)
    bq, bsf = wgrad_operand(x)
    d0 = fresh_randn(n, k, device=DEV)
    monkeypatch.setattr(kernels, "_NUM_SMS_OVERRIDE", 7)   # (kernels.set_num_sms, undone after the test)
    outs = {}
    for defines in ("", "DS_SERIAL_PROMOTE"):
        monkeypatch.setenv("DEEPSTACK_GEMM_DEFINES", defines)
        acc = d0.clone()
        ops.fp8_wgrad_gemm_nt(aq, asf, bq, bsf, acc, None, True)
        fresh = poisoned_empty(n, k, dtype=torch.float32, device=DEV)
        ops.fp8_wgrad_gemm_nt(aq, asf, bq, bsf, fresh)
        torch.cuda.synchronize()
        outs[defines] = (acc, fresh)
    assert torch.equal(outs[""][0], outs["DS_SERIAL_PROMOTE"][0])
    assert torch.equal(outs[""][1], outs["DS_SERIAL_PROMOTE"][1])
    assert calc_diff(outs[""][1], dy.float().T @ x.float()) < 1e-3


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_k_grouped_wgrad(out_dtype):
    g, m, n, expected = 5, 512, 2048, 1024
    ks = [(s + 127) // 128 * 128 for s in random_group_sizes(g, expected)]
    total = sum(ks)
    dy = fresh_randn(total, m, dtype=torch.bfloat16, device=DEV)
    x = fresh_randn(total, n, dtype=torch.bfloat16, device=DEV)
    aq, asf = wgrad_operand(dy)
    bq, bsf = wgrad_operand(x)
    d0 = fresh_randn(g, m, n, device=DEV).to(out_dtype)
    d = d0.clone()
    ops.k_grouped_fp8_wgrad_gemm_nt(aq, asf, bq, bsf, d, ks, None, True)
    start = 0
    for i, kk in enumerate(ks):
        want = dy[start:start + kk].float().T @ x[start:start + kk].float()
        if kk == 0:
            assert torch.equal(d[i], d0[i])
        else:
            assert calc_diff(d[i].float() - d0[i].float(), want) < 1e-3
        start += kk
    # the bf16 form is the fp32 one rounded once
    if out_dtype == torch.bfloat16:
        d32 = api.k_grouped_fp8_wgrad_gemm_nt(aq, asf, bq, bsf, ks)
        assert torch.equal(api.k_grouped_fp8_wgrad_gemm_nt(aq, asf, bq, bsf, ks, out_dtype=torch.bfloat16),
                           d32.to(torch.bfloat16))


@pytest.mark.parametrize("m,n,ks,config", [
    (512, 2048, None, None),                             # random sizes, group 1 empty
    (200, 328, [0, 384, 128, 0, 640, 0], None),          # odd M and N, empty first and last segments
    (200, 328, [0, 384, 128, 0, 640, 0], "128,128,5"),   # 128-row, 128-wide tiles with M, N % 128 != 0
    (4096, 7168, [1024, 896, 0, 1152], None),            # 128-wide tiles by the heuristic
    (129, 256, [256], None),                             # one group
])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tma_store", ["", "0", "1"])
def test_k_grouped_one_launch_equals_one_gemm_per_segment(m, n, ks, config, out_dtype, tma_store, monkeypatch):
    """The single k-grouped launch against the per-segment weight-gradient GEMMs (same slices, same promotion):
    bit-identical, every element written (empty segments: zeros), with and without C; the same under CUDA-graph
    capture and for an unpacked D, which take the per-segment path. bf16 output with the heuristic's epilogue,
    the TMA store forced off and forced on (rows past M in a group's last tile: the staged stores)."""
    monkeypatch.setenv("DEEPSTACK_GEMM_TMA_STORE", tma_store)
    if config:
        monkeypatch.setenv("DEEPSTACK_GEMM_CONFIG", config)
    if ks is None:
        ks = [(s + 127) // 128 * 128 for s in random_group_sizes(6, 1024)]
    g, total = len(ks), sum(ks)
    aq, asf = wgrad_operand(fresh_randn(total, m, dtype=torch.bfloat16, device=DEV))
    bq, bsf = wgrad_operand(fresh_randn(total, n, dtype=torch.bfloat16, device=DEV))
    want = poisoned_empty(g, m, n, dtype=out_dtype, device=DEV)
    k_grouped_per_segment(aq, asf, bq, bsf, want, ks)
    d = poisoned_empty(g, m, n, dtype=out_dtype, device=DEV)
    ops.k_grouped_fp8_wgrad_gemm_nt(aq, asf, bq, bsf, d, ks)
    torch.cuda.synchronize()
    assert torch.equal(d, want)
    c = fresh_randn(g, m, n, device=DEV)
    d = poisoned_empty(g, m, n, dtype=out_dtype, device=DEV)
    ops.k_grouped_fp8_wgrad_gemm_nt(aq, asf, bq, bsf, d, ks, c)
    assert torch.equal(d, (want.float() + c).to(out_dtype)) if out_dtype == torch.float32 else \
        calc_diff(d, want.float() + c) < 1e-5
    acc = c.to(out_dtype, copy=True)           # (copy: for fp32 a plain .to() would be c itself, updated below)
    ops.k_grouped_fp8_wgrad_gemm_nt(aq, asf, bq, bsf, acc, ks, None, True)          # D += A B^T
    assert calc_diff(acc, want.float() + c) < 1e-5
    # a row pitch above N (one launch: D addressed as [G * M, pitch]); groups not back to back and CUDA-graph
    # capture take the per-segment path
    wide = poisoned_empty(g, m, n + 16, dtype=out_dtype, device=DEV)
    ops.k_grouped_fp8_wgrad_gemm_nt(aq, asf, bq, bsf, wide[:, :, :n], ks)
    assert torch.equal(wide[:, :, :n], want)
    tall = poisoned_empty(g, m + 8, n, dtype=out_dtype, device=DEV)
    ops.k_grouped_fp8_wgrad_gemm_nt(aq, asf, bq, bsf, tall[:, :m], ks)
    assert torch.equal(tall[:, :m], want)
    d = poisoned_empty(g, m, n, dtype=out_dtype, device=DEV)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.k_grouped_fp8_wgrad_gemm_nt(aq, asf, bq, bsf, d, ks)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(d, want)


def _padded_bytes(q):
    """A transposed operand's whole [K, m_pad] buffer (its zero padding included) as bytes."""
    return q.as_strided((q.shape[0], q.stride(0)), (q.stride(0), 1)).view(torch.uint8)


@pytest.mark.parametrize("shape", [(4096, 7168), (1, 128), (130, 384), (4095, 256), (2048, 7168)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("row_pad", [0, 9])
def test_token_quant_dual_matches_single_layouts(shape, dtype, row_pad):
    """per_token_group_quant_fp8_dual = per_token_group_quant_fp8 + per_token_group_quant_fp8_t, bit for bit and
    with the same strides (the outputs land in freed memory that was filled with 0x7f first); M not a multiple of
    128 (partial row blocks) and rows that are not 16-byte aligned (row_pad: the scalar loads) included."""
    from torch_deepstack.quant.api import per_token_group_quant_fp8
    x = fresh_randn(shape[0], shape[1] + row_pad, dtype=dtype, device=DEV, scale=3.0)[:, :shape[1]]
    for ue8m0 in (False, True):
        junk = poison_(torch.empty(64 << 20, dtype=torch.float8_e4m3fn, device=DEV))
        del junk   # (freed to the caching allocator, which hands these 0x7f bytes out to the outputs below)
        q, s, qt, st = ops.per_token_group_quant_fp8_dual(x, 1e-4, ue8m0)
        q1, s1 = per_token_group_quant_fp8(x.contiguous(), 128, 1e-4, ue8m0)
        qt1, st1 = ops.per_token_group_quant_fp8_t(x, 1e-4, ue8m0)
        assert q.stride() == q1.stride() and s.stride() == s1.stride()
        assert qt.stride() == qt1.stride() and st.stride() == st1.stride()
        assert torch.equal(q.view(torch.uint8), q1.view(torch.uint8)) and torch.equal(s, s1)
        assert torch.equal(_padded_bytes(qt), _padded_bytes(qt1)) and torch.equal(st, st1)


@pytest.mark.parametrize("shape", [(4096, 7168), (200, 272), (129, 4000), (384, 256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("row_pad", [0, 9])
def test_quant_kernels_match_reference_bitwise(shape, dtype, row_pad):
    """Weight (per 128x128 block, plain and transposed) and transposed activation quantisers against the reference,
    bit for bit: whole aligned blocks take the vectorised paths, partial blocks and rows that are not 16-byte aligned
    (row_pad: x is a column slice of a wider tensor) the scalar ones."""
    x = fresh_randn(shape[0], shape[1] + row_pad, dtype=dtype, device=DEV, scale=3.0)[:, :shape[1]]
    for transpose in (False, True):
        for ue8m0 in (False, True):
            q, s = ops.per_block_quant_fp8(x, transpose, 1e-4, ue8m0)
            qr, sr = ref.per_block_quant_fp8_ref(x.cpu(), transpose, 1e-4, ue8m0)
            assert q.stride() == qr.stride() and s.stride() == sr.stride()
            assert torch.equal(q.cpu().view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s.cpu(), sr)
    for ue8m0 in (False, True):   # both orientations in one pass: the single-orientation kernels' results
        dual = ops.per_block_quant_fp8_dual(x, 1e-4, ue8m0)
        single = ops.per_block_quant_fp8(x, False, 1e-4, ue8m0) + ops.per_block_quant_fp8(x, True, 1e-4, ue8m0)
        for got, want in zip(dual, single):
            assert got.stride() == want.stride()
            assert torch.equal(got.view(torch.uint8) if got.dtype != torch.float32 else got,
                               want.view(torch.uint8) if want.dtype != torch.float32 else want)
    for ue8m0 in (False, True):
        q, s = ops.per_token_group_quant_fp8_t(x, 1e-4, ue8m0)
        qr, sr = ref.per_token_group_quant_fp8_t_ref(x.cpu(), 1e-4, ue8m0)
        assert q.stride() == qr.stride() and s.stride() == sr.stride()
        pad = q.stride(0)
        full = q.as_strided((q.shape[0], pad), (pad, 1)).cpu().view(torch.uint8)
        full_r = qr.as_strided((qr.shape[0], pad), (pad, 1)).view(torch.uint8)
        assert torch.equal(full, full_r) and torch.equal(s.cpu(), sr)


def test_bad_inputs_raise_clear_errors():
    _, _, (aq, asf), (bq, bsf) = dense_inputs(64, 256, 256, DEV)
    d = torch.empty(64, 256, dtype=torch.bfloat16, device=DEV)
    with pytest.raises(RuntimeError, match="float8_e4m3fn"):
        ops.fp8_gemm_nt(aq.float(), asf, bq, bsf, d)
    with pytest.raises(RuntimeError, match="sfb must have shape"):
        ops.fp8_gemm_nt(aq, asf, bq, bsf[:1], d)
    with pytest.raises(RuntimeError, match="d must have shape"):
        ops.fp8_gemm_nt(aq, asf, bq, bsf, d[:, :128])
    with pytest.raises(ValueError, match="one device"):
        ops.fp8_gemm_nt(aq, asf, bq, bsf, d.cpu())


def test_fp8_linear_cuda_edge_inputs():
    """No tokens (an MoE expert that got none), a stride-0 gradient (y.sum().backward()) and a transposed input view,
    on the CUDA kernels: shapes and values as a contiguous / bf16 computation gives them."""
    from torch_deepstack.gemm import FP8Linear
    f8 = FP8Linear(256, 384, device=DEV, dtype=torch.bfloat16)
    x0 = torch.empty(0, 256, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    f8(x0).sum().backward()
    assert x0.grad.shape == (0, 256)
    assert torch.count_nonzero(f8.weight.grad) == 0 and torch.count_nonzero(f8.bias.grad) == 0
    f8.zero_grad()
    xt = fresh_randn(256, 200, dtype=torch.bfloat16, device=DEV).t().requires_grad_()   # a [200, 256] view
    xc = xt.detach().contiguous().requires_grad_()
    f8(xt).sum().backward()
    gw = f8.weight.grad.clone()
    f8.zero_grad()
    f8(xc).sum().backward()
    assert torch.equal(xt.grad, xc.grad) and torch.equal(gw, f8.weight.grad)
    assert calc_diff(gw, torch.ones(200, 384, device=DEV).T @ xc.detach().float()) < 2e-3


def _fp8_linear_copy(f8):
    from torch_deepstack.gemm import FP8Linear
    e8 = FP8Linear(f8.in_features, f8.out_features, device=DEV, dtype=f8.weight.dtype)
    with torch.no_grad():
        e8.weight.copy_(f8.weight)
        e8.bias.copy_(f8.bias)
    return e8


def test_fp8_linear_cuda_graph_replays_read_the_current_weight():
    """A training step captured with torch.cuda.graph after eager steps (the FP8 weight cache warm): each replay,
    after an in-place weight update as an optimizer makes, gives what an eager module with that weight gives. (The
    graph quantises W itself; reading the cache captured the copy of the capture-time weight.)"""
    from torch_deepstack.gemm import FP8Linear
    f8 = FP8Linear(512, 384, device=DEV, dtype=torch.bfloat16)
    x = fresh_randn(300, 512, dtype=torch.bfloat16, device=DEV).requires_grad_()
    gy = fresh_randn(300, 384, dtype=torch.bfloat16, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):   # warm-up off the default stream, as torch.cuda.graph's documentation asks
        for _ in range(2):
            f8(x).backward(gy)
    torch.cuda.current_stream().wait_stream(side)
    x.grad = f8.weight.grad = f8.bias.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = f8(x)
        y.backward(gy)
    for _ in range(3):
        with torch.no_grad():
            f8.weight.add_(fresh_randn(384, 512, dtype=torch.bfloat16, device=DEV, scale=0.02))
            x.copy_(fresh_randn(300, 512, dtype=torch.bfloat16, device=DEV))
            gy.copy_(fresh_randn(300, 384, dtype=torch.bfloat16, device=DEV))
        graph.replay()
        e8 = _fp8_linear_copy(f8)
        xe = x.detach().clone().requires_grad_()
        ye = e8(xe)
        ye.backward(gy)
        for got, want in ((y, ye), (x.grad, xe.grad), (f8.weight.grad, e8.weight.grad), (f8.bias.grad, e8.bias.grad)):
            assert calc_diff(got, want) < 1e-6


def test_fp8_linear_cuda_frozen_weight_in_a_graph():
    """Serving: a frozen FP8Linear captured under no_grad replays with new inputs as the eager module computes, and
    after refresh_fp8_weight_ the same graph uses the new weight (its copies were rewritten in place)."""
    from torch_deepstack.gemm import FP8Linear
    f8 = FP8Linear(512, 384, device=DEV, dtype=torch.bfloat16).freeze_fp8_weight_()
    x = fresh_randn(65, 512, dtype=torch.bfloat16, device=DEV)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        f8(x)   # makes the frozen copies (and loads the kernels) outside the capture
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            y = f8(x)
        for update in (False, True, False):
            if update:
                f8.weight.mul_(-0.5)
                f8.refresh_fp8_weight_()
            x.copy_(fresh_randn(65, 512, dtype=torch.bfloat16, device=DEV))
            graph.replay()
            want = _fp8_linear_copy(f8)(x)
            assert calc_diff(y, want) < 1e-6


def test_fp8_linear_cuda_matches_bf16_linear():
    from torch_deepstack.gemm import FP8Linear
    torch.manual_seed(0)
    lin = torch.nn.Linear(1024, 768, device=DEV, dtype=torch.bfloat16)
    f8 = FP8Linear.from_linear(lin)
    x = fresh_randn(4, 300, 1024, dtype=torch.bfloat16, device=DEV).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    gy = fresh_randn(4, 300, 768, dtype=torch.bfloat16, device=DEV)
    y = f8(x)
    y.backward(gy)
    # (detached: f8 shares lin's Parameters, so lin's own graph would add into f8.weight.grad)
    y2 = torch.nn.functional.linear(x2.float(), lin.weight.detach().float(), lin.bias.detach().float())
    y2.backward(gy.float())
    assert calc_diff(y, y2) < 2e-3
    assert calc_diff(x.grad, x2.grad) < 2e-3
    want_w = gy.float().reshape(-1, 768).T @ x2.detach().float().reshape(-1, 1024)
    assert calc_diff(f8.weight.grad, want_w) < 2e-3
