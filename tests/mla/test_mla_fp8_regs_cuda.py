"""The register-dequantising few-rows FP8 kernel (src/mla/mla_decode_fp8_regs.cuh, opt-in through
kernels._FP8_SMALL_KERNEL = "regs") against the fp32 reference and against the shared-memory few-rows kernel.

Its own file so a device run can select or deselect it (-k / path). A kernel that deadlocks must fail the run rather
than hang it: the thread timeout method ends the process with a stack dump."""
from __future__ import annotations

import pytest
import torch

import torch_deepstack  # noqa: F401
from tests.helpers import calc_diff
from tests.mla.mla_data import assert_mla_close, make_case, varied_lengths
from tests.mla.test_mla_cuda import FP8_CASES, run_case
from torch_deepstack.mla import get_mla_metadata, kernels, mla_decode_with_kvcache

pytestmark = [pytest.mark.cuda, pytest.mark.timeout(180, method="thread")]


@pytest.fixture
def regs_kernel(monkeypatch):
    monkeypatch.setattr(kernels, "_FP8_SMALL_KERNEL", "regs")


@pytest.mark.parametrize("case", FP8_CASES, ids=lambda c: f"b{c[0]}sq{c[1]}hq{c[2]}hk{c[3]}")
@pytest.mark.parametrize("parts", [0, 7])
def test_fp8_regs_kernel_matches_reference(case, parts, regs_kernel):
    out, lse, ref_out, ref_lse, _ = run_case(*case, parts=parts, fp8=True)
    assert_mla_close(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("h_q", [16, 32])
def test_fp8_regs_kernel_matches_smem_kernel(monkeypatch, h_q):
    """Both few-rows FP8 kernels on the same inputs (several requests per part, an empty request, splits)."""
    lens = varied_lengths(12, 700, seed=7, zeros=(4,))
    q, cache, bt, seq = make_case(12, 1, h_q, 1, 576, torch.bfloat16, lens, fp8=True, device="cuda", seed=7)
    sched, splits = get_mla_metadata(seq, h_q, 1, num_sm_parts=9)
    monkeypatch.setattr(kernels, "_FP8_SMALL_KERNEL", "regs")
    o_regs, l_regs = mla_decode_with_kvcache(q, cache, bt, seq, 512, sched, splits, is_fp8_kvcache=True)
    monkeypatch.setattr(kernels, "_FP8_SMALL_KERNEL", "smem")
    o_smem, l_smem = mla_decode_with_kvcache(q, cache, bt, seq, 512, sched, splits, is_fp8_kvcache=True)
    assert calc_diff(o_regs.float(), o_smem.float()) < 1e-5
    assert torch.equal(torch.isinf(l_regs), torch.isinf(l_smem))
    fin = torch.isfinite(l_smem)
    assert float((l_regs[fin] - l_smem[fin]).abs().max()) < 1e-4
