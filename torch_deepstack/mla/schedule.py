"""The split-KV tile scheduler in plain Python: the spec of src/mla/mla_metadata.cuh (and the CPU face of
get_mla_metadata). Work of a request = ceil(s_k / 64) pages + FIXED_COST; the total is cut into `num_parts`
contiguous (request, page) ranges of about equal cost. See the header for the row format."""
from __future__ import annotations

import torch

from torch_deepstack.mla.checks import PAGE_SIZE, SCHED_INTS

FIXED_COST = 5          # pages' worth of cost for starting a split (Q load, output write, combine)
DEFAULT_CPU_SMS = 132   # the CPU face plans for an H100/H200-sized GPU unless num_sm_parts is given


def schedule(seqlens: list[int], num_parts: int) -> tuple[list[list[int]], list[int]]:
    b = len(seqlens)
    nblk = [(max(s, 0) + PAGE_SIZE - 1) // PAGE_SIZE for s in seqlens]
    total = sum(n + FIXED_COST for n in nblk)
    payload = -(-total // num_parts) + FIXED_COST
    pieces = [0] * b
    rows: list[list[int]] = []
    r = blk = 0
    for p in range(num_parts):
        if r >= b:
            rows.append([b, 0, b - 1, 0, 0, 0, 0, 0])
            continue
        br, bb, first_piece = r, blk, pieces[r]
        er, eb = r, blk
        unlimited = p == num_parts - 1
        cap = payload
        while r < b:
            left = nblk[r] - blk
            if unlimited or left + FIXED_COST <= cap:
                cap -= left + FIXED_COST
                pieces[r] += 1
                er, eb = r, nblk[r]
                r, blk = r + 1, 0
            else:
                take = cap - FIXED_COST
                if take <= 0:
                    break
                pieces[r] += 1
                er, eb = r, blk + take
                blk += take
                break
        rows.append([br, bb, er, eb, first_piece, 0, 0, 0])
    num_splits = [0]
    for n in pieces:
        num_splits.append(num_splits[-1] + n)
    for row in rows:
        if row[0] < b:
            row[4] += num_splits[row[0]]
    return rows, num_splits


def schedule_tensors(cache_seqlens: torch.Tensor, num_parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, splits = schedule(cache_seqlens.tolist(), num_parts)
    sched = torch.tensor(rows, dtype=torch.int32).reshape(num_parts, SCHED_INTS)
    return sched.to(cache_seqlens.device), torch.tensor(splits, dtype=torch.int32, device=cache_seqlens.device)
