"""deepstack::swiglu and swiglu_backward (schemas torch_deepstack/_library.py, references and autograd
gemm/reference.py, fakes meta_impls/gemm.py, CUDA faces gemm/kernels.py, kernel src/gemm/swiglu.cuh): the SwiGLU
between an expert MLP's GEMMs, h = [gate | up]. The references against autograd of F.silu(gate) * up in float64
(fp32 inputs: 1e-6); the CUDA kernel against the references on fresh random inputs at odd shapes (both compute in
fp32 and round once; the device expf differs from the CPU's by an ulp or two, so 1 ulp of the output dtype:
rtol 8e-3 bf16, 1e-3 fp16, 1e-5 fp32)."""
import pytest
import torch
import torch.nn.functional as F

from torch_deepstack.gemm import swiglu

_TOL = {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float32: 1e-5}


@pytest.mark.parametrize("rows,f", [(1, 1), (37, 136), (6, 7)])
def test_reference_and_gradient_match_autograd_of_the_formula(rows, f):
    h = (torch.randn(rows, 2 * f) * 3).requires_grad_(True)
    g = torch.randn(rows, f)
    out = swiglu(h)
    (dh,) = torch.autograd.grad(out, h, g)
    h64 = h.detach().double().requires_grad_(True)
    want = F.silu(h64[:, :f]) * h64[:, f:]
    (dh_want,) = torch.autograd.grad(want, h64, g.double())
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dh.double(), dh_want, rtol=1e-5, atol=1e-5)


def test_bad_input_gets_clear_errors():
    with pytest.raises(RuntimeError, match=r"h must be \[rows, 2F\]"):
        swiglu(torch.randn(4, 5))
    with pytest.raises(RuntimeError, match="h must be one of"):
        swiglu(torch.randn(4, 6, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="contiguous in its last dim"):
        swiglu(torch.randn(8, 4).t())
    with pytest.raises(RuntimeError, match=r"grad must be torch.float32 \[4, 3\]"):
        torch.ops.deepstack.swiglu_backward(torch.randn(4, 6), torch.randn(4, 6))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows,f", [(1, 8), (37, 136), (300, 2048), (19, 7)])
def test_cuda_kernels_match_references(dtype, rows, f):
    h = (torch.randn(rows, 2 * f) * 3).to(dtype)
    g = torch.randn(rows, f).to(dtype)
    wide = torch.zeros(rows, 2 * f + 8, dtype=dtype, device="cuda")   # h rows with a wider stride, too
    wide[:, :2 * f] = h.cuda()
    for hd in (h.cuda(), wide[:, :2 * f]):
        tol = dict(rtol=_TOL[dtype], atol=_TOL[dtype])
        torch.testing.assert_close(swiglu(hd).cpu(), swiglu(h), **tol)
        got = torch.ops.deepstack.swiglu_backward(g.cuda(), hd)
        torch.testing.assert_close(got.cpu(), torch.ops.deepstack.swiglu_backward(g, h), **tol)
