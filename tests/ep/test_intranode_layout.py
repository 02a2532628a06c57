"""Receive-area layouts of the fused NVLink path (torch_deepstack/ep/intranode.py): pure arithmetic, checked on CPU.

The kernels trust these offsets blindly, so regions must be aligned, disjoint and inside one half, and a buffer sized
by Buffer.get_low_latency_rdma_size_hint must hold the fixed low-latency slots (else every call would silently take
the slow fallback)."""
import random
from types import SimpleNamespace

import pytest
import torch

from torch_deepstack.ep import intranode
from torch_deepstack.ep.buffer import Buffer
from torch_deepstack.ep.ipc import IpcTransport


def _regions(lay, row_bytes, num_scales, k, with_topk):
    cap = lay.cap
    return [("data", lay.data, cap * row_bytes), ("scales", lay.scales, cap * num_scales * 4),
            ("topk", lay.topk, cap * k * 8 if with_topk else 0), ("weights", lay.weights, cap * k * 4),
            ("src", lay.src, cap * 4)]


@pytest.mark.parametrize("seed", range(20))
def test_normal_layout_regions_are_aligned_disjoint_and_fit(seed):
    rng = random.Random(seed)
    R = rng.choice([1, 2, 3, 4, 8, 16, 32])
    L = rng.choice([0, 1, 4, 32])
    row_bytes = 16 * rng.randint(1, 1024)
    num_scales, k = rng.choice([0, 56]), rng.choice([0, 1, 8])
    half = rng.randint(1 << 12, 1 << 28)
    with_notify, with_topk = rng.random() < 0.5, rng.random() < 0.5
    lay = intranode.NormalLayout(half, R, L, row_bytes, num_scales, k, with_notify, with_topk)
    if with_notify:
        assert lay.data >= R * (R + L) * 4                      # the count table comes first
    end = lay.data
    for name, off, size in _regions(lay, row_bytes, num_scales, k, with_topk):
        assert off % 256 == 0, name
        assert off >= end, f"{name} overlaps the region before it"
        end = off + size
    assert end <= half
    # one more row would not fit: cap is the largest count that does (up to alignment slack)
    bigger = (lay.cap + 1) * (row_bytes + num_scales * 4 + (k * 8 if with_topk else 0) + k * 4 + 4)
    assert bigger + lay.notify > half - 5 * 256


@pytest.mark.parametrize("tokens,hidden,ranks,experts", [(128, 7168, 8, 256), (128, 7168, 2, 256), (40, 256, 2, 16),
                                                         (16, 256, 3, 12), (1, 128, 1, 4)])
def test_low_latency_size_hint_holds_the_fused_slots(tokens, hidden, ranks, experts):
    num_bytes = Buffer.get_low_latency_rdma_size_hint(tokens, hidden, ranks, experts)
    slot_bytes = (num_bytes // 2 // ranks) // 256 * 256          # as IpcTransport sizes its slots
    t = SimpleNamespace(fused=IpcTransport.fused, world_size=ranks, slot_bytes=slot_bytes)
    L = experts // ranks
    assert intranode.ll_fits(t, L, tokens, hidden * 2, 0)                    # bf16 dispatch
    assert intranode.ll_fits(t, L, tokens, hidden, hidden // 128)             # fp8 + scales
    assert intranode.ll_combine_fits(t, experts, tokens, hidden * 2)         # bf16 combine
    lay = intranode.LowLatencyLayout(ranks, L, tokens, hidden * 2, 0)
    assert lay.slots % 256 == 0 and lay.slots >= L * ranks * 4 and lay.msg % 16 == 0


def test_fused_path_is_refused_where_the_kernels_do_not_apply():
    t = SimpleNamespace(fused=True, world_size=2, slot_bytes=1 << 20)
    assert intranode.usable(t, 512)
    assert not intranode.usable(t, 520)                            # rows must be whole 16-byte vectors
    assert not intranode.usable(SimpleNamespace(fused=True, world_size=33, slot_bytes=1 << 20), 512)
    assert not intranode.usable(SimpleNamespace(world_size=2), 512)   # torch.distributed transports


@pytest.mark.parametrize("n,R", [(0, 2), (1, 1), (4096, 2), (77, 8), (300, 5)])
def test_inclusive_rank_positions_equals_cumsum(n, R):
    from torch_deepstack.ep.layout import inclusive_rank_positions
    mask = torch.rand(n, R) < 0.4
    pos = inclusive_rank_positions(mask)
    assert pos.dtype == torch.int32 and pos.is_contiguous()
    assert torch.equal(pos, torch.cumsum(mask, 0, dtype=torch.int32))
