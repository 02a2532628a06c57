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


SCALE_DTYPES = (torch.float32, torch.int32)   # fp32 scales, or UE8M0 exponents packed four to an int32


def check_x(op: str, x: torch.Tensor, x_scales: torch.Tensor | None) -> None:
    """x: [N, hidden] data; with x_scales, DeepEP's (x, x_scales) pair: x of any one-byte dtype (fp8 e4m3/e5m2,
    uint8, ...) and x_scales [N, S] float32 or int32, any S and strides. The scales are an opaque per-token payload
    that travels with its row (dispatch returns them as [num_recv, S] in their dtype)."""
    torch._check(x.dim() == 2, lambda: f"{op}: x must be [num_tokens, hidden], got shape {tuple(x.shape)}")
    if x_scales is None:
        torch._check(x.dtype in DATA_DTYPES,
                     lambda: f"{op}: x must be bfloat16/float16/float32/float64 (or an (fp8, scales) pair), "
                             f"got {x.dtype}")
        return
    torch._check(x.element_size() == 1,
                 lambda: f"{op}: with x_scales, x must have a one-byte dtype (e.g. float8_e4m3fn), got {x.dtype}")
    torch._check(x_scales.dtype in SCALE_DTYPES,
                 lambda: f"{op}: x_scales must be float32 (or int32 packed UE8M0), got {x_scales.dtype}")
    torch._check(x_scales.dim() == 2 and x_scales.shape[0] == x.shape[0],
                 lambda: f"{op}: x_scales must be [num_tokens={x.shape[0]}, num_scales], got "
                         f"{tuple(x_scales.shape)}")


def check_tokens_per_expert(op: str, num_tokens_per_expert: torch.Tensor | None, num_experts: int) -> None:
    """The caller's per-expert token counts (get_dispatch_layout's num_tokens_per_expert): [num_experts], integer."""
    if num_tokens_per_expert is None:
        return
    t = num_tokens_per_expert
    torch._check(t.dim() == 1 and t.shape[0] == num_experts,
                 lambda: f"{op}: num_tokens_per_expert must be [num_experts={num_experts}], got {tuple(t.shape)}")
    torch._check(t.dtype in (torch.int32, torch.int64),
                 lambda: f"{op}: num_tokens_per_expert must be int32 (or int64), got {t.dtype}")


def check_max_tokens(op: str, name: str, num_tokens: int, num_max: int) -> None:
    torch._check(num_tokens <= num_max,
                 lambda: f"{op}: {name} has {num_tokens} tokens, more than num_max_dispatch_tokens_per_rank={num_max} "
                         f"(which must be the same on every rank)")


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


# --- checks whose outcome may differ between ranks ------------------------------------------------------------

class EPPeerInputError(ValueError):
    """Another rank's input failed a check in this call: that rank raises its own error, the others this one."""


# Codes a rank sends its peers in a call's first exchange (0: its checks passed).
BAD_EXPERT_IDS, TOO_MANY_TOKENS = 1, 2


class RankChecks:
    """This rank's checks of values that may differ between ranks (its token count, its expert ids).

    A rank that raised before the call's first exchange would leave its peers waiting in it until timeout_s. So a
    failure is kept here, the rank still takes part in that exchange (sending no tokens, and `code`), and then
    every rank calls raise_failures with the codes it received: the failing rank raises its own error (naming the
    argument), the others an EPPeerInputError naming the failing rank. Every rank runs the same checks with the
    same descriptions, so a peer describes a failure it did not see from its own `described`."""

    def __init__(self, op: str):
        self.op = op
        self.code = 0
        self.error: Exception | None = None
        self.described: dict[int, str] = {}

    @property
    def failed(self) -> bool:
        return self.error is not None

    def run(self, code: int, description: str, check) -> None:
        """check() raises ValueError/RuntimeError on bad input; after a failure the later checks are skipped."""
        self.described[code] = description
        if self.error is None:
            try:
                check()
            except (ValueError, RuntimeError) as e:
                self.code, self.error = code, e

    def raise_own(self) -> None:
        """For paths whose exchange carries no codes: raise this rank's error now (its peers are not told)."""
        if self.error is not None:
            raise self.error

    def raise_failures(self, codes: list[int] | None) -> None:
        """codes: every rank's code from the exchange (None while a CUDA graph is captured: nothing is read then)."""
        self.raise_own()
        failed = [(r, c) for r, c in enumerate(codes or ()) if c]
        if failed:
            raise EPPeerInputError(f"{self.op}: " + "; ".join(
                f"rank {r} failed its input check: {self.described.get(c, f'check {c}')}" for r, c in failed) +
                " (each failing rank raises its own error, naming the argument; the others raise this one instead "
                "of waiting for it)")


def read_codes(codes: torch.Tensor) -> list[int] | None:
    """Every rank's check code on the host (on CUDA a small device read), or None while a CUDA graph is captured,
    where nothing may be read (the data checks are skipped there too)."""
    if codes.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    return codes.tolist()
