"""The seesaw decode kernel (src/mla/mla_decode_seesaw.cuh) against the fp32 reference, alone and as row-block pairs:
the general kernel's cases plus long requests (odd and even page counts per part, parts that start and end mid-request,
request switches), growing scores (the running max handed between the warpgroups moves) and CUDA-graph replay."""
from __future__ import annotations

import pytest
import torch

from tests.mla import test_mla_cuda as base
from tests.mla.mla_data import assert_mla_close

pytestmark = pytest.mark.cuda

LONG_CASES = [
    (12, 2, 128, 1, 576, torch.bfloat16, 1500, True, (4,)),   # 4 row blocks, ~24 pages per request, stages wrap
    (7, 1, 128, 1, 512, torch.float16, 700, False, (0, 6)),   # d = 512 (separate P buffers), empty first/last request
    (9, 1, 64, 1, 576, torch.bfloat16, 100, False, ()),       # 1-3 pages per request: lone last tiles
]


@pytest.fixture
def seesaw(monkeypatch):
    from torch_deepstack.mla import kernels

    def use(name):
        monkeypatch.setattr(kernels, "_DECODE_KERNEL", name)
    return use


@pytest.mark.parametrize("parts", [0, 5])
@pytest.mark.parametrize("case", base.CASES, ids=lambda c: f"b{c[0]}sq{c[1]}hq{c[2]}hk{c[3]}d{c[4]}{str(c[5])[-4:]}")
def test_seesaw_matches_reference(case, parts, seesaw):
    seesaw("seesaw")
    out, lse, ref_out, ref_lse, _ = base.run_case(*case, parts=parts)
    assert_mla_close(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("case", LONG_CASES)
@pytest.mark.parametrize("parts", [0, 3, 40])
def test_seesaw_long_requests(case, parts, seesaw):
    seesaw("seesaw")
    out, lse, ref_out, ref_lse, _ = base.run_case(*case, parts=parts, seed=3)
    assert_mla_close(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("parts", [0, 3, 40])
@pytest.mark.parametrize("case", base.PAIR_CASES, ids=lambda c: f"b{c[0]}sq{c[1]}hq{c[2]}hk{c[3]}d{c[4]}{str(c[5])[-4:]}")
def test_seesaw_row_block_pairs(case, parts, seesaw):
    from torch_deepstack.mla import kernels
    seesaw("seesaw_pair")
    b, s_q, h_q, h_kv = case[:4]
    assert kernels.decode_cluster_for(s_q * h_q // h_kv) == 2
    out, lse, ref_out, ref_lse, _ = base.run_case(*case, parts=parts, seed=5)
    assert_mla_close(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("which", ["seesaw", "seesaw_pair"])
def test_seesaw_growing_scores(which, monkeypatch):
    base.test_decode_with_growing_scores(which, monkeypatch)


@pytest.mark.parametrize("h_q,kernel", [(128, "seesaw"), (128, "seesaw_pair"), (16, "seesaw")])
def test_seesaw_cuda_graph_replay(h_q, kernel, monkeypatch):
    base.test_cuda_graph_replay_with_new_lengths(h_q, kernel, monkeypatch)
