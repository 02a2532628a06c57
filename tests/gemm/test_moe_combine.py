"""deepstack::moe_combine and its routing-weight gradient moe_combine_weight_grad (schema torch_deepstack/_library.py, reference and autograd gemm/reference.py, fake
meta_impls/gemm.py, CUDA face gemm/kernels.py, kernel src/gemm/moe_combine.cuh): out[t] = sum_c weights[t, c] *
y[rows[t, c]] in fp32. The reference against a plain loop (exact up to fp32 summation order: 1e-6), the CUDA kernel
against the reference on fresh random inputs at odd shapes (fp32 sums in both, one rounding to y's dtype: equal to
1 ulp of that dtype, checked as 1e-2 relative for bf16, 2e-3 fp16, 1e-5 fp32), gradients against autograd through
the loop, and the errors for bad rows. moe_combine_weight_grad's kernel (fp32 dot products, summed across a block
in another order than the reference's) against the reference to 1e-5 relative."""
import pytest
import torch

from torch_deepstack.gemm import moe_combine

_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def _case(m, t, k, hidden, dtype=torch.float32, empty=0.2, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(m, generator=gen)[:t * k].view(t, k)
    rows = torch.where(torch.rand(t, k, generator=gen) < empty, -1, rows)
    y = torch.randn(m, hidden, generator=gen).to(dtype)
    w = torch.rand(t, k, generator=gen)
    return y.to(device), rows.to(device), w.to(device)


def _loop(y, rows, w):
    out = torch.zeros(rows.shape[0], y.shape[1], dtype=torch.float64)
    for i in range(rows.shape[0]):
        for c in range(rows.shape[1]):
            if rows[i, c] >= 0:
                out[i] += w[i, c].double() * y[rows[i, c]].double()
    return out


@pytest.mark.parametrize("m,t,k,hidden", [(50, 12, 4, 24), (7, 3, 2, 5), (300, 37, 8, 136), (10, 0, 2, 8)])
def test_reference_is_the_weighted_sum_of_each_tokens_rows(m, t, k, hidden):
    y, rows, w = _case(m, t, k, hidden, seed=m)
    out = moe_combine(y, rows, w)
    assert out.shape == (t, hidden) and out.dtype == y.dtype
    torch.testing.assert_close(out.double(), _loop(y, rows, w), rtol=1e-6, atol=1e-6)


def test_gradients_match_autograd_through_the_loop():
    y, rows, w = _case(60, 9, 5, 16, seed=3)
    y.requires_grad_(True)
    w.requires_grad_(True)
    g = torch.randn(9, 16)
    got = torch.autograd.grad(moe_combine(y, rows, w), (y, w), g)
    y2, w2 = y.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    want = torch.autograd.grad(_loop(y2, rows, w2), (y2, w2), g.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
    unread = torch.ones(60, dtype=torch.bool)
    unread[rows[rows >= 0]] = False
    assert unread.any() and got[0][unread].abs().sum() == 0          # rows no slot reads get no gradient


def test_bad_rows_and_arguments_get_clear_errors():
    y, rows, w = _case(20, 4, 3, 8, empty=0)
    with pytest.raises(ValueError, match=r"outside \[-1, 20\)"):
        moe_combine(y, torch.where(rows == rows[0, 0], 20, rows), w)
    with pytest.raises(ValueError, match="more than once"):
        moe_combine(y, torch.where(rows == rows[1, 1], rows[0, 0], rows), w)
    with pytest.raises(RuntimeError, match="weights must be float32"):
        moe_combine(y, rows, w.double())
    with pytest.raises(RuntimeError, match="weights must have rows' shape"):
        moe_combine(y, rows, w[:, :2])
    with pytest.raises(RuntimeError, match="y must be one of"):
        moe_combine(y.double(), rows, w)
    with pytest.raises(RuntimeError, match="rows must be int32/int64"):
        moe_combine(y, rows.float(), w)
    grad = torch.randn(4, 8).to(y.dtype)
    for bad in (20, -2):   # the weight gradient reads y[rows] too (before 2026-12-02: an IndexError, on GPU unchecked)
        with pytest.raises(ValueError, match=r"moe_combine_weight_grad: rows holds values in"):
            torch.ops.deepstack.moe_combine_weight_grad(grad, y, torch.where(rows == rows[0, 0], bad, rows))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,t,k,hidden", [(1000, 111, 8, 7168), (129, 31, 3, 72), (57, 19, 2, 13), (9, 4, 2, 1)])
def test_cuda_kernel_matches_reference(dtype, m, t, k, hidden):
    for seed in range(2):
        y, rows, w = _case(m, t, k, hidden, dtype, seed=seed + 10 * m)
        want = moe_combine(y, rows, w)
        got = moe_combine(y.cuda(), rows.cuda().int(), w.cuda())
        torch.testing.assert_close(got.cpu().float(), want.float(), rtol=_TOL[dtype], atol=_TOL[dtype])
        wide = torch.zeros(m, hidden + 8, dtype=dtype, device="cuda")   # y a column slice of a wider tensor
        wide[:, :hidden] = y.cuda()
        got = moe_combine(wide[:, :hidden], rows.cuda(), w.cuda())
        torch.testing.assert_close(got.cpu().float(), want.float(), rtol=_TOL[dtype], atol=_TOL[dtype])


@pytest.mark.cuda
def test_cuda_gradients_match_the_cpu_reference():
    y, rows, w = _case(400, 45, 6, 264, seed=4)
    g = torch.randn(45, 264)
    outs = []
    for device in ("cpu", "cuda"):
        yd, wd = (v.to(device, copy=True).requires_grad_(True) for v in (y, w))
        outs.append([t.cpu() for t in torch.autograd.grad(moe_combine(yd, rows.to(device), wd), (yd, wd),
                                                           g.to(device))])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_errors_and_graph_capture():
    y, rows, w = (v.cuda() for v in _case(64, 10, 4, 128, torch.bfloat16, empty=0))
    with pytest.raises(ValueError, match="more than once"):
        moe_combine(y, torch.where(rows == rows[1, 1], rows[0, 0], rows), w)
    with pytest.raises(ValueError, match=r"moe_combine_weight_grad: rows holds values in \[\d+, 64\]"):
        torch.ops.deepstack.moe_combine_weight_grad(torch.ones(10, 128, dtype=y.dtype, device="cuda"), y,
                                                    torch.where(rows == rows[0, 0], 64, rows))
    want = moe_combine(y, rows, w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):                     # (the eager row check would sync: skipped under capture)
        out = moe_combine(y, rows, w)
    w.mul_(2)
    graph.replay()
    torch.testing.assert_close(out.float(), 2 * want.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,t,k,hidden", [(1000, 111, 8, 7168), (57, 19, 2, 13), (129, 31, 3, 72)])
def test_cuda_weight_grad_kernel_matches_reference(dtype, m, t, k, hidden):
    y, rows, _ = _case(m, t, k, hidden, dtype, seed=m + 1)
    grad = torch.randn(t, hidden).to(dtype)
    want = torch.ops.deepstack.moe_combine_weight_grad(grad, y, rows)
    got = torch.ops.deepstack.moe_combine_weight_grad(grad.cuda(), y.cuda(), rows.cuda().int())
    got = got.cpu()
    assert (rows < 0).any() and got[rows < 0].eq(0).all()               # empty slots: exactly 0
    # Both sum `hidden` fp32 products in different orders: the rounding differences grow with the sum of the
    # products' magnitudes (fp32 at hidden = 7168: ~1e-4 on dots of ~1e2), so the bound scales with it; a wrong,
    # missing or doubled product (magnitude ~1) would exceed it by far.
    magnitude = (grad.float().abs()[:, None, :] * y.float().abs()[rows.clamp(min=0)]).sum(-1)
    err = (got - want).abs()
    bound = 1e-5 * want.abs() + 2e-6 * magnitude + 1e-6
    assert (err <= bound).all(), f"max error {err.max():.3g}, worst excess {(err - bound).max():.3g}"
