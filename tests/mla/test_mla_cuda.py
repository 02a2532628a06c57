"""MLA decode on the GPU against the fp32 reference (FlashMLA's tolerances), plus metadata, append, graphs."""
from __future__ import annotations

import pytest
import torch

import torch_deepstack  # noqa: F401
from tests.mla.mla_data import assert_mla_close, decode_and_reference, make_case, varied_lengths
from torch_deepstack.mla import PagedKVCache, get_mla_metadata, mla_append_kv, mla_decode_with_kvcache
from torch_deepstack.mla.reference import mla_decode_fp32
from torch_deepstack.mla.schedule import schedule

pytestmark = pytest.mark.cuda

CASES = [  # b, s_q, h_q, h_kv, d, dtype, mean s_k, causal, zero-length requests
    (4, 1, 16, 1, 576, torch.bfloat16, 300, False, (1,)),
    (3, 2, 3, 1, 576, torch.bfloat16, 200, True, ()),
    (5, 1, 1, 1, 576, torch.float16, 130, False, (0, 4)),
    (2, 1, 63, 1, 512, torch.bfloat16, 500, False, ()),
    (2, 2, 126, 2, 576, torch.bfloat16, 400, True, ()),
    (8, 1, 128, 1, 576, torch.bfloat16, 1000, False, (3,)),
    (6, 4, 9, 3, 576, torch.float16, 150, True, ()),
    (16, 1, 64, 1, 576, torch.bfloat16, 2000, False, ()),
    (3, 2, 64, 8, 512, torch.float16, 90, True, ()),
]


def run_case(b, s_q, h_q, h_kv, d, dtype, mean, causal, zeros, parts, fp8=False, seed=0):
    lens = varied_lengths(b, mean, s_q, seed=seed, zeros=zeros)
    q, cache, bt, seq = make_case(b, s_q, h_q, h_kv, d, dtype, lens, fp8=fp8, device="cuda", seed=seed)
    return (*decode_and_reference(q, cache, bt, seq, causal, fp8, parts), (q, cache, bt, seq))


@pytest.fixture(params=["general", "overlap"])
def decode_kernel(request, monkeypatch):
    """Force one of the bf16/fp16 decode kernels (mla_decode.cuh, mla_decode_overlap.cuh)."""
    from torch_deepstack.mla import kernels
    monkeypatch.setattr(kernels, "_DECODE_KERNEL", request.param)
    return request.param


@pytest.mark.parametrize("parts", [0, 5])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}sq{c[1]}hq{c[2]}hk{c[3]}d{c[4]}{str(c[5])[-4:]}")
def test_decode_matches_reference(case, parts, decode_kernel):
    out, lse, ref_out, ref_lse, _ = run_case(*case, parts=parts)
    assert_mla_close(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("case", [
    (12, 2, 128, 1, 576, torch.bfloat16, 1500, True, (4,)),   # 4 row blocks, ~24 pages per request, stages wrap
    (7, 1, 128, 1, 512, torch.float16, 700, False, (0, 6)),   # d = 512 (8 chunks), empty first/last request
])
@pytest.mark.parametrize("parts", [0, 3, 40])
def test_overlap_kernel_long_requests(case, parts, monkeypatch):
    """The overlap kernel over many tiles per part, parts that start/end mid-request, and request switches."""
    from torch_deepstack.mla import kernels
    monkeypatch.setattr(kernels, "_DECODE_KERNEL", "overlap")
    out, lse, ref_out, ref_lse, _ = run_case(*case, parts=parts, seed=3)
    assert_mla_close(out, lse, ref_out, ref_lse)


PAIR_CASES = [  # 2 or 4 64-row blocks per KV head: the row-block cluster kernels (pages multicast to 2 CTAs)
    (8, 1, 128, 1, 576, torch.bfloat16, 1000, False, (3,)),
    (5, 2, 64, 1, 576, torch.bfloat16, 1500, True, (0,)),     # s_q 2 x 64 heads, causal
    (4, 2, 126, 2, 576, torch.bfloat16, 700, True, ()),       # h_kv 2, 126 rows: a partial second block
    (7, 1, 128, 1, 512, torch.float16, 700, False, (0, 6)),   # d = 512, fp16, empty first/last request
    (12, 2, 128, 1, 576, torch.bfloat16, 1500, True, (4,)),   # 256 rows: two clusters per (part, KV head)
    (3, 1, 256, 2, 576, torch.float16, 900, False, ()),       # h_kv 2, 128 rows each
]


@pytest.mark.parametrize("kernel", ["general_pair", "overlap_pair"])
@pytest.mark.parametrize("parts", [0, 3, 40])
@pytest.mark.parametrize("case", PAIR_CASES, ids=lambda c: f"b{c[0]}sq{c[1]}hq{c[2]}hk{c[3]}d{c[4]}{str(c[5])[-4:]}")
def test_row_block_cluster_kernels(case, parts, kernel, monkeypatch):
    """Clusters of two row-block CTAs sharing each page load: parts that start/end mid-request, request switches,
    stages that wrap, parts with no work, more clusters than fit at once (parts 40 with h_kv 2)."""
    from torch_deepstack.mla import kernels
    monkeypatch.setattr(kernels, "_DECODE_KERNEL", kernel)
    b, s_q, h_q, h_kv = case[:4]
    assert kernels.decode_cluster_for(s_q * h_q // h_kv) == 2
    out, lse, ref_out, ref_lse, _ = run_case(*case, parts=parts, seed=5)
    assert_mla_close(out, lse, ref_out, ref_lse)


FP8_CASES = [  # rows = s_q * h_q / h_kv <= 32 take mla_decode_fp8.cuh (16 or 32 rows), larger the general kernel
    (4, 1, 16, 1, 576, torch.bfloat16, 300, False, (1,)),
    (3, 2, 128, 1, 576, torch.bfloat16, 700, True, ()),
    (2, 1, 32, 2, 576, torch.bfloat16, 129, False, (0,)),     # h_kv = 2: per-token copies
    (6, 1, 32, 1, 576, torch.bfloat16, 900, False, (2,)),     # 32 rows
    (3, 4, 3, 1, 576, torch.bfloat16, 200, True, ()),         # causal, 12 rows
    (4, 2, 16, 1, 576, torch.bfloat16, 1500, True, (0,)),     # causal, 32 rows, long requests
    (5, 1, 8, 2, 576, torch.bfloat16, 33, False, ()),         # pages with an empty second half
    (2, 1, 1, 1, 576, torch.bfloat16, 3000, False, ()),       # one row
]


@pytest.mark.parametrize("case", FP8_CASES, ids=lambda c: f"b{c[0]}sq{c[1]}hq{c[2]}hk{c[3]}")
@pytest.mark.parametrize("parts", [0, 7])
def test_fp8_cache_matches_reference(case, parts):
    out, lse, ref_out, ref_lse, _ = run_case(*case, parts=parts, fp8=True)
    assert_mla_close(out, lse, ref_out, ref_lse)


def test_fp8_small_rows_kernel_matches_general_kernel(monkeypatch):
    """The few-rows FP8 kernel and the general FP8 kernel agree on the same inputs (both against bf16 rounding)."""
    from torch_deepstack.mla import kernels
    lens = varied_lengths(16, 1000, seed=5, zeros=(3,))
    q, cache, bt, seq = make_case(16, 1, 32, 1, 576, torch.bfloat16, lens, fp8=True, device="cuda", seed=5)
    sched, splits = get_mla_metadata(seq, 32, 1)
    o_small, l_small = mla_decode_with_kvcache(q, cache, bt, seq, 512, sched, splits, is_fp8_kvcache=True)
    monkeypatch.setattr(kernels, "_FP8_SMALL_ROWS", False)
    o_gen, l_gen = mla_decode_with_kvcache(q, cache, bt, seq, 512, sched, splits, is_fp8_kvcache=True)
    from tests.helpers import calc_diff
    assert calc_diff(o_small.float(), o_gen.float()) < 1e-5
    fin = torch.isfinite(l_gen)
    assert torch.equal(fin, torch.isfinite(l_small))
    assert float((l_small[fin] - l_gen[fin]).abs().max()) < 1e-3


def test_metadata_matches_python_schedule():
    for seed, (b, mean, parts) in enumerate([(1, 10, 132), (7, 3000, 66), (128, 8192, 132), (33, 0, 5), (300, 64, 17),
                                             (3000, 300, 200), (0, 10, 4)]):
        lens = varied_lengths(b, mean, seed=seed, zeros=(0,) if b > 2 else ())
        seq = torch.tensor(lens, dtype=torch.int32, device="cuda")
        sched, splits = get_mla_metadata(seq, 64, 1, num_sm_parts=parts)
        rows, ref_splits = schedule(lens, parts)
        assert sched.cpu().tolist() == rows
        assert splits.cpu().tolist() == ref_splits


def test_append_matches_reference():
    for fp8, dtype in ((False, torch.bfloat16), (False, torch.float16), (True, torch.bfloat16), (True, torch.float32)):
        d = 576
        cache = torch.zeros(4, 64, 2, 656 if fp8 else d, dtype=torch.uint8 if fp8 else dtype)
        kv = torch.randn(9, 2, d).to(dtype)
        slots = torch.tensor([0, 5, 63, 64, -1, 130, 255, 200, 7])
        ref = cache.clone()
        torch.ops.deepstack.mla_append_kv(ref, kv, slots, fp8)
        gpu = cache.cuda()
        mla_append_kv(gpu, kv.cuda(), slots.cuda(), fp8)
        assert torch.equal(gpu.cpu(), ref)


@pytest.mark.parametrize("which", ["general", "overlap", "general_pair", "overlap_pair"])
def test_decode_with_growing_scores(which, monkeypatch):
    """Scores that grow along the sequence (and shrink for some rows), so the running max moves mid-request by more
    than the overlap kernel's lazy-rescaling margin (2^8) and O / l are rescaled several times."""
    from torch_deepstack.mla import kernels
    monkeypatch.setattr(kernels, "_DECODE_KERNEL", which)
    b, s_q, h_q, d = 3, 2, 128, 576
    lens = [1000, 700, 1300]
    q, cache, bt, seq = make_case(b, s_q, h_q, 1, d, torch.bfloat16, lens, seed=7)
    # Channel 0 of token t gets a ramp of ~0.9 * t / 64 in score (natural log, after the softmax scale): the max of a
    # row moves by ~20 log2 units over 1000 tokens; half of the heads see the ramp reversed (max in the first page).
    pos = torch.zeros(cache.shape[0], 64)
    for i, n in enumerate(lens):
        for blk in range((n + 63) // 64):
            pos[int(bt[i, blk])] = torch.arange(64) + 64 * blk
    ramp = (pos / 64 * 0.9 * d ** 0.5 / 4).to(cache.dtype)
    cache[:, :, 0, 0] = torch.where(cache[:, :, 0, 0].isnan(), cache[:, :, 0, 0], ramp)
    q[..., 0] = 4.0
    q[:, :, ::2, 0] = -4.0
    q, cache, bt, seq = q.cuda(), cache.cuda(), bt.cuda(), seq.cuda()
    sched, splits = get_mla_metadata(seq, s_q * h_q, 1, num_sm_parts=4)
    out, lse = mla_decode_with_kvcache(q, cache, bt, seq, 512, sched, splits, causal=True)
    ref_out, ref_lse = mla_decode_fp32(q.cpu(), cache.cpu(), bt.cpu(), seq.cpu(), d ** -0.5, True, False)
    assert_mla_close(out, lse, ref_out.to(q.dtype), ref_lse)


@pytest.mark.parametrize("h_q,kernel", [(16, "auto"), (128, "auto"), (128, "general_pair"), (128, "overlap_pair")])
def test_cuda_graph_replay_with_new_lengths(h_q, kernel, monkeypatch):
    from torch_deepstack.mla import kernels
    monkeypatch.setattr(kernels, "_DECODE_KERNEL", kernel)
    b, s_q, d = 4, 1, 576
    lens = [300, 100, 0, 64]
    q, cache, bt, seq = make_case(b, s_q, h_q, 1, d, torch.bfloat16, [400] * b, device="cuda")
    seq.copy_(torch.tensor(lens, dtype=torch.int32))
    out0, _ = mla_decode_with_kvcache(q, cache, bt, seq, 512, *get_mla_metadata(seq, h_q, 1))   # warm-up
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        sched, splits = get_mla_metadata(seq, h_q, 1)
        out, lse = mla_decode_with_kvcache(q, cache, bt, seq, 512, sched, splits)
    for new in ([300, 100, 0, 64], [1, 400, 257, 0]):
        seq.copy_(torch.tensor(new, dtype=torch.int32))
        g.replay()
        torch.cuda.synchronize()
        ref_out, ref_lse = mla_decode_fp32(q.cpu(), cache.cpu(), bt.cpu(), seq.cpu(), d ** -0.5, False, False)
        assert_mla_close(out, lse, ref_out.to(q.dtype), ref_lse)


def test_paged_cache_end_to_end():
    torch.manual_seed(0)
    for fp8 in (False, True):
        pc = PagedKVCache(num_blocks=20, max_batch=3, max_seq_len=400, device="cuda", fp8=fp8)
        pc.append(0, torch.randn(150, 1, 576, device="cuda", dtype=torch.bfloat16) / 10)
        pc.append(2, torch.randn(70, 1, 576, device="cuda", dtype=torch.bfloat16) / 10)
        pc.append([0, 1, 2], torch.randn(3, 1, 576, device="cuda", dtype=torch.bfloat16) / 10)
        q = torch.randn(3, 1, 16, 576, device="cuda", dtype=torch.bfloat16) / 10
        out, lse = pc.decode(q)
        ref_out, ref_lse = mla_decode_fp32(q.cpu(), pc.k_cache.cpu(), pc.block_table.cpu(), pc.seqlens.cpu(),
                                           576 ** -0.5, False, fp8)
        assert_mla_close(out, lse, ref_out.to(q.dtype), ref_lse)


def test_bad_block_table_is_a_clear_error():
    q, cache, bt, seq = make_case(2, 1, 16, 1, 576, torch.bfloat16, [100, 70], device="cuda")
    bt[1, 1] = cache.shape[0] + 5
    sched, splits = get_mla_metadata(seq, 16, 1)
    with pytest.raises(IndexError, match="out of range"):
        mla_decode_with_kvcache(q, cache, bt, seq, 512, sched, splits)


def test_table_checks_repeat_after_in_place_writes():
    """The data checks run once per table version (CheckedData): a table or seqlens that passed, then written in
    place, is checked again and the bad entry reported; so is a slot_mapping written in place; PagedKVCache's own
    tables and slots pass without a check, and a write to its table by hand is caught."""
    q, cache, bt, seq = make_case(2, 1, 16, 1, 576, torch.bfloat16, [100, 70], device="cuda")
    sched, splits = get_mla_metadata(seq, 16, 1)
    mla_decode_with_kvcache(q, cache, bt, seq, 512, sched, splits)
    mla_decode_with_kvcache(q, cache, bt, seq, 512, sched, splits)   # (passes from the memo)
    bt[0, 1] = -3
    with pytest.raises(IndexError, match="out of range"):
        mla_decode_with_kvcache(q, cache, bt, seq, 512, sched, splits)
    bt[0, 1] = 0
    mla_decode_with_kvcache(q, cache, bt, seq, 512, sched, splits)
    seq[1] = bt.shape[1] * 64 + 1
    with pytest.raises(ValueError, match="exceeds block_table capacity"):
        mla_decode_with_kvcache(q, cache, bt, seq, 512, sched, splits)
    slots = torch.tensor([3, 5], device="cuda")
    kv = torch.randn(2, 1, 576, device="cuda", dtype=torch.bfloat16)
    mla_append_kv(cache, kv, slots)
    slots[1] = cache.shape[0] * 64
    with pytest.raises(IndexError, match="out of range"):
        mla_append_kv(cache, kv, slots)
    pc = PagedKVCache(num_blocks=8, max_batch=2, max_seq_len=256, device="cuda")
    pc.append(0, torch.randn(70, 1, 576, device="cuda", dtype=torch.bfloat16) / 10)
    pc.decode(q[:1])
    pc.block_table[0, 1] = 99
    with pytest.raises(IndexError, match="out of range"):
        pc.decode(q[:1])


def test_fp8_accuracy_vs_bf16_cache():
    """What FP8 costs: the FP8-cache result against the bf16-cache result on the same keys (reported, bounded)."""
    b, h_q, d = 8, 64, 576
    lens = varied_lengths(b, 2000)
    q, cache_bf16, bt, seq = make_case(b, 1, h_q, 1, d, torch.bfloat16, lens, device="cuda")
    from torch_deepstack.mla import fp8_format
    cache_fp8 = fp8_format.quantize_rows(torch.nan_to_num(cache_bf16.float()))
    sched, splits = get_mla_metadata(seq, h_q, 1)
    o16, l16 = mla_decode_with_kvcache(q, cache_bf16, bt, seq, 512, sched, splits)
    o8, l8 = mla_decode_with_kvcache(q, cache_fp8, bt, seq, 512, sched, splits, is_fp8_kvcache=True)
    from tests.helpers import calc_diff
    diff = calc_diff(o8.float(), o16.float())
    print(f"\nFP8 vs bf16 cache: out cosine diff {diff:.2e}, max |lse diff| {float((l8 - l16).abs().max()):.2e}")
    assert diff < 1e-3


def test_compat_flash_mla_on_gpu_with_float8_cache_dtype():
    from torch_deepstack.compat import flash_mla
    lens = varied_lengths(4, 300, seed=3)
    q, cache, bt, seq = make_case(4, 2, 32, 1, 576, torch.bfloat16, lens, fp8=True, device="cuda", seed=3)
    sched, _ = flash_mla.get_mla_metadata()
    out, lse = flash_mla.flash_mla_with_kvcache(q, cache.view(torch.float8_e4m3fn), bt, seq, 512, sched, None,
                                                causal=True, is_fp8_kvcache=True)
    ref_out, ref_lse = mla_decode_fp32(q.cpu(), cache.cpu(), bt.cpu(), seq.cpu(), 576 ** -0.5, True, True)
    assert_mla_close(out, lse, ref_out.to(q.dtype), ref_lse)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_decode_step_compiled_with_reduce_overhead(fp8):
    """A serving decode step over a PagedKVCache - append each request's new latent, plan, decode - compiled with
    torch.compile(mode="reduce-overhead", fullgraph=True): replayed as CUDA graphs (no cudagraph skip: the cache's
    tensors are static addresses, written in place), every step matches the fp32 reference on the updated cache."""
    from torch._dynamo.utils import counters
    from tests.helpers import recorded_cuda_graphs
    torch._dynamo.reset()
    counters.clear()
    b, h_q, d = 3, 16, 576
    gen = torch.Generator().manual_seed(7)
    pc = PagedKVCache(num_blocks=24, max_batch=b, max_seq_len=600, device="cuda", fp8=fp8)
    for r, n in enumerate((130, 0, 257)):
        if n:
            pc.append(r, (torch.randn(n, 1, d, generator=gen) / 10).to("cuda", torch.bfloat16))

    def step(q, kv, slots):
        mla_append_kv(pc.k_cache, kv, slots, fp8)
        sched, splits = get_mla_metadata(pc.seqlens, h_q, 1)
        return mla_decode_with_kvcache(q, pc.k_cache, pc.block_table, pc.seqlens, 512, sched, splits, None, False,
                                       fp8)

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for _ in range(5):   # warm-up, recording, replays; each step appends one token per request (pages fill up)
        slots = torch.cat([pc.reserve(r, 1) for r in range(b)])   # host bookkeeping, outside the graph
        kv = (torch.randn(b, 1, d, generator=gen) / 10).to("cuda", torch.bfloat16)
        q = (torch.randn(b, 1, h_q, d, generator=gen) / 10).to("cuda", torch.bfloat16)
        out, lse = (t.clone() for t in compiled(q, kv, slots))
        ref_out, ref_lse = mla_decode_fp32(q.cpu(), pc.k_cache.cpu(), pc.block_table.cpu(), pc.seqlens.cpu(),
                                           d ** -0.5, False, fp8)
        assert_mla_close(out, lse, ref_out.to(q.dtype), ref_lse)
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert recorded_cuda_graphs() >= 1
