"""Fused NVLink kernels for the IPC transport (src/ep/intranode.cuh, src/ep/low_latency.cuh).

The torch-op path in core.py moves rows with several copies per peer and round; here every phase is one kernel
that stores rows straight into the peers' mapped receive areas, then one barrier, then one kernel that reads this
rank's area into the outputs. Results are identical to the torch.distributed path (same row order, same fp32
summation order for normal combine). A call falls back to core.py's path when its rows do not fit one half of the
receive area (the decision uses numbers every rank has, so all ranks take the same path).
"""
from __future__ import annotations


import functools

import torch

from torch_deepstack._library import allocating_into_cuda_graph_pool
from torch_deepstack.ep.layout import align_expert_counts
from torch_deepstack.jit import KernelSpec, get_kernel, register_prebuild

MAX_RANKS = 32          # one lane per rank in the kernels
# Blocks (one per SM) the send kernels use, which may overlap with compute; ep.Buffer.set_num_sms sets it. The
# receive and reduce kernels run after the barrier with nothing to overlap, so they take every SM.
num_sms = 20
_ALIGN = 256
_CTYPE = {torch.bfloat16: "__nv_bfloat16", torch.float16: "__half", torch.float32: "float"}
REDUCE_DTYPES = tuple(_CTYPE)     # dtypes the combine kernels sum


def _align(v: int, a: int = _ALIGN) -> int:
    return (v + a - 1) // a * a


# Kernel signatures, one code per parameter in order (see torch_deepstack/jit/launch.py).
_SIG = {
    "rank_positions_kernel": "p ii p",
    "notify_dispatch_kernel": "ppp iii p l p ii p l pp",
    "dispatch_send_kernel": "p l i p l i pp ii pppp l ii p lllll ppppp i i",
    "dispatch_recv_kernel": "p l p lllll iiiiiiii p i ppppp i",
    "combine_send_kernel": "p l i p i p ii p l p ll i",
    "combine_reduce_kernel": "p l p ll ppp iiiii pp pp",
    "ll_dispatch_send_kernel": "p l i p l i p iiii p l ii p ll i",
    "ll_dispatch_recv_kernel": "p l p ll iiiii pp ll ppp",
    "ll_combine_send_kernel": "p i pp iiii p l p l",
    "ll_combine_reduce_kernel": "p l p l pp iiii p",
}


def spec(name: str, *targs) -> KernelSpec:
    header = "low_latency.cuh" if name.startswith("ll_") else "intranode.cuh"
    return KernelSpec(f"ep/{header}", f"deepstack::ep::{name}", targs)


@functools.lru_cache(maxsize=None)
def kernel(name: str, *targs):
    """A compiled kernel of src/ep/intranode.cuh (ll_* names: low_latency.cuh), specialised on `targs` (looked up
    once per process: every EP call launches several)."""
    return get_kernel(spec(name, *targs), _SIG[name].replace(" ", ""))


@register_prebuild("ep")
def _prebuild():
    """Every fused NVLink kernel, so `deepstack jit prebuild` and the spill check cover them."""
    from torch_deepstack.ep.ipc import _MAX_RANKS
    specs = [spec(n, MAX_RANKS) for n in ("notify_dispatch_kernel", "dispatch_send_kernel", "dispatch_recv_kernel",
                                         "combine_send_kernel", "ll_dispatch_send_kernel", "ll_dispatch_recv_kernel",
                                         "ll_combine_send_kernel")]
    specs += [spec("rank_positions_kernel", MAX_RANKS)]
    specs += [spec("combine_reduce_kernel", c, MAX_RANKS) for c in _CTYPE.values()]
    specs += [spec("ll_combine_reduce_kernel", c) for c in _CTYPE.values()]
    specs += [spec("copy_bytes_kernel", _MAX_RANKS),
              KernelSpec("ep/ipc_barrier.cuh", "deepstack::ipc_barrier_kernel", (_MAX_RANKS,))]
    return specs


class NormalLayout:
    """Byte offsets inside one half for a normal dispatch (or combine, with no notify table or top-k)."""

    def __init__(self, half_bytes: int, R: int, L: int, row_bytes: int, num_scales: int, k: int,
                 with_notify: bool = True, with_topk: bool = True):
        self.notify = _align(R * (R + L) * 4) if with_notify else 0
        per_row = row_bytes + num_scales * 4 + (k * 8 if with_topk else 0) + k * 4 + 4
        self.cap = max(0, (half_bytes - self.notify - 5 * _ALIGN) // per_row)
        cap = self.cap
        self.data = self.notify
        self.scales = _align(self.data + cap * row_bytes)
        self.topk = _align(self.scales + cap * num_scales * 4)
        self.weights = _align(self.topk + (cap * k * 8 if with_topk else 0))
        self.src = _align(self.weights + cap * k * 4)


def rank_positions(mask: torch.Tensor) -> torch.Tensor:
    """layout.inclusive_rank_positions in one kernel launch (int32 [N, R])."""
    n, R = mask.shape
    pos = torch.empty(n, R, dtype=torch.int32, device=mask.device)
    if n:
        kernel("rank_positions_kernel", MAX_RANKS).launch(1, 1024, mask, n, R, pos)
    return pos


def usable(transport, row_bytes: int) -> bool:
    return (getattr(transport, "fused", False) and transport.world_size <= MAX_RANKS and row_bytes % 16 == 0
            and row_bytes > 0)


class Intranode:
    """The fused moves of one IpcTransport."""

    def __init__(self, t):
        self.t = t
        R = t.world_size
        self.R, self.rank = R, t.rank
        self.half_bytes = R * t.slot_bytes
        self.peer_base = torch.tensor(t.peer_base, dtype=torch.int64, device=t.device)
        self.area_ptr = t.area.data_ptr()
        self.all_blocks = 2 * torch.cuda.get_device_properties(t.device).multi_processor_count
        self._host_counts: dict[int, tuple] = {}   # rank_counts data_ptr -> _remember's entry
        self._last_per_expert = None
        self._pos = None    # (mask, mask._version, rank_positions(mask)) of the last mask seen
        self._info_host = None

    # --- bookkeeping ------------------------------------------------------------------------------------------
    # Host copies of small results: held with a strong reference to the device tensor, so its memory cannot be
    # reused by another tensor while the entry lives, and a data_ptr match means the same result.
    def _remember(self, rc_dev: torch.Tensor, flat: list) -> tuple:
        """flat: the R x R counts, row-major, as a host list (plain Python: this runs while the GPU waits)."""
        if len(self._host_counts) >= 64:
            self._host_counts.pop(next(iter(self._host_counts)))
        R = self.R
        rows = [flat[i * R:(i + 1) * R] for i in range(R)]
        # (device tensor, rows, most rows any rank receives, most rows any rank sends): _fits per call
        entry = (rc_dev, rows, max(map(sum, zip(*rows))), max(map(sum, rows)))
        if not allocating_into_cuda_graph_pool():   # (see _positions)
            self._host_counts[rc_dev.data_ptr()] = entry
        return entry

    def _counts_entry(self, rc_dev: torch.Tensor) -> tuple:
        """Remembered from the dispatch that made rc_dev, else one device read."""
        hit = self._host_counts.get(rc_dev.data_ptr())
        if hit is not None and hit[0].shape == rc_dev.shape:
            return hit
        return self._remember(rc_dev, rc_dev.reshape(-1).tolist())

    def host_list(self, t: torch.Tensor) -> list | None:
        """The per-expert counts of the last exact dispatch as a host list, if `t` is that result."""
        last = self._last_per_expert
        if last is not None and last[0].data_ptr() == t.data_ptr() and last[0].shape == t.shape:
            return last[1]
        return None

    # Errors without host syncs: every call's barrier kernel copies a set error word into host-mapped memory,
    # read at the start of the next call (the exact dispatch's count exchange also reports it at once).
    def _raise_pending(self) -> None:
        if self.t.error_seen() and not torch.cuda.is_current_stream_capturing():
            self.t.check_error()

    def _host_info(self, size: int) -> tuple:
        """A pinned int32 buffer for the count exchange's result and the event that says it has arrived."""
        if self._info_host is None or self._info_host[0].numel() != size:
            self._info_host = (torch.empty(size, dtype=torch.int32, pin_memory=True), torch.cuda.Event())
        return self._info_host

    def _positions(self, mask: torch.Tensor) -> torch.Tensor:
        """rank_positions(mask), reused while the same mask tensor comes back unchanged (a handle's mask serves
        every cached dispatch and combine of a layer). Neither reused into nor cached from a CUDA graph's memory
        pool: a graph must own its inputs, and a cached tensor in the pool would be overwritten by later replays."""
        if allocating_into_cuda_graph_pool():
            return rank_positions(mask)
        hit = self._pos
        if hit is not None and hit[0] is mask and hit[1] == mask._version:
            return hit[2]
        pos = rank_positions(mask)
        self._pos = (mask, mask._version, pos)
        return pos

    def _barrier(self):
        self.t._barrier()

    def _fits(self, lay: NormalLayout, rc_dev, num_worst_tokens: int, axis: int) -> bool:
        """Whether every rank's rows fit one half: rows received per rank are rc's column sums (axis 0: dispatch)
        or, for combine, its row sums (axis 1); num_worst_tokens bounds both. The same answer on every rank."""
        if num_worst_tokens:
            return num_worst_tokens <= lay.cap
        return self._counts_entry(rc_dev)[2 + axis] <= lay.cap

    # --- normal dispatch --------------------------------------------------------------------------------------
    def notify(self, mask: torch.Tensor, pos: torch.Tensor, topk_idx, L: int, expert_counts=None) -> torch.Tensor:
        """Exchange counts: -> info int32 (see notify_dispatch_kernel): rank counts [R*R], received tokens per local
        expert [L], bad-expert-id flags [R], lowest and highest id, error word. expert_counts: this rank's tokens
        per expert as the caller gave them (int32 [E], contiguous), sent instead of the ones counted from
        topk_idx."""
        t, R = self.t, self.R
        n = mask.shape[0]
        info = torch.empty(R * R + L + R + 3, dtype=torch.int32, device=mask.device)
        k = topk_idx.shape[1] if topk_idx is not None else 0
        kernel("notify_dispatch_kernel", MAX_RANKS).launch(1, 1024, pos[n - 1] if n else None, topk_idx,
                                                           expert_counts, n, k, L, self.peer_base, self.half_bytes,
                                                           t.flag_table, self.rank, R, t.epoch, t.timeout_ns, t.error,
                                                           info, smem=R * L * 4)
        t.note_barrier()
        return info

    def _check_notify(self, host: list, L: int, num_experts: int) -> None:
        R = self.R
        if host[-1]:
            self.t.check_error()                       # raises: a peer did not reach the count exchange
        bad = [r for r, b in enumerate(host[R * R + L:R * R + L + R]) if b]
        if bad:
            lo, hi = host[R * R + L + R:R * R + L + R + 2]
            if self.rank in bad:
                raise ValueError(f"ep_dispatch: topk_idx holds expert ids in [{lo}, {hi}]; valid ids are -1 "
                                 f"(unused slot) and 0..{num_experts - 1} (num_experts={num_experts})")
            raise ValueError(f"ep_dispatch: rank(s) {bad} passed topk_idx with expert ids in an invalid range "
                             f"(valid: -1..{num_experts - 1}); every rank raises so that none waits for them")

    def send_rows(self, x, x_scales, topk_idx, topk_weights, mask, pos, rc_dev, lay: NormalLayout, outs, L: int,
                  cap: int = 0):
        """Rows to every destination's area; this rank's own rows straight into `outs` (see alloc_outputs), or,
        with outs=None, into its own area like everyone else's. cap > 0: the kernel checks the fit (see
        dispatch_send_kernel) because the host has not seen the counts."""
        n = x.shape[0]
        if n:
            k = topk_idx.shape[1] if topk_idx is not None else 0
            xb = x.view(torch.uint8) if x.dtype != torch.uint8 else x
            recv_x, recv_scales, recv_topk, recv_w, recv_src = outs if outs is not None else (None,) * 5
            launch = kernel("dispatch_send_kernel", MAX_RANKS).launch
            launch(num_sms, 512, xb, x.stride(0) * x.element_size(), x.shape[1] * x.element_size(), x_scales,
                   x_scales.stride(0) if x_scales is not None else 0, x_scales.shape[1] if x_scales is not None else 0,
                   topk_idx, topk_weights, k, n, mask, pos, rc_dev, self.peer_base, self.half_bytes, self.rank, self.R,
                   self.t.epoch, lay.data, lay.scales, lay.topk, lay.weights, lay.src,
                   recv_x.view(torch.uint8) if recv_x is not None else None, recv_scales, recv_topk, recv_w, recv_src,
                   L, cap)
        self._barrier()

    @staticmethod
    def alloc_outputs(out_rows: int, row_bytes: int, dtype, num_scales: int, k: int, has_weights: bool, device,
                      with_layout: bool = True, scales_dtype=torch.float32):
        """(recv_x, recv_scales, recv_topk, recv_w, recv_src); a cached dispatch (with_layout=False) moves data
        only: no top-k, weights or source index (the kernels skip None outputs). The kernels move scales as 4-byte
        words (fp32 or int32: bits unchanged)."""
        x = torch.empty(out_rows, row_bytes // dtype.itemsize, dtype=dtype, device=device)
        scales = torch.empty(out_rows, num_scales, dtype=scales_dtype, device=device) if num_scales else None
        if not with_layout:
            return x, scales, None, None, None
        return (x, scales, torch.empty(out_rows, k, dtype=torch.int64, device=device),
                torch.empty(out_rows, k, dtype=torch.float32, device=device) if has_weights else None,
                torch.empty(out_rows, dtype=torch.int32, device=device))

    def recv_rows(self, lay: NormalLayout, rc_dev, outs, row_bytes: int, num_scales: int, k: int, has_topk: bool,
                  L: int, own_rows_sent: bool = True):
        """Rows out of this rank's area into `outs`; own_rows_sent: send_rows already wrote this rank's own rows
        into them (else they are in the area too)."""
        recv_x, recv_scales, recv_topk, recv_w, recv_src = outs
        out_rows = recv_x.shape[0]
        if out_rows:
            launch = kernel("dispatch_recv_kernel", MAX_RANKS).launch
            launch(self.all_blocks, 512, self.area_ptr, self.half_bytes, self.t.epoch, lay.data, lay.scales, lay.topk,
                   lay.weights, lay.src, row_bytes, num_scales, k, int(has_topk), int(recv_w is not None), L,
                   self.rank, self.R, rc_dev, out_rows, recv_x.view(torch.uint8), recv_scales, recv_topk, recv_w,
                   recv_src, int(own_rows_sent))
        return outs

    def dispatch(self, x, x_scales, topk_idx, topk_weights, mask, num_experts: int, expert_alignment: int,
                 num_worst_tokens: int, num_tokens_per_expert=None):
        """core.dispatch over the fused kernels, or None when the rows do not fit (the caller falls back)."""
        R, rank = self.R, self.rank
        L = num_experts // R
        n, hidden = x.shape
        row_bytes = hidden * x.element_size()
        num_scales = x_scales.shape[1] if x_scales is not None else 0
        k = topk_idx.shape[1] if topk_idx is not None else 0
        lay = NormalLayout(self.half_bytes, R, L, row_bytes, num_scales, k)
        if num_worst_tokens and num_worst_tokens > lay.cap:
            return None
        x = x if x.stride(-1) == 1 else x.contiguous()
        x_scales = x_scales.contiguous() if x_scales is not None else None
        topk_idx = topk_idx.contiguous() if topk_idx is not None else None
        topk_weights = topk_weights.contiguous() if topk_weights is not None else None
        expert_counts = (num_tokens_per_expert.to(device=x.device, dtype=torch.int32).contiguous()
                         if num_tokens_per_expert is not None else None)
        mask = mask.contiguous()
        self._raise_pending()
        pos = self._positions(mask)
        info = self.notify(mask, pos, topk_idx, L, expert_counts)
        rc_dev = info[:R * R].view(R, R)
        per_expert = align_expert_counts(info[R * R:R * R + L], expert_alignment)   # tokens per local expert
        has_w = topk_weights is not None
        sdt = x_scales.dtype if x_scales is not None else torch.float32
        if num_worst_tokens:
            out_rows = num_worst_tokens
            outs = self.alloc_outputs(out_rows, row_bytes, x.dtype, num_scales, k, has_w, x.device, scales_dtype=sdt)
            self.send_rows(x, x_scales, topk_idx, topk_weights, mask, pos, rc_dev, lay, outs, L)
            own_rows_sent = True
        else:
            # The one host sync of an exact-size dispatch: the counts go to pinned memory and the rows go out
            # while the host waits for them (own rows through this rank's area, as no output exists yet; the
            # kernel skips the sends if some rank's rows do not fit, as the host decides below).
            host_info, ready = self._host_info(info.numel())
            host_info.copy_(info, non_blocking=True)
            ready.record()
            self.send_rows(x, x_scales, topk_idx, topk_weights, mask, pos, rc_dev, lay, None, L, cap=lay.cap)
            ready.synchronize()
            host = host_info.tolist()
            self._check_notify(host, L, num_experts)
            entry = self._remember(rc_dev, host[:R * R])
            if entry[2] > lay.cap:
                return None
            out_rows = sum(row[rank] for row in entry[1])
            if not allocating_into_cuda_graph_pool():
                self._last_per_expert = (per_expert, [(v + a - 1) // a * a for v in host[R * R:R * R + L]])
            outs = self.alloc_outputs(out_rows, row_bytes, x.dtype, num_scales, k, has_w, x.device, scales_dtype=sdt)
            own_rows_sent = False
        recv_x, recv_scales, recv_topk, recv_w, recv_src = self.recv_rows(lay, rc_dev, outs, row_bytes, num_scales,
                                                                          k, topk_idx is not None, L, own_rows_sent)
        if x_scales is None:
            recv_scales = torch.empty(0, dtype=torch.float32, device=x.device)
        elif recv_scales is None:       # x_scales [N, 0]
            recv_scales = torch.empty(out_rows, 0, dtype=x_scales.dtype, device=x.device)
        if recv_w is None:
            recv_w = torch.empty(out_rows, 0, dtype=torch.float32, device=x.device)
        return recv_x, recv_scales, recv_topk, recv_w, per_expert, mask, rc_dev, recv_src

    def cached_dispatch(self, x, x_scales, mask, rc_dev, num_recv: int, num_worst_tokens: int):
        R = self.R
        row_bytes = x.shape[1] * x.element_size()
        num_scales = x_scales.shape[1] if x_scales is not None else 0
        lay = NormalLayout(self.half_bytes, R, 0, row_bytes, num_scales, 0)
        if not self._fits(lay, rc_dev, num_worst_tokens, 0):
            return None
        self._raise_pending()
        x = x if x.stride(-1) == 1 else x.contiguous()
        x_scales = x_scales.contiguous() if x_scales is not None else None
        mask = mask.contiguous()
        pos = self._positions(mask)
        outs = self.alloc_outputs(num_recv, row_bytes, x.dtype, num_scales, 0, False, x.device, with_layout=False,
                                  scales_dtype=x_scales.dtype if x_scales is not None else torch.float32)
        self.send_rows(x, x_scales, None, None, mask, pos, rc_dev, lay, outs, 0)
        recv_x, recv_scales, _, _, _ = self.recv_rows(lay, rc_dev, outs, row_bytes, num_scales, 0, False, 0)
        if x_scales is None:
            recv_scales = torch.empty(0, dtype=torch.float32, device=x.device)
        elif recv_scales is None:       # x_scales [N, 0]
            recv_scales = torch.empty(num_recv, 0, dtype=x_scales.dtype, device=x.device)
        return recv_x, recv_scales

    # --- normal combine ---------------------------------------------------------------------------------------
    def combine(self, x, topk_weights, mask, rc_dev, num_worst_tokens: int):
        R, rank = self.R, self.rank
        n = mask.shape[0]
        hidden = x.shape[1]
        row_bytes = hidden * x.element_size()
        k = topk_weights.shape[1] if topk_weights is not None else 0
        lay = NormalLayout(self.half_bytes, R, 0, row_bytes, 0, k, with_notify=False, with_topk=False)
        if not self._fits(lay, rc_dev, num_worst_tokens, 1):
            return None
        self._raise_pending()
        mask = mask.contiguous()
        pos = self._positions(mask)
        x = x.contiguous()
        w = topk_weights.contiguous() if topk_weights is not None else None
        if x.shape[0]:
            kernel("combine_send_kernel", MAX_RANKS).launch(num_sms, 512, x.view(torch.uint8), row_bytes, row_bytes, w,
                                                            k, rc_dev, rank, R, self.peer_base, self.half_bytes,
                                                            self.t.epoch, lay.data, lay.weights, 1)
        self._barrier()
        out = torch.empty(n, hidden, dtype=x.dtype, device=x.device)
        out_w = torch.empty(n, k, dtype=torch.float32, device=x.device)
        if n:
            launch = kernel("combine_reduce_kernel", _CTYPE[x.dtype], MAX_RANKS).launch
            launch(self.all_blocks, 512, self.area_ptr, self.half_bytes, self.t.epoch, lay.data, lay.weights, mask,
                   pos, rc_dev, rank, R, n, hidden, k, out, out_w if k else None, x.view(torch.uint8), w)
        return out, out_w


def intranode_for(transport):
    """The fused kernels of an IPC transport (made once per transport)."""
    fused = getattr(transport, "_intranode", None)
    if fused is None:
        fused = transport._intranode = Intranode(transport)
    return fused


# --- low-latency mode -----------------------------------------------------------------------------------------

class LowLatencyLayout:
    def __init__(self, R: int, L: int, M: int, data_bytes: int, num_scales: int):
        self.msg = _align(data_bytes + num_scales * 4 + 4, 16)
        self.counts = 0
        self.slots = _align(L * R * 4)
        self.dispatch_bytes = self.slots + L * R * M * self.msg

    @staticmethod
    def combine_bytes(num_experts: int, M: int, row_bytes: int) -> int:
        return num_experts * M * row_bytes


def ll_fits(transport, L: int, M: int, data_bytes: int, num_scales: int) -> bool:
    lay = LowLatencyLayout(transport.world_size, L, M, data_bytes, num_scales)
    return usable(transport, data_bytes) and lay.dispatch_bytes <= transport.world_size * transport.slot_bytes


class FusedLowLatencyDispatch:
    """Same interface as core.LowLatencyDispatch: the send runs now, finish() (the receive hook) runs the barrier
    and unpacks. `outputs` = (recv_x, recv_scales MN-major [L, M*R, G] or empty, count, src_info, layout_range)."""

    def __init__(self, transport, x, x_scales, topk_idx, num_max: int, num_experts: int):
        f = self.f = intranode_for(transport)
        R, rank = f.R, f.rank
        L = self.L = num_experts // R
        n, hidden = x.shape
        dev = x.device
        k = topk_idx.shape[1]
        self.M = M = num_max
        data_bytes = hidden * x.element_size()
        G = x_scales.shape[1] if x_scales is not None else 0
        self.lay = lay = LowLatencyLayout(R, L, M, data_bytes, G)
        self.data_bytes, self.G = data_bytes, G
        f._raise_pending()
        topk = topk_idx.contiguous()
        x = x if x.stride(-1) == 1 else x.contiguous()
        x_scales = x_scales.contiguous() if x_scales is not None else None
        kernel("ll_dispatch_send_kernel", MAX_RANKS).launch(max(1, min(f.all_blocks, -(-num_experts // 8))), 256,
                                                            x.view(torch.uint8), x.stride(0) * x.element_size(),
                                                            data_bytes, x_scales,
                                                            x_scales.stride(0) if x_scales is not None else 0, G, topk,
                                                            n, k, M, L, f.peer_base, f.half_bytes, rank, R,
                                                            transport.epoch, lay.counts, lay.slots, lay.msg)
        cap = M * R
        self.recv_x = torch.empty(L, cap, hidden, dtype=x.dtype, device=dev)
        if G:   # MN-major and TMA-aligned per expert, as the masked grouped FP8 GEMM reads them
            from torch_deepstack.quant.scale_layout import mn_major_tma_aligned_empty
            self.recv_scales = mn_major_tma_aligned_empty((L, cap, G), device=dev)
        else:
            self.recv_scales = torch.empty(0, dtype=torch.float32, device=dev)
        self.count = torch.empty(L, dtype=torch.int32, device=dev)
        self.src_info = torch.empty(L, cap, dtype=torch.int32, device=dev)
        self.layout_range = torch.empty(L, R, dtype=torch.int64, device=dev)
        self.outputs = (self.recv_x, self.recv_scales, self.count, self.src_info, self.layout_range)

    def finish(self):
        f = self.f
        f._barrier()
        rs = self.recv_scales
        sl, sg = (rs.stride(0), rs.stride(2)) if self.G else (0, 0)
        kernel("ll_dispatch_recv_kernel", MAX_RANKS).launch(self.L, 512, f.area_ptr, f.half_bytes, f.t.epoch,
                                                            self.lay.counts, self.lay.slots, self.lay.msg,
                                                            self.data_bytes, self.G, self.M, f.R,
                                                            self.recv_x.view(torch.uint8), rs if self.G else None, sl,
                                                            sg, self.count, self.src_info, self.layout_range)
        return self.outputs


class FusedLowLatencyCombine:
    """Same interface as core.LowLatencyCombine: the expert outputs go home now; finish() (the receive hook) runs
    the barrier and the weighted sum."""

    def __init__(self, transport, x, topk_idx, topk_weights, src_info, layout_range, num_max: int, out=None):
        f = self.f = intranode_for(transport)
        f._raise_pending()
        L, cap, hidden = x.shape
        self.M = num_max
        self.row_bytes = hidden * x.element_size()
        x = x.contiguous()
        kernel("ll_combine_send_kernel", MAX_RANKS).launch(f.all_blocks, 256, x.view(torch.uint8), self.row_bytes,
                                                           src_info.contiguous(), layout_range.contiguous(), L,
                                                           num_max, f.rank, f.R, f.peer_base, f.half_bytes,
                                                           transport.epoch, 0)
        self.topk = topk_idx.contiguous()
        self.w = topk_weights.contiguous().float()
        self.n, self.hidden, self.dtype = topk_idx.shape[0], hidden, x.dtype
        self.out = out if out is not None else torch.empty(self.n, hidden, dtype=x.dtype, device=x.device)

    def finish(self):
        f = self.f
        f._barrier()
        if self.n:
            out = self.out if self.out.is_contiguous() and self.out.dtype == self.dtype else \
                torch.empty(self.n, self.hidden, dtype=self.dtype, device=self.out.device)
            launch = kernel("ll_combine_reduce_kernel", _CTYPE[self.dtype]).launch
            launch(max(1, min(4 * f.all_blocks, self.n)), 256, f.area_ptr, f.half_bytes, f.t.epoch, 0, self.topk,
                   self.w, self.n, self.topk.shape[1], self.hidden, self.M, out)
            if out is not self.out:
                self.out.copy_(out)
        return self.out


def ll_combine_fits(transport, num_experts: int, M: int, row_bytes: int) -> bool:
    return usable(transport, row_bytes) and \
        LowLatencyLayout.combine_bytes(num_experts, M, row_bytes) <= transport.world_size * transport.slot_bytes
