"""Per-rank bodies of the GPU tests of ep.Buffer's streams, events and groups (run by spawn.run_world from
tests/ep/test_ep_cuda.py)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from torch_deepstack.ep import Buffer, EventHandle, EventOverlap
from tests.ep.workers import HIDDEN, make_inputs, normal_mode_checks, num_tokens

# ~0.5 s at an H200's clock: far longer than the host needs to return from a call and queue what follows it.
SLEEP_CYCLES = 1_000_000_000
_POISON_BYTES = [512 << i for i in range(11)]        # 512 B .. 512 KiB: the caching allocator's small pool


def delay_comm_stream(buf) -> None:
    """Make the next async call's work wait, on its comm stream, behind a long sleep, while the caller's stream
    stays free; and fill the comm stream's free memory with 0xff bytes first (NaN in floats, -1 in ints), so an
    output read before the comm stream has written it holds garbage rather than an earlier call's result."""
    comm = buf.get_comm_stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(comm):
        junk = [torch.full((n,), 255, dtype=torch.uint8, device="cuda") for n in _POISON_BYTES for _ in range(8)]
    torch.cuda.synchronize()
    del junk                    # back to the comm stream's pool, still holding 0xff
    with torch.cuda.stream(comm):
        torch.cuda._sleep(SLEEP_CYCLES)


def async_finish_checks(rank, ws, transport):
    """async_finish=True: every output, and everything made from the outputs, is right once the returned event is
    waited on, when the comm stream runs late (see test_ep_cuda.test_async_finish_outputs_ready_after_event)."""
    torch.cuda.set_device(rank % torch.cuda.device_count())
    E, M = 8 * ws, 32
    L = E // ws
    buf = Buffer(None, num_nvl_bytes=1 << 24, num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(M, HIDDEN, ws, E),
                 low_latency_mode=True, transport=transport, timeout_s=60)
    assert (buf._ipc is not None) == (transport == "ipc")
    dev = torch.device("cuda")

    # low-latency dispatch: cumulative_local_expert_recv_stats is updated from the received counts
    xb, idx_ll, w_ll = (t.to(dev) for t in make_inputs(5, rank, E, torch.bfloat16, n=M - rank))
    ref_recv, ref_cnt, ref_h, _, _ = buf.low_latency_dispatch(xb, idx_ll, M, E, use_fp8=False)
    assert int(ref_cnt.sum()) > 0
    stats = torch.zeros(L, dtype=torch.int32, device=dev)
    delay_comm_stream(buf)
    recv, cnt, h, ev, hook = buf.low_latency_dispatch(xb, idx_ll, M, E, cumulative_local_expert_recv_stats=stats,
                                                      use_fp8=False, async_finish=True)
    assert hook is None and ev.event is not None
    ev.current_stream_wait()
    assert torch.equal(cnt, ref_cnt)
    assert torch.equal(stats, ref_cnt), (stats, ref_cnt)
    valid = torch.arange(M * ws, device=dev).view(1, -1) < ref_cnt.view(-1, 1)
    assert torch.equal(recv[valid], ref_recv[valid])

    # low-latency combine into out=
    y_in = ref_recv * 2
    ref_out, _, _ = buf.low_latency_combine(y_in, idx_ll, w_ll, ref_h)
    assert ref_out.abs().sum() > 0
    out = torch.full_like(ref_out, float("nan"))
    delay_comm_stream(buf)
    got, ev, _ = buf.low_latency_combine(y_in, idx_ll, w_ll, ref_h, async_finish=True, out=out)
    ev.current_stream_wait()
    assert got is out
    assert torch.equal(out, ref_out), (out - ref_out).abs().max()

    # normal mode: worst-case dispatch (handle.rank_prefix_matrix is made from the received counts), exact
    # dispatch (the per-expert list), combine with a bias pair; previous_event in both DeepEP forms
    x, idx, w = (t.to(dev) for t in make_inputs(6, rank, E))
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    worst = ws * max(num_tokens(r) for r in range(ws))
    ref = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_worst_tokens=worst, **layout)
    assert int(ref[4].rank_prefix_matrix.sum()) > 0
    delay_comm_stream(buf)
    got = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_worst_tokens=worst, previous_event=Buffer.capture(),
                       async_finish=True, **layout)
    got[5].current_stream_wait()
    for name in ("rank_prefix_matrix", "rank_counts", "recv_src_idx"):
        assert torch.equal(getattr(got[4], name), getattr(ref[4], name)), name
    assert torch.equal(got[1], ref[1])
    rows = ref[4].recv_src_idx >= 0
    assert torch.equal(got[0][rows], ref[0][rows])

    ref = buf.dispatch(x, topk_idx=idx, topk_weights=w, **layout)
    delay_comm_stream(buf)
    got = buf.dispatch(x, topk_idx=idx, topk_weights=w, previous_event=EventOverlap(EventHandle()),
                       async_finish=True, **layout)
    got[5].current_stream_wait()
    assert got[3] == ref[3] and sum(ref[3]) > 0
    assert torch.equal(got[0], ref[0]) and torch.equal(got[4].rank_prefix_matrix, ref[4].rank_prefix_matrix)

    rx, _, rw, _, handle, _ = ref
    n = x.shape[0]
    bias = (torch.randn(n, HIDDEN, device=dev), torch.randn(n, HIDDEN, device=dev))
    ref_y, ref_yw, _ = buf.combine(rx, handle, topk_weights=rw, bias=bias)
    delay_comm_stream(buf)
    y, yw, ev = buf.combine(rx, handle, topk_weights=rw, bias=bias, previous_event=EventOverlap(EventHandle()),
                            async_finish=True)
    ev.current_stream_wait()
    assert torch.equal(y, ref_y), (y - ref_y).abs().max()
    assert torch.equal(yw, ref_yw)
    torch.cuda.synchronize()
    dist.barrier()


def gloo_auto_normal_mode(rank, ws, seed):
    """A gloo-group Buffer with transport="auto" in a process that has not touched CUDA (its CUDA side is set up at
    the first exchange of CUDA tensors), through every normal-mode, FP8, gradient, low-latency and graph check."""
    assert not torch.cuda.is_initialized()
    probe = Buffer(None, num_nvl_bytes=1 << 20)
    assert probe._cuda == "lazy" and not torch.cuda.is_initialized()     # made without touching CUDA
    probe.destroy()
    normal_mode_checks(rank, ws, seed, "cuda", "auto")


def gloo_group_cuda_and_cpu(rank, ws, seed):
    """vLLM's form: the GPU is set, then `Buffer(group=cpu_group)` with a gloo subgroup. One Buffer moves CUDA
    tensors (through NVLink IPC buffers) and CPU tensors (through gloo), with the same results; a transport="dist"
    gloo Buffer refuses CUDA tensors with an error saying why."""
    torch.cuda.set_device(rank % torch.cuda.device_count())
    torch.zeros(1, device="cuda")
    cpu_group = dist.new_group(list(range(ws)), backend="gloo")
    E, M = 8 * ws, 32
    buf = Buffer(group=cpu_group, num_nvl_bytes=1 << 24, num_rdma_bytes=0, low_latency_mode=False,
                 num_qps_per_rank=1)
    assert buf._cuda == "on" and buf.device.type == "cuda" and buf._ipc is not None
    assert buf.get_comm_stream() is not None
    assert EventHandle().event is not None

    x, idx, w = make_inputs(seed, rank, E)
    results = {}
    for dev in ("cpu", "cuda"):
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx.to(dev), E)
        rx, ridx, rw, counts, handle, _ = buf.dispatch(
            x.to(dev), topk_idx=idx.to(dev), topk_weights=w.to(dev), num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        assert rx.device.type == dev
        y, yw, _ = buf.combine(rx * 2, handle, topk_weights=rw)
        results[dev] = (rx.cpu(), ridx.cpu(), rw.cpu(), counts, y.cpu(), yw.cpu())
    cpu, gpu = results["cpu"], results["cuda"]
    for a, b in zip(cpu[:3], gpu[:3]):
        assert torch.equal(a, b)
    assert cpu[3] == gpu[3]
    torch.testing.assert_close(gpu[4], cpu[4], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gpu[5], cpu[5], rtol=1e-6, atol=1e-6)

    # Megatron's events on the gloo Buffer's CUDA side
    xc, idxc, wc = x.cuda(), idx.cuda(), w.cuda()
    per_rank, _, per_expert, in_rank, ev = buf.get_dispatch_layout(
        idxc, E, previous_event=EventOverlap(EventHandle()), async_finish=True, allocate_on_comm_stream=True)
    rx, _, rw, counts, handle, ev = buf.dispatch(
        xc, topk_idx=idxc, topk_weights=wc, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, previous_event=ev, async_finish=True, allocate_on_comm_stream=True)
    ev.current_stream_wait()
    assert torch.equal(rx.cpu(), cpu[0]) and counts == cpu[3]

    ll = Buffer(cpu_group, 0, Buffer.get_low_latency_rdma_size_hint(M, HIDDEN, ws, E), low_latency_mode=True,
                num_qps_per_rank=E // ws)
    assert ll._ipc is not None
    xb, idx_ll, w_ll = make_inputs(seed + 1, rank, E, torch.bfloat16, n=M - rank)
    outs = {}
    for dev in ("cpu", "cuda"):
        recv, cnt, h, _, _ = ll.low_latency_dispatch(xb.to(dev), idx_ll.to(dev), M, E, use_fp8=False)
        out, _, _ = ll.low_latency_combine(recv, idx_ll.to(dev), w_ll.to(dev), h)
        outs[dev] = (cnt.cpu(), out.cpu().float())
    assert torch.equal(outs["cpu"][0], outs["cuda"][0])
    torch.testing.assert_close(outs["cuda"][1], outs["cpu"][1], rtol=2e-2, atol=2e-2)

    cpu_only = Buffer(cpu_group, 1 << 24, transport="dist")
    per_rank, _, per_expert, in_rank, _ = cpu_only.get_dispatch_layout(idx, E)
    with pytest.raises(ValueError, match="transport='dist' over a gloo group moves CPU tensors only"):
        cpu_only.dispatch(xc, topk_idx=idxc, topk_weights=wc, num_tokens_per_rank=per_rank.cuda(),
                          is_token_in_rank=in_rank.cuda(), num_tokens_per_expert=per_expert.cuda())
    for b in (buf, ll, cpu_only):
        b.destroy()
    torch.cuda.synchronize()
    dist.barrier(group=cpu_group)
