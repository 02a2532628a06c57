"""Compile-only checks (CPU with nvcc): the MLA kernels that calls take by default compile for sm_90a without spills,
a stack frame or serialised wgmmas (ptxas's C75xx notes: a kernel that still runs, up to ~1.6x slower)."""
import pytest
import torch

from torch_deepstack import jit
from torch_deepstack.jit import nvcc
from torch_deepstack.mla import kernels

needs_nvcc = pytest.mark.skipif(nvcc.find_nvcc() is None, reason="nvcc not installed")


def _default_specs():
    """(name, spec): the bf16/fp16 decode kernel per q-row count (general, seesaw pairs, overlap), d = 512, the FP8
    kernels (few rows, and the general kernel's FP8 form), the combine and metadata kernels."""
    specs = [(f"bf16 rows={rows}", kernels.bf16_decode_spec(torch.bfloat16, 576, rows)[0]) for rows in (16, 64, 128, 192)]
    specs += [("fp16 rows=256", kernels.bf16_decode_spec(torch.float16, 576, 256)[0]),
              ("bf16 d=512 rows=128", kernels.bf16_decode_spec(torch.bfloat16, 512, 128)[0]),
              ("fp8 rows=16", kernels.fp8_few_rows_spec(16)), ("fp8 rows=32", kernels.fp8_few_rows_spec(32)),
              ("fp8 rows=64", kernels.decode_spec(torch.bfloat16, 576, True)),
              ("combine", kernels.combine_spec(torch.bfloat16)), ("metadata", kernels.metadata_spec())]
    return specs


@needs_nvcc
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name,spec", _default_specs(), ids=[n for n, _ in _default_specs()])
def test_default_mla_kernels_compile_clean(monkeypatch, tmp_path, name, spec):
    monkeypatch.setenv("DEEPSTACK_JIT_PTXAS_CHECK", "1")   # fails the build on spills, stack or C75xx notes
    monkeypatch.setenv("DEEPSTACK_JIT_CACHE_DIR", str(tmp_path))
    r = jit.build(spec)
    assert r.meta["spill_stores"] == 0 and r.meta["stack_frame"] == 0
    assert not nvcc.wgmma_serialisation_notes(r.meta["ptxas"])


def test_default_kernel_choice_per_row_count():
    assert kernels.decode_kernel_for(16) == "general" and kernels.decode_kernel_for(64) == "general"
    assert kernels.decode_kernel_for(128) == "seesaw_pair" and kernels.decode_kernel_for(256) == "seesaw_pair"
    assert kernels.decode_kernel_for(192) == "overlap"     # an odd number of 64-row blocks: not paired
