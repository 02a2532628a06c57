"""per_token_group_quant_fp8: reference semantics on CPU, CUDA kernel against the reference, bad input."""
import pytest
import torch

import torch_deepstack  # noqa: F401
from torch_deepstack.quant import per_token_group_quant_fp8
from torch_deepstack.quant.reference import ceil_to_ue8m0
from tests.helpers import fresh_randn

OP = torch.ops.deepstack.per_token_group_quant_fp8


def dequant(q, s, group_size):
    *lead, k = q.shape
    return (q.float().reshape(*lead, k // group_size, group_size) * s.unsqueeze(-1)).reshape(*lead, k)


@pytest.mark.parametrize("shape", [(1, 128), (7, 384), (65, 256), (3, 33, 512)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reference_semantics(shape, dtype):
    x = fresh_randn(*shape, dtype=dtype, scale=4.0)
    q, s = per_token_group_quant_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    groups = shape[-1] // 128
    assert s.shape == (*shape[:-1], groups) and s.dtype == torch.float32
    m_al = (shape[-2] + 3) // 4 * 4
    assert s.stride()[-2:] == (1, m_al)          # MN-major, TMA-aligned
    amax = x.float().reshape(*shape[:-1], groups, 128).abs().amax(-1).clamp_min(1e-4)
    torch.testing.assert_close(s, amax / 448.0, rtol=0, atol=0)
    # Every group uses the full e4m3 range and dequantises within e4m3's relative precision (2^-4).
    err = (dequant(q, s, 128) - x.float()).abs()
    assert (err <= x.float().abs() * 2 ** -4 + s.repeat_interleave(128, -1) * 2 ** -9).all()
    assert (q.float().reshape(*shape[:-1], groups, 128).abs().amax(-1) == 448).all()


def test_ue8m0_scales_are_powers_of_two():
    x = fresh_randn(5, 256, dtype=torch.bfloat16)
    q, s = per_token_group_quant_fp8(x, scale_ue8m0=True)
    assert torch.equal(torch.log2(s), torch.log2(s).round())
    amax = x.float().reshape(5, 2, 128).abs().amax(-1)
    assert (s >= amax / 448).all() and (s < 2 * amax / 448).all()


def test_ceil_to_ue8m0_exact():
    s = torch.tensor([1.0, 1.5, 0.25, 0.2500001, 3.0, 2 ** -20, 7.9], dtype=torch.float32)
    assert ceil_to_ue8m0(s).tolist() == [1.0, 2.0, 0.25, 0.5, 4.0, 2 ** -20, 8.0]


def test_zero_rows_are_clamped_not_nan():
    x = torch.zeros(4, 128)
    q, s = per_token_group_quant_fp8(x)
    assert torch.all(s == 1e-4 / 448) and torch.all(q.float() == 0)


@pytest.mark.parametrize("bad, match", [
    (lambda: torch.randn(4, 100), "multiple of group_size"),
    (lambda: torch.randn(4, 128).to(torch.int32), "bfloat16, float16 or float32"),
    (lambda: torch.randn(256, 4).t(), "contiguous in its last dim"),
    (lambda: torch.randn(128), r"shape \[M, K\]"),
])
def test_bad_input_raises_clear_error(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        OP(bad())
    with pytest.raises(RuntimeError, match=match), torch._subclasses.FakeTensorMode() as mode:
        OP(mode.from_tensor(bad()))          # the fake rejects the same input while tracing


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan"), float("inf")])
def test_eps_must_be_positive_and_finite(eps):
    """eps floors each group's amax: with eps <= 0 an all-zero group (a padding row) got scale 0 and NaN values."""
    from torch_deepstack.gemm import api as gemm_api
    from torch_deepstack.quant import swiglu_quant_fp8
    x = torch.zeros(128, 256, dtype=torch.bfloat16)
    for quantise in (lambda: per_token_group_quant_fp8(x, eps=eps), lambda: swiglu_quant_fp8(x, eps=eps),
                     lambda: gemm_api.per_block_quant_fp8(x, eps=eps),
                     lambda: gemm_api.per_block_quant_fp8_dual(x, eps=eps),
                     lambda: gemm_api.per_token_group_quant_fp8_t(x, eps=eps),
                     lambda: gemm_api.per_token_group_quant_fp8_dual(x, eps=eps)):
        with pytest.raises(ValueError, match="eps must be a positive finite number"):
            quantise()


def test_bad_group_size():
    with pytest.raises(ValueError, match="group_size must be"):
        OP(torch.randn(4, 256), 96)


# ----------------------------------------------------------------------------------------------- CUDA kernel
SHAPES = [(1, 128), (7, 384), (65, 256), (129, 1024), (4095, 7168), (2, 37, 512), (3, 1, 128)]


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_cuda_matches_reference(shape, dtype, ue8m0):
    x = fresh_randn(*shape, dtype=dtype, scale=3.0)
    x.view(-1)[:: 977] *= 50                     # outliers: groups with very different scales
    q_ref, s_ref = OP(x, 128, 1e-4, ue8m0)
    q, s = OP(x.cuda(), 128, 1e-4, ue8m0)
    assert s.stride() == s_ref.stride()
    torch.testing.assert_close(s.cpu(), s_ref, rtol=0, atol=0)
    # e4m3 codes must agree exactly: both round to nearest even from the same fp32 products.
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.cuda
@pytest.mark.parametrize("group_size", [32, 64])
def test_cuda_small_groups(group_size):
    x = fresh_randn(33, 256, dtype=torch.bfloat16)
    q_ref, s_ref = OP(x, group_size)
    q, s = OP(x.cuda(), group_size)
    torch.testing.assert_close(s.cpu(), s_ref, rtol=0, atol=0)
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.cuda
def test_cuda_strided_rows_and_empty():
    x = fresh_randn(16, 512, dtype=torch.bfloat16, device="cuda")[:, :256]      # row stride 512
    q, s = OP(x)
    q_ref, s_ref = OP(x.cpu())
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))
    q0, s0 = OP(torch.empty(0, 256, device="cuda", dtype=torch.bfloat16))
    assert q0.shape == (0, 256) and s0.shape == (0, 2)
    one = fresh_randn(1, 265, dtype=torch.bfloat16, device="cuda")[:, :256]     # one row: its odd stride is unused
    q1, _ = OP(one)
    assert torch.equal(q1.cpu().view(torch.uint8), OP(one.cpu())[0].view(torch.uint8))


@pytest.mark.cuda
def test_cuda_graph_capture_replays():
    x = fresh_randn(300, 1024, dtype=torch.bfloat16, device="cuda")
    OP(x)  # compile + load outside capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        q, s = OP(x)
    x.copy_(fresh_randn(300, 1024, dtype=torch.bfloat16, device="cuda"))
    g.replay()
    torch.cuda.synchronize()
    q_ref, s_ref = OP(x.cpu())
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))
    torch.testing.assert_close(s.cpu(), s_ref, rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_device_mismatch_is_clear():
    from torch_deepstack.checks import check_same_device
    with pytest.raises(ValueError, match="one device"):
        check_same_device("op", a=torch.zeros(1), b=torch.zeros(1, device="cuda"))
