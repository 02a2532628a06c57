"""The transport seam: the three collective moves that dispatch and combine are built from.

Every dispatch/combine in this package is local torch work (packing rows, computing positions) around these
primitives, so a transport only moves bytes and never decides routing:

    exchange_counts(t [R] int)            -> [R, R]   row i = rank i's t (an all-gather)
    all_to_all_v(send [S, B] uint8, send_splits, recv_splits) -> [sum(recv_splits), B]
    all_to_all_fixed(send [R, C, B] uint8) -> [R, C, B]   block j of the input goes to rank j; block i of the
                                                          output came from rank i (no host sync: capturable)

Implementations: `DistTransport` (torch.distributed all_to_all_single: gloo on CPU, NCCL on GPU),
`LoopbackTransport` (a world of one: the moves are copies), and `ipc.IpcTransport` (CUDA IPC peer-mapped
buffers, intranode NVLink). An NVSHMEM/NCCL-device transport slots in by implementing the same three methods and
registering itself for a group name with `register_transport`.
"""
from __future__ import annotations

import datetime
from typing import Protocol

import torch
import torch.distributed as dist


class EPTransportError(RuntimeError):
    """A collective move failed: a peer died or timed out, or the transport cannot move these tensors."""


class Transport(Protocol):
    rank: int
    world_size: int
    name: str

    def exchange_counts(self, t: torch.Tensor) -> torch.Tensor: ...

    def all_to_all_v(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor: ...

    def all_to_all_fixed(self, send: torch.Tensor) -> torch.Tensor: ...


# An ep.Buffer gives its ops the name "<group name>@buffer<id>": the transports are keyed by that whole name (so two
# Buffers on one group each use their own buffers and timeout), the process group by the part before it.
BUFFER_SEP = "@buffer"


def process_group_name(group_name: str) -> str:
    return group_name.split(BUFFER_SEP, 1)[0]


def resolve_group(group_name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group
    if not dist.is_initialized():
        raise EPTransportError(f"group_name={group_name!r}: torch.distributed is not initialised "
                               f"(call torch.distributed.init_process_group first)")
    try:
        return _resolve_process_group(process_group_name(group_name))
    except Exception as e:  # noqa: BLE001 - re-raised with the name the caller passed
        raise EPTransportError(f"group_name={group_name!r} names no live process group ({e})") from None


def _group_backend(group) -> str:
    try:
        return str(dist.get_backend(group)).lower()
    except Exception:  # noqa: BLE001 - groups not made by new_group may not be registered with a backend name
        return "unknown"


class DistTransport:
    """torch.distributed all_to_all_single over a process group (gloo moves CPU tensors, NCCL CUDA ones)."""

    def __init__(self, group, timeout_s: float | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.name = f"dist:{_group_backend(group)}"
        self.timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)

    def _wait(self, work, what: str) -> None:
        try:
            # gloo: a bounded host wait. NCCL: a stream wait (its watchdog bounds it); a host wait would also
            # break CUDA-graph capture.
            if self.timeout is not None and "gloo" in self.name:
                work.wait(self.timeout)
            else:
                work.wait()
        except Exception as e:  # noqa: BLE001 - gloo/NCCL raise RuntimeError subclasses with long messages
            raise EPTransportError(f"{what} over {self.name} (rank {self.rank} of {self.world_size}) failed: a "
                                   f"peer is gone or timed out. Underlying error: {str(e).splitlines()[0]}") from e

    def exchange_counts(self, t: torch.Tensor) -> torch.Tensor:
        outs = [torch.empty_like(t) for _ in range(self.world_size)]
        work = dist.all_gather(outs, t.contiguous(), group=self.group, async_op=True)
        self._wait(work, "count exchange")
        return torch.stack(outs)

    def all_to_all_v(self, send, send_splits, recv_splits):
        out = torch.empty(sum(recv_splits), *send.shape[1:], dtype=send.dtype, device=send.device)
        work = dist.all_to_all_single(out, send.contiguous(), list(recv_splits), list(send_splits),
                                      group=self.group, async_op=True)
        self._wait(work, "all-to-all")
        return out

    def all_to_all_fixed(self, send):
        return self.start_all_to_all_fixed(send).wait()

    def start_all_to_all_fixed(self, send):
        """Leave the move in flight: `.wait()` returns the received blocks (receive hooks use this)."""
        out = torch.empty_like(send)
        work = dist.all_to_all_single(out, send.contiguous(), group=self.group, async_op=True)
        return _InFlight(self, work, out)


class _InFlight:
    def __init__(self, transport, work, out):
        self.transport, self.work, self.out = transport, work, out

    def wait(self):
        if self.work is not None:
            self.transport._wait(self.work, "fixed all-to-all")
            self.work = None
        return self.out


class LoopbackTransport:
    """A world of one: every move is a copy to oneself (the semantics of a one-rank all-to-all)."""

    def __init__(self, name: str = "loopback"):
        self.rank, self.world_size, self.name = 0, 1, name

    def exchange_counts(self, t):
        return t.unsqueeze(0).clone()

    def all_to_all_v(self, send, send_splits, recv_splits):
        if list(send_splits) != list(recv_splits):
            raise EPTransportError(f"loopback all-to-all: send splits {send_splits} != receive splits {recv_splits}")
        return send.clone()

    def all_to_all_fixed(self, send):
        return send.clone()


# group_name -> transport registered for CUDA tensors of that group (by ep.Buffer when it maps IPC buffers).
_CUDA_TRANSPORTS: dict[str, object] = {}
# name the ops get (a Buffer's own, or a process group's) -> its torch.distributed transport (which holds its timeout)
_DIST_TRANSPORTS: dict[str, DistTransport] = {}
DEFAULT_TIMEOUT_S = 120.0


def register_transport(group_name: str, transport) -> None:
    """Route the CUDA tensors of ops on `group_name` through `transport` (e.g. the NVLink IPC transport). ep.Buffer
    registers under its own name (group name + BUFFER_SEP + id), so each Buffer's calls use its own memory."""
    _CUDA_TRANSPORTS[group_name] = transport


def unregister_transport(group_name: str, transport=None) -> None:
    if transport is None or _CUDA_TRANSPORTS.get(group_name) is transport:
        _CUDA_TRANSPORTS.pop(group_name, None)


def set_timeout(group_name: str, seconds: float) -> None:
    """Bound every collective of the torch.distributed transport of ops on `group_name` (a dead peer then raises).
    A Buffer sets it for its own name only: other Buffers on the same group keep theirs."""
    _DIST_TRANSPORTS[group_name] = DistTransport(resolve_group(group_name), seconds)


def forget_timeout(group_name: str) -> None:
    _DIST_TRANSPORTS.pop(group_name, None)


def transport_for(group_name: str, device: torch.device):
    """The transport ops on `group_name` use for tensors on `device`."""
    if device.type == "cuda" and group_name in _CUDA_TRANSPORTS:
        return _CUDA_TRANSPORTS[group_name]
    group = resolve_group(group_name)
    t = _DIST_TRANSPORTS.get(group_name)
    if t is None or t.group is not group:           # (a group made again under an old name starts afresh)
        t = _DIST_TRANSPORTS[group_name] = DistTransport(group, DEFAULT_TIMEOUT_S)
    if device.type == "cuda" and "gloo" in t.name:
        if t.world_size == 1:
            return LoopbackTransport("loopback(gloo group of one)")
        raise EPTransportError(f"group {group_name!r} uses gloo, which cannot move CUDA tensors: use an NCCL group, "
                               f"or an ep.Buffer (which maps NVLink IPC buffers for its group)")
    if device.type == "cpu" and "nccl" in t.name:
        raise EPTransportError(f"group {group_name!r} uses NCCL, which cannot move CPU tensors: use a gloo group")
    return t
