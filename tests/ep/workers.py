"""Per-rank bodies of the multi-process EP tests (run by spawn.run_world). Each reuses one process group for many
checks, since starting processes that import torch is the slow part.

Inputs are a pure function of (seed, rank), so every rank can rebuild every other rank's inputs and compute the
expected result of any exchange locally: no extra collectives in the checks themselves.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

import torch_deepstack  # noqa: F401
from torch_deepstack.ep import Buffer, DispatchHandle, EPPeerInputError, EPTransportError, LowLatencyHandle
from torch_deepstack.ep.layout import to_local_experts

from tests.helpers import calc_diff

HIDDEN = 256
NUM_TOPK = 4


def num_tokens(rank: int) -> int:
    return 24 + 5 * rank          # ranks differ; some tokens go nowhere (all slots -1)


def make_inputs(seed: int, rank: int, num_experts: int, dtype=torch.float32, n=None, hidden=HIDDEN):
    g = torch.Generator().manual_seed(seed * 1009 + rank)
    n = num_tokens(rank) if n is None else n
    scores = torch.rand(n, num_experts, generator=g)
    scores[:, 3::7] = -1.0                                    # experts that never receive anything
    idx = scores.topk(NUM_TOPK, dim=1).indices
    idx[torch.rand(n, NUM_TOPK, generator=g) < 0.2] = -1      # unused slots
    if n > 2:
        idx[1] = -1                                            # a token routed nowhere
    w = torch.rand(n, NUM_TOPK, generator=g) + 0.1
    x = torch.randn(n, hidden, generator=g)
    x[:, 0] = rank                                            # every row names its source rank and token
    x[:, 1] = torch.arange(n)
    return x.to(dtype), idx, w


def rank_of(idx, num_experts, ws):
    return torch.where(idx >= 0, idx // (num_experts // ws), -1)


def expected_receive(seed, rank, ws, num_experts, dtype=torch.float32):
    """Rows this rank must receive, in order: (source rank, token, x row, global top-k, weights)."""
    rows = []
    for i in range(ws):
        x, idx, w = make_inputs(seed, i, num_experts, dtype)
        for t in range(x.shape[0]):
            if (rank_of(idx[t], num_experts, ws) == rank).any():
                rows.append((i, t, x[t], idx[t], w[t]))
    return rows


def check_layout(buf, seed, rank, ws, num_experts):
    _, idx, _ = make_inputs(seed, rank, num_experts)
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, num_experts)
    assert per_rdma is None
    ref_in_rank = torch.zeros(idx.shape[0], ws, dtype=torch.bool)
    ref_expert = torch.zeros(num_experts, dtype=torch.int32)
    for t in range(idx.shape[0]):
        for e in idx[t].tolist():
            if e >= 0:
                ref_in_rank[t, e // (num_experts // ws)] = True
                ref_expert[e] += 1
    assert torch.equal(in_rank, ref_in_rank)
    assert torch.equal(per_rank, ref_in_rank.sum(0).to(torch.int32))
    assert torch.equal(per_expert, ref_expert)
    assert (per_expert[3::7] == 0).all()


def dispatch_once(buf, seed, rank, num_experts, dtype=torch.float32, **kw):
    x, idx, w = make_inputs(seed, rank, num_experts, dtype)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, num_experts)
    return (x, idx, w), buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                     num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w, **kw)


def check_dispatch(buf, seed, rank, ws, num_experts):
    L = num_experts // ws
    (x, idx, w), (rx, ridx, rw, counts, handle, ev) = dispatch_once(buf, seed, rank, num_experts,
                                                                   expert_alignment=4)
    ev.current_stream_wait()
    exp = expected_receive(seed, rank, ws, num_experts)
    assert rx.shape == (len(exp), HIDDEN), (rx.shape, len(exp))
    src_idx = handle.recv_src_idx.cpu()
    for p, (i, t, xr, gidx, wr) in enumerate(exp):
        assert rx[p, 0] == i and rx[p, 1] == t, f"row {p}: from ({rx[p, 0]}, {rx[p, 1]}), expected ({i}, {t})"
        assert torch.equal(rx[p], xr)
        local = to_local_experts(gidx, rank, L)
        assert torch.equal(ridx[p], local)
        assert torch.equal(rw[p], torch.where(local >= 0, wr, torch.zeros_like(wr)))
        assert int(src_idx[p]) == t
    ref_counts = torch.bincount(ridx[ridx >= 0], minlength=L)
    assert counts == ((ref_counts + 3) // 4 * 4).tolist()
    # the rank-count matrix in the handle agrees with the rows that arrived
    got_from = torch.bincount(rx[:, 0].long(), minlength=ws)
    assert torch.equal(handle.rank_counts[:, rank].long().cpu(), got_from)
    return (x, idx, w), (rx, ridx, rw, handle)


def check_worst_and_cached(buf, seed, rank, ws, num_experts, exact):
    (x, idx, w), (rx, ridx, rw, handle) = exact
    worst = max(num_tokens(r) for r in range(ws)) * ws
    _, (wx, widx, ww, wcounts, whandle, _) = dispatch_once(buf, seed, rank, num_experts, num_worst_tokens=worst)
    n = rx.shape[0]
    assert wx.shape[0] == worst and wcounts == []
    assert torch.equal(wx[:n], rx) and torch.equal(widx[:n], ridx) and torch.equal(ww[:n], rw)
    assert (widx[n:] == -1).all()
    # cached: the layout is reused and only data moves
    cx, cidx, cw, ccounts, chandle, _ = buf.dispatch(x * 2, handle=handle)
    assert cidx is None and cw is None and ccounts is None and chandle is handle
    assert torch.equal(cx, rx * 2)
    cwx = buf.dispatch(x * 3, handle=whandle)[0]
    assert torch.equal(cwx[:n], rx * 3)
    # combine: every token comes back once from each rank it visited; weights come back whole
    y, yw, _ = buf.combine(rx, handle, topk_weights=rw)
    visits = torch.zeros(x.shape[0])
    for r in range(ws):
        visits += (rank_of(idx, num_experts, ws) == r).any(1).float()
    assert torch.allclose(y, x * visits.unsqueeze(1), rtol=1e-6, atol=1e-6)
    assert torch.equal(yw, torch.where(idx >= 0, w, torch.zeros_like(w)))
    wy, wyw, _ = buf.combine(wx, whandle, topk_weights=ww)
    assert torch.equal(wy, y) and torch.equal(wyw, yw)
    return y


def check_fp8(buf, seed, rank, ws, num_experts):
    x, idx, w = make_inputs(seed, rank, num_experts, torch.bfloat16)
    q, s = torch.ops.deepstack.per_token_group_quant_fp8(x, 128)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, num_experts)
    (rq, rs), ridx, rw, counts, handle, _ = buf.dispatch((q, s), num_tokens_per_rank=per_rank,
                                                         is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                                                         topk_idx=idx, topk_weights=w)
    exp = expected_receive(seed, rank, ws, num_experts, torch.bfloat16)
    assert rq.dtype == torch.float8_e4m3fn and rs.shape == (len(exp), HIDDEN // 128)
    quant = {}
    for p, (i, t, xr, _, _) in enumerate(exp):
        if i not in quant:
            quant[i] = torch.ops.deepstack.per_token_group_quant_fp8(make_inputs(seed, i, num_experts,
                                                                                 torch.bfloat16)[0], 128)
        qi, si = quant[i]
        assert torch.equal(rq[p].view(torch.uint8), qi[t].view(torch.uint8))
        assert torch.equal(rs[p], si[t])
    deq = (rq.float().view(-1, HIDDEN // 128, 128) * rs.unsqueeze(2)).view(-1, HIDDEN)
    ref = torch.stack([e[2].float() for e in exp]) if exp else deq
    assert calc_diff(deq, ref) < 1e-3


def check_gradients(buf, seed, rank, ws, num_experts):
    """dispatch -> per-rank expert function -> combine, gradients against autograd through a single-process
    reference that replays every rank's routing."""
    L = num_experts // ws

    def expert_fn(rx, ridx, rw, r):
        scale = (ridx.clamp(min=0).float() + 1 + r) * (ridx >= 0)    # depends on local expert and rank
        return rx * (scale * rw).sum(1, keepdim=True) + rx.sin() * rw.sum(1, keepdim=True)

    x, idx, w = make_inputs(seed, rank, num_experts)
    x.requires_grad_(True)
    w.requires_grad_(True)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, num_experts)
    rx, ridx, rw, _, handle, _ = buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                              num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w)
    y, _, _ = buf.combine(expert_fn(rx, ridx, rw, rank), handle)
    g = torch.Generator().manual_seed(seed + 77 + rank)
    gy = torch.randn(y.shape, generator=g)
    (y * gy).sum().backward()
    # reference: all ranks' inputs rebuilt here, the exchange done by indexing
    xs, ws_, gys = [], [], []
    for i in range(ws):
        xi, ii, wi = make_inputs(seed, i, num_experts)
        xs.append(xi.requires_grad_(True))
        ws_.append(wi.requires_grad_(True))
        gys.append(torch.randn(xi.shape, generator=torch.Generator().manual_seed(seed + 77 + i)))
    total = 0.0
    for j in range(ws):
        for i in range(ws):
            _, ii, _ = make_inputs(seed, i, num_experts)
            sel = (rank_of(ii, num_experts, ws) == j).any(1)
            if not sel.any():
                continue
            lidx = to_local_experts(ii[sel], j, L)
            lw = torch.where(lidx >= 0, ws_[i][sel], torch.zeros_like(ws_[i][sel]))
            out = expert_fn(xs[i][sel], lidx, lw, j)
            total = total + (out * gys[i][sel]).sum()
    total.backward()
    torch.testing.assert_close(x.grad, xs[rank].grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, ws_[rank].grad, rtol=1e-5, atol=1e-5)


def check_low_latency(buf, seed, rank, ws, num_experts, num_max):
    L = num_experts // ws
    for use_fp8 in (False, True):
        x, idx, w = make_inputs(seed, rank, num_experts, torch.bfloat16, n=num_max - rank)
        stats = torch.zeros(L, dtype=torch.int32, device=buf.device)
        recv, count, handle, ev, hook = buf.low_latency_dispatch(
            x, idx, num_max, num_experts, cumulative_local_expert_recv_stats=stats, use_fp8=use_fp8,
            return_recv_hook=True)
        overlap = (x.float() @ x.float().t()).sum()                   # compute while the data is in flight
        hook()
        assert torch.isfinite(overlap)
        rx, rs = recv if use_fp8 else (recv, None)
        plain, plain_count, plain_handle, _, no_hook = buf.low_latency_dispatch(x, idx, num_max, num_experts,
                                                                               use_fp8=use_fp8)
        assert no_hook is None and torch.equal(plain_count, count)
        valid = torch.arange(num_max * ws).view(1, -1) < count.cpu().view(-1, 1)   # rows past a count: unspecified
        for a, b in zip(plain if use_fp8 else (plain,), recv if use_fp8 else (recv,)):
            assert torch.equal(a.cpu().float()[valid], b.cpu().float()[valid])   # hook and plain receive the same
        assert torch.equal(plain_handle.src_info, handle.src_info)
        assert torch.equal(plain_handle.layout_range, handle.layout_range)
        assert rx.shape == (L, num_max * ws, HIDDEN)
        assert torch.equal(stats.cpu(), count)
        begin, cnt = handle.layout_range.cpu() >> 32, handle.layout_range.cpu() & 0xFFFFFFFF
        src_info = handle.src_info.cpu()
        for l in range(L):
            e = rank * L + l
            rows = []
            for i in range(ws):
                xi, ii, _ = make_inputs(seed, i, num_experts, torch.bfloat16, n=num_max - i)
                toks = (ii == e).any(1).nonzero().flatten().tolist()
                assert int(cnt[l, i]) == len(toks) and int(begin[l, i]) == len(rows)
                rows += [(i, t, xi[t]) for t in toks]
            assert int(count[l]) == len(rows)
            for p, (i, t, xr) in enumerate(rows):
                assert int(src_info[l, p]) == t
                if use_fp8:
                    deq = rx[l, p].float().view(-1, 128) * rs[l, p].view(-1, 1)
                    assert calc_diff(deq.flatten(), xr.float()) < 1e-3
                else:
                    assert torch.equal(rx[l, p], xr)
        # combine with identity experts: x * sum of the weights of the experts it reached
        if use_fp8:
            y_in = (rx.float().view(L, -1, HIDDEN // 128, 128) * rs.unsqueeze(-1)).view(rx.shape).to(torch.bfloat16)
        else:
            y_in = rx
        out, _, hook2 = buf.low_latency_combine(y_in, idx, w, handle, return_recv_hook=True)
        hook2()
        ref = x.float() * torch.where(idx >= 0, w, 0).sum(1, keepdim=True)
        assert calc_diff(out.float(), ref) < (9e-4 if use_fp8 else 1e-5)
        again, _, _ = buf.low_latency_combine(y_in, idx, w, handle)
        assert torch.equal(again, out)


class OnDevice:
    """Runs a Buffer on `device` for checks written against CPU tensors: tensor arguments move to the device,
    tensor results come back (handles stay where they are: they feed later calls)."""

    def __init__(self, buf, device):
        self.buf, self.device = buf, torch.device(device)

    def _to(self, v, dev):
        if isinstance(v, torch.Tensor):
            return v.to(dev)
        if isinstance(v, (DispatchHandle, LowLatencyHandle)):
            return v
        if isinstance(v, tuple):
            return tuple(self._to(a, dev) for a in v)
        if isinstance(v, list):
            return [self._to(a, dev) for a in v]
        return v

    def __getattr__(self, name):
        attr = getattr(self.buf, name)
        if not callable(attr) or name.startswith("_") or isinstance(attr, type):
            return attr

        def call(*args, **kwargs):
            out = attr(*self._to(args, self.device), **{k: self._to(v, self.device) for k, v in kwargs.items()})
            host = self._to(out, "cpu")
            if isinstance(out, tuple) and callable(out[-1]):
                hook = out[-1]

                def host_hook():        # the device outputs are filled by the hook: refresh the host copies
                    hook()
                    _copy_into(host[:-1], out[:-1])
                host = host[:-1] + (host_hook,)
            return host
        return call


def _copy_into(dst, src):
    if isinstance(src, torch.Tensor):
        dst.copy_(src)
    elif isinstance(src, (tuple, list)) and not isinstance(src, (DispatchHandle, LowLatencyHandle)):
        for d, s in zip(dst, src):
            _copy_into(d, s)


def make_buffer(device, transport, **kw):
    buf = Buffer(None, transport=transport, **kw)
    return buf if device == "cpu" else OnDevice(buf, device)


def check_low_latency_gradients(buf, seed, rank, ws, num_experts, num_max):
    """low_latency_dispatch -> per-expert scale -> low_latency_combine: gradients of x and topk_weights against
    autograd through a closed-form single-process reference (out[t] = x[t] * sum_k w[t,k] * c(e_k))."""
    L = num_experts // ws
    x, idx, w = make_inputs(seed, rank, num_experts, torch.float32, n=num_max - rank)
    idx[0, 1] = idx[0, 0] if idx[0, 0] >= 0 else idx[0, 1]          # one token names an expert twice
    x.requires_grad_(True)
    w.requires_grad_(True)
    recv, count, handle, _, _ = buf.low_latency_dispatch(x, idx, num_max, num_experts, use_fp8=False)
    scale = (torch.arange(L, dtype=torch.float32) + 1 + L * rank).view(L, 1, 1)   # c(e) = e + 1
    out, _, _ = buf.low_latency_combine(recv * scale.to(recv.device), idx, w, handle)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + rank))
    (out * gy).sum().backward()
    xr, wr = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    c = torch.where(idx >= 0, (idx + 1).float(), 0.0)
    ref = xr * (wr * c).sum(1, keepdim=True)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)
    (ref * gy).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    # grad_w[t, k] = c(e_k) <gy_t, x_t>: an fp32 dot product of HIDDEN terms, summed in another order than
    # autograd's. Where the terms cancel, rounding is relative to the sum of their magnitudes, which grows with c
    # (up to 64 at 8 ranks), so the bound adds 2e-7 (~3.4 x 2^-24) of that sum to the plain tolerances.
    terms = (gy.abs() * x.detach().abs()).sum(1, keepdim=True) * c.abs()
    err = (w.grad - wr.grad).abs()
    bound = 1e-4 + 1e-5 * wr.grad.abs() + 2e-7 * terms
    assert bool((err <= bound).all()), f"grad_w off by {float(err.max()):.3g}, bound there " \
                                       f"{float(bound.flatten()[err.argmax()]):.3g}"


def normal_mode_checks(rank, ws, seed, device="cpu", transport="auto"):
    num_experts = 8 * ws
    buf = make_buffer(device, transport, num_nvl_bytes=1 << 24, timeout_s=60)
    check_layout(buf, seed, rank, ws, num_experts)
    exact = check_dispatch(buf, seed, rank, ws, num_experts)
    y1 = check_worst_and_cached(buf, seed, rank, ws, num_experts, exact)
    y2 = check_worst_and_cached(buf, seed, rank, ws, num_experts, check_dispatch(buf, seed, rank, ws, num_experts))
    assert torch.equal(y1, y2)                                          # repeated runs are bitwise identical
    check_fp8(buf, seed, rank, ws, num_experts)
    check_gradients(buf, seed, rank, ws, num_experts)
    ll = make_buffer(device, transport, num_nvl_bytes=1 << 24, low_latency_mode=True, timeout_s=60,
                     num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(40, HIDDEN, ws, num_experts))
    check_low_latency(ll, seed, rank, ws, num_experts, num_max=40)
    check_low_latency_gradients(ll, seed, rank, ws, num_experts, num_max=40)
    if device != "cpu":
        check_low_latency_graph(ll.buf, seed, rank, ws, num_experts, num_max=40)
        check_worst_mode_graph(buf.buf, seed, rank, ws, num_experts)
        check_decode_step_graph(ll.buf, seed, rank, ws, num_experts, num_max=40)
    if device != "cpu" and buf.buf._ipc is not None:
        check_own_transports_and_overflow(buf, ll, seed, rank, ws, num_experts, device, transport)
    dist.barrier()


def check_own_transports_and_overflow(buf, ll, seed, rank, ws, num_experts, device, transport):
    """Each Buffer's calls use its own IPC buffers (two Buffers on one group), and an exact dispatch whose rows
    exceed one half of a small Buffer's area (the fused send skips itself on the GPU, the host falls back to the
    multi-round copies) still delivers every row, on a Buffer made after the others and destroyed before them."""
    from torch_deepstack.ep.intranode import NormalLayout
    from torch_deepstack.ep.transport import transport_for
    dev = torch.device(device)
    assert transport_for(buf.buf._op_group, dev) is buf.buf._ipc
    assert transport_for(ll.buf._op_group, dev) is ll.buf._ipc and ll.buf._ipc is not buf.buf._ipc
    small = make_buffer(device, transport, num_nvl_bytes=40 << 10, timeout_s=60)
    t = small.buf._ipc
    cap = NormalLayout(ws * t.slot_bytes, ws, num_experts // ws, HIDDEN * 4, 0, NUM_TOPK).cap
    received = len(expected_receive(seed, rank, ws, num_experts))
    everyone = [None] * ws
    dist.all_gather_object(everyone, received)
    assert max(everyone) > cap, (everyone, cap)         # the fused path cannot hold it: the fallback runs
    check_dispatch(small, seed, rank, ws, num_experts)
    small.buf.destroy()
    assert transport_for(buf.buf._op_group, dev) is buf.buf._ipc
    check_dispatch(buf, seed, rank, ws, num_experts)      # the earlier Buffer still works through its own area


def spread_over_gpus_checks(rank, ws, seed):
    """normal_mode_checks with rank r on GPU r % device_count: peers on other GPUs (NVLink) and on the same GPU
    at once, so the fused kernels run with R = ws on fewer GPUs than ranks (gloo carries only the IPC handles)."""
    torch.cuda.set_device(rank % torch.cuda.device_count())
    normal_mode_checks(rank, ws, seed, "cuda", "ipc")


def _replay_matches_eager(step, statics, fresh_inputs, check=None):
    """Capture step() in a CUDA graph, then for new inputs copied into `statics` the replay equals eager (and
    passes `check(i, outputs)` for the i-th inputs when given)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for i, inputs in enumerate(fresh_inputs):
        for st, v in zip(statics, inputs):
            st.copy_(v)
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for a, b in zip(captured, eager):
            assert torch.equal(a, b), "CUDA-graph replay differs from eager"
        if check is not None:
            check(i, captured)


def _ll_step(buf, seed, rank, num_experts, num_max, experts):
    """(inputs(seed), static inputs, step) for a decode step to capture: low-latency FP8 dispatch of the static
    bf16 tokens -> experts(recv_x, recv_scales, count) -> low-latency combine; step() returns (out, count)."""
    def inputs(s):
        x, idx, w = make_inputs(s, rank, num_experts, torch.bfloat16, n=num_max)
        return x.cuda(), idx.cuda(), w.cuda()
    statics = [t.clone() for t in inputs(seed)]

    def step():
        (rx, rs), cnt, handle, _, _ = buf.low_latency_dispatch(statics[0], statics[1], num_max, num_experts,
                                                               use_fp8=True)
        out, _, _ = buf.low_latency_combine(experts(rx, rs, cnt), statics[1], statics[2], handle)
        return out, cnt
    return inputs, statics, step


def check_low_latency_graph(buf, seed, rank, ws, num_experts, num_max):
    """Low-latency dispatch + combine captured in one CUDA graph (the decode-step pattern) replays correctly."""
    def dequantise(rx, rs, cnt):
        return (rx.float() * rs.repeat_interleave(128, dim=-1)).to(torch.bfloat16)
    inputs, statics, step = _ll_step(buf, seed, rank, num_experts, num_max, dequantise)
    _replay_matches_eager(step, statics, [inputs(seed + 100 + i) for i in range(3)])


def check_decode_step_graph(buf, seed, rank, ws, num_experts, num_max):
    """A whole MoE decode step in one CUDA graph: low-latency FP8 dispatch -> this rank's experts as one masked
    grouped FP8 GEMM (the layout dispatch writes is the one the GEMM reads) -> low-latency combine. Replays equal
    eager calls, and every replay matches an fp32 reference built from the dequantised operands."""
    from torch_deepstack.gemm import m_grouped_fp8_gemm_nt_masked, per_block_quant_fp8
    L = num_experts // ws
    g = torch.Generator().manual_seed(seed * 7919)
    experts = torch.randn(num_experts, HIDDEN, HIDDEN, generator=g) / HIDDEN ** 0.5   # alike on every rank
    wq, wsc = zip(*(per_block_quant_fp8(experts[e].to(torch.bfloat16).cuda()) for e in range(num_experts)))
    deq_w = [q.float() * s.repeat_interleave(128, 0).repeat_interleave(128, 1) for q, s in zip(wq, wsc)]
    bq, bs = torch.stack(wq[rank * L:(rank + 1) * L]), torch.stack(wsc[rank * L:(rank + 1) * L])

    def local_experts(rx, rs, cnt):
        return m_grouped_fp8_gemm_nt_masked(rx, rs, bq, bs, cnt, expected_m=num_max)
    inputs, statics, step = _ll_step(buf, seed, rank, num_experts, num_max, local_experts)

    seeds = [seed + 300 + i for i in range(3)]

    def matches_reference(i, outputs):
        x, idx, w = statics                       # hold the inputs of seeds[i] during its check
        q, s = torch.ops.deepstack.per_token_group_quant_fp8(x, 128)
        deq_x = q.float() * s.repeat_interleave(128, 1)
        ref = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for t in range(x.shape[0]):
            for k, e in enumerate(idx[t].tolist()):
                if e >= 0:
                    ref[t] += w[t, k] * (deq_w[e] @ deq_x[t])
        assert calc_diff(outputs[0].float(), ref) < 1e-4
        count = torch.zeros(L, dtype=torch.int32)            # tokens of every rank that name each local expert
        for r in range(ws):
            _, ii, _ = make_inputs(seeds[i], r, num_experts, torch.bfloat16, n=num_max)
            for l in range(L):
                count[l] += int((ii == rank * L + l).any(1).sum())
        assert torch.equal(outputs[1].cpu(), count)
    _replay_matches_eager(step, statics, [inputs(v) for v in seeds], check=matches_reference)


def check_worst_mode_graph(buf, seed, rank, ws, num_experts):
    """Normal dispatch + combine with num_worst_tokens (no host sync) captured and replayed."""
    n = num_tokens(rank)
    worst = max(num_tokens(r) for r in range(ws)) * ws
    E = num_experts

    def inputs(s):
        x, idx, w = make_inputs(s, rank, E)
        return x.cuda(), idx.cuda(), w.cuda()
    statics = [t.clone() for t in inputs(seed)]

    def step():
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(statics[1], E)
        rx, ridx, rw, _, handle, _ = buf.dispatch(statics[0], num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                  num_tokens_per_expert=per_expert, topk_idx=statics[1],
                                                  topk_weights=statics[2], num_worst_tokens=worst)
        y, yw, _ = buf.combine(rx * 2, handle, topk_weights=rw)
        return rx, ridx, y, yw
    assert n <= worst
    _replay_matches_eager(step, statics, [inputs(seed + 200 + i) for i in range(3)])


def reduce_overhead_checks(rank, ws, seed, transport):
    """The low-latency decode step as a compiled model calls it (the ops, on a Buffer's group) under
    torch.compile(mode="reduce-overhead", fullgraph=True): Inductor's CUDA graph trees record it on every rank, and
    every call on fresh inputs (replays after the first two) equals the eager step, bitwise. Then the same for a
    normal-mode dispatch + combine with num_worst_tokens, and an exact-size one (kept outside the graphs)."""
    from tests.helpers import recorded_cuda_graphs
    num_experts, num_max = 8 * ws, 40
    buf = Buffer(None, transport=transport, num_nvl_bytes=1 << 24, low_latency_mode=True, timeout_s=60,
                 num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(num_max, HIDDEN, ws, num_experts))
    group, L = buf._op_group, num_experts // ws
    expert_scale = (torch.arange(L, dtype=torch.float32, device="cuda") + 1 + L * rank).view(L, 1, 1)

    def step(x, idx, w):
        rx, rs, cnt, src_info, layout_range = torch.ops.deepstack.ep_low_latency_dispatch(
            x, idx, num_max, num_experts, ws, group, True, False)
        y = (rx.float() * rs.repeat_interleave(128, dim=-1) * expert_scale).to(torch.bfloat16)
        out = torch.ops.deepstack.ep_low_latency_combine(y, idx, w, src_info, layout_range, num_max, group)
        return out, cnt

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for i in range(5):
        x, idx, w = (t.cuda() for t in make_inputs(seed + 500 + i, rank, num_experts, torch.bfloat16, n=num_max))
        got = [t.clone() for t in compiled(x, idx, w)]   # (the next replay overwrites the graph's outputs)
        want = step(x, idx, w)
        for a, b in zip(got, want):
            assert torch.equal(a, b), f"call {i}: the reduce-overhead step differs from eager"
        assert int(want[1].sum()) > 0
    assert recorded_cuda_graphs() >= 1, "the step ran outside CUDA graphs (cudagraph skip)"
    buf.destroy()

    # Normal mode with num_worst_tokens (shapes independent of routing), on a Buffer made after the graphs above.
    normal = Buffer(None, transport=transport, num_nvl_bytes=1 << 24, timeout_s=60)
    group, n = normal._op_group, num_tokens(rank)
    worst = max(num_tokens(r) for r in range(ws)) * ws

    def normal_step(x, idx, w):
        rx, _, _, rw, _, mask, rc, src = torch.ops.deepstack.ep_dispatch(x, None, idx, w, None, num_experts, ws,
                                                                         group, 1, worst)
        out, _ = torch.ops.deepstack.ep_combine(rx * (rw.sum(1, keepdim=True) + 1), None, mask, rc, src, group,
                                                worst)
        return out

    graphs_before = recorded_cuda_graphs()
    compiled = torch.compile(normal_step, mode="reduce-overhead", fullgraph=True)
    for i in range(5):
        x, idx, w = (t.cuda() for t in make_inputs(seed + 600 + i, rank, num_experts, n=n))
        got = compiled(x, idx, w).clone()
        want = normal_step(x, idx, w)
        # (Inductor fuses the stand-in expert's sum and product: last-bit differences, hence a tolerance)
        torch.testing.assert_close(got, want, msg=lambda m: f"call {i}: the reduce-overhead normal step: {m}")
    assert recorded_cuda_graphs() > graphs_before, "the normal step ran outside CUDA graphs (cudagraph skip)"

    # Exact-size dispatch (receive sizes known only on the device: unbacked in the graph) cannot be captured. With
    # graph partitioning (Inductor's default) torch 2.11's graph trees then fail on the op's output tuple handed to
    # the next partition (an AssertionError in _allocate_and_copy_recording_inputs; torch's fix for tensors nested in
    # partition inputs is pytorch/pytorch#176267); without it Inductor runs the step outside CUDA graphs, which is
    # what this checks (docs/ep.md). Use num_worst_tokens for steps that should replay as graphs.
    def exact_step(x, idx, w):
        rx, _, _, rw, _, mask, rc, src = torch.ops.deepstack.ep_dispatch(x, None, idx, w, None, num_experts, ws,
                                                                         group, 1, 0)
        out, _ = torch.ops.deepstack.ep_combine(rx * (rw.sum(1, keepdim=True) + 1), None, mask, rc, src, group, 0)
        return out

    import torch._inductor.config as inductor_config
    with inductor_config.patch(graph_partition=False):
        compiled = torch.compile(exact_step, mode="reduce-overhead", fullgraph=True)
        for i in range(4):
            x, idx, w = (t.cuda() for t in make_inputs(seed + 700 + i, rank, num_experts, n=n))
            got = compiled(x, idx, w).clone()
            torch.testing.assert_close(got, exact_step(x, idx, w),
                                       msg=lambda m: f"call {i}: the reduce-overhead exact step: {m}")
    normal.destroy()
    dist.barrier()


def error_checks(rank, ws, device="cpu", transport="auto"):
    """Bad input raises a clear error on every rank (so nothing hangs): before any collective, or, for the checks
    that can fail on some ranks only (token counts, expert ids), right after the call's first exchange."""
    import pytest
    num_experts = 4 * ws
    buf = make_buffer(device, transport, num_nvl_bytes=1 << 22, timeout_s=30)
    x, idx, w = make_inputs(0, rank, num_experts)
    layout = buf.get_dispatch_layout(idx, num_experts)
    kw = dict(num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2])
    bad = idx.clone()
    bad[0, 0] = num_experts
    with pytest.raises(ValueError, match="expert ids in"):
        buf.dispatch(x, topk_idx=bad, topk_weights=w, **kw)
    with pytest.raises(ValueError, match="expert ids in"):
        buf.get_dispatch_layout(bad, num_experts)
    with pytest.raises(RuntimeError, match="topk_weights must be float32"):
        buf.dispatch(x, topk_idx=idx, topk_weights=w.double(), **kw)
    with pytest.raises(RuntimeError, match="topk_idx must be int64"):
        buf.dispatch(x, topk_idx=idx.int(), topk_weights=w, **kw)
    with pytest.raises(RuntimeError, match="x must be"):
        buf.dispatch(x.to(torch.int32), topk_idx=idx, topk_weights=w, **kw)
    q = x.to(torch.float8_e4m3fn)          # (x_scales [N, S] fp32 or int32, any S, is valid: as upstream)
    with pytest.raises(RuntimeError, match="x_scales must be float32 .or int32"):
        buf.dispatch((q, torch.ones(x.shape[0], 3, dtype=torch.float64)), topk_idx=idx, topk_weights=w, **kw)
    with pytest.raises(RuntimeError, match=r"x_scales must be \[num_tokens=\d+, num_scales\]"):
        buf.dispatch((q, torch.ones(x.shape[0] + 1, 3)), topk_idx=idx, topk_weights=w, **kw)
    with pytest.raises(RuntimeError, match="with x_scales, x must have a one-byte dtype"):
        buf.dispatch((x.bfloat16(), torch.ones(x.shape[0], 3)), topk_idx=idx, topk_weights=w, **kw)
    with pytest.raises(RuntimeError, match=r"topk_weights must have topk_idx's shape"):
        buf.dispatch(x, topk_idx=idx, topk_weights=w[:, :2].contiguous(), **kw)
    rx, _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, **kw)
    other = make_buffer(device, transport, num_nvl_bytes=1 << 22)
    with pytest.raises(ValueError, match="another ep.Buffer"):
        other.combine(rx, handle)
    with pytest.raises(ValueError, match="another ep.Buffer"):
        other.dispatch(x, handle=handle)
    with pytest.raises(RuntimeError, match="one row per received token"):
        buf.combine(rx[:-1] if rx.shape[0] else torch.zeros(1, HIDDEN), handle)
    with pytest.raises(ValueError, match="too small"):
        small = make_buffer(device, transport, num_nvl_bytes=1000)
        small.dispatch(x, topk_idx=idx, topk_weights=w, **kw)
    with pytest.raises(ValueError, match="too small"):
        small_ll = make_buffer(device, transport, num_nvl_bytes=1 << 20, num_rdma_bytes=1000,
                               low_latency_mode=True)
        small_ll.low_latency_dispatch(x.bfloat16(), idx, 64, num_experts)
    ll = make_buffer(device, transport,
                     num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(16, HIDDEN, ws, num_experts))
    with pytest.raises(RuntimeError, match="more than num_max_dispatch_tokens_per_rank"):
        ll.low_latency_dispatch(x.bfloat16(), idx, 16, num_experts)
    with pytest.raises(ValueError, match="num_worst_tokens=.* gives each source rank"):
        buf.dispatch(x, topk_idx=idx, topk_weights=w, num_worst_tokens=ws, **kw)
    if transport == "ipc":      # every rank lays out its peer-mapped area alike, so sizes must agree
        with pytest.raises(ValueError, match="same buffer size"):
            make_buffer(device, transport, num_nvl_bytes=(1 << 22) + rank * (1 << 16))
    # the group still works after all that
    y, _, _ = buf.combine(rx, handle)
    assert y.shape == x.shape
    dist.barrier()


def uneven_input_checks(rank, ws, case, device="cpu", transport="auto"):
    """A check that fails on some ranks only (found by a review, 2026-12-02: the peers then waited in the call's
    first exchange until timeout_s and got EPTransportError). Each failing rank raises its own error naming the
    argument; every other rank raises at once an EPPeerInputError naming the failing ranks. `case`: "worst_tokens"
    (a rank over num_worst_tokens // R), "ll_tokens" (over num_max_dispatch_tokens_per_rank) or "expert_ids"."""
    import re
    import time
    E = 4 * ws
    timeout_s = 20
    buf = make_buffer(device, transport, num_nvl_bytes=1 << 22, timeout_s=timeout_s)
    x, idx, w = make_inputs(0, rank, E)
    lay = buf.get_dispatch_layout(idx, E)
    kw = dict(num_tokens_per_rank=lay[0], is_token_in_rank=lay[3], num_tokens_per_expert=lay[2])
    M = num_tokens(ws - 1)                          # every rank's tokens fit (rank r has num_tokens(r))
    ll = make_buffer(device, transport, num_nvl_bytes=1 << 20, timeout_s=timeout_s,
                     num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(M, HIDDEN, ws, E))
    xb = x.bfloat16()

    def expect(call, bad_ranks, own_error, own_pattern, peer_pattern):
        t0 = time.monotonic()
        try:
            call()
        except Exception as e:  # noqa: BLE001 - checked below
            err = e
        else:
            raise AssertionError(f"rank {rank}: the call returned (ranks {bad_ranks} had bad input)")
        took = time.monotonic() - t0
        if rank in bad_ranks:
            assert isinstance(err, own_error) and re.search(own_pattern, str(err)), \
                f"rank {rank}: expected its own {own_error.__name__} ({own_pattern}), got {type(err).__name__}: {err}"
        else:
            assert isinstance(err, EPPeerInputError) and isinstance(err, ValueError), \
                f"rank {rank}: expected EPPeerInputError, got {type(err).__name__} after {took:.1f} s: {err}"
            for r in bad_ranks:
                assert f"rank {r} failed its input check" in str(err), str(err)
            assert re.search(peer_pattern, str(err)), str(err)
        assert took < timeout_s / 4, f"rank {rank}: raised after {took:.1f} s (timeout_s={timeout_s})"

    if case == "worst_tokens":                      # rank r has num_tokens(r) = 24 + 5 r tokens
        for cap_rank in (ws - 2, 0):                # cap fits ranks <= cap_rank: the others fail
            worst = ws * num_tokens(cap_rank)
            expect(lambda: buf.dispatch(x, topk_idx=idx, topk_weights=w, num_worst_tokens=worst, **kw),
                   list(range(cap_rank + 1, ws)), ValueError, r"num_worst_tokens=\d+ gives each source rank",
                   rf"more tokens than num_worst_tokens // num_ranks = {worst // ws}")
    elif case == "ll_tokens":
        short = num_tokens(ws - 2)                  # the last rank has more tokens than that
        for use_fp8 in (False, True):
            expect(lambda: ll.low_latency_dispatch(xb, idx, short, E, use_fp8=use_fp8), [ws - 1], RuntimeError,
                   "x has .* more than num_max_dispatch_tokens_per_rank", "num_max_dispatch_tokens_per_rank")
        # with a receive hook the failing rank raises in the call, the others in hook()
        expect(lambda: ll.low_latency_dispatch(xb, idx, short, E, use_fp8=False, return_recv_hook=True)[4](),
               [ws - 1], RuntimeError, "more than num_max_dispatch_tokens_per_rank", "num_max_dispatch_tokens")
        recv, _, handle, _, _ = ll.low_latency_dispatch(xb, idx, M, E, use_fp8=False)
        extra = M + 1 - x.shape[0] if rank == 0 else 0          # rank 0 passes one token more than M
        long_idx, long_w = torch.cat([idx, idx[:1].expand(extra, -1)]), torch.cat([w, w[:1].expand(extra, -1)])
        expect(lambda: ll.low_latency_combine(recv, long_idx, long_w, handle), [0], RuntimeError,
               "more than num_max_dispatch_tokens_per_rank", "num_max_dispatch_tokens_per_rank")
    elif case == "expert_ids":
        bad = idx.clone()
        if rank == 0:
            bad[2, 1] = E
        expect(lambda: buf.dispatch(x, topk_idx=bad, topk_weights=w, **kw), [0], ValueError, "expert ids in",
               "expert ids")
        expect(lambda: buf.dispatch(x, topk_idx=bad, topk_weights=w, num_worst_tokens=ws * M, **kw), [0],
               ValueError, "expert ids in", "expert ids")
        if rank == 0:
            bad[3, 0] = -3
        expect(lambda: ll.low_latency_dispatch(xb, bad, M, E), [0], ValueError, "expert ids in", "expert ids")
        recv, _, handle, _, _ = ll.low_latency_dispatch(xb, idx, M, E, use_fp8=False)
        expect(lambda: ll.low_latency_combine(recv, bad, w, handle), [0], ValueError, "expert ids in",
               "expert ids")
    else:
        raise ValueError(f"unknown case {case!r}")
    # the group still works after all that
    rx, _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_worst_tokens=ws * M, **kw)
    y, _, _ = buf.combine(rx, handle)
    assert y.shape == x.shape
    recv, _, handle, _, _ = ll.low_latency_dispatch(xb, idx, M, E, use_fp8=False)
    out, _, _ = ll.low_latency_combine(recv, idx, w, handle)
    assert out.shape == xb.shape
    dist.barrier()


def dead_peer_check(rank, ws, device="cpu", transport="auto"):
    """A peer that dies makes the survivors raise EPTransportError (bounded), never hang."""
    import os
    import time
    num_experts = 4 * ws
    buf = make_buffer(device, transport, num_nvl_bytes=1 << 22, timeout_s=5)
    x, idx, w = make_inputs(0, rank, num_experts)
    layout = buf.get_dispatch_layout(idx, num_experts)
    dist.barrier()
    if rank == ws - 1:
        os._exit(0)
    time.sleep(0.5)
    t0 = time.monotonic()
    try:
        buf.dispatch(x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
                     num_tokens_per_expert=layout[2], topk_idx=idx, topk_weights=w)
    except EPTransportError as e:
        assert "peer" in str(e) and time.monotonic() - t0 < 30
    else:
        raise AssertionError("dispatch with a dead peer returned normally")
    os._exit(0)   # the process group is broken; skip its teardown


def edge_case_checks(rank, ws, device="cpu", transport="auto"):
    """Ranks that send or receive 0 or 1 rows, a zero-token rank's backward, fp8 rows with an odd scale count,
    low-latency combine with garbage past the received rows, and argument errors found by a review (2026-12-02):
    each of the exchanges below raised a dtype-view error on one rank (the others then timed out), and the
    low-latency combine spread NaN from unused rows into every token."""
    import pytest
    E = ws                                       # one expert per rank
    buf = make_buffer(device, transport, num_nvl_bytes=1 << 22, timeout_s=30)
    for k, with_w, hidden in ((1, False, HIDDEN), (2, True, HIDDEN), (2, True, 384)):
        # rank r > 0 has one token, routed to expert 0 (rank 0) only; rank 0 has none: rank 0 receives ws - 1
        # rows (1 at ws = 2), every other rank receives 0
        n = 0 if rank == 0 else 1
        idx = torch.full((n, k), -1, dtype=torch.int64)
        idx[:, 0] = 0
        w = torch.full((n, k), 0.5) if with_w else None
        x = (torch.arange(n * hidden, dtype=torch.float32).view(n, hidden) + rank).requires_grad_(with_w)
        lay = buf.get_dispatch_layout(idx, E)
        kw = dict(topk_idx=idx, topk_weights=w, num_tokens_per_rank=lay[0], is_token_in_rank=lay[3],
                  num_tokens_per_expert=lay[2])
        rx, ridx, rw, counts, handle, _ = buf.dispatch(x, **kw)
        assert rx.shape == ((ws - 1 if rank == 0 else 0), hidden)
        if rank == 0 and ws == 2:
            assert torch.equal(rx[0], torch.arange(hidden, dtype=torch.float32) + 1)
        y, _, _ = buf.combine(rx, handle)
        assert torch.equal(y.detach(), x.detach())
        if with_w:
            y.sum().backward()                   # a stride-0 gradient of zero rows on rank 0
            assert x.grad.shape == x.shape and bool((x.grad == 1).all())
        if hidden % 128 == 0:                    # fp8 rows: hidden 384 has 3 scales (an odd count)
            q = x.detach().to(torch.float8_e4m3fn)
            s = torch.ones(n, hidden // 128)
            (rq, rs), *_ = buf.dispatch((q, s), **{**kw, "topk_weights": None})
            assert rq.shape[0] == rs.shape[0] == rx.shape[0]
    # low-latency combine: rows past recv_count are unspecified; poison them
    num_max, L = 4, 1
    ll = make_buffer(device, transport, num_nvl_bytes=1 << 20,
                     num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(num_max, HIDDEN, ws, E))
    g = torch.Generator().manual_seed(70 + rank)
    x = torch.randn(3, HIDDEN, generator=g).to(torch.bfloat16)
    idx = torch.randint(0, E, (3, 2), generator=g)
    w = torch.rand(3, 2, generator=g) + 0.1
    idx[0] = -1                                   # a token routed nowhere
    recv, count, handle, _, _ = ll.low_latency_dispatch(x, idx, num_max, E, use_fp8=False)
    clean = recv.clone()
    dirty = recv.clone()
    for l in range(L):
        dirty[l, int(count[l]):] = float("nan")
    out_clean, _, _ = ll.low_latency_combine(clean, idx, w, handle)
    out_dirty, _, _ = ll.low_latency_combine(dirty, idx, w, handle)
    assert not out_dirty.isnan().any() and torch.equal(out_dirty, out_clean)
    assert bool((out_clean[0] == 0).all())
    bad = idx.clone()
    bad[1, 0] = E + 5
    with pytest.raises(ValueError, match="expert ids in"):
        ll.low_latency_combine(recv, bad, w, handle)
    # argument errors name the argument
    xs, idx1, w1 = make_inputs(0, rank, 4 * ws)
    lay = buf.get_dispatch_layout(idx1, 4 * ws)
    kw = dict(num_tokens_per_rank=lay[0], is_token_in_rank=lay[3], num_tokens_per_expert=lay[2])
    with pytest.raises(ValueError, match=r"dispatch: x must be \[num_tokens, hidden\]"):
        buf.dispatch(xs[0], topk_idx=idx1, topk_weights=w1, **kw)
    rx, _, _, _, handle, _ = buf.dispatch(xs, topk_idx=idx1, topk_weights=w1, **kw)
    with pytest.raises(ValueError, match="combine: bias must be torch.float32"):
        buf.combine(rx, handle, bias=torch.zeros(xs.shape[0], 1))
    with pytest.raises(ValueError, match="combine: bias must be"):
        buf.combine(rx, handle, bias=torch.zeros(xs.shape, dtype=torch.float64))
    y, _, _ = buf.combine(rx, handle, bias=(torch.ones_like(xs), None))
    dist.barrier()


# --- DeepEP V1 forms a review against upstream (2026-12) found rejected or wrong ---------------------------------

def _global_tokens_per_expert(seed, ws, num_experts, counts_of=None):
    """Sum over ranks of each rank's num_tokens_per_expert (get_dispatch_layout's, or counts_of(rank)): what
    upstream's test_intranode all-reduces and slices for every rank's num_recv_tokens_per_expert_list."""
    total = torch.zeros(num_experts, dtype=torch.int64)
    for i in range(ws):
        if counts_of is not None:
            total += counts_of(i).long()
        else:
            _, idx, _ = make_inputs(seed, i, num_experts)
            flat = idx[idx >= 0]
            total += torch.bincount(flat, minlength=num_experts)
    return total


def _custom_counts(seed, rank, num_experts):
    """Per-expert counts a caller passes that no top-k produced (upstream only sums what it is given)."""
    return (torch.arange(num_experts, dtype=torch.int32) * (rank + 1) + seed % 5) % 11


def tokens_per_expert_checks(rank, ws, seed, device="cpu", transport="auto"):
    """num_recv_tokens_per_expert_list comes from the callers' num_tokens_per_expert, exchanged in the count
    exchange: with and without topk_idx (upstream test_intranode's "without top-k" cases assert
    gbl_num_tokens_per_expert.view(R, -1)[rank] == the list), rounded up to expert_alignment; the handle's
    tensor and the op's output agree, in exact and worst-case mode."""
    E = 4 * ws
    L = E // ws
    buf = make_buffer(device, transport, num_nvl_bytes=1 << 24, timeout_s=60)
    x, idx, w = make_inputs(seed, rank, E)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    gbl = _global_tokens_per_expert(seed, ws, E)
    mine = gbl.view(ws, -1)[rank]
    assert int(mine.sum()) > 0
    lay = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    exp_rows = len(expected_receive(seed, rank, ws, E))
    for align in (1, 4):
        want = ((mine + align - 1) // align * align).tolist()
        # without top-k: is_token_in_rank routes, the counts are the callers'
        rx, ridx, rw, lst, handle, _ = buf.dispatch(x, expert_alignment=align, **lay)
        assert ridx is None and rw is None and rx.shape[0] == exp_rows
        assert lst == want, (rank, align, lst, want)
        assert handle.num_recv_tokens_per_expert.cpu().tolist() == want
        # with top-k (the same numbers: the callers' counts agree with their top-k)
        _, _, _, lst_k, handle_k, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, expert_alignment=align, **lay)
        assert lst_k == want and handle_k.num_recv_tokens_per_expert.cpu().tolist() == want
        # worst-case mode: no list (no host read), the handle's tensor holds the counts
        worst = max(num_tokens(r) for r in range(ws)) * ws
        _, _, _, lst_w, handle_w, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, expert_alignment=align,
                                                   num_worst_tokens=worst, **lay)
        assert lst_w == [] and handle_w.num_recv_tokens_per_expert.cpu().tolist() == want
    # counts that no top-k produced are summed as given (upstream trusts the caller's num_tokens_per_expert)
    custom = _custom_counts(seed, rank, E)
    want = _global_tokens_per_expert(seed, ws, E, lambda i: _custom_counts(seed, i, E)).view(ws, -1)[rank].tolist()
    lst = buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=custom)[3]
    assert lst == want, (lst, want)
    # the op itself: without the caller's counts, the counts come from the top-k of the rows each source sends
    group = buf.buf._op_group if isinstance(buf, OnDevice) else buf._op_group
    dev = torch.device(device)
    out = torch.ops.deepstack.ep_dispatch(x.to(dev), None, idx.to(dev), w.to(dev), None, E, ws, group, 1, 0)
    assert out[4].cpu().tolist() == mine.tolist()
    out = torch.ops.deepstack.ep_dispatch(x.to(dev), None, None, None, in_rank.to(dev), E, ws, group, 1, 0,
                                          per_expert.to(dev))
    assert out[4].cpu().tolist() == mine.tolist()
    assert L == len(mine)
    import pytest
    with pytest.raises(RuntimeError, match=r"num_tokens_per_expert must be int32"):   # before any exchange
        torch.ops.deepstack.ep_dispatch(x.to(dev), None, None, None, in_rank.to(dev), E, ws, group, 1, 0,
                                        per_expert.to(dev).float())
    with pytest.raises(RuntimeError, match=rf"num_tokens_per_expert must be \[num_experts={E}\]"):
        torch.ops.deepstack.ep_dispatch(x.to(dev), None, None, None, in_rank.to(dev), E, ws, group, 1, 0,
                                        per_expert.to(dev)[1:])
    dist.barrier()


def _scale_form_inputs(seed, rank, num_experts, form: str, hidden: int):
    """(x, x_scales, topk_idx, topk_weights) of one rank for a DeepEP V1 (x, x_scales) form upstream accepts:
    x of any one-byte dtype, scales float32 or int32 [N, S] with any S and strides."""
    x, idx, w = make_inputs(seed, rank, num_experts, hidden=hidden)
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed * 7 + rank * 131 + len(form))
    if form == "e4m3+int32[N,H/512]":          # UE8M0 exponents packed 4 to an int32: any bit pattern
        return (x.to(torch.float8_e4m3fn), torch.randint(-2 ** 31, 2 ** 31 - 1, (n, hidden // 512), generator=g,
                                                         dtype=torch.int64).to(torch.int32), idx, w)
    if form == "e4m3+fp32[N,1]":               # per-token scales
        return x.to(torch.float8_e4m3fn), torch.rand(n, 1, generator=g) + 0.5, idx, w
    if form == "e5m2+fp32[N,H/128]":
        return x.to(torch.float8_e5m2), torch.rand(n, hidden // 128, generator=g), idx, w
    if form == "uint8+fp32[N,3]T":              # any S, column-major storage
        q = torch.randint(0, 256, (n, hidden), generator=g, dtype=torch.int64).to(torch.uint8)
        return q, torch.rand(3, n, generator=g).t(), idx, w
    if form == "e4m3+fp32[N,H/128]::2":        # a strided view of a wider tensor
        return x.to(torch.float8_e4m3fn), torch.rand(n, 2 * (hidden // 128), generator=g)[:, ::2], idx, w
    raise ValueError(form)


SCALE_FORMS = ("e4m3+int32[N,H/512]", "e4m3+fp32[N,1]", "e5m2+fp32[N,H/128]", "uint8+fp32[N,3]T",
               "e4m3+fp32[N,H/128]::2")


def scale_forms_checks(rank, ws, seed, device="cpu", transport="auto"):
    """Normal dispatch moves every (x, x_scales) form upstream accepts: the received rows are the sources' rows and
    the received scales their scales, bit for bit, as [num_recv, S] in the scales' dtype (exact, worst-case and
    cached dispatch, with and without top-k)."""
    E = 4 * ws
    hidden = 1024
    buf = make_buffer(device, transport, num_nvl_bytes=1 << 24, timeout_s=60)
    for form in SCALE_FORMS:
        q, s, idx, w = _scale_form_inputs(seed, rank, E, form, hidden)
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
        lay = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        rows_q, rows_s = [], []
        for i in range(ws):
            qi, si, ii, _ = _scale_form_inputs(seed, i, E, form, hidden)
            sel = (rank_of(ii, E, ws) == rank).any(1)
            rows_q.append(qi[sel])
            rows_s.append(si[sel])
        want_q, want_s = torch.cat(rows_q), torch.cat(rows_s)
        n = want_q.shape[0]

        def same(rq, rs, rows, what):
            assert rq.dtype == q.dtype and rs.dtype == s.dtype, (form, what, rq.dtype, rs.dtype)
            assert rq.shape == (rows, hidden) and rs.shape == (rows, s.shape[1]), (form, what, rq.shape, rs.shape)
            assert torch.equal(rq[:n].view(torch.uint8), want_q.view(torch.uint8)), (form, what)
            assert torch.equal(rs[:n].contiguous().view(torch.int32), want_s.contiguous().view(torch.int32)), \
                (form, what)

        (rq, rs), _, _, _, handle, _ = buf.dispatch((q, s), topk_idx=idx, topk_weights=w, **lay)
        same(rq, rs, n, "exact")
        (rq, rs), *_ = buf.dispatch((q, s), **lay)                       # without top-k
        same(rq, rs, n, "exact, no top-k")
        (rq, rs), *_ = buf.dispatch((q, s), handle=handle)               # cached
        same(rq, rs, n, "cached")
        worst = max(num_tokens(r) for r in range(ws)) * ws
        (rq, rs), _, _, _, whandle, _ = buf.dispatch((q, s), topk_idx=idx, topk_weights=w, num_worst_tokens=worst,
                                                     **lay)
        same(rq, rs, worst, "worst-case")
        assert bool((rs[n:].contiguous().view(torch.int32) == 0).all()), form   # padded rows: zero scales
        (rq, rs), *_ = buf.dispatch((q, s), handle=whandle)
        same(rq, rs, worst, "cached worst-case")
    dist.barrier()
