"""Routing layout in plain PyTorch: who sends which token to which rank, and where it lands.

Conventions (DeepEP's): `num_experts` experts are split evenly over `num_ranks` ranks, expert e lives on rank
e // (num_experts // num_ranks) as local expert e % (num_experts // num_ranks). `topk_idx` is int64 [N, k] with
-1 for an unused slot. A token goes to a rank once, however many of its experts live there.

Receive order (normal mode): rows arrive grouped by source rank (rank 0 first) and, within a source, in that
source's token order. So the layout is a pure function of every rank's `is_token_in_rank`, which makes dispatch
deterministic and lets combine invert it exactly.
"""
from __future__ import annotations

import torch


def fixed_bincount(values: torch.Tensor, size: int) -> torch.Tensor:
    """bincount with a known output size: no host sync on CUDA (torch.bincount reads the max), so capturable."""
    out = torch.zeros(size, dtype=torch.int64, device=values.device)
    return out.scatter_add_(0, values, torch.ones_like(values))


def token_rank_mask(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """is_token_in_rank [N, num_ranks] bool."""
    per_rank = num_experts // num_ranks
    valid = topk_idx >= 0
    rank_of = torch.where(valid, topk_idx // per_rank, torch.full_like(topk_idx, num_ranks))
    mask = torch.zeros(topk_idx.shape[0], num_ranks + 1, dtype=torch.bool, device=topk_idx.device)
    mask.scatter_(1, rank_of, True)
    return mask[:, :num_ranks].contiguous()


def dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int):
    """(num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32, is_token_in_rank [N, R] bool)."""
    is_token_in_rank = token_rank_mask(topk_idx, num_experts, num_ranks)
    per_rank = is_token_in_rank.sum(0, dtype=torch.int32)
    flat = topk_idx.reshape(-1)
    flat = torch.where(flat >= 0, flat, torch.full_like(flat, num_experts))
    per_expert = fixed_bincount(flat, num_experts + 1)[:num_experts].to(torch.int32)
    return per_rank, per_expert, is_token_in_rank


def inclusive_rank_positions(mask: torch.Tensor) -> torch.Tensor:
    """int32 [N, R]: for each token and rank, how many tokens up to and including it go to that rank.

    torch.cumsum over dim 0 of a narrow [N, R] tensor runs as an outer-dimension scan, which took 226 us for
    N=4096, R=2 on an H200 (more than a whole cached FP8 dispatch moves data); scanning the transposed [R, N] copy
    along its rows takes a few us."""
    return torch.cumsum(mask.t().contiguous(), 1, dtype=torch.int32).t().contiguous()


def to_local_experts(topk_idx: torch.Tensor, rank: int, num_local_experts: int) -> torch.Tensor:
    """Re-index global expert ids to this rank's local ids; -1 for experts that live elsewhere."""
    local = topk_idx - rank * num_local_experts
    keep = (topk_idx >= 0) & (local >= 0) & (local < num_local_experts)
    return torch.where(keep, local, torch.full_like(local, -1))


def low_latency_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                          num_experts: int) -> int:
    """Bytes a low-latency buffer needs: two halves (exchanges alternate between them), each holding the larger of
    the dispatch receive slots ([experts][tokens] messages of a bf16 or fp8 + scales row, its token index and
    padding, plus the counts) and the combine receive slots ([experts][tokens] bf16 rows), as the fused NVLink
    kernels lay them out (src/ep/low_latency.cuh). Like DeepEP's, it grows with experts x tokens."""
    m, e = num_max_dispatch_tokens_per_rank, num_experts
    msg = max(hidden * 2, hidden + hidden // 128 * 4) + 4
    msg = (msg + 15) // 16 * 16
    dispatch = (e * 4 + 255) // 256 * 256 + e * m * msg
    combine = e * m * hidden * 2
    total = 2 * max(dispatch, combine) + 2 * 256 * num_ranks     # slack for the per-rank 256-byte rounding
    return (total + 127) // 128 * 128


def align_expert_counts(counts: torch.Tensor, alignment: int) -> torch.Tensor:
    """Tokens per local expert rounded up to `alignment` (DeepEP's expert_alignment), as a new int32 tensor (the
    fused path's counts sit in a buffer the next call reuses)."""
    out = (counts + alignment - 1) // alignment * alignment if alignment > 1 else counts.clone()
    return out.to(torch.int32)
