"""swiglu_quant_fp8 (schema torch_deepstack/_library.py, reference quant/reference.py, fake meta_impls/quant.py, CUDA
face quant/kernels.py, kernel src/quant/per_token_group_quant_fp8.cuh with kSwiGLU): h = [gate | up] ->
silu(gate) * up in fp32, quantised per 1x128 group. The reference is per_token_group_quant_fp8 of the fp32
activation, bit for bit. The CUDA kernel's silu uses the device expf (within 2 ulp of the CPU's), so a value on a
rounding boundary of e4m3 may land one e4m3 step away: checked as scales within 1e-6 relative, at most 0.1% of the
codes one step apart, none further, on fresh random inputs at odd shapes."""
import pytest
import torch
import torch.nn.functional as F

import torch_deepstack  # noqa: F401
from tests.helpers import fresh_randn
from torch_deepstack.quant import per_token_group_quant_fp8, swiglu_quant_fp8


@pytest.mark.parametrize("shape", [(1, 256), (37, 512), (3, 10, 768)])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_reference_is_the_group_quant_of_the_fp32_activation(shape, ue8m0):
    h = fresh_randn(*shape, dtype=torch.bfloat16, scale=3.0)
    f = shape[-1] // 2
    act = F.silu(h[..., :f].float()) * h[..., f:].float()
    q, s = swiglu_quant_fp8(h, scale_ue8m0=ue8m0)
    q_want, s_want = per_token_group_quant_fp8(act, scale_ue8m0=ue8m0)
    assert q.shape == (*shape[:-1], f) and s.stride() == s_want.stride()
    assert torch.equal(q.view(torch.uint8), q_want.view(torch.uint8)) and torch.equal(s, s_want)


def test_bad_input_gets_clear_errors():
    with pytest.raises(ValueError, match="multiple of 256"):
        swiglu_quant_fp8(torch.randn(4, 384))
    with pytest.raises(ValueError, match=r"\[M, 2F\] or \[B, M, 2F\]"):
        swiglu_quant_fp8(torch.randn(256))
    with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
        swiglu_quant_fp8(torch.randn(4, 256, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        swiglu_quant_fp8(torch.randn(512, 4).t())


def _codes_close(got, want):
    """Equal e4m3 values, or one step apart (e4m3 steps: 2^-3 of the value, 2^-9 below the normal range)."""
    a, b = got.cpu().float(), want.float()
    off = a != b
    step = torch.maximum(a.abs(), b.abs()) * 2.0 ** -3 + 2.0 ** -9
    assert ((a - b).abs() <= step).all() and off.float().mean() <= 1e-3, off.float().mean()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 256), (37, 768), (300, 4096), (2, 129, 512)])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_cuda_matches_reference(dtype, shape, ue8m0):
    h = fresh_randn(*shape, dtype=dtype, scale=4.0)
    q_want, s_want = swiglu_quant_fp8(h, scale_ue8m0=ue8m0)
    q, s = swiglu_quant_fp8(h.cuda(), scale_ue8m0=ue8m0)
    assert s.stride() == s_want.stride()
    torch.testing.assert_close(s.cpu(), s_want, rtol=1e-6, atol=0)
    _codes_close(q, q_want)


@pytest.mark.cuda
def test_cuda_strided_rows_and_empty():
    wide = fresh_randn(45, 1024, dtype=torch.bfloat16, device="cuda")
    h = wide[:, :512]                                         # row stride 1024
    q, s = swiglu_quant_fp8(h)
    q_want, s_want = swiglu_quant_fp8(h.cpu())
    torch.testing.assert_close(s.cpu(), s_want, rtol=1e-6, atol=0)
    _codes_close(q, q_want)
    q0, s0 = swiglu_quant_fp8(torch.empty(0, 256, device="cuda", dtype=torch.bfloat16))
    assert q0.shape == (0, 128) and s0.shape == (0, 1)
