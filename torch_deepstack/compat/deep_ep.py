"""DeepEP V1's Python API (`deep_ep`), backed by torch_deepstack.ep.

    import torch_deepstack.compat.deep_ep as deep_ep     # instead of: import deep_ep
    buffer = deep_ep.Buffer(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode=..., num_qps_per_rank=...)

Same constructor, methods, argument names and return tuples as DeepEP V1 (`Buffer`, `EventOverlap`, `Config`,
`topk_idx_t`). Differences, all documented in docs/ep.md: intranode only (num_rdma_bytes sizes the low-latency area,
no RDMA ranks, so num_tokens_per_rdma_rank is None); Config values are accepted but do not tune anything;
use_ue8m0 raises; use_logfmt sends bf16; receive hooks are no-ops because the data has landed when the call returns.
"""
import torch

from torch_deepstack.ep import Buffer, Config, EventOverlap  # noqa: F401

topk_idx_t = torch.int64

__all__ = ["Buffer", "Config", "EventOverlap", "topk_idx_t"]
