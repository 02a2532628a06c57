"""Input validation for the EP ops: clear Python errors naming the argument and the expected shape/dtype."""
from __future__ import annotations

import torch

from torch_deepstack.checks import CheckedData, check_same_device  # noqa: F401  (re-exported for the area)

DATA_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
FP8_GROUP = 128


def check_topology(op: str, num_experts: int, num_ranks: int) -> int:
    torch._check(num_ranks >= 1, lambda: f"{op}: num_ranks must be >= 1, got {num_ranks}")
    torch._check(num_experts >= num_ranks and num_experts % num_ranks == 0,
                 lambda: f"{op}: num_experts={num_experts} must be a positive multiple of num_ranks={num_ranks}")
    return num_experts // num_ranks


def check_x(op: str, x: torch.Tensor, x_scales: torch.Tensor | None) -> None:
    torch._check(x.dim() == 2, lambda: f"{op}: x must be [num_tokens, hidden], got shape {tuple(x.shape)}")
    if x_scales is None:
        torch._check(x.dtype in DATA_DTYPES,
                     lambda: f"{op}: x must be bfloat16/float16/float32/float64 (or an (fp8, scales) pair), "
                             f"got {x.dtype}")
        return
    torch._check(x.dtype == torch.float8_e4m3fn,
                 lambda: f"{op}: with x_scales, x must be float8_e4m3fn, got {x.dtype}")
    torch._check(x.shape[1] % FP8_GROUP == 0,
                 lambda: f"{op}: fp8 hidden={x.shape[1]} must be a multiple of {FP8_GROUP}")
    torch._check(x_scales.dtype == torch.float32, lambda: f"{op}: x_scales must be float32, got {x_scales.dtype}")
    torch._check(x_scales.dim() == 2 and x_scales.shape[0] == x.shape[0]
                 and x_scales.shape[1] == x.shape[1] // FP8_GROUP,
                 lambda: f"{op}: x_scales must be [num_tokens, hidden // 128] = "
                         f"[{x.shape[0]}, {x.shape[1] // FP8_GROUP}], got {tuple(x_scales.shape)}")


def check_topk(op: str, topk_idx: torch.Tensor, topk_weights: torch.Tensor | None, num_tokens, num_experts: int
               ) -> None:
    torch._check(topk_idx.dtype == torch.int64, lambda: f"{op}: topk_idx must be int64, got {topk_idx.dtype}")
    torch._check(topk_idx.dim() == 2 and topk_idx.shape[0] == num_tokens,
                 lambda: f"{op}: topk_idx must be [num_tokens={num_tokens}, num_topk], got {tuple(topk_idx.shape)}")
    if topk_weights is not None:
        torch._check(topk_weights.dtype == torch.float32,
                     lambda: f"{op}: topk_weights must be float32, got {topk_weights.dtype}")
        torch._check(topk_weights.shape == topk_idx.shape,
                     lambda: f"{op}: topk_weights must have topk_idx's shape {tuple(topk_idx.shape)}, "
                             f"got {tuple(topk_weights.shape)}")


# topk_idx tensors that passed check_expert_range at their versions: a low-latency combine after its dispatch (the
# same topk_idx) then needs no second host sync.
EXPERT_IDS_CHECKED = CheckedData()


def check_expert_range(op: str, topk_idx: torch.Tensor, num_experts: int) -> None:
    """Data check (a host sync on GPU, skipped while a CUDA graph is being captured; once per tensor version)."""
    if topk_idx.numel() == 0:
        return
    EXPERT_IDS_CHECKED.check_eager((topk_idx,), (num_experts,),
                                  lambda: _check_expert_range_now(op, topk_idx, num_experts))


def _check_expert_range_now(op: str, topk_idx: torch.Tensor, num_experts: int) -> None:
    lo, hi = torch.stack(torch.aminmax(topk_idx)).tolist()   # one host sync
    if lo < -1 or hi >= num_experts:
        raise ValueError(f"{op}: topk_idx holds expert ids in [{lo}, {hi}]; valid ids are -1 (unused slot) and "
                         f"0..{num_experts - 1} (num_experts={num_experts})")
