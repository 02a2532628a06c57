"""`Buffer`: DeepEP's V1 Python API over a torch.distributed process group.

Call forms and return tuples follow DeepEP V1 (`deep_ep.Buffer`); the work is done by the `deepstack::ep_*`
ops, so everything here is argument handling, streams/events, handles and the buffer-size rules.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from torch_deepstack.ep import core, ops
from torch_deepstack.ep.layout import low_latency_size_hint
from torch_deepstack.ep.transport import (BUFFER_SEP, DEFAULT_TIMEOUT_S, forget_timeout, register_transport,
                                          set_timeout, unregister_transport)

_ids = itertools.count(1)


class EventHandle:
    """DeepEP's `EventHandle` (`deep_ep.utils.EventHandle`): a CUDA event recorded on `stream` (default: the current
    stream) when the handle is made. `EventOverlap(EventHandle())` is how DeepEP callers (Megatron's fused_a2a, for
    one) say "start after the work queued so far" as `previous_event`.

    Where this process has not initialised CUDA no GPU work can have been queued, so there is nothing to wait for:
    the handle is then empty (`event` is None) and making one does not initialise CUDA (CPU-only runs stay CPU-only).
    """

    __slots__ = ("event",)

    def __init__(self, stream: Optional[torch.cuda.Stream] = None):
        self.event: Optional[torch.cuda.Event] = None
        if stream is not None or (torch.cuda.is_available() and torch.cuda.is_initialized()):
            ev = torch.cuda.Event()
            ev.record(stream if stream is not None else torch.cuda.current_stream())
            self.event = ev

    def current_stream_wait(self) -> None:
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)


def _cuda_event(ev) -> Optional[torch.cuda.Event]:
    """The torch.cuda.Event inside `ev`: an EventOverlap (ours, or any object with an `event` attribute, as DeepEP
    reads `previous_event.event`), an EventHandle, a torch.cuda.Event, or None."""
    for _ in range(4):     # EventOverlap -> EventHandle -> torch.cuda.Event
        if ev is None or isinstance(ev, torch.cuda.Event):
            return ev
        if not hasattr(ev, "event"):
            break
        ev = ev.event
    raise TypeError(f"previous_event must be an EventOverlap (Buffer.capture(), EventOverlap(EventHandle()) or "
                    f"the event a call returned), an EventHandle or a torch.cuda.Event, got {type(ev).__name__}")


class EventOverlap:
    """A CUDA event (None on CPU, where every call has finished when it returns) plus tensors kept alive until
    the event is waited on (a graph-safe stand-in for record_stream). `event` may be a torch.cuda.Event (what our
    calls return) or an EventHandle (`EventOverlap(EventHandle())`, DeepEP's form)."""

    def __init__(self, event=None, extra_tensors: Optional[tuple] = None):
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        ev = _cuda_event(self.event)
        if ev is not None:
            torch.cuda.current_stream().wait_event(ev)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.current_stream_wait()
        return False


@dataclass
class Config:
    """DeepEP's tuning knobs. Accepted for compatibility; our kernels size themselves (see docs/ep.md)."""
    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        # DeepEP's formula: channels x peers x recv chunk x (row + metadata), 128-byte aligned.
        channels = max(self.num_sms // 2, 1)
        row = hidden_bytes + 4 + 128 * 3
        size = channels * num_ranks * self.num_max_nvl_chunked_recv_tokens * row
        return max((size + 127) // 128 * 128, Buffer.min_nvl_bytes(hidden_bytes, num_ranks))

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return 0   # intranode only (<= 8 ranks per node, as DeepEP)


class DispatchHandle(NamedTuple):
    """Layout of one normal-mode dispatch: pass it to combine, or back to dispatch to reuse the layout."""
    rank_prefix_matrix: torch.Tensor      # [R, R] int32: prefix over source ranks of rank_counts
    rank_counts: torch.Tensor             # [R, R] int32: tokens rank i sent to rank j
    recv_src_idx: torch.Tensor            # [num_recv] int32: each received row's token index on its source
    is_token_in_rank: torch.Tensor        # [N, R] bool (this rank's tokens)
    num_recv_tokens_per_expert: torch.Tensor
    num_worst_tokens: int
    buffer_id: int


class LowLatencyHandle(NamedTuple):
    src_info: torch.Tensor                # [L, M*R] int32: source token index of each row
    layout_range: torch.Tensor            # [L, R] int64: (begin << 32) | count per source rank
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
    buffer_id: int


_dispatch_stack_len = getattr(torch._C, "_len_torch_dispatch_stack", None)
_function_mode_on = getattr(torch._C, "_is_torch_function_mode_enabled", None)
_functorch_on = getattr(torch._C, "_are_functorch_transforms_active", None)


def _direct_ok(*tensors) -> bool:
    """Whether an eager call may run the op's implementation (ops.*_impl: the same checks and kernels) without
    going through torch.ops: plain tensors, nothing for autograd to record, no dispatch or function mode, no
    functorch transform, not being traced. The dispatcher is what those need; for a plain eager call it only
    adds its Python layers (register_autograd's wrapper, redispatch): ~45 us of a ~180 us call on the H200."""
    if torch.compiler.is_compiling() or _dispatch_stack_len is None or _function_mode_on is None \
            or _functorch_on is None:
        return False
    if _dispatch_stack_len() or _function_mode_on() or _functorch_on():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (t.__class__ is not torch.Tensor or (grad and t.requires_grad)):
            return False
    return True


def _backend_name(group) -> str:
    try:
        return str(dist.get_backend(group)).lower()
    except Exception:  # noqa: BLE001 - groups not made by new_group may not be registered with a backend name
        return "unknown"


def _device_plan(backend: str, transport: str, cuda_initialized: bool) -> tuple:
    """Which tensors a Buffer over a group with `backend` moves: (cuda, cpu_ok, why_no_cuda).

    cuda is "now" (set up the CUDA side, the comm stream and the NVLink IPC transport, at construction), "lazy" (at
    the first exchange of CUDA tensors) or "off". An NCCL group moves CUDA tensors only. Any other group (gloo)
    moves CPU tensors itself and, as in DeepEP, which uses its group only to exchange handles, carries the IPC
    handles of peer-mapped buffers that move CUDA tensors (vLLM builds its DeepEP buffers with its gloo group).
    Under transport="auto" that CUDA side is set up at construction when this process has initialised CUDA (it
    uses the GPU), else at the first exchange of CUDA tensors (every rank makes it, so every rank sets up there):
    a process that only ever moves CPU tensors (the gloo test worlds, also on a GPU machine) never touches CUDA,
    not even to ask whether it is available."""
    if "nccl" in backend or transport == "ipc":
        return "now", "nccl" not in backend, ""
    if transport == "dist":
        return "off", True, "transport='dist' over a gloo group moves CPU tensors only (gloo cannot move CUDA " \
                            "tensors; transport='auto' or 'ipc' moves them through NVLink IPC buffers)"
    return ("now" if cuda_initialized else "lazy"), True, ""


class Buffer:
    """Expert-parallel communication buffer over `group` (DeepEP V1 call forms).

    Groups: an NCCL group moves CUDA tensors; a gloo group moves CPU tensors, and CUDA tensors through NVLink IPC
    buffers whose handles it carries (as DeepEP uses its group; see `_device_plan`).

    Extra keyword-only arguments (not in DeepEP): `transport` = "auto" | "dist" | "ipc" picks how CUDA tensors
    move ("auto": NVLink IPC buffers when the ranks are on one host and the buffers are large enough, else NCCL on
    an NCCL group; "dist": torch.distributed only, so CPU tensors only on a gloo group; "ipc": IPC buffers or an
    error); `timeout_s` bounds every collective, so a dead peer raises EPTransportError instead of hanging.
    """

    num_sms: int = 20

    def __init__(self, group: Optional[dist.ProcessGroup] = None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 use_fabric: bool = False, explicitly_destroy: bool = False, enable_shrink: bool = False,
                 comm=None, *, transport: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S):
        if enable_shrink:
            raise NotImplementedError("ep.Buffer: enable_shrink=True (DeepEP's rank masking) is not supported; "
                                      "see docs/ep.md, 'Not supported'")
        if comm is not None and group is None:
            raise NotImplementedError("ep.Buffer: an mpi4py communicator (comm=) is not supported: pass a "
                                      "torch.distributed process group as `group` (see docs/ep.md)")
        if not dist.is_initialized():
            raise RuntimeError("ep.Buffer needs torch.distributed: call torch.distributed.init_process_group first")
        if num_nvl_bytes < 0 or num_rdma_bytes < 0:
            raise ValueError(f"num_nvl_bytes={num_nvl_bytes} and num_rdma_bytes={num_rdma_bytes} must be >= 0")
        if transport not in ("auto", "dist", "ipc"):
            raise ValueError(f"transport must be 'auto', 'dist' or 'ipc', got {transport!r}")
        self.group = group if group is not None else dist.group.WORLD
        self.group_name = self.group.group_name
        self.rank = dist.get_rank(self.group)
        self.group_size = dist.get_world_size(self.group)
        self.num_nvl_bytes, self.num_rdma_bytes = int(num_nvl_bytes), int(num_rdma_bytes)
        self.low_latency_mode = low_latency_mode
        self.num_qps_per_rank = num_qps_per_rank
        self.explicitly_destroy = explicitly_destroy
        self.buffer_id = next(_ids)
        self._destroyed = False
        self._ipc = None
        self._comm_stream = None
        self._transport = transport
        self._timeout_s = timeout_s
        self._nccl = "nccl" in _backend_name(self.group)
        # The device of this Buffer's CUDA side once set up, else cpu (a gloo Buffer takes CPU tensors as well).
        self.device = torch.device("cpu")
        self._cuda, self._cpu_ok, self._no_cuda_why = _device_plan(_backend_name(self.group), transport,
                                                                   torch.cuda.is_initialized())
        # What the ops get: this Buffer's own name, so its transports (IPC buffers, timeout_s) are its own even
        # when other Buffers share the group.
        self._op_group = f"{self.group_name}{BUFFER_SEP}{self.buffer_id}"
        set_timeout(self._op_group, timeout_s)
        if self._cuda == "now":
            self._setup_cuda()
        self._ll_combine_buffers: list[Optional[torch.Tensor]] = [None, None]
        self._ll_parity = 0

    def _setup_cuda(self) -> None:
        """The CUDA side: comm stream and, unless transport="dist", the NVLink IPC transport (collective over the
        group: every rank makes it at the same point)."""
        if not torch.cuda.is_available():
            raise RuntimeError("transport='ipc' is not usable here: no CUDA device" if self._transport == "ipc" else
                               "ep.Buffer: an NCCL group moves CUDA tensors, and CUDA is not available here")
        self.device = torch.device("cuda", torch.cuda.current_device())
        if self._comm_stream is None:
            self._comm_stream = torch.cuda.Stream()
        self._cuda = "on"
        if self._transport == "dist":
            return
        from torch_deepstack.ep import ipc
        usable, why = ipc.ipc_usable(self.group)
        area = max(self.num_nvl_bytes, self.num_rdma_bytes)   # low-latency exchanges use the same area
        need = ipc.IpcTransport.min_bytes(self.group_size)
        if usable and area >= need:
            self._ipc = ipc.IpcTransport(self.group, area, self._timeout_s)
            # Its fused kernels' device state is made now, not on the first call: that call may run inside
            # torch.compile(mode="reduce-overhead")'s CUDA graph trees, whose pool would own it.
            from torch_deepstack.ep.intranode import intranode_for
            intranode_for(self._ipc)
            register_transport(self._op_group, self._ipc)
            return
        if self._transport == "ipc":
            if usable:
                raise ValueError(f"ep.Buffer buffers too small for the IPC transport: max(num_nvl_bytes, "
                                 f"num_rdma_bytes)={area}, need >= {need}")
            raise RuntimeError(f"transport='ipc' is not usable here: {why}")
        if not self._nccl and self.group_size > 1:
            # gloo cannot move CUDA tensors (a world of one needs no move: it copies)
            self._cuda, self.device = "off", torch.device("cpu")
            self._no_cuda_why = (f"the NVLink IPC transport, which moves CUDA tensors for a gloo group, is not "
                                 f"usable here: {why}" if not usable else
                                 f"its buffers are too small for the NVLink IPC transport, which moves CUDA "
                                 f"tensors for a gloo group: max(num_nvl_bytes, num_rdma_bytes)={area}, need >= "
                                 f"{need}")

    # --- DeepEP static helpers --------------------------------------------------------------------------------
    @staticmethod
    def is_sm90_compiled() -> bool:
        return True

    @classmethod
    def set_num_sms(cls, new_num_sms: int) -> None:
        if new_num_sms % 2 != 0 or new_num_sms <= 0:
            raise ValueError(f"num_sms must be even and positive, got {new_num_sms}")
        cls.num_sms = new_num_sms
        from torch_deepstack.ep import intranode
        intranode.num_sms = new_num_sms            # SMs of the NVLink send kernels

    @staticmethod
    def capture() -> EventOverlap:
        """An event on the current stream (empty where this process has not initialised CUDA: see EventHandle)."""
        return EventOverlap(EventHandle())

    @staticmethod
    def min_nvl_bytes(hidden_bytes: int, num_ranks: int) -> int:
        """Smallest normal-mode buffer: one row (data + scales + top-k metadata) per peer per round."""
        return num_ranks * (hidden_bytes + hidden_bytes // 128 * 4 + 32 * 12 + 4)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        return low_latency_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        return Config(Buffer.num_sms, 6, 256, 6, 128)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        return Config(Buffer.num_sms, 4, 256, 6, 128)

    # --- instance helpers -------------------------------------------------------------------------------------
    def get_comm_stream(self):
        """The stream async calls run on (None for a Buffer that moves CPU tensors only)."""
        if self._comm_stream is None and self._cuda == "lazy" and torch.cuda.is_available():
            self._comm_stream = torch.cuda.Stream()
        return self._comm_stream

    def get_local_buffer_tensor(self, dtype: torch.dtype, size=None, offset: int = 0, use_rdma_buffer=False):
        """This rank's peer-mapped receive area as a tensor (NVLink IPC transport only). The normal and low-latency
        exchanges share one area, so use_rdma_buffer selects nothing."""
        if self._ipc is None:
            raise RuntimeError(f"get_local_buffer_tensor: this Buffer has no peer-mapped memory: "
                               f"{self._why_no_ipc()}. Only the NVLink IPC transport has a local buffer to view")
        return self._ipc.local_view(dtype, size, offset)

    def _why_no_ipc(self) -> str:
        if self._cuda == "off":
            return f"it moves CPU tensors with torch.distributed ({self._no_cuda_why})"
        if self._cuda == "lazy" and not torch.cuda.is_available():
            return "it moves CPU tensors with torch.distributed (no CUDA device here)"
        if self._cuda == "lazy":
            return ("its CUDA side is set up at its first exchange of CUDA tensors (CUDA was not initialised in "
                    "this process when it was made), which has not happened yet")
        if not self._nccl:
            return "a gloo group of one moves CUDA tensors by copying them (its buffers were too small for IPC)"
        if self._transport == "dist":
            return "transport='dist' moves CUDA tensors with NCCL"
        return ("the IPC transport was not usable or its buffers too small (max(num_nvl_bytes, num_rdma_bytes) < "
                "IpcTransport.min_bytes), so it moves CUDA tensors with NCCL; transport='ipc' says why")

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """No-op: our low-latency exchanges leave no state behind between calls (kept for DeepEP's call form)."""
        self._check_alive()

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """The tensor a zero-copy low_latency_combine reads: write expert outputs here, then call it with
        zero_copy=True."""
        self._check_handle(handle, LowLatencyHandle)
        L = handle.num_experts // self.group_size
        shape = (L, handle.num_max_dispatch_tokens_per_rank * self.group_size, handle.hidden)
        buf = self._ll_combine_buffers[self._ll_parity]
        if buf is None or tuple(buf.shape) != shape:
            buf = torch.empty(shape, dtype=torch.bfloat16, device=handle.src_info.device)
            self._ll_combine_buffers[self._ll_parity] = buf
        return buf

    def destroy(self) -> None:
        if self._destroyed:
            return
        forget_timeout(self._op_group)
        if self._ipc is not None:
            unregister_transport(self._op_group, self._ipc)
            self._ipc.close()
            self._ipc = None
        self._destroyed = True

    def __del__(self):
        try:
            if not self.explicitly_destroy:
                self.destroy()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass

    # --- checks -----------------------------------------------------------------------------------------------
    def _check_alive(self):
        if self._destroyed:
            raise RuntimeError("this ep.Buffer was destroyed")

    def _check_handle(self, handle, kind):
        if not isinstance(handle, kind):
            raise TypeError(f"handle must be the {kind.__name__} a dispatch of this Buffer returned, "
                            f"got {type(handle).__name__}")
        if handle.buffer_id != self.buffer_id:
            raise ValueError(f"handle comes from another ep.Buffer (id {handle.buffer_id}); this Buffer is "
                             f"id {self.buffer_id}: pass the handle to the Buffer that dispatched")

    def _check_device(self, op, t, collective: bool = True):
        """Whether this Buffer moves tensors on t's device; the first exchange of CUDA tensors of a gloo Buffer
        made before CUDA was initialised sets up its CUDA side (collective: every rank is in the same call)."""
        kind = t.device.type
        if kind == "cuda":
            if self._cuda == "lazy" and collective:
                if torch.cuda.is_current_stream_capturing():
                    raise RuntimeError(f"{op}: this Buffer sets up its CUDA side (IPC buffers, a collective) at its "
                                       f"first exchange of CUDA tensors, which cannot happen during CUDA graph "
                                       f"capture: make one eager call first, or make the Buffer after CUDA is "
                                       f"initialised in this process")
                self._check_alive()
                self._setup_cuda()
            if self._cuda == "off":
                raise ValueError(f"{op}: this Buffer moves CPU tensors only, got a tensor on {t.device}: "
                                 f"{self._no_cuda_why}")
            return
        if kind == "cpu" and self._cpu_ok:
            return
        kinds = " and ".join(k for k, ok in (("cpu", self._cpu_ok), ("cuda", self._cuda != "off")) if ok)
        raise ValueError(f"{op}: this Buffer's group moves {kinds} tensors, got a tensor on {t.device}")

    def _check_nvl_size(self, x: torch.Tensor, op: str = "ep.Buffer"):
        if x.dim() != 2:
            raise ValueError(f"{op}: x must be [num_tokens, hidden], got shape {tuple(x.shape)}")
        need = self.min_nvl_bytes(x.shape[1] * max(x.element_size(), 2), self.group_size)
        if self.num_nvl_bytes < need:
            raise ValueError(f"ep.Buffer num_nvl_bytes={self.num_nvl_bytes} is too small for hidden={x.shape[1]} "
                             f"on {self.group_size} ranks: normal mode needs at least {need} bytes "
                             f"(Config.get_nvl_buffer_size_hint gives a good size)")

    def _host_list(self, t: torch.Tensor) -> list:
        """t.tolist(), without a host sync when the fused path already has the values on the host."""
        if self._ipc is not None and t.is_cuda:
            from torch_deepstack.ep.intranode import intranode_for
            cached = intranode_for(self._ipc).host_list(t)
            if cached is not None:
                return list(cached)
        return t.tolist()

    # --- streams and events -----------------------------------------------------------------------------------
    def _run(self, device, fn, inputs, previous_event, async_finish, allocate_on_comm_stream):
        """Run fn() (the op and every step that reads its outputs: with async_finish the caller's stream does not
        wait for the comm stream before we return, so nothing may read an output on the caller's stream here)."""
        self._check_alive()
        if device.type != "cuda":
            return fn(), EventOverlap(None)
        if previous_event is None and not async_finish and not allocate_on_comm_stream:
            # The default call: the caller's stream would wait for the comm stream before we return, so running
            # on the caller's stream is the same order, without the cross-stream events and record_stream calls
            # (about a fifth of an eager call's host time on the H200 machine). As in DeepEP, a call that is not
            # async_finish returns no event: everything is already ordered on the caller's stream.
            return fn(), EventOverlap(None)
        cur = torch.cuda.current_stream()
        comm = self.get_comm_stream()
        wait_for = _cuda_event(previous_event)
        if wait_for is not None:
            comm.wait_event(wait_for)
        else:
            comm.wait_stream(cur)
        with torch.cuda.stream(comm):
            out = fn()
        ev = torch.cuda.Event()
        ev.record(comm)
        flat = [t for t in _flatten(out) if isinstance(t, torch.Tensor)]
        inputs = [t for t in inputs if isinstance(t, torch.Tensor)]
        if not torch.cuda.is_current_stream_capturing():   # a captured graph owns its memory pool
            for t in inputs:
                t.record_stream(comm)
            if not allocate_on_comm_stream:
                for t in flat:
                    t.record_stream(cur)
        if not async_finish:
            cur.wait_event(ev)
        return out, EventOverlap(ev, tuple(inputs) + tuple(flat) if async_finish else None)

    # --- normal mode ------------------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event=None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """-> (num_tokens_per_rank [R] int32, None (no RDMA ranks: intranode), num_tokens_per_expert [E] int32,
        is_token_in_rank [N, R] bool, event)."""
        self._check_device("get_dispatch_layout", topk_idx, collective=False)   # a local computation
        op = ops.get_dispatch_layout_impl if _direct_ok(topk_idx) else torch.ops.deepstack.ep_get_dispatch_layout
        (per_rank, per_expert, in_rank), ev = self._run(
            topk_idx.device, lambda: op(topk_idx, num_experts, self.group_size),
            [topk_idx], previous_event, async_finish, allocate_on_comm_stream)
        return per_rank, None, per_expert, in_rank, ev

    def dispatch(self, x, handle: Optional[DispatchHandle] = None, num_tokens_per_rank=None,
                 num_tokens_per_rdma_rank=None, is_token_in_rank=None, num_tokens_per_expert=None,
                 topk_idx=None, topk_weights=None, expert_alignment: int = 1, num_worst_tokens: int = 0,
                 config: Optional[Config] = None, previous_event=None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False):
        """-> (recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event).

        x is a tensor [N, hidden] or a pair (fp8 [N, hidden], fp32 scales [N, hidden // 128]); recv_x has the
        same form. With `handle`, the layout is reused (no top-k, no count exchange) and recv_topk_idx,
        recv_topk_weights and the list are None. With num_worst_tokens > 0 the outputs have that many rows
        (valid rows first, recv_topk_idx -1 after them), nothing waits on the host, and the list is empty."""
        x_data, x_scales = (x if isinstance(x, tuple) else (x, None))
        self._check_device("dispatch", x_data)
        self._check_nvl_size(x_data, "dispatch")
        if handle is not None:
            self._check_handle(handle, DispatchHandle)
            if num_worst_tokens and num_worst_tokens != handle.num_worst_tokens:
                raise ValueError(f"dispatch: num_worst_tokens={num_worst_tokens} differs from the handle's "
                                 f"{handle.num_worst_tokens}")
            op = ops.dispatch_cached_impl if _direct_ok(x_data, x_scales) else torch.ops.deepstack.ep_dispatch_cached
            (rx, rs), ev = self._run(
                x_data.device,
                lambda: op(x_data, x_scales, handle.is_token_in_rank, handle.rank_counts, handle.recv_src_idx,
                           self._op_group, handle.num_worst_tokens),
                [x_data, x_scales], previous_event, async_finish, allocate_on_comm_stream)
            return ((rx, rs) if x_scales is not None else rx), None, None, None, handle, ev
        if topk_idx is None and is_token_in_rank is None:
            raise ValueError("dispatch: pass topk_idx (with the layout from get_dispatch_layout) or a handle")
        if topk_idx is None:
            num_experts = self.group_size if num_tokens_per_expert is None else num_tokens_per_expert.shape[0]
        else:
            if num_tokens_per_expert is None:
                raise ValueError("dispatch: num_tokens_per_expert (from get_dispatch_layout) is required with "
                                 "topk_idx: it gives num_experts")
            num_experts = num_tokens_per_expert.shape[0]
        if num_tokens_per_rank is not None and tuple(num_tokens_per_rank.shape) != (self.group_size,):
            raise ValueError(f"dispatch: num_tokens_per_rank must be [{self.group_size}], "
                             f"got {tuple(num_tokens_per_rank.shape)}")
        op = ops.dispatch_impl if _direct_ok(x_data, x_scales, topk_weights) else torch.ops.deepstack.ep_dispatch

        def work():
            outs = op(x_data, x_scales, topk_idx, topk_weights, is_token_in_rank, num_experts, self.group_size,
                      self._op_group, expert_alignment, num_worst_tokens, num_tokens_per_expert)
            # These read the outputs, so they run where the outputs are made (the comm stream, see _run).
            prefix = torch.cumsum(outs[6], 0, dtype=torch.int32)
            counts = [] if num_worst_tokens > 0 else self._host_list(outs[4])
            return (*outs, prefix), counts

        (outs, per_expert_list), ev = self._run(
            x_data.device, work, [x_data, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert],
            previous_event, async_finish, allocate_on_comm_stream)
        rx, rs, ridx, rw, per_expert, mask, rank_counts, src_idx, prefix = outs
        new_handle = DispatchHandle(prefix, rank_counts, src_idx, mask, per_expert, num_worst_tokens, self.buffer_id)
        recv_x = (rx, rs) if x_scales is not None else rx
        if topk_idx is None:
            ridx = rw = None
        elif topk_weights is None:
            rw = None
        return recv_x, ridx, rw, per_expert_list, new_handle, ev

    def combine(self, x: torch.Tensor, handle: DispatchHandle, topk_weights=None, bias=None,
                config: Optional[Config] = None, previous_event=None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False):
        """-> (combined_x [N, hidden], combined_topk_weights or None, event): each token's rows summed back on
        its source rank (unweighted, as DeepEP's normal combine), plus `bias` (a tensor or a pair) if given."""
        self._check_handle(handle, DispatchHandle)
        self._check_device("combine", x)
        self._check_nvl_size(x, "combine")
        biases = self._biases(bias, x, handle)
        op = ops.combine_impl if _direct_ok(x, topk_weights) else torch.ops.deepstack.ep_combine

        def work():
            cx, cw = op(x, topk_weights, handle.is_token_in_rank, handle.rank_counts, handle.recv_src_idx,
                        self._op_group, handle.num_worst_tokens)
            for b in biases:        # on the stream that made cx (see _run)
                cx = cx + b
            return cx, cw

        (cx, cw), ev = self._run(x.device, work, [x, topk_weights, *biases], previous_event, async_finish,
                                 allocate_on_comm_stream)
        return cx, (cw if topk_weights is not None else None), ev

    @staticmethod
    def _biases(bias, x: torch.Tensor, handle: DispatchHandle) -> list:
        """combine's bias (a tensor, or a pair whose members may be None) as a list, checked before any exchange.
        DeepEP's contract: [num_tokens, hidden] in x's dtype (no silent broadcast or promotion)."""
        if bias is None:
            return []
        shape, out = (handle.is_token_in_rank.shape[0], x.shape[1]), []
        for b in (bias if isinstance(bias, tuple) else (bias,)):
            if b is None:
                continue
            if not isinstance(b, torch.Tensor) or tuple(b.shape) != shape or b.dtype != x.dtype \
                    or b.device.type != x.device.type:
                raise ValueError(f"combine: bias must be {x.dtype} {shape} on {x.device.type} (or a pair of such), "
                                 f"got " + (f"{b.dtype} {tuple(b.shape)} on {b.device}" if isinstance(b, torch.Tensor)
                                            else type(b).__name__))
            out.append(b)
        return out

    # --- low-latency mode -------------------------------------------------------------------------------------
    def _check_ll_size(self, num_max: int, hidden: int, num_experts: int):
        need = low_latency_size_hint(num_max, hidden, self.group_size, num_experts)
        if self.num_rdma_bytes < need:
            raise ValueError(f"ep.Buffer num_rdma_bytes={self.num_rdma_bytes} is too small for low-latency mode "
                             f"with num_max_dispatch_tokens_per_rank={num_max}, hidden={hidden}, "
                             f"{self.group_size} ranks, {num_experts} experts: need {need} bytes "
                             f"(Buffer.get_low_latency_rdma_size_hint)")

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats=None,
                             dispatch_wait_recv_cost_stats=None, use_fp8: bool = True, round_scale: bool = False,
                             use_ue8m0: bool = False, async_finish: bool = False, return_recv_hook: bool = False):
        """-> (recv_x, recv_count, handle, event, hook). recv_x is [L, M*R, hidden] (bf16), or with use_fp8 the
        pair (e4m3 [L, M*R, hidden], fp32 scales [L, M*R, hidden // 128] MN-major TMA-aligned); only the first
        recv_count[e] rows of expert e are meaningful.

        return_recv_hook=True: the call only sends (on the torch.distributed transport the all-to-all is left in
        flight) and returns the output tensors unfilled; `hook()` receives into them. Run compute in between to
        overlap it with the transfer; read nothing before hook() returns. The IPC transport completes the move
        before returning (its double buffer allows no move to stay open), so there its hook only unpacks."""
        if use_ue8m0:
            raise NotImplementedError("low_latency_dispatch: use_ue8m0 (packed int32 scales) is not supported; "
                                      "use round_scale=True for power-of-two fp32 scales")
        self._check_device("low_latency_dispatch", x)
        if x.dim() != 2:
            raise ValueError(f"low_latency_dispatch: x must be [num_tokens, hidden], got shape {tuple(x.shape)}")
        self._check_ll_size(num_max_dispatch_tokens_per_rank, x.shape[1], num_experts)
        self._ll_parity ^= 1
        if return_recv_hook:
            return self._ll_dispatch_with_hook(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                                               cumulative_local_expert_recv_stats, use_fp8, round_scale)
        op = ops.ll_dispatch_impl if _direct_ok(x) else torch.ops.deepstack.ep_low_latency_dispatch
        stats = cumulative_local_expert_recv_stats

        def work():
            outs = op(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, self.group_size, self._op_group,
                      use_fp8, round_scale)
            if stats is not None:       # on the stream that made the counts (see _run)
                stats.add_(outs[2].to(stats.dtype))
            return outs

        (rx, rs, cnt, src_info, layout_range), ev = self._run(x.device, work, [x, topk_idx, stats], None,
                                                              async_finish, False)
        handle = LowLatencyHandle(src_info, layout_range, num_max_dispatch_tokens_per_rank, x.shape[1], num_experts,
                                  self.buffer_id)
        return ((rx, rs) if use_fp8 else rx), cnt, handle, ev, None

    def _ll_dispatch_with_hook(self, x, topk_idx, num_max, num_experts, stats, use_fp8, round_scale):
        self._check_alive()
        xq, xs = ops.ll_prepare(x, topk_idx, num_max, num_experts, self.group_size, use_fp8, round_scale)
        transport = ops._transport("low_latency_dispatch", self._op_group, x.device, self.group_size)
        state = core.ll_dispatch_state(transport, xq, xs, topk_idx, num_max, num_experts)
        rx, scales, cnt, src_info, layout_range = state.outputs

        def hook():
            state.finish()
            if stats is not None:
                stats.add_(cnt.to(stats.dtype))

        handle = LowLatencyHandle(src_info, layout_range, num_max, x.shape[1], num_experts, self.buffer_id)
        return ((rx, scales) if use_fp8 else rx), cnt, handle, self.capture(), hook

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: LowLatencyHandle, use_logfmt: bool = False, zero_copy: bool = False,
                            async_finish: bool = False, return_recv_hook: bool = False, out=None,
                            combine_wait_recv_cost_stats=None):
        """-> (combined_x [N, hidden], event, hook): sum over k of topk_weights[t, k] times expert
        topk_idx[t, k]'s output row for token t. use_logfmt is accepted and sends bf16 (exact, more bytes).
        return_recv_hook=True: combined_x is filled by hook() (the partial sums are in flight until then)."""
        self._check_handle(handle, LowLatencyHandle)
        if zero_copy:
            x = self.get_next_low_latency_combine_buffer(handle)
        self._check_device("low_latency_combine", x)
        self._check_ll_size(handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts)
        if return_recv_hook:
            self._check_alive()
            M = handle.num_max_dispatch_tokens_per_rank
            ops.check_ll_combine(x, topk_idx, topk_weights, handle.src_info, handle.layout_range, M)
            transport = ops._transport("low_latency_combine", self._op_group, x.device, self.group_size)
            state = core.ll_combine_state(transport, x, topk_idx, topk_weights, handle.src_info,
                                          handle.layout_range, M, out=out)
            return state.out, self.capture(), state.finish
        op = ops.ll_combine_impl if _direct_ok(x, topk_weights) else torch.ops.deepstack.ep_low_latency_combine

        def work():
            cx = op(x, topk_idx, topk_weights, handle.src_info, handle.layout_range,
                    handle.num_max_dispatch_tokens_per_rank, self._op_group)
            if out is None:
                return cx
            out.copy_(cx)               # on the stream that made cx (see _run)
            return out

        cx, ev = self._run(x.device, work, [x, topk_idx, topk_weights, out], None, async_finish, False)
        return cx, ev, None

    # --- DeepEP methods we do not support (see docs/ep.md, "Not supported") -----------------------------------
    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False):
        raise NotImplementedError(_unsupported("low_latency_update_mask_buffer", _MASKING))

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor):
        raise NotImplementedError(_unsupported("low_latency_query_mask_buffer", _MASKING))

    def low_latency_clean_mask_buffer(self):
        raise NotImplementedError(_unsupported("low_latency_clean_mask_buffer", _MASKING))

    def internode_dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                           is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                           expert_alignment: int = 1, num_worst_tokens: int = 0, config: Optional[Config] = None,
                           previous_event=None, async_finish: bool = False, allocate_on_comm_stream: bool = False):
        raise NotImplementedError(_unsupported("internode_dispatch", _INTERNODE))

    def internode_combine(self, x, handle, topk_weights=None, bias=None, config: Optional[Config] = None,
                          previous_event=None, async_finish: bool = False, allocate_on_comm_stream: bool = False):
        raise NotImplementedError(_unsupported("internode_combine", _INTERNODE))


_MASKING = "rank masking (DeepEP's shrink mode, enable_shrink=True) is not supported"
_INTERNODE = ("internode (RDMA) exchanges are not supported: ep.Buffer is intranode (NVLink IPC, or NCCL on an NCCL "
              "group); dispatch/combine move the tokens of all ranks of one host")


def _unsupported(name: str, what: str) -> str:
    return f"ep.Buffer.{name}: {what}; see docs/ep.md, 'Not supported'"


def _flatten(obj):
    if isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _flatten(o)
    else:
        yield obj


# Keep core importable for callers that want the transport-level functions.
__all__ = ["Buffer", "Config", "DispatchHandle", "EventHandle", "EventOverlap", "LowLatencyHandle", "core"]
