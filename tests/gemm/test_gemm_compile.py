"""Compile-only checks (CPU with nvcc): the experimental staged epilogue (DS_STAGED_EPILOGUE, off by default and not
yet run on a GPU) keeps compiling for sm_90a without spills, and leaves room for its shared memory."""
import pytest
import torch

from torch_deepstack import jit
from torch_deepstack.gemm import heuristic, kernels
from torch_deepstack.jit import nvcc

needs_nvcc = pytest.mark.skipif(nvcc.find_nvcc() is None, reason="nvcc not installed")


def test_staged_epilogue_reserves_its_shared_memory(monkeypatch):
    cfg = heuristic.select_config(4096, 7168, 16384, 1, 132)
    plain = heuristic.smem_bytes(cfg, False)
    monkeypatch.setenv("DEEPSTACK_GEMM_DEFINES", "DS_STAGED_EPILOGUE")
    staged_cfg = heuristic.select_config(4096, 7168, 16384, 1, 132)
    assert staged_cfg == cfg                                  # the heuristic's choice does not move here
    assert heuristic.smem_bytes(staged_cfg, False) - plain == 2 * 4 * 16 * 48
    assert heuristic.smem_bytes(staged_cfg, False) <= heuristic.SMEM_BUDGET
    assert plain <= heuristic.SMEM_BUDGET


@needs_nvcc
@pytest.mark.timeout(600)
@pytest.mark.parametrize("m,n,k,kind", [(4096, 32768, 512, kernels.KIND_DENSE), (4096, 7168, 16384, kernels.KIND_DENSE),
                                        (8192, 4096, 7168, kernels.KIND_CONTIGUOUS),
                                        (256, 7168, 2048, kernels.KIND_MASKED), (7, 200, 256, kernels.KIND_DENSE)])
def test_staged_epilogue_compiles_without_spills(monkeypatch, tmp_path, m, n, k, kind):
    monkeypatch.setenv("DEEPSTACK_GEMM_DEFINES", "DS_STAGED_EPILOGUE")
    monkeypatch.setenv("DEEPSTACK_JIT_PTXAS_CHECK", "1")
    monkeypatch.setenv("DEEPSTACK_JIT_CACHE_DIR", str(tmp_path))
    cfg = heuristic.select_config(m, n, k, 4 if kind == kernels.KIND_MASKED else 1, 132)
    spec = kernels.gemm_spec(cfg, n, k, kind, False, torch.bfloat16, torch.bfloat16, False)
    assert ("DS_STAGED_EPILOGUE", 1) in spec.defines
    r = jit.build(spec)
    assert r.meta["stack_frame"] == 0 and r.meta["spill_stores"] == 0
