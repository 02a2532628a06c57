"""CPU checks of the FP8 GEMM area: the references against a naive formula, accuracy of the recipe, layouts,
fakes, clear errors and FP8Linear's autograd. Shapes are small: this runs in CI on 2 cores."""
import pytest
import torch

import torch_deepstack  # noqa: F401
from tests.gemm.util import contiguous_layout, dense_inputs, grouped_b, quant_a, random_group_sizes, wgrad_operand
from tests.helpers import calc_diff, fresh_randn, poisoned_empty
from torch_deepstack.gemm import FP8Linear, api, get_mn_major_tma_aligned_tensor
from torch_deepstack.gemm import reference as ref
from torch_deepstack.gemm.heuristic import select_config

ops = torch.ops.deepstack


@pytest.mark.parametrize("m,n,k", [(1, 16, 16), (7, 200, 256), (65, 144, 384), (129, 130, 160)])
def test_dense_reference_accuracy(m, n, k):
    # calc_diff is a statistic over the outputs: FP8 rounding alone puts its median near 6e-4, and over a few dozen
    # outputs (1x16) its spread crosses 1e-3 in ~14% of draws. So the bound is checked over >= 4096 outputs, from
    # as many fresh draws of this shape as that takes.
    got, want_exact = [], []
    for _ in range(-(-4096 // (m * n))):
        a, b, (aq, asf), (bq, bsf) = dense_inputs(m, n, k, "cpu")
        d = poisoned_empty(m, n, dtype=torch.float32, device="cpu")
        ops.fp8_gemm_nt(aq, asf, bq, bsf, d)
        got.append(d.flatten())
        want_exact.append((a.float() @ b.float().T).flatten())
    assert calc_diff(torch.cat(got), torch.cat(want_exact)) < 1e-3
    # the reference equals the slice-by-slice definition
    want = torch.zeros(m, n)
    for kb in range(0, k, 128):
        s = slice(kb, kb + 128)
        part = aq[:, s].float() @ bq[:, s].float().T
        sb = bsf[:, kb // 128].repeat_interleave(128)[:n]
        want += part * asf[:, kb // 128][:, None] * sb[None, :]
    torch.testing.assert_close(d, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_dense_c_and_accumulate():
    m, n, k = 9, 256, 256
    a, b, (aq, asf), (bq, bsf) = dense_inputs(m, n, k, "cpu")
    c = fresh_randn(m, n)
    d = api.fp8_gemm_nt(aq, asf, bq, bsf, c=c, out_dtype=torch.float32)
    assert calc_diff(d, c + a.float() @ b.float().T) < 1e-3
    d0 = d.clone()
    api.fp8_gemm_nt(aq, asf, bq, bsf, c=d, out=d)   # c is d: in-place accumulate
    assert calc_diff(d - d0, a.float() @ b.float().T) < 1e-3


def test_contiguous_and_offsets_reference():
    g, n, k = 4, 96, 256
    sizes = random_group_sizes(g, 60)
    ids = contiguous_layout(sizes)
    m = ids.numel()
    a = fresh_randn(m, k, dtype=torch.bfloat16)
    aq, asf = quant_a(a)
    b, bq, bsf = grouped_b(g, n, k, "cpu")
    d = poisoned_empty(m, n, dtype=torch.bfloat16, device="cpu")
    api.m_grouped_fp8_gemm_nt_contiguous(aq, asf, bq, bsf, ids, out=d)
    assert d[ids < 0].isnan().all() and not d[ids >= 0].isnan().any()
    for i in range(g):
        rows = ids == i
        if rows.any():
            assert calc_diff(d[rows], a[rows].float() @ b[i].float().T) < 1e-3
    ends, off = [], 0
    for s in sizes:
        ends.append(off + s)
        off += (s + 127) // 128 * 128
    assert torch.equal(api.m_indices_from_offsets(torch.tensor(ends, dtype=torch.int32), m), ids)


def _contiguous_case(ids, g=2, n=64, k=128):
    a = fresh_randn(ids.numel(), k, dtype=torch.bfloat16)
    aq, asf = quant_a(a)
    b, bq, bsf = grouped_b(g, n, k, "cpu")
    return a, b, aq, asf, bq, bsf, poisoned_empty(ids.numel(), n, dtype=torch.bfloat16, device="cpu")


def test_contiguous_group_ids_are_checked():
    """Ids outside [-1, G) or two groups in one 128-row block (the kernel multiplies a block by one group's B) are
    refused, naming m_indices; before, the reference skipped such rows silently and the GPU read B out of range."""
    good = contiguous_layout([100, 70])
    bad_ids = {"id >= G": (5, 2), "id < -1": (5, -7)}
    for what, (row, value) in bad_ids.items():
        ids = good.clone()
        ids[row] = value
        *_, aq, asf, bq, bsf, d = _contiguous_case(ids)
        with pytest.raises(ValueError, match=r"m_indices holds group ids"):
            api.m_grouped_fp8_gemm_nt_contiguous(aq, asf, bq, bsf, ids, out=d)
    mixed = torch.tensor([0] * 100 + [1] * 70, dtype=torch.int32)        # group 1 starts at row 100
    *_, aq, asf, bq, bsf, d = _contiguous_case(mixed)
    with pytest.raises(ValueError, match=r"m_indices rows 0..127 hold more than one group"):
        ops.m_grouped_fp8_gemm_nt_contiguous(aq, asf, bq, bsf, d, mixed)
    # padding before a group inside a block is fine: one group per block
    ids = torch.tensor([-1] * 28 + [0] * 100 + [1] * 50, dtype=torch.int32)
    a, b, aq, asf, bq, bsf, d = _contiguous_case(ids)
    api.m_grouped_fp8_gemm_nt_contiguous(aq, asf, bq, bsf, ids, out=d)
    assert d[:28].isnan().all()
    for i in range(2):
        assert calc_diff(d[ids == i], a[ids == i].float() @ b[i].float().T) < 1e-3


def test_offsets_form_checks_ends():
    ids = contiguous_layout([100, 70])
    a, b, aq, asf, bq, bsf, d = _contiguous_case(ids)
    with pytest.raises(ValueError, match="ends has 3 entries but b has G=2"):
        api.m_grouped_fp8_gemm_nt_contiguous_offsets(aq, asf, bq, bsf, torch.tensor([100, 198, 256]), out=d)
    with pytest.raises(TypeError, match="ends must be a 1-D integer tensor"):
        api.m_grouped_fp8_gemm_nt_contiguous_offsets(aq, asf, bq, bsf, torch.tensor([100.0, 198.0]), out=d)
    with pytest.raises(ValueError, match="alignment must be a positive multiple of 128"):
        api.m_grouped_fp8_gemm_nt_contiguous_offsets(aq, asf, bq, bsf, torch.tensor([100, 198]), out=d, alignment=64)
    # an end below the previous one: that group is empty (its ids never go down, so no block mixes groups)
    assert api.m_indices_from_offsets(torch.tensor([100, 60]), 256).tolist() == [0] * 100 + [-1] * 156
    api.m_grouped_fp8_gemm_nt_contiguous_offsets(aq, asf, bq, bsf, torch.tensor([100, 60], dtype=torch.int32), out=d)
    assert d[100:].isnan().all() and calc_diff(d[:100], a[:100].float() @ b[0].float().T) < 1e-3


def test_masked_m_above_m_max_counts_as_m_max():
    g, m_max, n, k = 2, 50, 64, 128
    a = fresh_randn(g, m_max, k, dtype=torch.bfloat16)
    aq, asf = quant_a(a)
    b, bq, bsf = grouped_b(g, n, k, "cpu")
    d = poisoned_empty(g, m_max, n, dtype=torch.bfloat16, device="cpu")
    api.m_grouped_fp8_gemm_nt_masked(aq, asf, bq, bsf, torch.tensor([80, 50], dtype=torch.int32), 50, out=d)
    for i in range(g):
        assert calc_diff(d[i], a[i].float() @ b[i].float().T) < 1e-3


def test_masked_reference_writes_only_valid_rows():
    g, m_max, n, k = 3, 50, 64, 128
    a = fresh_randn(g, m_max, k, dtype=torch.bfloat16)
    aq, asf = quant_a(a)
    b, bq, bsf = grouped_b(g, n, k, "cpu")
    masked = torch.tensor([50, 0, 13], dtype=torch.int32)
    d = poisoned_empty(g, m_max, n, dtype=torch.bfloat16, device="cpu")
    api.m_grouped_fp8_gemm_nt_masked(aq, asf, bq, bsf, masked, 20, out=d)
    for i, s in enumerate([50, 0, 13]):
        assert d[i, s:].isnan().all() and not d[i, :s].isnan().any()
        if s:
            assert calc_diff(d[i, :s], a[i, :s].float() @ b[i].float().T) < 1e-3


def test_wgrad_and_k_grouped_reference():
    tokens, n, k = 300, 128, 256
    dy, x = fresh_randn(tokens, n, dtype=torch.bfloat16), fresh_randn(tokens, k, dtype=torch.bfloat16)
    aq, asf = wgrad_operand(dy)
    bq, bsf = wgrad_operand(x)
    assert aq.shape == (n, 304) and asf.shape == (n, 3)
    d = api.fp8_wgrad_gemm_nt(aq, asf, bq, bsf)
    assert calc_diff(d, dy.float().T @ x.float()) < 1e-3
    ks = [128, 0, 256]
    dy2, x2 = fresh_randn(384, 64), fresh_randn(384, 96)
    aq, asf = wgrad_operand(dy2)
    bq, bsf = wgrad_operand(x2)
    out = api.k_grouped_fp8_wgrad_gemm_nt(aq, asf, bq, bsf, ks)
    assert torch.equal(out[1], torch.zeros(64, 96))
    assert calc_diff(out[0], dy2[:128].T @ x2[:128]) < 1e-3
    assert calc_diff(out[2], dy2[128:].T @ x2[128:]) < 1e-3
    assert torch.equal(api.k_grouped_fp8_wgrad_gemm_nt(aq, asf, bq, bsf, ks, out_dtype=torch.bfloat16),
                       out.to(torch.bfloat16))                 # bf16 out: the fp32 sums rounded once


def test_block_quant_reference_layouts():
    w = fresh_randn(200, 272, scale=3.0)
    q, s = api.per_block_quant_fp8(w)
    qt, st = api.per_block_quant_fp8(w, transpose=True)
    assert q.shape == (200, 272) and s.shape == (2, 3) and qt.shape == (272, 200) and st.shape == (3, 2)
    assert torch.equal(qt.view(torch.uint8), q.t().contiguous().view(torch.uint8)) and torch.equal(st, s.t())
    back = ref.dequant_blocks(q, s)
    assert calc_diff(back, w) < 1e-3
    dq, ds, dqt, dst = api.per_block_quant_fp8_dual(w)
    assert torch.equal(dq.view(torch.uint8), q.view(torch.uint8)) and torch.equal(ds, s)
    assert torch.equal(dqt.view(torch.uint8), qt.view(torch.uint8)) and torch.equal(dst, st)
    assert dqt.is_contiguous() and dst.is_contiguous()
    _, su = api.per_block_quant_fp8(w, scale_ue8m0=True)
    assert torch.equal(torch.log2(su), torch.log2(su).round())


def test_scale_layout_conversion():
    sf = torch.rand(7, 3)                       # row-major, what a naive per-token cast returns
    mn = get_mn_major_tma_aligned_tensor(sf)
    assert mn.stride() == (1, 8) and torch.equal(mn, sf)
    assert get_mn_major_tma_aligned_tensor(mn) is mn
    sf3 = torch.rand(2, 5, 3)
    mn3 = get_mn_major_tma_aligned_tensor(sf3)
    assert mn3.stride() == (24, 1, 8) and torch.equal(mn3, sf3)


def test_fakes_under_fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(300, 256, dtype=torch.bfloat16)
        q, s = ops.per_token_group_quant_fp8_t(x)
        assert q.shape == (256, 300) and q.stride() == (304, 1) and s.shape == (256, 3) and s.stride() == (1, 256)
        q, s = ops.per_block_quant_fp8(x, True)
        assert q.shape == (256, 300) and s.shape == (2, 3)
        q, s, qt, st = ops.per_block_quant_fp8_dual(x)
        assert q.shape == (300, 256) and s.shape == (3, 2) and qt.shape == (256, 300) and st.shape == (2, 3)


def test_torch_compile_fullgraph():
    m, n, k = 16, 128, 256
    _, _, (aq, asf), (bq, bsf) = dense_inputs(m, n, k, "cpu")

    def f(aq, asf, bq, bsf):
        d = torch.empty(m, n, dtype=torch.bfloat16)
        ops.fp8_gemm_nt(aq, asf, bq, bsf, d)
        return d * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(aq, asf, bq, bsf), f(aq, asf, bq, bsf))


def test_bad_inputs():
    _, _, (aq, asf), (bq, bsf) = dense_inputs(8, 128, 256, "cpu")
    d = torch.empty(8, 128, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="float8_e4m3fn"):
        ops.fp8_gemm_nt(aq.float(), asf, bq, bsf, d)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        x = torch.zeros(8, 24, dtype=torch.float8_e4m3fn)
        ops.fp8_gemm_nt(x, torch.zeros(8, 1), torch.zeros(128, 24, dtype=torch.float8_e4m3fn), torch.zeros(1, 1), d)
    with pytest.raises(RuntimeError, match="b must be \\[N, K\\]"):
        ops.fp8_gemm_nt(aq, asf, bq[:, :128], bsf, d)
    with pytest.raises(RuntimeError, match="sfa must have shape"):
        ops.fp8_gemm_nt(aq, asf[:4], bq, bsf, d)
    with pytest.raises(RuntimeError, match="m_indices must be int32"):
        ops.m_grouped_fp8_gemm_nt_contiguous(aq, asf, bq[None], bsf[None], d, torch.zeros(8, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="multiple of 128"):
        ops.k_grouped_fp8_wgrad_gemm_nt(aq, asf, bq[:8], asf, torch.empty(1, 8, 8), [100])
    with pytest.raises(ValueError, match="multiple of 128"):
        FP8Linear(100, 128)
    with pytest.raises(ValueError, match="out_features=0 must be a positive multiple of 128"):
        FP8Linear(128, 0)
    assert api.fp8_gemm_nt(aq, asf, bq[:0], bsf[:0]).shape == (8, 0)    # N = 0: an empty D, not a stride error


def test_heuristic_is_deterministic_and_fills_sms():
    assert select_config(4096, 7168, 16384, 1, 132) == select_config(4096, 7168, 16384, 1, 132)
    cfg = select_config(128, 7168, 16384, 1, 132)
    tiles = -(-128 // cfg.block_m) * -(-7168 // cfg.block_n)
    assert tiles > 0.8 * 132


def test_split_tail_only_where_the_last_column_adds_a_wave(monkeypatch):
    """With DEEPSTACK_GEMM_SPLIT_TAIL=1, dense GEMMs run their last N % 128 (<= 64) columns as a second launch only
    where the heuristic picked 128x128 tiles and that column of tiles adds a wave (kernels.split_tail_columns)."""
    from torch_deepstack.gemm.kernels import split_tail_columns
    monkeypatch.delenv("DEEPSTACK_GEMM_SPLIT_TAIL", raising=False)
    assert split_tail_columns(4096, 3136, 7168, 132) == 0        # opt-in
    monkeypatch.setenv("DEEPSTACK_GEMM_SPLIT_TAIL", "1")
    assert split_tail_columns(4096, 3136, 7168, 132) == 64       # 800 tiles = 7 waves -> 768 = 6 waves + tail
    assert split_tail_columns(8192, 1600, 7168, 132) == 64       # 832 tiles = 7 waves -> 768 = 6 waves + tail
    assert split_tail_columns(4096, 2112, 7168, 132) == 0        # the heuristic takes 128x176 tiles (3 waves)
    assert split_tail_columns(4096, 4160, 7168, 132) == 0        # 1056 tiles: 8 waves either way
    assert split_tail_columns(4096, 7168, 2048, 132) == 0        # N % 128 == 0
    assert split_tail_columns(4096, 2200, 7168, 132) == 0        # last column more than half full
    assert split_tail_columns(64, 2112, 7168, 132) == 0          # 64-row tiles
    assert split_tail_columns(4096, 576, 7168, 132) == 0         # 128x192 tiles
    monkeypatch.setenv("DEEPSTACK_GEMM_SPLIT_TAIL", "0")
    assert split_tail_columns(4096, 3136, 7168, 132) == 0
    monkeypatch.setenv("DEEPSTACK_GEMM_SPLIT_TAIL", "1")
    monkeypatch.setenv("DEEPSTACK_GEMM_CONFIG", "128,128,6")
    assert split_tail_columns(4096, 3136, 7168, 132) == 0        # a forced config runs as one launch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_autograd_matches_linear(dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 384, dtype=dtype)
    f8 = FP8Linear.from_linear(lin)
    x = fresh_randn(3, 50, 256, dtype=dtype).requires_grad_()
    x2 = x.detach().clone().float().requires_grad_()
    gy = fresh_randn(3, 50, 384, dtype=dtype)
    y = f8(x)
    assert y.dtype == dtype and y.shape == (3, 50, 384)
    y.backward(gy)
    w = lin.weight.detach().float().requires_grad_()
    bias = lin.bias.detach().float().requires_grad_()
    y2 = torch.nn.functional.linear(x2, w, bias)
    y2.backward(gy.float())
    # FP8 recipe tolerances (stated in docs/gemm.md): calc_diff < 2e-3 for y, dx and dW; bias grad exact up to dtype.
    assert calc_diff(y, y2) < 2e-3
    assert calc_diff(x.grad, x2.grad) < 2e-3
    assert calc_diff(f8.weight.grad, w.grad) < 2e-3
    torch.testing.assert_close(f8.bias.grad.float(), bias.grad, rtol=1e-2, atol=1e-2)


def test_fp8_linear_mixed_dtypes_follow_their_own_tensors():
    """bf16 activations on fp32 master weights (the DeepSeek-V3 recipe's layout): y and dx in x's dtype, dW in W's,
    values within the FP8 tolerances of an fp32 linear."""
    torch.manual_seed(0)
    f8 = FP8Linear(256, 128, dtype=torch.float32)
    x = fresh_randn(40, 256, dtype=torch.bfloat16).requires_grad_()
    gy = fresh_randn(40, 128, dtype=torch.bfloat16)
    y = f8(x)
    y.backward(gy)
    assert y.dtype == x.grad.dtype == torch.bfloat16 and f8.weight.grad.dtype == torch.float32
    x2 = x.detach().float().requires_grad_()
    w = f8.weight.detach().clone().requires_grad_()
    torch.nn.functional.linear(x2, w, f8.bias.detach()).backward(gy.float())
    assert calc_diff(y, torch.nn.functional.linear(x2, w, f8.bias).detach()) < 2e-3
    assert calc_diff(x.grad, x2.grad) < 2e-3
    assert calc_diff(f8.weight.grad, w.grad) < 2e-3


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.float64, torch.float32), (torch.int64, torch.bfloat16),
                                              (torch.bfloat16, torch.float64)])
@pytest.mark.parametrize("grad", [False, True])
def test_fp8_linear_refuses_dtypes_it_cannot_quantise(x_dtype, w_dtype, grad):
    f8 = FP8Linear(128, 128, dtype=torch.float32).to(w_dtype)
    x = torch.ones(3, 128, dtype=x_dtype)
    with torch.set_grad_enabled(grad), pytest.raises(TypeError, match=r"FP8Linear: input and weight must be bfloat16, "
                                                                      r"float16 or float32, got input .* and weight"):
        f8(x)


def test_fp8_linear_inference_skips_autograd_work(monkeypatch):
    """Under no_grad (or with nothing requiring grad) FP8Linear builds no autograd node and does not quantise x for a
    weight gradient; its output is the training path's, bit for bit."""
    from torch_deepstack.gemm import linear
    f8 = FP8Linear(256, 128, dtype=torch.bfloat16)
    x = fresh_randn(2, 9, 256, dtype=torch.bfloat16)
    y_train = f8(x)
    assert y_train.grad_fn is not None
    monkeypatch.setattr(linear, "_wgrad_operand", lambda t: pytest.fail("wgrad operand quantised in inference"))
    with torch.no_grad():
        y_inf = f8(x)
    assert y_inf.grad_fn is None
    torch.testing.assert_close(y_inf, y_train, rtol=0, atol=0)
    f8.requires_grad_(False)
    assert f8(x).grad_fn is None


def test_fp8_linear_weight_cache_follows_updates():
    f8 = FP8Linear(128, 128, bias=False)
    x = fresh_randn(4, 128)
    y1 = f8(x)
    first = f8._cache.fwd
    f8(x)
    assert f8._cache.fwd is first                 # reused while the weight is unchanged
    with torch.no_grad():
        f8.weight.mul_(2)                         # an optimizer step bumps the version counter
    y2 = f8(x)
    assert f8._cache.fwd is not first
    assert calc_diff(y2, 2 * y1) < 1e-4


def test_fp8_linear_under_capture_quantises_the_weight_in_the_graph(monkeypatch):
    """While a CUDA graph is being captured (simulated: the capture check patched), FP8Linear neither reads nor fills
    its weight cache: the graph quantises W itself, so replays never read a copy that a later optimizer step made
    stale or an eager call freed."""
    from torch_deepstack.gemm import linear
    f8 = FP8Linear(128, 128, bias=False)
    x = fresh_randn(4, 128)
    f8(x)
    cached = f8._cache.fwd
    monkeypatch.setattr(linear, "_capturing", lambda w: True)
    with torch.no_grad():
        f8.weight.mul_(3)                           # the cache is stale now
    y = f8(x)
    assert f8._cache.fwd is cached                  # untouched: not read, not replaced
    monkeypatch.setattr(linear, "_capturing", lambda w: False)
    assert calc_diff(y, f8(x)) < 1e-6 and f8._cache.fwd is not cached


def test_fp8_linear_frozen_weight(monkeypatch):
    """freeze_fp8_weight_: the FP8 copies are made once and used until refresh_fp8_weight_ rewrites them in place
    (so a captured graph would see the new values); unfrozen, the module follows the weight again and the copies it
    gave up stay allocated. Making the copies under capture is refused with an error that says what to do."""
    from torch_deepstack.gemm import linear
    f8 = FP8Linear(256, 128, bias=False).freeze_fp8_weight_()
    x = fresh_randn(5, 256)
    y1 = f8(x)
    q, s = f8._cache.fwd
    with torch.no_grad():
        f8.weight.mul_(2)
    assert torch.equal(f8(x), y1)                   # frozen: the change is not seen...
    f8.refresh_fp8_weight_()
    assert f8._cache.fwd[0] is q and f8._cache.fwd[1] is s   # ...until refreshed, in place
    y2 = f8(x)
    assert calc_diff(y2, 2 * y1) < 1e-4
    xg = x.clone().requires_grad_()
    f8(xg).sum().backward()                         # a data gradient adds the frozen W^T copy (made eagerly)
    assert f8._cache.bwd is not None
    monkeypatch.setattr(linear, "_capturing", lambda w: True)
    f8(xg).sum().backward()                         # both copies exist: usable under capture
    f8.freeze_fp8_weight_(False)
    f8.freeze_fp8_weight_(True)
    assert f8._cache.released[-1][0][0] is q        # given up, still referenced
    with pytest.raises(RuntimeError, match="outside CUDA graph capture"):
        f8(x)
    monkeypatch.setattr(linear, "_capturing", lambda w: False)
    f8.freeze_fp8_weight_(False)
    with torch.no_grad():
        f8.weight.mul_(0.5)
    assert calc_diff(f8(x), y1) < 1e-4              # unfrozen: follows the weight
    y_half = f8(x)
    f8.weight.data.mul_(-2)                         # .data bypasses the version counter: the cache cannot see it
    assert torch.equal(f8(x), y_half)
    f8.refresh_fp8_weight_()                        # unfrozen: drops the copies, the next call re-quantises
    assert calc_diff(f8(x), -2 * y_half.float()) < 1e-4


def test_fp8_linear_quantises_the_weight_once_per_step(monkeypatch):
    """A training step whose input needs a gradient makes both FP8 copies of W in one pass (the dual quantiser) and
    none again until W changes; inference and a frozen input make only the forward copy."""
    calls = []
    for name in ("per_block_quant_fp8", "per_block_quant_fp8_dual"):
        real = getattr(api, name)
        monkeypatch.setattr(api, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    f8 = FP8Linear(256, 128, bias=False, dtype=torch.bfloat16)
    x = fresh_randn(3, 256, dtype=torch.bfloat16).requires_grad_()
    f8(x).sum().backward()
    assert calls == ["per_block_quant_fp8_dual"]
    f8(x).sum().backward()
    assert calls == ["per_block_quant_fp8_dual"]     # W unchanged: both copies reused
    with torch.no_grad():
        f8.weight.add_(1)
        f8(x)
    assert calls[1:] == ["per_block_quant_fp8"]     # inference after an update: the forward copy only
    f8(x.detach()).sum().backward()                  # no data gradient: no W^T copy
    assert calls[2:] == [] and f8.weight.grad is not None


def test_fp8_linear_takes_broadcast_and_strided_tensors():
    """`y.sum().backward()` hands FP8Linear a stride-0 gradient, and inputs may be strided views (here a transpose
    and an offset slice); results equal those of contiguous copies."""
    f8 = FP8Linear(256, 128, dtype=torch.bfloat16)
    base = fresh_randn(256, 7, dtype=torch.bfloat16)
    for x in (base.t(), fresh_randn(7, 264, dtype=torch.bfloat16)[:, 3:259]):
        xs = x.detach().requires_grad_()
        xc = x.detach().contiguous().requires_grad_()
        f8(xs).sum().backward()
        gw = f8.weight.grad.clone()
        f8.weight.grad = None
        f8(xc).sum().backward()
        torch.testing.assert_close(xs.grad, xc.grad, rtol=0, atol=0)
        torch.testing.assert_close(gw, f8.weight.grad, rtol=0, atol=0)
        f8.weight.grad = None


def test_quantisers_take_empty_inputs():
    """No rows (or no columns): every quantiser returns empty outputs of the right shapes instead of failing."""
    x0 = torch.empty(0, 256, dtype=torch.bfloat16)
    q, s = api.per_token_group_quant_fp8_t(x0)
    assert q.shape == (256, 0) and s.shape == (256, 0)
    q, s, qt, st = api.per_token_group_quant_fp8_dual(x0)
    assert q.shape == (0, 256) and s.shape == (0, 2) and qt.shape == (256, 0) and st.shape == (256, 0)
    q, s, qt, st = api.per_block_quant_fp8_dual(x0)
    assert q.shape == (0, 256) and s.shape == (0, 2) and qt.shape == (256, 0) and st.shape == (2, 0)
    with pytest.raises((ValueError, RuntimeError), match="multiple of 128"):
        api.per_token_group_quant_fp8_dual(torch.randn(4, 100))


def test_fp8_linear_with_no_tokens():
    """An MoE expert can receive no tokens: output [0, N], dx [0, K], zero weight and bias gradients, as nn.Linear."""
    f8 = FP8Linear(256, 128, dtype=torch.bfloat16)
    x = torch.empty(0, 256, dtype=torch.bfloat16, requires_grad=True)
    y = f8(x)
    assert y.shape == (0, 128)
    y.sum().backward()
    assert x.grad.shape == (0, 256)
    assert torch.count_nonzero(f8.weight.grad) == 0 and torch.count_nonzero(f8.bias.grad) == 0


def test_empty_k_writes_c_or_zeros():
    """K = 0 (an empty token batch for a weight gradient, DeepGEMM's early return): D = C, or zeros without C, from
    the ops themselves (an empty operand's strides are not checked: nothing is read)."""
    fp8 = torch.float8_e4m3fn
    a, sa = torch.empty(5, 0, dtype=fp8), torch.empty(5, 0)
    b = torch.empty(256, 0, dtype=fp8)
    c = torch.randn(5, 256)
    assert api.fp8_gemm_nt(a, sa, b, torch.empty(2, 0)).abs().sum() == 0
    assert torch.equal(api.fp8_gemm_nt(a, sa, b, torch.empty(2, 0), c=c, out_dtype=torch.float32), c)
    assert torch.equal(api.fp8_wgrad_gemm_nt(a, sa, b, torch.empty(256, 0), c=c), c)
    cg = torch.randn(3, 5, 256)
    assert torch.equal(api.k_grouped_fp8_wgrad_gemm_nt(a, sa, b, torch.empty(256, 0), [0, 0, 0], c=cg), cg)
