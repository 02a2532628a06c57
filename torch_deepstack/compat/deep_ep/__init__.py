"""DeepEP V1's Python API (`deep_ep`), backed by torch_deepstack.ep.

    import torch_deepstack.compat.deep_ep as deep_ep     # instead of: import deep_ep
    from torch_deepstack.compat.deep_ep.utils import EventHandle, EventOverlap   # instead of: deep_ep.utils
    buffer = deep_ep.Buffer(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode=..., num_qps_per_rank=...)

What matches DeepEP V1: the constructor, method names, argument names and order, and the arity and positions of
every return tuple (`Buffer`, `EventOverlap`, `EventHandle` (also in `.utils`), `Config`, `topk_idx_t`). The group
may be NCCL or gloo: as in DeepEP, a gloo group (vLLM passes its CPU group) carries the handles of the buffers
that move CUDA tensors; a gloo Buffer also moves CPU tensors. `EventOverlap(EventHandle())` works as
`previous_event`. `__version__` names the DeepEP V1 API level followed (plus "+deepstack").

What differs (docs/ep.md has the details):
- Handles. DeepEP's normal handle is a plain 6-tuple (rank_prefix_matrix, channel_prefix_matrix,
  recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, send_head); ours is `ep.DispatchHandle`, a
  NamedTuple of 7 (rank_prefix_matrix, rank_counts, recv_src_idx, is_token_in_rank, num_recv_tokens_per_expert,
  num_worst_tokens, buffer_id): only index 0 means the same, and 6-way unpacking fails. The low-latency handle
  `ep.LowLatencyHandle` has DeepEP's five fields in DeepEP's order plus buffer_id (5-way unpacking fails). Treat
  handles as opaque: pass them back to the Buffer that made them (a plain tuple or another Buffer's handle is
  refused with a TypeError/ValueError). A cached dispatch (handle=...) returns the handle where DeepEP returns None.
- `num_worst_tokens` is stricter than DeepEP's "worst-case number of received tokens": every rank's token count
  must be <= num_worst_tokens // num_ranks (each source gets that many receive slots per destination; checked,
  with a clear error on every rank).
- Intranode only: num_tokens_per_rdma_rank is None, num_rdma_bytes sizes the low-latency area; internode_dispatch,
  internode_combine, rank masking (low_latency_*_mask_buffer, enable_shrink=True), use_ue8m0 and an mpi4py `comm`
  without a group raise NotImplementedError. use_logfmt sends bf16 (exact); Config values and the recv-cost stats
  tensors are accepted and unused; get_dispatch_config/get_combine_config accept any rank count.
- Receive hooks (return_recv_hook=True): on the torch.distributed transport the all-to-all stays in flight until
  hook() (compute in between overlaps it); on the NVLink IPC transport the move completes inside the call and the
  hook only unpacks.
- Events are empty on CPU (every call has finished when it returns); `EventOverlap(None).current_stream_wait()` and
  `destroy()` without explicitly_destroy are allowed (DeepEP asserts).
"""
import torch

from torch_deepstack.compat.deep_ep import utils  # noqa: F401  (deep_ep.utils)
from torch_deepstack.ep import Buffer, Config, EventHandle, EventOverlap  # noqa: F401

topk_idx_t = torch.int64
__version__ = "1.2.1+deepstack"

__all__ = ["Buffer", "Config", "EventHandle", "EventOverlap", "topk_idx_t"]
