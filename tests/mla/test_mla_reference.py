"""CPU tests: the reference decode, the scheduler, the FP8 row format, appends, PagedKVCache, input errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import torch_deepstack  # noqa: F401
from tests.mla.mla_data import assert_mla_close, make_case, varied_lengths
from torch_deepstack.mla import CacheFullError, PagedKVCache, fp8_format, get_mla_metadata, mla_append_kv, \
    mla_decode_with_kvcache
from torch_deepstack.mla.reference import mla_decode_fp32
from torch_deepstack.mla.schedule import FIXED_COST, schedule


def sdpa_oracle(q, cache, bt, seq, scale, causal, fp8=False):
    """An independent per-(request, head, query) loop in float64."""
    b, s_q, h_q, d = q.shape
    h_kv = cache.shape[2]
    out = torch.zeros(b, s_q, h_q, 512, dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float64)
    for i in range(b):
        sk = int(seq[i])
        rows = []
        for t in range(sk):
            row = cache[int(bt[i, t // 64]), t % 64]
            rows.append(fp8_format.dequantize_rows(row) if fp8 else row.float())
        if not rows:
            continue
        k = torch.stack(rows).double()                      # [sk, h_kv, d]
        for h in range(h_q):
            kh = k[:, h // (h_q // h_kv)]
            for s in range(s_q):
                n = sk - s_q + s + 1 if causal else sk
                if n <= 0:
                    continue
                sc = (kh[:n] @ q[i, s, h].double()) * scale
                lse[i, h, s] = torch.logsumexp(sc, 0)
                out[i, s, h] = torch.softmax(sc, 0) @ kh[:n, :512]
    return out, lse


@pytest.mark.parametrize("b,s_q,h_q,h_kv,d,causal,fp8", [
    (3, 1, 3, 1, 576, False, False), (2, 2, 4, 2, 512, True, False), (2, 3, 2, 1, 576, True, True)])
def test_reference_matches_float64_oracle(b, s_q, h_q, h_kv, d, causal, fp8):
    lens = [0, 70, 130][:b] if b == 3 else [1, 129]
    q, cache, bt, seq = make_case(b, s_q, h_q, h_kv, d, torch.bfloat16, lens, fp8=fp8)
    out, lse = mla_decode_fp32(q, cache, bt, seq, d ** -0.5, causal, fp8)
    ref_out, ref_lse = sdpa_oracle(q, cache, bt, seq, d ** -0.5, causal, fp8)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_op_on_cpu_handles_empty_and_nan_slots():
    q, cache, bt, seq = make_case(3, 2, 4, 1, 576, torch.bfloat16, [0, 1, 100])
    sched, splits = get_mla_metadata(seq, 8, 1)
    out, lse = mla_decode_with_kvcache(q, cache, bt, seq, 512, sched, splits, causal=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert out.shape == (3, 2, 4, 512) and lse.shape == (3, 4, 2)
    assert not out.isnan().any()
    assert torch.isinf(lse[0]).all() and float(out[0].abs().max()) == 0
    assert torch.isinf(lse[1, :, 0]).all() and torch.isfinite(lse[1, :, 1]).all()   # causal: s_k=1, s_q=2
    ref_out, ref_lse = mla_decode_fp32(q, cache, bt, seq, 576 ** -0.5, True, False)
    assert_mla_close(out, lse, ref_out.to(q.dtype), ref_lse)


def covered(rows, seqlens):
    seen = []
    for br, bb, er, eb, *_ in rows:
        for r in range(br, er + 1):
            nblk = (seqlens[r] + 63) // 64
            lo = bb if r == br else 0
            hi = eb if r == er else nblk
            seen.append((r, lo, hi))
    return seen


@pytest.mark.parametrize("seed", range(6))
def test_schedule_covers_every_page_once(seed):
    g = torch.Generator().manual_seed(seed)
    b = int(torch.randint(1, 40, (1,), generator=g))
    lens = varied_lengths(b, [0, 50, 700, 5000][seed % 4], seed=seed, zeros=(0,) if seed % 2 else ())
    parts = int(torch.randint(1, 140, (1,), generator=g))
    rows, splits = schedule(lens, parts)
    assert len(rows) == parts and len(splits) == b + 1 and splits[0] == 0
    pieces = [0] * b
    pages = {}
    for r, lo, hi in covered(rows, lens):
        pieces[r] += 1
        for blk in range(lo, hi):
            assert (r, blk) not in pages, "a page is scheduled twice"
            pages[(r, blk)] = True
    assert len(pages) == sum((s + 63) // 64 for s in lens)
    assert all(p >= 1 for p in pieces), "every request (also s_k = 0) belongs to some part"
    assert [splits[i + 1] - splits[i] for i in range(b)] == pieces
    # begin_split indexes the piece of begin_req that this part computes
    firsts = {}
    for row in rows:
        if row[0] < b:
            firsts.setdefault(row[0], []).append(row[4])
    for r, idx in firsts.items():
        assert idx == sorted(idx) and all(splits[r] <= i < splits[r + 1] for i in idx)
    # balance: no part exceeds the payload bound (except the last, which takes what is left)
    payload = -(-sum((s + 63) // 64 + FIXED_COST for s in lens) // parts) + FIXED_COST
    for row in rows[:-1]:
        if row[0] < b:
            cost = sum(hi - lo + FIXED_COST for r, lo, hi in covered([row], lens))
            assert cost <= payload


def test_metadata_op_shapes_and_default_parts():
    seq = torch.tensor([10, 0, 5000], dtype=torch.int32)
    sched, splits = get_mla_metadata(seq, 128, 1)
    assert sched.shape == (66, 8) and sched.dtype == torch.int32     # 132 SMs / 2 row blocks
    assert splits.shape == (4,) and int(splits[-1]) >= 3
    sched, _ = get_mla_metadata(seq, 16, 2, num_sm_parts=7)
    assert sched.shape == (7, 8)


def test_metadata_fake_knows_the_default_part_count():
    """The fake gives the default part count as a plain int where it can be known (here the CPU reference's plan),
    so compiled graphs see a static metadata shape (an unbacked size put the op outside torch.compile's CUDA
    graphs); meta tensors, whose GPU is unknown, keep a symbolic count."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        seq = mode.from_tensor(torch.tensor([10, 0, 5000], dtype=torch.int32))
        sched, splits = torch.ops.deepstack.get_mla_metadata(seq, 128, 1)
        assert type(sched.shape[0]) is int and sched.shape == (66, 8) and splits.shape == (4,)
        meta = mode.from_tensor(torch.empty(3, dtype=torch.int32, device="meta"))
        sched, _ = torch.ops.deepstack.get_mla_metadata(meta, 128, 1)
        assert isinstance(sched.shape[0], torch.SymInt)


def test_fp8_rows_round_trip():
    x = torch.randn(5, 2, 576) * 3
    rows = fp8_format.quantize_rows(x)
    assert rows.shape == (5, 2, 656) and rows.dtype == torch.uint8
    back = fp8_format.dequantize_rows(rows)
    scales = rows[..., 512:528].contiguous().view(torch.float32)
    assert torch.equal(torch.log2(scales), torch.log2(scales).round()), "scales are powers of two"
    assert torch.equal(back[..., 512:], x[..., 512:].to(torch.bfloat16).float())
    rel = (back[..., :512] - x[..., :512]).abs().max() / x[..., :512].abs().max()
    assert rel < 0.07


def test_append_writes_rows_and_skips_negative_slots():
    for fp8 in (False, True):
        cache = torch.zeros(3, 64, 2, 656 if fp8 else 576, dtype=torch.uint8 if fp8 else torch.bfloat16)
        kv = torch.randn(4, 2, 576).to(torch.bfloat16)
        mla_append_kv(cache, kv, torch.tensor([3, -1, 64, 191]), fp8)
        flat = cache.view(192, 2, -1)
        got = fp8_format.dequantize_rows(flat) if fp8 else flat.float()
        want = kv.float()
        tol = 0.07 * float(want.abs().max()) if fp8 else 0
        for slot, row in ((3, 0), (64, 2), (191, 3)):
            assert float((got[slot] - want[row]).abs().max()) <= tol
        untouched = torch.ones(192, dtype=torch.bool)
        untouched[[3, 64, 191]] = False
        assert float(flat[untouched].float().abs().max()) == 0
        with pytest.raises(IndexError, match="out of range"):
            mla_append_kv(cache, kv[:1], torch.tensor([192]), fp8)


def test_paged_cache_bookkeeping_and_decode():
    pc = PagedKVCache(num_blocks=6, max_batch=3, max_seq_len=256)
    torch.manual_seed(0)
    k0 = torch.randn(100, 1, 576).to(torch.bfloat16)
    pc.append(0, k0)
    pc.append(1, torch.randn(64, 1, 576).to(torch.bfloat16))
    assert pc.seqlens.tolist() == [100, 64, 0] and pc.num_free_blocks == 3
    pc.append([0, 1], torch.randn(2, 1, 576).to(torch.bfloat16))
    assert pc.seqlens.tolist() == [101, 65, 0] and pc.num_free_blocks == 2
    blocks0 = pc.blocks_of(0)
    assert pc.block_table[0, :2].tolist() == blocks0
    assert torch.equal(pc.k_cache[blocks0[0], :64], k0[:64]) and torch.equal(pc.k_cache[blocks0[1], :36], k0[64:])
    with pytest.raises(CacheFullError):
        pc.append(2, torch.randn(200, 1, 576).to(torch.bfloat16))
    with pytest.raises(ValueError, match="max is"):
        pc.reserve(2, 300)
    q = torch.randn(2, 1, 8, 576).to(torch.bfloat16)
    out, lse = pc.decode(q)
    ref_out, ref_lse = mla_decode_fp32(q, pc.k_cache, pc.block_table[:2], pc.seqlens[:2], 576 ** -0.5, False, False)
    assert_mla_close(out, lse, ref_out.to(q.dtype), ref_lse)
    pc.free(0)
    assert pc.num_free_blocks == 4 and pc.seqlen(0) == 0


def test_paged_cache_refused_calls_change_nothing():
    """A refused append/reserve/free raises before touching the tables (before 2026-12-02 a kv of the wrong dtype,
    or a multi-request append that ran out of blocks halfway, left seqlens grown over rows never written, which
    later decodes attended to); request slots and token counts are checked."""
    pc = PagedKVCache(num_blocks=2, max_batch=3, max_seq_len=256)
    pc.append(0, torch.randn(10, 1, 576).to(torch.bfloat16))
    def state():
        return pc.seqlens.tolist(), pc.block_table.tolist(), pc.num_free_blocks, [pc.blocks_of(r) for r in range(3)]
    before = state()
    with pytest.raises(RuntimeError, match="kv .* must match k_cache"):
        pc.append(1, torch.randn(3, 1, 576))                                     # fp32 kv, bf16 cache
    with pytest.raises(RuntimeError, match="kv must be"):
        pc.append([0, 1], torch.randn(2, 2, 576).to(torch.bfloat16))              # two heads, cache has one
    with pytest.raises(CacheFullError):
        pc.append([1, 2], torch.randn(2, 1, 576).to(torch.bfloat16))              # room for one of them only
    for bad in (-1, 3, 1.0, True, "0"):
        with pytest.raises(ValueError, match="req must be a request slot in 0..2"):
            pc.reserve(bad, 1)
        with pytest.raises(ValueError, match="req must be a request slot"):
            pc.free(bad)
    with pytest.raises(ValueError, match="num_tokens must be an integer >= 0"):
        pc.reserve(0, -4)
    assert state() == before
    pc.reserve(np.int64(1), np.int64(1))                                          # NumPy integers are fine
    assert pc.seqlen(1) == 1


def _inputs(**over):
    q, cache, bt, seq = make_case(2, 1, 4, 1, 576, torch.bfloat16, [70, 10])
    sched, splits = get_mla_metadata(seq, 4, 1, num_sm_parts=4)
    args = dict(q=q, k_cache=cache, block_table=bt, cache_seqlens=seq, head_dim_v=512,
                tile_scheduler_metadata=sched, num_splits=splits)
    args.update(over)
    return args


@pytest.mark.parametrize("over,err,msg", [
    (lambda a: {"k_cache": a["k_cache"][:6].reshape(12, 32, 1, 576)}, RuntimeError, "page size"),
    (lambda a: {"k_cache": a["k_cache"].half()}, RuntimeError, "must match q dtype"),
    (lambda a: {"q": a["q"][..., :500]}, RuntimeError, "576 .* or 512"),
    (lambda a: {"head_dim_v": 576}, RuntimeError, "head_dim_v must be 512"),
    (lambda a: {"q": a["q"][:, :, :3], "k_cache": a["k_cache"].expand(-1, -1, 2, -1)}, RuntimeError, "divisible"),
    (lambda a: {"block_table": a["block_table"].long()}, RuntimeError, "int32"),
    (lambda a: {"block_table": a["block_table"] + 1000}, IndexError, "out of range"),
    (lambda a: {"cache_seqlens": a["cache_seqlens"] * 100}, ValueError, "exceeds block_table capacity"),
    (lambda a: {"num_splits": a["num_splits"][:-1]}, RuntimeError, "num_splits"),
])
def test_bad_input_gives_clear_error(over, err, msg):
    a = _inputs()
    a.update(over(a))
    with pytest.raises(err, match=msg):
        mla_decode_with_kvcache(**a)


def test_fp8_cache_needs_bf16_q_and_656_byte_rows():
    a = _inputs()
    with pytest.raises(RuntimeError, match="uint8, int8 or float8_e4m3fn"):
        mla_decode_with_kvcache(**a, is_fp8_kvcache=True)
    a["k_cache"] = fp8_format.quantize_rows(torch.nan_to_num(a["k_cache"].float()))
    a["q"] = a["q"].half()
    with pytest.raises(RuntimeError, match="bfloat16 q"):
        mla_decode_with_kvcache(**a, is_fp8_kvcache=True)


def test_checked_data_follows_versions_views_and_objects():
    """CheckedData (the memo that spares the GPU faces a host sync per call): a pass holds for the same tensors at
    the same versions and limits; an in-place write, another view (unless noted whole), another tensor or other
    limits need a new check."""
    from torch_deepstack.mla.checks import CheckedData
    memo = CheckedData()
    bt, seq = torch.zeros(4, 3, dtype=torch.int32), torch.zeros(4, dtype=torch.int32)
    assert not memo.passed((bt, seq), (8,))
    memo.note((bt, seq), (8,))
    assert memo.passed((bt, seq), (8,)) and not memo.passed((bt, seq), (9,))
    assert not memo.passed((bt[:2], seq[:2]), (8,))          # a view that was not checked
    seq[1] = 5
    assert not memo.passed((bt, seq), (8,))
    memo.note((bt, seq), (8,), whole=True)
    assert memo.passed((bt[:2], seq[:2]), (8,)) and memo.passed((bt, seq), (8,))
    # ... but not a column slice: fewer pages per request than the noted tables held (seqlens may then exceed it)
    assert not memo.passed((bt[:, :1], seq), (8,)) and not memo.passed((bt[:, 1:], seq), (8,))
    bt[:2][0, 0] = 1                                          # a write through a view bumps the base's version
    assert not memo.passed((bt[:2], seq[:2]), (8,))
    assert not memo.passed((bt.clone(), seq), (8,))
