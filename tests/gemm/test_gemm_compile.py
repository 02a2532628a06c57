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
        assert cfg.block_m == 128 and cfg.block_n in (64, 128, 192)


@needs_nvcc
@pytest.mark.timeout(600)
@pytest.mark.parametrize("defines", ["", "DS_DIRECT_EPILOGUE"])
@pytest.mark.parametrize("m,n,k,kind", [(4096, 32768, 512, kernels.KIND_DENSE), (4096, 7168, 16384, kernels.KIND_DENSE),
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
    assert "C7514" not in r.meta["ptxas"] and "C7520" not in r.meta["ptxas"]   # no serialised wgmma
