"""ep.Buffer's stream discipline, event forms and device choice, checked on CPU (world of one, gloo).

GPU counterparts: tests/ep/test_ep_cuda.py::test_async_finish_outputs_ready_after_event and the gloo-group tests."""
import types

import pytest
import torch
import torch.distributed as dist

from torch_deepstack.ep import Buffer, EventHandle, EventOverlap
from torch_deepstack.ep import buffer as buffer_mod
from torch_deepstack.ep.ops import single_process_group_name

E, H, M = 8, 256, 16


def _walk(obj):
    yield obj
    if isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _walk(o)


class _RunSpy:
    """Wraps Buffer._run: records every object its work returned and a snapshot of the watched tensors at the
    moment it returns. With async_finish on CUDA that moment is when the caller's stream is let go without waiting
    for the comm stream: whatever a call returns or changes must be made inside the work by then."""

    def __init__(self, monkeypatch, watched=()):
        self.returned, self.snapshots, self.watched = [], [], watched
        orig = Buffer._run
        spy = self

        def run(self, *args, **kwargs):
            out, ev = orig(self, *args, **kwargs)
            spy.returned.extend(_walk(out))
            spy.snapshots.append([t.clone() for t in spy.watched])
            return out, ev
        monkeypatch.setattr(Buffer, "_run", run)

    def made_inside(self, obj) -> bool:
        return any(o is obj for o in self.returned)


def _buffers():
    single_process_group_name()
    group = dist.group.WORLD
    normal = Buffer(group, Buffer.get_dispatch_config(1).get_nvl_buffer_size_hint(H * 4, 1), 0)
    ll = Buffer(group, 0, Buffer.get_low_latency_rdma_size_hint(M, H, 1, E), low_latency_mode=True)
    return normal, ll


def test_everything_a_call_returns_or_updates_is_made_inside_its_run(monkeypatch):
    """The review's five steps (2026-12-02) ran after _run returned, on the caller's stream, reading outputs the comm
    stream was still producing under async_finish=True: the low-latency stats update, the out= copy, the bias add,
    the handle's rank_prefix_matrix and the per-expert list. Fails before: each of them is made after _run."""
    normal, ll = _buffers()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, H, generator=g)
    idx = torch.randint(-1, E, (12, 2), generator=g)
    w = torch.rand(12, 2, generator=g)
    for async_finish in (False, True):
        stats = torch.zeros(E, dtype=torch.int32)
        out = torch.full((12, H), float("nan"), dtype=torch.bfloat16)
        spy = _RunSpy(monkeypatch, watched=(stats, out))
        recv, cnt, h, _, _ = ll.low_latency_dispatch(x.bfloat16(), idx, M, E, cumulative_local_expert_recv_stats=stats,
                                                     use_fp8=False, async_finish=async_finish)
        assert torch.equal(stats, cnt) and int(cnt.sum()) > 0
        assert torch.equal(spy.snapshots[-1][0], stats)       # updated inside the run
        got, _, _ = ll.low_latency_combine(recv, idx, w, h, async_finish=async_finish, out=out)
        assert got is out and spy.made_inside(out)
        assert torch.equal(spy.snapshots[-1][1], out)         # filled inside the run

        per_rank, _, per_expert, in_rank, _ = normal.get_dispatch_layout(idx, E)
        layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        for worst in (0, 12):
            rx, _, rw, counts, handle, _ = normal.dispatch(x, topk_idx=idx, topk_weights=w, num_worst_tokens=worst,
                                                           async_finish=async_finish, **layout)
            assert spy.made_inside(handle.rank_prefix_matrix)
            assert torch.equal(handle.rank_prefix_matrix, torch.cumsum(handle.rank_counts, 0, dtype=torch.int32))
            assert spy.made_inside(counts) and (counts == [] if worst else sum(counts) == int((idx >= 0).sum()))
        bias = (torch.randn(12, H, generator=g), torch.randn(12, H, generator=g))
        y, _, _ = normal.combine(rx, handle, topk_weights=rw, bias=bias, async_finish=async_finish)
        assert spy.made_inside(y)
        plain, _, _ = normal.combine(rx, handle, topk_weights=rw)
        torch.testing.assert_close(y, plain + bias[0] + bias[1])
        monkeypatch.undo()
    normal.destroy()
    ll.destroy()


def test_bias_is_checked_before_the_exchange():
    normal, _ = _buffers()
    x = torch.randn(5, H)
    idx = torch.tensor([[0, 1]] * 5)
    per_rank, _, per_expert, in_rank, _ = normal.get_dispatch_layout(idx, E)
    rx, _, _, _, handle, _ = normal.dispatch(x, topk_idx=idx, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                             num_tokens_per_expert=per_expert)
    calls = []
    orig = normal._run
    normal._run = lambda *a, **k: calls.append(1) or orig(*a, **k)
    with pytest.raises(ValueError, match=r"combine: bias must be torch.float32 \(5, 256\)"):
        normal.combine(rx, handle, bias=(None, torch.zeros(5, 1)))
    assert not calls                                          # raised before any exchange
    y, _, _ = normal.combine(rx, handle, bias=(None, torch.ones(5, H)))
    assert torch.equal(y, x + 1)
    normal.destroy()


# --- events ---------------------------------------------------------------------------------------------------

def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def test_event_handle_and_previous_event_forms():
    """Megatron's previous_event=EventOverlap(EventHandle()) and the other forms DeepEP callers pass. Fails before:
    there was no EventHandle."""
    h = EventHandle()
    assert (h.event is None) == (not _cuda_in_use())      # empty where no CUDA work can have been queued
    h.current_stream_wait()
    with EventOverlap(EventHandle()) as ev:
        ev.current_stream_wait()
    for form in (None, EventOverlap(None), EventOverlap(EventHandle()), EventHandle(), Buffer.capture()):
        ev = buffer_mod._cuda_event(form)
        assert ev is None or isinstance(ev, torch.cuda.Event)
    with pytest.raises(TypeError, match="previous_event must be an EventOverlap"):
        buffer_mod._cuda_event(object())
    normal, _ = _buffers()
    idx = torch.tensor([[0, 3], [-1, 5]])
    x = torch.randn(2, H)
    per_rank, _, per_expert, in_rank, ev = normal.get_dispatch_layout(
        idx, E, previous_event=EventOverlap(EventHandle()), async_finish=True, allocate_on_comm_stream=True)
    rx, _, _, _, handle, ev = normal.dispatch(x, topk_idx=idx, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                              num_tokens_per_expert=per_expert, previous_event=ev, async_finish=True)
    ev.current_stream_wait()
    y, _, ev = normal.combine(rx, handle, previous_event=EventOverlap(EventHandle()), async_finish=True)
    ev.current_stream_wait()
    assert torch.equal(y, x)
    normal.destroy()


# --- which tensors a Buffer moves -----------------------------------------------------------------------------

def test_device_plan():
    """NCCL: CUDA only. gloo: CPU, plus CUDA through IPC buffers unless transport="dist" (set up at construction
    when the process has initialised CUDA, else at the first exchange of CUDA tensors)."""
    plan = buffer_mod._device_plan
    assert plan("nccl", "auto", True)[:2] == ("now", False)
    assert plan("nccl", "dist", True)[:2] == ("now", False)
    assert plan("gloo", "ipc", False)[:2] == ("now", True)
    assert plan("gloo", "auto", True)[:2] == ("now", True)
    assert plan("gloo", "auto", False)[:2] == ("lazy", True)
    cuda, cpu_ok, why = plan("gloo", "dist", True)
    assert (cuda, cpu_ok) == ("off", True) and "transport='dist'" in why


def _fake(device: str):
    return types.SimpleNamespace(device=torch.device(device))


def test_gloo_buffer_accepts_cuda_tensors(monkeypatch):
    """A gloo-group Buffer (transport="auto") takes CUDA tensors as well as CPU ones; made in a process that has
    not initialised CUDA it does not touch CUDA until its first exchange of CUDA tensors. Before (review,
    2026-12-02) any gloo group meant CPU tensors only: "this Buffer's group moves cpu tensors"."""
    single_process_group_name()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    buf = Buffer(None, num_nvl_bytes=1 << 20)
    assert buf._cuda == "lazy" and buf._ipc is None and buf.device.type == "cpu"
    buf._check_device("get_dispatch_layout", _fake("cpu"))
    buf._check_device("get_dispatch_layout", _fake("cuda:0"), collective=False)   # a local call sets nothing up
    assert buf._cuda == "lazy"
    with pytest.raises(ValueError, match="moves cpu and cuda tensors, got a tensor on meta"):
        buf._check_device("dispatch", _fake("meta"))
    buf.destroy()
    dist_only = Buffer(None, num_nvl_bytes=1 << 20, transport="dist")
    with pytest.raises(ValueError, match=r"moves CPU tensors only.*transport='dist' over a gloo group"):
        dist_only._check_device("dispatch", _fake("cuda:0"))
    with pytest.raises(RuntimeError, match=r"no peer-mapped memory: it moves CPU tensors"):
        dist_only.get_local_buffer_tensor(torch.bfloat16)
    dist_only.destroy()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_ipc_transport_without_cuda_says_so():
    single_process_group_name()
    with pytest.raises(RuntimeError, match="transport='ipc' is not usable here: no CUDA device"):
        Buffer(None, num_nvl_bytes=1 << 20, transport="ipc")
