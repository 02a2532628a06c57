"""Compile-only checks (CPU with nvcc): the default kernels (staged epilogue) and the DS_DIRECT_EPILOGUE A/B switch
compile for sm_90a without spills, and the heuristic reserves the staging buffer only when it is compiled in."""
import pytest
import torch

from torch_deepstack import jit
from torch_deepstack.gemm import heuristic, kernels
from torch_deepstack.jit import nvcc

needs_nvcc = pytest.mark.skipif(nvcc.find_nvcc() is None, reason="nvcc not installed")


def test_staging_buffer_is_reserved_unless_direct_epilogue(monkeypatch):
    cfg = heuristic.select_config(4096, 7168, 16384, 1, 132)
    staged = heuristic.smem_bytes(cfg, False)
    monkeypatch.setenv("DEEPSTACK_GEMM_DEFINES", "DS_DIRECT_EPILOGUE")
    assert staged - heuristic.smem_bytes(cfg, False) == 2 * 4 * 16 * 48
    assert staged <= heuristic.SMEM_BUDGET


def test_two_warpgroup_tiles_use_widths_that_measured_fast():
    for n, k in kernels.DSV3_NK:
        cfg = heuristic.select_config(4096, n, k, 1, 132)
        assert cfg.block_m == 128 and cfg.block_n in (64, 128, 176, 192)
        # 176 (measured 1251 vs 1080 TFLOPS at 4096 x 2112 x 7168) only where it saves waves: 32 x 12 tiles = 3 waves
        # instead of 32 x 17 = 5 (4.1) at 128
        assert (cfg.block_n == 176) == (n == 2112)
    assert heuristic.wave_fill_width(4096, 4096, 1, 132, 128) == 128          # 8 waves either way: no switch
    assert heuristic.wave_fill_width(4096, 2112, 1, 132, 128) == 176
    assert heuristic.wave_fill_width(4096, 2112, 1, 114, 128) == 128          # on 114 SMs 128 loses no wave


@needs_nvcc
@pytest.mark.timeout(600)
@pytest.mark.parametrize("defines", ["", "DS_DIRECT_EPILOGUE"])
@pytest.mark.parametrize("m,n,k,kind", [(4096, 32768, 512, kernels.KIND_DENSE), (4096, 7168, 16384, kernels.KIND_DENSE),
                                        (4096, 2112, 7168, kernels.KIND_DENSE), (700, 576, 1536, kernels.KIND_DENSE),
                                        (8192, 4096, 7168, kernels.KIND_CONTIGUOUS),
                                        (256, 7168, 2048, kernels.KIND_MASKED), (7, 200, 256, kernels.KIND_DENSE)])
def test_gemm_compiles_without_spills(monkeypatch, tmp_path, defines, m, n, k, kind):
    monkeypatch.setenv("DEEPSTACK_GEMM_DEFINES", defines)
    monkeypatch.setenv("DEEPSTACK_JIT_PTXAS_CHECK", "1")
    monkeypatch.setenv("DEEPSTACK_JIT_CACHE_DIR", str(tmp_path))
    cfg = heuristic.select_config(m, n, k, 4 if kind == kernels.KIND_MASKED else 1, 132)
    spec = kernels.gemm_spec(cfg, n, k, kind, False, torch.bfloat16, torch.bfloat16, False)
    assert (("DS_DIRECT_EPILOGUE", 1) in spec.defines) == bool(defines)
    r = jit.build(spec)
    assert r.meta["stack_frame"] == 0 and r.meta["spill_stores"] == 0
    assert not nvcc.wgmma_serialisation_notes(r.meta["ptxas"])


def test_tma_store_epilogue_policy_and_shared_memory(monkeypatch):
    monkeypatch.setenv("DEEPSTACK_GEMM_ROWS256", "0")        # the 128-row tiles' policy (256 rows: the next test)

    def choose(m=4096, n=7168, k=2048, kind=kernels.KIND_DENSE, out=torch.bfloat16, c=None):
        return kernels.choose_spec(kind, m, 1, n, k, m, False, None, out, c, 132)
    spec, cfg, _ = choose()                                   # default: on for 128-row tiles at K <= 16384
    assert cfg.tma_store and spec.template_args[-2:] == (1, True)
    assert heuristic.smem_bytes(cfg, False) <= heuristic.SMEM_BUDGET
    assert not choose(k=32768)[1].tma_store and not choose(m=64)[1].tma_store
    assert choose(m=129, n=24576, k=1536)[1].tma_store and not choose(m=128, n=24576, k=1536)[1].tma_store
    monkeypatch.setenv("DEEPSTACK_GEMM_TMA_STORE", "0")
    _, plain, _ = choose()
    assert not plain.tma_store and plain.stages == cfg.stages + 1   # the staging tile costs one 128x128 stage
    assert heuristic.smem_bytes(cfg, False) - heuristic.smem_bytes(plain, False) == (
        128 * 128 * 2 - 2 * 4 * 16 * 48 - heuristic.stage_bytes(128, 128, False) - 16)
    monkeypatch.setenv("DEEPSTACK_GEMM_TMA_STORE", "1")
    assert choose(k=32768)[1].tma_store and choose(m=64)[1].tma_store
    # C accumulation and fp32 output keep their epilogues; the grouped kinds (bf16 output, no C) take it like the
    # dense one
    for kind, out, c in ((kernels.KIND_DENSE, torch.bfloat16, torch.bfloat16), (kernels.KIND_DENSE, torch.float32, None)):
        assert not choose(kind=kind, out=out, c=c)[1].tma_store
    monkeypatch.delenv("DEEPSTACK_GEMM_TMA_STORE")
    assert choose(kind=kernels.KIND_CONTIGUOUS, m=8192)[1].tma_store
    assert not choose(kind=kernels.KIND_CONTIGUOUS, m=8192, k=32768)[1].tma_store
    assert not choose(kind=kernels.KIND_MASKED, m=4096)[1].tma_store      # measured slower: off unless forced
    monkeypatch.setenv("DEEPSTACK_GEMM_TMA_STORE", "1")
    assert choose(kind=kernels.KIND_MASKED, m=4096)[1].tma_store
    # widths that are not multiples of 64 take it too (unswizzled 16 x BLOCK_N boxes), stages cut to fit
    for forced, stages in (("64,112,8", 8), ("128,112,7", 6), ("128,176,5", 4)):
        monkeypatch.setenv("DEEPSTACK_GEMM_CONFIG", forced)
        odd = choose()[1]
        assert odd.tma_store and odd.stages == stages and heuristic.smem_bytes(odd, False) <= heuristic.SMEM_BUDGET
    monkeypatch.delenv("DEEPSTACK_GEMM_CONFIG")
    monkeypatch.setenv("DEEPSTACK_GEMM_TMA_STORE", "2")
    with pytest.raises(ValueError, match="DEEPSTACK_GEMM_TMA_STORE"):
        choose()


def test_256_row_tile_policy(monkeypatch):
    """256 x 128 tiles where the model picked 128 x 128 for a dense bf16 GEMM with the TMA-store epilogue and they
    leave fewer waves (ROWS256_COST): the DeepSeek-V3 shapes at M = 4096 but N = 2112 (128 x 176 there), not
    M = 2048 x 7168 x 2048 (7 waves of 128-row tiles against 4 of 256), not grouped kinds, fp32 output, C, K past the
    TMA store's limit, nor with the TMA store or the switch off."""
    def choose(m=4096, n=7168, k=2048, kind=kernels.KIND_DENSE, out=torch.bfloat16, c=None, groups=1):
        return kernels.choose_spec(kind, m, groups, n, k, m, False, None, out, c, 132)[1]
    for n, k in kernels.DSV3_NK:
        cfg = choose(n=n, k=k)
        assert (cfg.block_m, cfg.block_n, cfg.stages, cfg.tma_store) == (
            (128, 176, 4, True) if n == 2112 else (256, 128, 3, True)), (n, k, cfg)
        assert cfg.threads == 384 and heuristic.smem_bytes(cfg, False) <= heuristic.SMEM_BUDGET
    assert choose(m=8192, n=2048, k=7168).block_m == 256
    assert choose(m=2048).block_m == 128 and choose(m=300, n=4096, k=1024).block_m == 128
    assert choose(kind=kernels.KIND_CONTIGUOUS, m=8192, groups=4).block_m == 128
    assert choose(out=torch.float32).block_m == 128 and choose(c=torch.bfloat16).block_m == 128
    assert choose(k=32768).block_m == 128
    monkeypatch.setenv("DEEPSTACK_GEMM_TMA_STORE", "0")
    assert choose().block_m == 128
    monkeypatch.delenv("DEEPSTACK_GEMM_TMA_STORE")
    monkeypatch.setenv("DEEPSTACK_GEMM_ROWS256", "0")
    assert choose().block_m == 128
    # =2 (opt-in) takes them for the contiguous kind too, below 2^15 groups and not at three K slices (ptxas spills)
    monkeypatch.setenv("DEEPSTACK_GEMM_ROWS256", "2")
    assert choose().block_m == 256
    contiguous = dict(kind=kernels.KIND_CONTIGUOUS, m=32768, groups=4)
    assert (choose(**contiguous).block_m, choose(**contiguous).tma_store) == (256, True)
    assert choose(**contiguous, k=384).block_m == 128 and choose(**contiguous, k=512).block_m == 256
    assert choose(kind=kernels.KIND_CONTIGUOUS, m=32768, groups=kernels.CONTIGUOUS_256_MAX_GROUPS).block_m == 128
    assert choose(kind=kernels.KIND_MASKED, m=4096, groups=4).block_m == 128
    monkeypatch.setenv("DEEPSTACK_GEMM_ROWS256", "3")
    with pytest.raises(ValueError, match="DEEPSTACK_GEMM_ROWS256"):
        choose()


@needs_nvcc
@pytest.mark.timeout(600)
@pytest.mark.parametrize("m,n,k,kind", [(4096, 7168, 2048, kernels.KIND_DENSE), (4096, 32768, 512, kernels.KIND_DENSE),
                                        (64, 7168, 16384, kernels.KIND_DENSE), (4096, 2112, 7168, kernels.KIND_DENSE),
                                        (32768, 7168, 2048, kernels.KIND_CONTIGUOUS),
                                        (4096, 4096, 7168, kernels.KIND_MASKED)])
def test_tma_store_kernels_compile_without_spills(monkeypatch, tmp_path, m, n, k, kind):
    monkeypatch.setenv("DEEPSTACK_GEMM_TMA_STORE", "1")
    _build_without_spills(monkeypatch, tmp_path, m, n, k, kind)


@needs_nvcc
@pytest.mark.timeout(600)
@pytest.mark.parametrize("n,k", [(7168, 2048), (4096, 7168), (4096, 512), (2000, 640), (7168, 16384)])
def test_contiguous_256_row_kernels_compile_without_spills(monkeypatch, tmp_path, n, k):
    """The opt-in 256-row contiguous kernel (DEEPSTACK_GEMM_ROWS256=2): two passes per tile where its halves hold two
    groups, the halves' ids packed in one register; no spills, no serialised wgmmas."""
    monkeypatch.setenv("DEEPSTACK_GEMM_ROWS256", "2")
    assert _build_without_spills(monkeypatch, tmp_path, 32768, n, k, kernels.KIND_CONTIGUOUS).block_m == 256


def _build_without_spills(monkeypatch, tmp_path, m, n, k, kind):
    monkeypatch.setenv("DEEPSTACK_JIT_PTXAS_CHECK", "1")
    monkeypatch.setenv("DEEPSTACK_JIT_CACHE_DIR", str(tmp_path))
    groups, em = (4, 256) if kind == kernels.KIND_MASKED else (1, m)
    spec, cfg, _ = kernels.choose_spec(kind, m, groups, n, k, em, False, None, torch.bfloat16, None, 132)
    assert cfg.tma_store
    r = jit.build(spec)
    assert r.meta["stack_frame"] == 0 and r.meta["spill_stores"] == 0
    assert not nvcc.wgmma_serialisation_notes(r.meta["ptxas"])
    return cfg


def test_weight_gradient_tma_store_policy():
    """1D1D kernels: the TMA store for bf16 output up to K = WGRAD_TMA_STORE_MAX_K with 128-row tiles, never for
    fp32 output or with C; its staging tile and the second B-scale slots fit the shared memory."""
    def cfg(k, out=torch.bfloat16, c=None, kind=kernels.KIND_DENSE, m=4096):
        return kernels.choose_spec(kind, m, 8, 7168, k, m, True, 0, out, c, 132)[1]
    assert cfg(1024).tma_store and cfg(kernels.WGRAD_TMA_STORE_MAX_K).tma_store
    assert not cfg(2 * kernels.WGRAD_TMA_STORE_MAX_K).tma_store
    assert not cfg(1024, torch.float32).tma_store and not cfg(1024, torch.float32, torch.float32).tma_store
    assert cfg(1024, kind=kernels.KIND_K_GROUPED).tma_store and not cfg(1024, m=128).tma_store
    for c in (cfg(1024), cfg(1024, kind=kernels.KIND_K_GROUPED), cfg(8192)):
        assert heuristic.smem_bytes(c, True) <= heuristic.SMEM_BUDGET


@needs_nvcc
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", [kernels.KIND_DENSE, kernels.KIND_K_GROUPED])
@pytest.mark.parametrize("out,has_c,tma", [(torch.bfloat16, False, ""), (torch.bfloat16, False, "0"),
                                          (torch.float32, False, ""), (torch.float32, True, "")])
def test_weight_gradient_kernels_compile_without_spills(monkeypatch, tmp_path, kind, out, has_c, tma):
    """The 1D1D kernels (dense and k-grouped) at FP8Experts' 7168 x 2048 weight gradient: bf16 output with the
    TMA store (the default at K <= 2048) and the staged stores, fp32 output with and without C."""
    monkeypatch.setenv("DEEPSTACK_GEMM_TMA_STORE", tma)
    monkeypatch.setenv("DEEPSTACK_JIT_PTXAS_CHECK", "1")
    monkeypatch.setenv("DEEPSTACK_JIT_CACHE_DIR", str(tmp_path))
    groups = 32 if kind == kernels.KIND_K_GROUPED else 1
    spec, cfg, _ = kernels.choose_spec(kind, 7168, groups, 2048, 1024, 7168, True, 0, out, out if has_c else None,
                                       132)
    assert cfg.tma_store == (out == torch.bfloat16 and tma != "0")
    assert heuristic.smem_bytes(cfg, True) <= heuristic.SMEM_BUDGET
    r = jit.build(spec)
    assert r.meta["stack_frame"] == 0 and r.meta["spill_stores"] == 0
    assert not nvcc.wgmma_serialisation_notes(r.meta["ptxas"])


@needs_nvcc
@pytest.mark.timeout(600)
@pytest.mark.parametrize("cfg,tma", [("128,112,7", "1"), ("128,144,6", "0"), ("128,160,5", "1"), ("128,176,5", "1"),
                                     ("64,176,7", "0")])
def test_odd_width_kernels_compile_without_spills(monkeypatch, tmp_path, cfg, tma):
    """Widths that are not multiples of 64: one main-loop copy per tile offset inside a B scale block, the TMA-store
    epilogue's unswizzled boxes; no spills, no serialised wgmma."""
    monkeypatch.setenv("DEEPSTACK_GEMM_CONFIG", cfg)
    monkeypatch.setenv("DEEPSTACK_GEMM_TMA_STORE", tma)
    monkeypatch.setenv("DEEPSTACK_JIT_PTXAS_CHECK", "1")
    monkeypatch.setenv("DEEPSTACK_JIT_CACHE_DIR", str(tmp_path))
    spec, used, _ = kernels.choose_spec(kernels.KIND_DENSE, 4096, 1, 2112, 7168, 4096, False, None, torch.bfloat16,
                                        None, 132)
    assert used.tma_store == (tma == "1")
    r = jit.build(spec)
    assert r.meta["stack_frame"] == 0 and r.meta["spill_stores"] == 0
    assert not nvcc.wgmma_serialisation_notes(r.meta["ptxas"])


@needs_nvcc
@pytest.mark.timeout(600)
@pytest.mark.parametrize("n,k", kernels.DSV3_NK)
@pytest.mark.parametrize("bn,multicast", [(128, "0"), (128, "1"), (64, "0")])
def test_256_row_tile_kernels_compile_without_spills(monkeypatch, tmp_path, n, k, bn, multicast):
    """256-row tiles (two 64-row waves per math warpgroup; multicast: 2-CTA clusters sharing A): 3-4 stages beside the
    64 / 32 KB TMA-store staging tile, no spills, no stack, no serialised wgmma."""
    monkeypatch.setenv("DEEPSTACK_GEMM_CONFIG", f"256,{bn},4")
    monkeypatch.setenv("DEEPSTACK_GEMM_MULTICAST", multicast)
    monkeypatch.setenv("DEEPSTACK_JIT_PTXAS_CHECK", "1")
    monkeypatch.setenv("DEEPSTACK_JIT_CACHE_DIR", str(tmp_path))
    spec, used, cluster = kernels.choose_spec(kernels.KIND_DENSE, 4096, 1, n, k, 4096, False, None, torch.bfloat16,
                                              None, 132)
    assert used.tma_store and used.threads == 384 and used.stages == (3 if bn == 128 else 4)
    assert cluster == (2 if multicast == "1" else 1)
    assert heuristic.smem_bytes(used, False) <= heuristic.SMEM_BUDGET
    r = jit.build(spec)
    assert r.meta["stack_frame"] == 0 and r.meta["spill_stores"] == 0
    assert not nvcc.wgmma_serialisation_notes(r.meta["ptxas"])


@pytest.mark.parametrize("kind,m,out,c,groups", [(kernels.KIND_CONTIGUOUS, 8192, torch.bfloat16, None, 1 << 15),
                                                 (kernels.KIND_MASKED, 4096, torch.bfloat16, None, 4),
                                                 (kernels.KIND_DENSE, 4096, torch.float32, None, 1),
                                                 (kernels.KIND_DENSE, 4096, torch.bfloat16, torch.bfloat16, 1),
                                                 (kernels.KIND_DENSE, 128, torch.bfloat16, None, 1)])
def test_256_row_tiles_refused_outside_the_tma_store_kernels(monkeypatch, kind, m, out, c, groups):
    """The masked kind, fp32 output, C, M <= 128 (no TMA-store epilogue) and contiguous calls with 2^15 groups or
    more (16-bit ids in that kernel) have no 256-row kernel: a clear error. (Contiguous calls below that take it.)"""
    monkeypatch.setenv("DEEPSTACK_GEMM_CONFIG", "256,128,3")
    with pytest.raises(ValueError, match="256-row GEMM tiles"):
        kernels.choose_spec(kind, m, groups, 4096, 7168, m, False, None, out, c, 132)
    if kind == kernels.KIND_CONTIGUOUS:
        assert kernels.choose_spec(kind, m, groups - 1, 4096, 7168, m, False, None, out, c, 132)[1].block_m == 256


# The A/B controls of the lean slices and the two-tile id lookahead (defaults since 2026-11-30), the opt-in
# 64-row tiles sharing A (2026-12-01), and the opt-in 2-CTA multicast with the TMA store (docs/gemm.md, "Session of 2026-11-30 05:35 UTC"): each compiles for sm_90a
# without spills, stack or serialised wgmma, so an A/B run can build it.
_D, _C, _M = kernels.KIND_DENSE, kernels.KIND_CONTIGUOUS, kernels.KIND_MASKED
EXPERIMENT_SPECS = (
    [("DS_ID_LOOKAHEAD1", "0", None, _C, 32768, 7168, 2048),
     ("DS_ID_LOOKAHEAD1", "0", "128,176,5", _C, 8192, 2112, 7168)]
    + [("DS_NO_LEAN_SLICE", "0", None, _D, 4096, 4096, 7168), ("DS_NO_LEAN_SLICE", "0", None, _M, 4096, 4096, 7168),
       ("DS_NO_LEAN_SLICE,DS_ID_LOOKAHEAD1", "0", None, _C, 32768, 7168, 2048)]
    + [("", "2", None, _D, 4096, n, k) for n, k in kernels.DSV3_NK if n != 2112]
    + [("", "2", "128,160,5", _D, 4096, 7168, 2048)]
    # 64-row tiles sharing A (M = 64 / 128: every DeepSeek-V3 shape whose heuristic tile is 64 rows, at most 160 wide)
    + [("", "1", None, _D, m, n, k) for m in (64, 128) for n, k in kernels.DSV3_NK
       if n != 24576 and (m, n) != (128, 32768)]
    + [("DS_SLOW_PLACE", "0", None, _C, 32768, 7168, 2048), ("DS_FAST_PLACE", "0", None, _D, 4096, 7168, 16384),
       ("DS_NO_SERIAL_AHEAD", "0", None, _D, 4096, 2112, 7168)]
)


@needs_nvcc
@pytest.mark.timeout(600)
@pytest.mark.parametrize("defines,multicast,cfg,kind,m,n,k", EXPERIMENT_SPECS)
def test_experiment_kernels_compile_without_spills(monkeypatch, tmp_path, defines, multicast, cfg, kind, m, n, k):
    monkeypatch.setenv("DEEPSTACK_GEMM_DEFINES", defines)
    monkeypatch.setenv("DEEPSTACK_GEMM_MULTICAST", multicast)
    if cfg:
        monkeypatch.setenv("DEEPSTACK_GEMM_CONFIG", cfg)
    monkeypatch.setenv("DEEPSTACK_JIT_PTXAS_CHECK", "1")
    monkeypatch.setenv("DEEPSTACK_JIT_CACHE_DIR", str(tmp_path))
    groups, em = (4, 256) if kind == kernels.KIND_MASKED else (4 if kind == kernels.KIND_CONTIGUOUS else 1, m)
    spec, used, cluster = kernels.choose_spec(kind, m, groups, n, k, em, False, None, torch.bfloat16, None, 132)
    if multicast == "2":
        assert cluster == 2 and used.tma_store
    if multicast == "1":
        assert cluster == 2 and used.block_m == 64
    r = jit.build(spec)
    assert r.meta["stack_frame"] == 0 and r.meta["spill_stores"] == 0
    assert not nvcc.wgmma_serialisation_notes(r.meta["ptxas"])
