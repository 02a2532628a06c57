"""The GEMM faces remember calls by their operands' addresses and layouts (gemm/kernels.py _CALLS) and the
quantisers plan by input layout (_QUANT_PLANS). Their host-side logic, on the CPU with the GPU parts stubbed
(torch_deepstack.testing.gpu_stub): a repeat skips the checks but still launches, anything the launch's arguments
depend on (shape, strides, dtype, addresses, switches) makes a new entry, and work that is not a replayable launch
(K = 0, temporaries) is never remembered."""
import pytest
import torch

from torch_deepstack.gemm import checks, kernels
from torch_deepstack.testing.gpu_stub import gpu_parts_stubbed

FP8 = torch.float8_e4m3fn


@pytest.fixture
def stubs(monkeypatch):
    for v in kernels._SWITCHES:
        monkeypatch.delenv(v, raising=False)
    calls = []
    real = checks.check_dense
    monkeypatch.setattr(checks, "check_dense", lambda *a, **k: (calls.append(a[0]), real(*a, **k)))
    with gpu_parts_stubbed() as kernels_by_spec:
        yield kernels_by_spec, calls


def _operands(m=256, n=384, k=512):
    a = torch.zeros(m, k, dtype=FP8)
    sfa = kernels.mn_major_tma_aligned_empty((m, k // 128), device="cpu").fill_(1)
    b = torch.zeros(n, k, dtype=FP8)
    sfb = torch.ones(n // 128, k // 128)
    return a, sfa, b, sfb, torch.empty(m, n, dtype=torch.bfloat16)


def _launches(kernels_by_spec):
    return sum(kern.launches for kern in kernels_by_spec.values())


def test_repeated_call_skips_checks_and_still_launches(stubs):
    kernels_by_spec, calls = stubs
    ops = _operands()
    for _ in range(3):
        kernels.fp8_gemm_nt_cuda(*ops)
    assert calls == ["fp8_gemm_nt"] and len(kernels._CALLS) == 1 and _launches(kernels_by_spec) == 3


def test_any_change_to_the_launch_arguments_is_a_new_call(stubs, monkeypatch):
    kernels_by_spec, calls = stubs
    a, sfa, b, sfb, d = _operands()
    kernels.fp8_gemm_nt_cuda(a, sfa, b, sfb, d)
    kernels.fp8_gemm_nt_cuda(a, sfa, b, sfb, torch.empty_like(d))                  # another output address
    a2, sfa2, _, _, d2 = _operands(m=128)
    kernels.fp8_gemm_nt_cuda(a2, sfa2, b, sfb, d2)                                  # another M
    kernels.fp8_gemm_nt_cuda(a, sfa, b, sfb, torch.empty(256, 384))                 # another output dtype
    monkeypatch.setenv("DEEPSTACK_GEMM_TMA_STORE", "0")                             # a switch
    kernels.fp8_gemm_nt_cuda(a, sfa, b, sfb, d)
    kernels.fp8_wgrad_gemm_nt_cuda(a, sfa, a2, sfa2, torch.empty(256, 128))         # another op
    assert len(calls) == 6 and len(kernels._CALLS) == 6 and _launches(kernels_by_spec) == 6


def test_work_without_a_replayable_launch_is_not_remembered(stubs):
    kernels_by_spec, calls = stubs
    a, sfa, b, sfb, d = _operands()
    a0, sfa0, b0 = a[:, :0], sfa[:, :0], b[:, :0]
    for _ in range(2):                      # K = 0: D = 0, written by torch ops on every call
        d.fill_(7)
        kernels.fp8_gemm_nt_cuda(a0, sfa0, b0, sfb[:, :0], d)
        assert d.eq(0).all()
    c = torch.ones_like(d)
    for _ in range(2):                      # accumulate into D from a separate C: a C + D temporary
        kernels.fp8_gemm_nt_cuda(a, sfa, b, sfb, d, c, True)
    for _ in range(2):                      # row-major scales: a layout copy
        kernels.fp8_gemm_nt_cuda(a, sfa.contiguous(), b, sfb, d)
    assert len(calls) == 6 and not kernels._CALLS and _launches(kernels_by_spec) == 4


def test_bad_input_still_raises_after_a_good_call(stubs):
    a, sfa, b, sfb, d = _operands()
    kernels.fp8_gemm_nt_cuda(a, sfa, b, sfb, d)
    with pytest.raises(RuntimeError, match="sfb must have shape"):
        kernels.fp8_gemm_nt_cuda(a, sfa, b, sfb[:1], d)
    with pytest.raises(RuntimeError, match="a must be torch.float8_e4m3fn"):
        kernels.fp8_gemm_nt_cuda(a.view(torch.int8), sfa, b, sfb, d)


def test_quantiser_plans_by_layout(stubs):
    kernels_by_spec, _ = stubs
    x = torch.randn(256, 512, dtype=torch.bfloat16)
    outs = [kernels.per_token_group_quant_fp8_dual_cuda(x) for _ in range(2)]
    assert len(kernels._QUANT_PLANS) == 1 and _launches(kernels_by_spec) == 2
    assert outs[0][0].data_ptr() != outs[1][0].data_ptr()          # fresh outputs on every call
    kernels.per_token_group_quant_fp8_dual_cuda(x[:, :256])          # another layout: planned (and checked) anew
    assert len(kernels._QUANT_PLANS) == 2
    with pytest.raises(RuntimeError, match="multiple of 128"):
        kernels.per_token_group_quant_fp8_dual_cuda(x[:, :200])
    with pytest.raises(RuntimeError, match="2-D"):
        kernels.per_block_quant_fp8_cuda(x[0])


def test_contiguous_group_ids_checked_on_every_call_unless_unchanged(stubs, monkeypatch):
    """The CUDA face's data check of m_indices runs outside the call memo (the ids may change in place at the same
    address) but only once per version of the tensor (IDS_CHECKED), and not at all for layouts noted as built valid."""
    kernels_by_spec, _ = stubs
    seen = []
    real = checks.check_m_indices_values
    monkeypatch.setattr(checks, "check_m_indices_values", lambda *a: (seen.append(a[0]), real(*a)))
    a, sfa, b, sfb, d = _operands(m=256)
    bg, sfbg = torch.stack([b, b]), torch.stack([sfb, sfb])
    ids = torch.tensor([0] * 128 + [1] * 100 + [-1] * 28, dtype=torch.int32)
    for _ in range(3):
        kernels.m_grouped_contiguous_cuda(a, sfa, bg, sfbg, d, ids)
    assert len(seen) == 1 and _launches(kernels_by_spec) == 3
    ids[5] = 2                                                    # written in place: checked again, refused
    with pytest.raises(ValueError, match="m_indices holds group ids"):
        kernels.m_grouped_contiguous_cuda(a, sfa, bg, sfbg, d, ids)
    assert len(seen) == 2 and _launches(kernels_by_spec) == 3
    fresh = ids.clone().fill_(0)
    checks.IDS_CHECKED.note((fresh,), (2,))                       # e.g. FP8Experts' own layout
    kernels.m_grouped_contiguous_cuda(a, sfa, bg, sfbg, d, fresh)
    assert len(seen) == 2 and _launches(kernels_by_spec) == 4
    monkeypatch.setenv("DEEPSTACK_GEMM_CHECK_IDS", "0")          # opted out: no data check (no sync) at all
    kernels.m_grouped_contiguous_cuda(a, sfa, bg, sfbg, d, ids.clone().fill_(1))
    assert len(seen) == 2 and _launches(kernels_by_spec) == 5
