"""Expert parallelism (DeepEP's job): MoE dispatch and combine over a torch.distributed process group.

    buf = torch_deepstack.ep.Buffer(group, num_nvl_bytes=1 << 30)
    rank_counts, _, expert_counts, in_rank, _ = buf.get_dispatch_layout(topk_idx, num_experts)
    recv_x, recv_idx, recv_w, per_expert, handle, event = buf.dispatch(x, topk_idx=topk_idx, ...)
    y, _, event = buf.combine(expert_out, handle)

The same semantics run on CPU (gloo), over NCCL, and over NVLink peer-mapped buffers; see docs/ep.md.
"""
from torch_deepstack.ep import ops  # noqa: F401  (register the op faces)
from torch_deepstack.ep.checks import EPPeerInputError  # noqa: F401
from torch_deepstack.ep.buffer import (Buffer, Config, DispatchHandle, EventHandle, EventOverlap,  # noqa: F401
                                     LowLatencyHandle)
from torch_deepstack.ep.layout import dispatch_layout, low_latency_size_hint  # noqa: F401
from torch_deepstack.ep.transport import EPTransportError, register_transport  # noqa: F401

topk_idx_t = __import__("torch").int64
