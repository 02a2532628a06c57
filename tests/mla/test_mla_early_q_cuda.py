"""Early Q (mla_decode.cuh): producer warps load each request piece's Q tile (and its num_splits pair) while the
previous piece still runs, double-buffered by piece parity, skipping pieces without pages. These cases give a part
many short pieces: requests of 0-3 pages, s_k = 0 requests between others (and first / last), parts that start and
end mid-request, so the q_full / q_free phases and the split slots alternate many times per CTA. Every
kernel that loads Q early (seesaw and the FP8 few-rows kernel by default, the general kernel with
-DDEEPSTACK_MLA_EARLY_Q_GENERAL=1; plain and as row-block pairs), plus the load it replaces."""
from __future__ import annotations

import pytest
import torch

from tests.mla.mla_data import add_kernel_defines, assert_mla_close, decode_and_reference, make_case
from torch_deepstack.mla import get_mla_metadata, mla_decode_with_kvcache
from torch_deepstack.mla.reference import mla_decode_fp32

pytestmark = pytest.mark.cuda

# 0-3 pages each, empty requests first, last and in runs; 1 and 64 (a page boundary) and 65 tokens.
SHORT_LENS = [0, 1, 64, 65, 0, 0, 130, 3, 0, 200, 64, 129, 0, 17, 192, 1, 0, 70, 5, 0]

CASES = [  # kernel, s_q, h_q, h_kv, d, dtype, causal
    ("general", 1, 16, 1, 576, torch.bfloat16, False),
    ("general", 2, 32, 1, 576, torch.bfloat16, True),      # 64 rows, causal
    ("general", 1, 9, 3, 512, torch.float16, False),       # 3 rows per KV head, h_kv 3, d 512
    ("general_pair", 1, 128, 1, 576, torch.bfloat16, False),
    ("general_pair", 2, 63, 1, 576, torch.float16, True),  # 126 rows: a partial second block
    ("seesaw", 1, 64, 1, 576, torch.bfloat16, False),
    ("seesaw", 1, 128, 2, 512, torch.float16, False),
    ("seesaw_pair", 1, 128, 1, 576, torch.bfloat16, False),
    ("seesaw_pair", 2, 128, 1, 576, torch.bfloat16, True),   # 256 rows: two clusters
    ("seesaw_pair", 1, 256, 2, 512, torch.float16, False),
]


def _with_defines(monkeypatch, defines):
    """The decode kernels (not combine, not metadata) with extra -D defines."""
    add_kernel_defines(monkeypatch, defines, lambda name: "combine" not in name and "metadata" not in name)


@pytest.mark.parametrize("early_q", [1, 0])
@pytest.mark.parametrize("parts", [0, 3, 7])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-sq{c[1]}hq{c[2]}hk{c[3]}d{c[4]}{str(c[5])[-4:]}")
def test_many_short_pieces_per_part(case, parts, early_q, monkeypatch):
    from torch_deepstack.mla import kernels
    kernel, s_q, h_q, h_kv, d, dtype, causal = case
    monkeypatch.setattr(kernels, "_DECODE_KERNEL", kernel)
    if kernel.startswith("general"):   # early Q is opt-in there (-DDEEPSTACK_MLA_EARLY_Q_GENERAL=1)
        if early_q:
            _with_defines(monkeypatch, (("DEEPSTACK_MLA_EARLY_Q_GENERAL", 1),))
    elif not early_q:
        _with_defines(monkeypatch, (("DEEPSTACK_MLA_EARLY_Q", 0),))
    lens = [max(s, s_q) if s else 0 for s in SHORT_LENS]
    q, cache, bt, seq = make_case(len(lens), s_q, h_q, h_kv, d, dtype, lens, device="cuda", seed=11)
    assert_mla_close(*decode_and_reference(q, cache, bt, seq, causal, parts=parts))


def test_q_rows_change_between_calls(monkeypatch):
    """Two calls with different q on the same cache and metadata: no Q tile survives from the previous call."""
    from torch_deepstack.mla import kernels
    monkeypatch.setattr(kernels, "_DECODE_KERNEL", "general")
    q, cache, bt, seq = make_case(len(SHORT_LENS), 1, 16, 1, 576, torch.bfloat16, SHORT_LENS, device="cuda", seed=2)
    sched, splits = get_mla_metadata(seq, 16, 1, num_sm_parts=3)
    for scale in (1.0, -0.5):
        q2 = (q.float() * scale).to(q.dtype)
        out, lse = mla_decode_with_kvcache(q2, cache, bt, seq, 512, sched, splits)
        torch.cuda.synchronize()
        ref_out, ref_lse = mla_decode_fp32(q2.cpu(), cache.cpu(), bt.cpu(), seq.cpu(), 576 ** -0.5, False, False)
        assert_mla_close(out, lse, ref_out.to(q.dtype), ref_lse)


FP8_CASES = [  # the FP8 few-rows kernel (mla_decode_fp8.cuh: its consumers copy the next piece's Q early)
    (1, 16, 1, False),   # 16 rows
    (2, 16, 1, True),    # 32 rows, causal
    (1, 5, 1, False),    # 5 rows: zero-filled rows in the 16-row tile
    (1, 32, 2, False),   # h_kv 2, 16 rows each
]


@pytest.mark.parametrize("early_q", [1, 0, "late", "after_s"])
@pytest.mark.parametrize("parts", [0, 3, 7])
@pytest.mark.parametrize("case", FP8_CASES, ids=lambda c: f"sq{c[0]}hq{c[1]}hk{c[2]}")
def test_fp8_many_short_pieces_per_part(case, parts, early_q, monkeypatch):
    from torch_deepstack.mla import kernels
    monkeypatch.setattr(kernels, "_FP8_SMALL_KERNEL", "smem")   # the early Q of mla_decode_fp8.cuh
    s_q, h_q, h_kv, causal = case
    if early_q in ("late", "after_s"):   # force where the next Q is issued (default: by the row count)
        _with_defines(monkeypatch, (("DEEPSTACK_MLA_FP8_EQ_LATE", int(early_q == "late")),))
    elif not early_q:
        _with_defines(monkeypatch, (("DEEPSTACK_MLA_EARLY_Q", 0),))
    lens = [max(s, s_q) if s else 0 for s in SHORT_LENS]
    q, cache, bt, seq = make_case(len(lens), s_q, h_q, h_kv, 576, torch.bfloat16, lens, fp8=True, device="cuda",
                                  seed=13)
    assert_mla_close(*decode_and_reference(q, cache, bt, seq, causal, fp8=True, parts=parts))
