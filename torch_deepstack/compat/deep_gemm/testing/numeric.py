"""DeepGEMM's accuracy and traffic measures for tests and benchmarks."""
from __future__ import annotations

import torch


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - 2<x, y> / (|x|^2 + |y|^2) in float64, as a 0-dim tensor (DeepGEMM's measure: 0 for equal tensors, and
    it penalises a difference in magnitude as well as direction). Two all-zero tensors give 0 (DeepGEMM: nan)."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    diff = 1 - 2 * (x * y).sum() / denom
    return torch.where(denom > 0, diff, torch.zeros_like(diff))   # no host sync


def count_bytes(*tensors) -> int:
    """Bytes held by the tensors, looking into tuples and lists (data, scales pairs) and skipping None."""
    total = 0
    for t in tensors:
        if isinstance(t, (tuple, list)):
            total += count_bytes(*t)
        elif t is not None:
            total += t.numel() * t.element_size()
    return total
