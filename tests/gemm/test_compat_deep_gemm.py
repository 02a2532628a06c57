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
    a = (qa.t().contiguous(), sa.t())                  # [n, tokens] K-major + [n, tokens/128]
    b = (qb.t().contiguous(), sb.t())
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
    with pytest.raises(NotImplementedError, match="NT layout"):
        deep_gemm.m_grouped_fp8_gemm_nn_contiguous(None, None, None, None)
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


# ---- DeepGEMM layouts, names and helper values as upstream code and tests use them ----------------------------

def _upstream_style_cast(x, gran=128):
    """Oracle for DeepGEMM 2.x's per-token helper, written from its documented formula: sf = amax / 448 per
    1 x gran group (amax clamped to 1e-4, K zero-padded), q = x * (1 / sf); contiguous results."""
    m, k = x.shape
    xp = torch.nn.functional.pad(x, (0, (-k) % gran)).view(m, -1, gran)
    sf = xp.abs().float().amax(dim=2).clamp(1e-4) / 448.0
    q = (xp * (1.0 / sf).unsqueeze(2)).to(torch.float8_e4m3fn).view(m, -1)[:, :k].contiguous()
    return q, sf


def _k_grouped_case(m, n, ks):
    """bf16 [sum(ks), m] / [sum(ks), n] inputs (K rows), their per-group references and quantised column-segment
    operands: (a2d, sfa [m, T]), (b2d, sfb [n, T]) in torch_deepstack's [MN, sum(ks)] layout."""
    x, y = fresh_randn(sum(ks), m, dtype=torch.bfloat16), fresh_randn(sum(ks), n, dtype=torch.bfloat16)
    refs, s = [], 0
    for k in ks:
        refs.append(x[s:s + k].float().T @ y[s:s + k].float())
        s += k
    qa, sa = deep_gemm.per_channel_cast_to_fp8(x)          # [sum_k, m], scales [sum_k/128, m]
    qb, sb = deep_gemm.per_channel_cast_to_fp8(y)
    return (qa.T.contiguous(), sa.T), (qb.T.contiguous(), sb.T), torch.stack(refs)


def _flatten_groups(q2d, ks):
    """[MN, sum(ks)] column segments -> upstream's flat buffer: group g's [MN, k_g] block, row-major, one after
    another (the layout of DeepGEMM's K-major k-grouped operands)."""
    parts, s = [], 0
    for k in ks:
        parts.append(q2d[:, s:s + k].contiguous().view(-1))
        s += k
    return torch.cat(parts)


def test_k_grouped_takes_upstream_flat_layout_v2():
    m, n, ks = 48, 32, [256, 0, 128]
    a, b, ref = _k_grouped_case(m, n, ks)
    d_ours = fresh_randn(len(ks), m, n)
    c0 = d_ours.clone()
    deep_gemm.k_grouped_fp8_gemm_nt_contiguous(a, b, d_ours, ks, torch.tensor(ks, dtype=torch.int32), c=d_ours)
    assert calc_diff(d_ours - c0, ref) < 1e-3
    # 2.x form: 1-D data, scales [MN, sum(ks)/128] (a transposed view, as the upstream generator builds them)
    fa, fb = (_flatten_groups(a[0], ks), a[1]), (_flatten_groups(b[0], ks), b[1])
    d = c0.clone()
    deep_gemm.k_grouped_fp8_gemm_nt_contiguous(fa, fb, d, ks, torch.tensor(ks, dtype=torch.int32), c=d)
    assert torch.equal(d, d_ours)
    # newer keyword names (ks_cpu, grouped_layout, use_psum_layout), C distinct from D
    d2 = torch.empty_like(d)
    layout = torch.tensor(ks, dtype=torch.int32)
    deep_gemm.k_grouped_fp8_gemm_nt_contiguous(fa, fb, d2, ks_cpu=ks, grouped_layout=layout, c=c0, use_psum_layout=False)
    assert torch.equal(d2, d_ours)
    # the TN form: A as [sum(ks), M] (MN-major), scales [sum(ks)/128, MN]
    d3 = c0.clone()
    deep_gemm.k_grouped_fp8_gemm_tn_contiguous((a[0].T.contiguous(), a[1].T), (b[0].T.contiguous(), b[1].T), d3, ks,
                                               torch.tensor(ks, dtype=torch.int32), c=d3)
    assert torch.equal(d3, d_ours)
    with pytest.raises(ValueError, match=r"a.*numel"):
        deep_gemm.k_grouped_fp8_gemm_nt_contiguous((fa[0][:-16], fa[1]), fb, d, ks, None, c=d)


def test_k_grouped_wgrad_v1_flat_layout_and_row_scales():
    m, n, ks = 40, 24, [128, 256]
    a, b, ref = _k_grouped_case(m, n, ks)
    out = fresh_randn(len(ks), m, n)
    before = out.clone()
    # 1.x: flat [m, k_g] chunks and scales [sum(ks)/128, MN] (row-major, the transposed orientation)
    deep_gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt((_flatten_groups(a[0], ks), a[1].T.contiguous()),
                                                   (_flatten_groups(b[0], ks), b[1].T.contiguous()), out, ks)
    assert calc_diff(out - before, ref) < 1e-3
    # a square scale tensor (MN == sum(ks)/128) is read in each entry point's own orientation: 1.x [T, MN] here,
    # [MN, T] in the 2.x NT form
    a, b, _ = _k_grouped_case(2, 3, [128, 128])
    want = torch.zeros(2, 2, 3)
    deep_gemm.k_grouped_fp8_gemm_nt_contiguous(a, b, want, [128, 128], c=want)
    out = torch.zeros(2, 2, 3)
    deep_gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt((_flatten_groups(a[0], [128, 128]), a[1].T.contiguous()),
                                                   (_flatten_groups(b[0], [128, 128]), b[1].T.contiguous()), out,
                                                   [128, 128])
    assert torch.equal(out, want)


@pytest.mark.parametrize("ks", [[128] * 40, [256, 0, 512, 128] * 10, [512, 1024, 0, 512] * 10])
def test_k_grouped_flat_repack_is_one_copy(ks):
    # many groups (equal sizes, mixed sizes, a common divisor above 128): the flat -> column-segment repack must
    # be exact and must not cost one copy kernel per group
    q = torch.randint(-100, 100, (8, sum(ks)), dtype=torch.int8).view(torch.float8_e4m3fn)
    flat = _flatten_groups(q, ks)
    from torch_deepstack.compat.deep_gemm import k_grouped
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], acc_events=True) as prof:
        out = k_grouped.flat_groups_to_columns(flat, ks, 8)
    assert torch.equal(out.view(torch.int8), q.view(torch.int8))
    copies = [e.name for e in prof.events() if e.cpu_parent is None and e.name in
              ("aten::copy_", "aten::clone", "aten::reshape", "aten::index_select", "aten::index", "aten::cat")]
    assert len(copies) <= 2, copies


def test_missing_upstream_names_and_submodules():
    import importlib
    assert deep_gemm.fp8_m_grouped_gemm_nt_masked is deep_gemm.m_grouped_fp8_gemm_nt_masked
    utils = importlib.import_module("torch_deepstack.compat.deep_gemm.utils")
    umath = importlib.import_module("torch_deepstack.compat.deep_gemm.utils.math")
    testing = importlib.import_module("torch_deepstack.compat.deep_gemm.testing")
    jk = importlib.import_module("torch_deepstack.compat.deep_gemm.jit_kernels.utils")
    for name in ("per_token_cast_to_fp8", "per_block_cast_to_fp8", "per_channel_cast_to_fp8", "align", "ceil_div",
                 "ceil_to_ue8m0", "get_mn_major_tma_aligned_tensor", "get_tma_aligned_size",
                 "get_mk_alignment_for_contiguous_layout", "set_mk_alignment_for_contiguous_layout",
                 "get_m_alignment_for_contiguous_layout", "get_k_alignment_for_contiguous_layout"):
        assert getattr(utils, name) is getattr(deep_gemm, name), name
    assert umath.align(130, 128) == 256 and umath.ceil_div(130, 128) == 2
    assert jk.get_m_alignment_for_contiguous_layout() == 128 and jk.get_col_major_tma_aligned_tensor is not None
    d = testing.calc_diff(torch.ones(3), torch.ones(3) * 2)
    assert isinstance(d, torch.Tensor) and d.dim() == 0 and abs(d.item() - 0.2) < 1e-12
    assert deep_gemm.calc_diff is testing.calc_diff
    assert testing.count_bytes(torch.empty(3, 4), (torch.empty(2, dtype=torch.float8_e4m3fn), None)) == 50
    t = testing.bench(lambda: torch.randn(64, 64) @ torch.randn(64, 64), num_warmups=1, num_tests=3)
    assert isinstance(t, float) and 0 < t < 10
    x = torch.randn(96, 96)
    tk = testing.bench_kineto(lambda: x @ x, "aten::mm", num_tests=3)
    assert isinstance(tk, float) and 0 < tk < 10
    with pytest.raises(ValueError, match="no_such_kernel"):
        testing.bench_kineto(lambda: x @ x, "no_such_kernel", num_tests=2)


def test_mk_alignment_setting_drives_psum_layout():
    assert deep_gemm.get_mk_alignment_for_contiguous_layout() == 128
    with pytest.raises(ValueError, match="multiple of 128"):
        deep_gemm.set_mk_alignment_for_contiguous_layout(64)
    deep_gemm.set_mk_alignment_for_contiguous_layout(256)
    try:
        assert deep_gemm.get_m_alignment_for_contiguous_layout() == 256
        sizes, n, k = [130, 40], 32, 128
        ids = contiguous_layout(sizes, alignment=256)
        x, a = _pair_a(ids.numel(), k)
        ws = [_pair_b(n, k) for _ in sizes]
        b = (torch.stack([q for _, (q, _) in ws]), torch.stack([s for _, (_, s) in ws]))
        d = torch.zeros(ids.numel(), n, dtype=torch.bfloat16)
        deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, ids)
        d2 = torch.zeros_like(d)
        ends = torch.tensor([130, 256 + 40], dtype=torch.int32)
        deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d2, ends, use_psum_layout=True)
        assert torch.equal(d, d2)
    finally:
        deep_gemm.set_mk_alignment_for_contiguous_layout(128)


def test_casts_return_contiguous_tensors_with_upstream_values():
    x = fresh_randn(100, 200, dtype=torch.bfloat16) * 3
    q, s = deep_gemm.per_token_cast_to_fp8(x, use_ue8m0=False)
    rq, rs = _upstream_style_cast(x)
    assert q.is_contiguous() and s.is_contiguous() and s.view(-1).numel() == 200
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
    q, s = deep_gemm.per_channel_cast_to_fp8(fresh_randn(256, 64, dtype=torch.bfloat16), use_ue8m0=False)
    assert q.is_contiguous() and s.is_contiguous() and q.view(-1).numel() == 256 * 64 and s.shape == (2, 64)
    xc = fresh_randn(256, 64) * 5
    qc, sc = deep_gemm.per_channel_cast_to_fp8(xc, use_ue8m0=False)
    rq, rs = _upstream_style_cast(xc.T.contiguous())
    assert torch.equal(qc.view(torch.uint8), rq.T.contiguous().view(torch.uint8)) and torch.equal(sc, rs.T)
    q, s = deep_gemm.per_block_cast_to_fp8(x, use_ue8m0=True)
    assert q.is_contiguous() and s.is_contiguous() and s.shape == (1, 2)
    q, s = deep_gemm.per_token_cast_to_fp8(x, use_ue8m0=True, gran_k=64)
    assert s.shape == (100, 4) and s.is_contiguous()
    assert torch.equal(s, deep_gemm.ceil_to_ue8m0(_upstream_style_cast(x, 64)[1]))


def test_ceil_to_ue8m0_clamps_the_exponent():
    t = torch.tensor([float("inf"), 0.0, -3.0, 1e-45, 1.0, 0.75])
    got = deep_gemm.ceil_to_ue8m0(t)
    assert got.tolist() == [2.0 ** 127, 2.0 ** -126, 4.0, 2.0 ** -126, 1.0, 1.0]


def test_empty_k_writes_c_or_zeros():
    a = (torch.empty(4, 0, dtype=torch.float8_e4m3fn), torch.empty(4, 0))
    b = (torch.empty(128, 0, dtype=torch.float8_e4m3fn), torch.empty(1, 0))
    d = torch.full((4, 128), 3.0, dtype=torch.bfloat16)
    deep_gemm.fp8_gemm_nt(a, b, d)
    assert (d == 0).all()
    c = fresh_randn(4, 128)
    d32 = torch.full((4, 128), 3.0)
    deep_gemm.fp8_gemm_nt(a, b, d32, c=c)
    assert torch.equal(d32, c)
    out = torch.full((2, 4, 8), 5.0)
    deep_gemm.k_grouped_fp8_gemm_nt_contiguous((torch.empty(0, dtype=torch.float8_e4m3fn), torch.empty(4, 0)),
                                               (torch.empty(0, dtype=torch.float8_e4m3fn), torch.empty(8, 0)),
                                               out, [0, 0], None, c=out)
    assert (out == 5.0).all()


def test_transform_sf_into_required_layout_recipes_and_errors():
    sf = torch.rand(100, 4)
    r = deep_gemm.transform_sf_into_required_layout(sf, 100, 512, (1, 128))
    assert r.stride(-2) == 1 and torch.equal(r, sf)
    r = deep_gemm.transform_sf_into_required_layout(sf, 100, 512, (1, 128, 128), is_sfa=True)
    assert r.stride(-2) == 1 and torch.equal(r, sf)
    blk = torch.rand(1, 4)
    assert deep_gemm.transform_sf_into_required_layout(blk, 100, 512, (1, 128, 128), is_sfa=False) is blk
    assert deep_gemm.transform_sf_into_required_layout(blk, 100, 512, (128, 128)) is blk
    g = torch.rand(3, 100, 4)
    r = deep_gemm.transform_sf_into_required_layout(g, 100, 512, (1, 128), num_groups=3)
    assert r.stride(-2) == 1 and torch.equal(r, g)
    with pytest.raises(ValueError, match=r"sf .*\(100, 4\)"):
        deep_gemm.transform_sf_into_required_layout(torch.rand(7, 4), 100, 512, (1, 128, 128), is_sfa=True)
    with pytest.raises(ValueError, match="is_sfa"):
        deep_gemm.transform_sf_into_required_layout(sf, 100, 512, (1, 128, 128))
