"""DeepEP V1 call forms through torch_deepstack.compat.deep_ep (one import changed), on a world of one."""
import inspect

import torch

import torch_deepstack.compat as compat
from torch_deepstack.compat import deep_ep
from torch_deepstack.ep.ops import single_process_group_name


def test_lazy_package_and_exports():
    assert compat.deep_ep is deep_ep
    assert deep_ep.topk_idx_t is torch.int64
    assert {"Buffer", "Config", "EventOverlap"} <= set(dir(deep_ep))


def test_v1_signatures():
    want = {
        "__init__": ["group", "num_nvl_bytes", "num_rdma_bytes", "low_latency_mode", "num_qps_per_rank",
                     "allow_nvlink_for_low_latency_mode", "allow_mnnvl", "use_fabric", "explicitly_destroy",
                     "enable_shrink", "comm"],
        "get_dispatch_layout": ["topk_idx", "num_experts", "previous_event", "async_finish",
                                "allocate_on_comm_stream"],
        "dispatch": ["x", "handle", "num_tokens_per_rank", "num_tokens_per_rdma_rank", "is_token_in_rank",
                     "num_tokens_per_expert", "topk_idx", "topk_weights", "expert_alignment", "num_worst_tokens",
                     "config", "previous_event", "async_finish", "allocate_on_comm_stream"],
        "combine": ["x", "handle", "topk_weights", "bias", "config", "previous_event", "async_finish",
                    "allocate_on_comm_stream"],
        "low_latency_dispatch": ["x", "topk_idx", "num_max_dispatch_tokens_per_rank", "num_experts",
                                 "cumulative_local_expert_recv_stats", "dispatch_wait_recv_cost_stats", "use_fp8",
                                 "round_scale", "use_ue8m0", "async_finish", "return_recv_hook"],
        "low_latency_combine": ["x", "topk_idx", "topk_weights", "handle", "use_logfmt", "zero_copy", "async_finish",
                                "return_recv_hook", "out", "combine_wait_recv_cost_stats"],
    }
    for name, params in want.items():
        got = [p for p in inspect.signature(getattr(deep_ep.Buffer, name)).parameters if p != "self"]
        assert got[:len(params)] == params, (name, got)


def test_deepep_style_script_runs():
    """A DeepEP README-style training step, written against deep_ep, on a gloo world of one."""
    import torch.distributed as dist
    single_process_group_name()
    group = dist.group.WORLD
    hidden, num_experts, n = 256, 8, 20
    hidden_bytes = hidden * 2
    num_nvl_bytes = 0
    for config in (deep_ep.Buffer.get_dispatch_config(group.size()), deep_ep.Buffer.get_combine_config(group.size())):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, group.size()), num_nvl_bytes)
    buffer = deep_ep.Buffer(group, num_nvl_bytes, 0)
    x = torch.randn(n, hidden)
    topk_idx = torch.randint(-1, num_experts, (n, 2), dtype=deep_ep.topk_idx_t)
    topk_weights = torch.rand(n, 2)
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, previous_event = \
        buffer.get_dispatch_layout(topk_idx, num_experts, previous_event=deep_ep.Buffer.capture(),
                                   async_finish=True, allocate_on_comm_stream=True)
    recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, previous_event=previous_event, async_finish=True,
        allocate_on_comm_stream=True)
    event.current_stream_wait()
    routed = (topk_idx >= 0).any(1)
    assert torch.equal(recv_x, x[routed])
    assert sum(num_recv_tokens_per_expert_list) == int((topk_idx >= 0).sum())
    combined_x, _, event = buffer.combine(recv_x, handle, async_finish=True, previous_event=event)
    with event:
        pass
    assert torch.equal(combined_x, torch.where(routed.unsqueeze(1), x, torch.zeros_like(x)))
    # without top-k: rows go where is_token_in_rank says, no expert information comes back
    recv_x, recv_topk_idx, recv_topk_weights, _, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert)
    assert recv_topk_idx is None and recv_topk_weights is None and torch.equal(recv_x, x[routed])
    # low-latency form
    ll = deep_ep.Buffer(group, 0, deep_ep.Buffer.get_low_latency_rdma_size_hint(32, hidden, 1, num_experts),
                        low_latency_mode=True, num_qps_per_rank=num_experts)
    xb = x.bfloat16()
    recv, recv_count, h, event, hook = ll.low_latency_dispatch(xb, topk_idx, 32, num_experts, use_fp8=False,
                                                                return_recv_hook=True)
    hook()
    assert recv.shape == (num_experts, 32, hidden)
    out, event, hook = ll.low_latency_combine(recv, topk_idx, topk_weights, h, return_recv_hook=True)
    hook()
    ref = xb.float() * torch.where(topk_idx >= 0, topk_weights, 0).sum(1, keepdim=True)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_utils_module_event_handle_and_version(monkeypatch):
    """Megatron's `from deep_ep.utils import EventHandle, EventOverlap` and `EventOverlap(EventHandle())`, through the
    one changed import and through an alias of the module as `deep_ep`. Fails before: deep_ep was a module without
    `utils`, `EventHandle` or `__version__` (review, 2026-12-02)."""
    import importlib
    import sys
    from torch_deepstack.compat.deep_ep.utils import EventHandle, EventOverlap
    assert EventHandle is deep_ep.EventHandle and EventOverlap is deep_ep.EventOverlap
    assert deep_ep.utils.EventHandle is EventHandle
    assert deep_ep.__version__.startswith("1.") and "deepstack" in deep_ep.__version__
    monkeypatch.setitem(sys.modules, "deep_ep", deep_ep)
    monkeypatch.delitem(sys.modules, "deep_ep.utils", raising=False)
    try:
        aliased = importlib.import_module("deep_ep.utils")
        assert aliased.EventHandle is EventHandle and aliased.EventOverlap is EventOverlap
    finally:
        sys.modules.pop("deep_ep.utils", None)
    previous_event = EventOverlap(EventHandle())
    previous_event.current_stream_wait()
    with previous_event:
        pass


def test_unsupported_methods_and_arguments_raise_clearly():
    """DeepEP methods and arguments we do not support raise NotImplementedError naming docs/ep.md (before: an
    AttributeError, or, for enable_shrink and comm, silently accepted)."""
    import pytest
    import torch.distributed as dist
    single_process_group_name()
    want = {
        "low_latency_update_mask_buffer": ["rank_to_mask", "mask"],
        "low_latency_query_mask_buffer": ["mask_status"],
        "low_latency_clean_mask_buffer": [],
        "internode_dispatch": ["x", "handle", "num_tokens_per_rank", "num_tokens_per_rdma_rank", "is_token_in_rank",
                               "num_tokens_per_expert", "topk_idx", "topk_weights", "expert_alignment",
                               "num_worst_tokens", "config", "previous_event", "async_finish",
                               "allocate_on_comm_stream"],
        "internode_combine": ["x", "handle", "topk_weights", "bias", "config", "previous_event", "async_finish",
                              "allocate_on_comm_stream"],
    }
    for name, params in want.items():       # DeepEP's parameter names and order
        got = [p for p in inspect.signature(getattr(deep_ep.Buffer, name)).parameters if p != "self"]
        assert got == params, (name, got)
    buf = deep_ep.Buffer(dist.group.WORLD, 1 << 20, 0)
    calls = {"low_latency_update_mask_buffer": (0, True), "low_latency_query_mask_buffer": (torch.zeros(1),),
             "low_latency_clean_mask_buffer": (), "internode_dispatch": (torch.zeros(2, 256),),
             "internode_combine": (torch.zeros(2, 256), None)}
    for name, args in calls.items():
        with pytest.raises(NotImplementedError, match="docs/ep.md"):
            getattr(buf, name)(*args)
    with pytest.raises(NotImplementedError, match="enable_shrink"):
        deep_ep.Buffer(dist.group.WORLD, 1 << 20, 0, enable_shrink=True)
    with pytest.raises(NotImplementedError, match="mpi4py"):
        deep_ep.Buffer(None, 1 << 20, 0, comm=object())
    if buf._ipc is None:        # (in a process that uses CUDA a gloo Buffer has IPC buffers: nothing to refuse)
        with pytest.raises(RuntimeError, match="no peer-mapped memory: .+"):
            buf.get_local_buffer_tensor(torch.bfloat16)
    buf.destroy()


def test_docstring_states_the_differences():
    """The module docstring said receive hooks were no-ops and that the return tuples were DeepEP's: it now states
    the handle layouts (ours vs DeepEP's 6-tuple), the hooks, and the stricter num_worst_tokens (review,
    2026-12-02)."""
    doc = deep_ep.__doc__
    assert "no-ops" not in doc
    for fact in ("send_head", "recv_channel_prefix_matrix", "DispatchHandle", "LowLatencyHandle",
                 "num_worst_tokens // num_ranks", "hook() (compute in between overlaps it)", "NotImplementedError"):
        assert fact in doc, fact
