"""torch_deepstack.compat.deep_gemm: DeepGEMM's call forms and helpers on the CPU references (same code path as on
the GPU up to the op dispatch)."""
import pytest
import torch

from tests.gemm.util import contiguous_layout, random_group_sizes
from tests.helpers import calc_diff, fresh_randn
from torch_deepstack.compat import deep_gemm
from torch_deepstack.jit.launch import param_struct


def _pair_a(m, k):
    x = fresh_randn(m, k, dtype=torch.bfloat16)
    return x, deep_gemm.per_token_cast_to_fp8(x)


def _pair_b(n, k):
    w = fresh_randn(n, k, dtype=torch.bfloat16)
    return w, deep_gemm.per_block_cast_to_fp8(w)


def test_dense_current_and_v1_names():
    x, a = _pair_a(33, 320)          # K not a multiple of 128: the cast pads, the GEMM zero-fills
    w, b = _pair_b(200, 320)
    d = torch.empty(33, 200, dtype=torch.bfloat16)
    deep_gemm.fp8_gemm_nt(a, b, d)
    assert calc_diff(d, x.float() @ w.float().T) < 1e-3
    d1 = torch.empty_like(d)
    deep_gemm.gemm_fp8_fp8_bf16_nt(a, b, d1)
    assert torch.equal(d, d1)
    c = fresh_randn(33, 200)
    d32 = torch.empty(33, 200)
    deep_gemm.fp8_gemm_nt(a, b, d32, c=c)
    assert calc_diff(d32, c + x.float() @ w.float().T) < 1e-3


def test_row_major_scales_are_accepted():
    x, (aq, asf) = _pair_a(16, 256)
    w, b = _pair_b(128, 256)
    d = torch.empty(16, 128, dtype=torch.bfloat16)
    deep_gemm.fp8_gemm_nt((aq, asf.contiguous()), b, d)
    assert calc_diff(d, x.float() @ w.float().T) < 1e-3


def test_grouped_contiguous_psum_and_masked():
    g, n, k = 3, 64, 256
    sizes = random_group_sizes(g, 40)
    ids = contiguous_layout(sizes)
    x, a = _pair_a(ids.numel(), k)
    ws = [_pair_b(n, k) for _ in range(g)]
    b = (torch.stack([q for _, (q, _) in ws]), torch.stack([s for _, (_, s) in ws]))
    d = torch.zeros(ids.numel(), n, dtype=torch.bfloat16)
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, ids)
    ends, off = [], 0
    for s in sizes:
        ends.append(off + s)
        off += (s + 127) // 128 * 128
    d2 = torch.zeros_like(d)
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d2, torch.tensor(ends, dtype=torch.int32), use_psum_layout=True)
    assert torch.equal(d, d2)
    d3 = torch.zeros_like(d)
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(a, b, d3, ids)
    assert torch.equal(d, d3)
    for i in range(g):
        rows = ids == i
        if rows.any():
            assert calc_diff(d[rows], x[rows].float() @ ws[i][0].float().T) < 1e-3
    xm = fresh_randn(g, 20, k, dtype=torch.bfloat16)
    qs = [deep_gemm.per_token_cast_to_fp8(xm[i]) for i in range(g)]
    am = (torch.stack([q for q, _ in qs]), deep_gemm.get_mn_major_tma_aligned_tensor(torch.stack([s for _, s in qs])))
    dm = torch.zeros(g, 20, n, dtype=torch.bfloat16)
    deep_gemm.m_grouped_fp8_gemm_nt_masked(am, b, dm, torch.tensor([20, 0, 7], dtype=torch.int32), 12)
    assert calc_diff(dm[2, :7], xm[2, :7].float() @ ws[2][0].float().T) < 1e-3 and (dm[1] == 0).all()


def test_wgrad_forms():
    tokens, n, k = 256, 64, 128
    dy, x = fresh_randn(tokens, n), fresh_randn(tokens, k)
    qa, sa = deep_gemm.per_channel_cast_to_fp8(dy)     # [tokens, n], 1x128 groups along tokens
    qb, sb = deep_gemm.per_channel_cast_to_fp8(x)
    a = (qa.t(), sa.t())                               # [n, tokens] K-major + [n, tokens/128]
    b = (qb.t(), sb.t())
    out = fresh_randn(n, k)
    before = out.clone()
    deep_gemm.wgrad_gemm_fp8_fp8_fp32_nt(a, b, out)
    assert calc_diff(out - before, dy.T @ x) < 1e-3
    out2 = torch.zeros(n, k)
    deep_gemm.fp8_gemm_nt(a, b, out2, c=out2, recipe=(1, 1, 128))
    assert calc_diff(out2, dy.T @ x) < 1e-3
    outg = torch.zeros(2, n, k)
    deep_gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(a, b, outg, [128, 128])
    assert calc_diff(outg[1], dy[128:].T @ x[128:]) < 1e-3


def test_helpers_and_errors():
    assert deep_gemm.get_m_alignment_for_contiguous_layout() == 128
    assert deep_gemm.get_mk_alignment_for_contiguous_layout() == 128
    assert deep_gemm.get_tma_aligned_size(5, 4) == 8 and deep_gemm.ceil_div(7, 4) == 2
    sf = torch.rand(6, 3)
    assert deep_gemm.get_col_major_tma_aligned_tensor(sf).stride() == (1, 8)
    with pytest.raises(NotImplementedError, match="NT layout"):
        deep_gemm.fp8_gemm_nn(None, None, None)
    with pytest.raises(ValueError, match="recipe"):
        x, a = _pair_a(4, 128)
        deep_gemm.fp8_gemm_nt(a, a, torch.empty(4, 4), recipe=(1, 32, 128))


def test_launcher_packs_parameters_at_cubin_offsets():
    # CUDA 13 aligns CUtensorMap to 128 bytes: the cubin puts the first one at offset 112 (regression, H200 run).
    s = param_struct("tpi", [(112, 128), (240, 8), (248, 4)])
    buf = s.pack(b"\\1" * 128, 7, 9)
    assert s.size == 252 and buf[240] == 7 and buf[248] == 9
    with pytest.raises(ValueError, match="does not match"):
        param_struct("ti", [(0, 128), (128, 8)])
