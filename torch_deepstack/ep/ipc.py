"""Intranode transport over CUDA IPC: every rank's receive area is mapped into every other rank's address space,
so a send is a device copy straight into the peer's memory (over NVLink between GPUs; within one GPU when
several processes share it), followed by a barrier kernel on peer-mapped flags (src/ep/ipc_barrier.cuh).

Layout of each rank's receive area: 2 (double buffer) x R (one slot per source rank) x slot_bytes. A move that
does not fit a slot goes in rounds; moves alternate between the two halves, so one barrier per round is enough:
a rank writes half p again only after every peer has passed the barrier that followed its read of half p.

IPC handles are exchanged through the process group with torch.multiprocessing's CUDA tensor reduction (the
same mechanism DataLoader workers use), and the barrier times out instead of hanging when a peer is gone.
"""
from __future__ import annotations

import socket

import torch
import torch.distributed as dist
from torch_deepstack.ep.transport import EPTransportError
from torch_deepstack.jit import driver

_MAX_RANKS = 64
_SIGNATURE = "piiplpp"   # flag table, rank, num_ranks, epoch counter, timeout_ns, error, host error word


def ipc_usable(group) -> tuple[bool, str]:
    """Collective: whether every rank of `group` is on this host with a GPU it can peer-map. (ok, reason)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    me = (socket.gethostname(), torch.cuda.current_device())
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, me, group=group)
    if len({h for h, _ in everyone}) != 1:
        return False, "the group spans several hosts (NVLink IPC is intranode)"
    if dist.get_world_size(group) > _MAX_RANKS:
        return False, f"more than {_MAX_RANKS} ranks"
    for _, dev in everyone:
        if dev != me[1] and not torch.cuda.can_device_access_peer(me[1], dev):
            return False, f"GPU {me[1]} cannot access GPU {dev} as a peer"
    return True, ""


# A process may map one peer allocation for several buffers (small tensors share the caching allocator's blocks),
# and CUDA maps an IPC handle once per process: opened handles are shared and reference-counted.
_OPENED: dict[tuple[int, bytes], list] = {}


def _open_shared(device: int, handle: bytes) -> int:
    entry = _OPENED.get((device, handle))
    if entry is None:
        entry = _OPENED[(device, handle)] = [driver.ipc_import(device, handle), 0]
    entry[1] += 1
    return entry[0]


def _close_shared(device: int, handle: bytes) -> None:
    entry = _OPENED.get((device, handle))
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _OPENED[(device, handle)]
        try:
            driver.ipc_close(device, entry[0])
        except Exception:  # noqa: BLE001 - a peer that died may have taken the mapping with it
            pass


def _barrier_kernel():
    from torch_deepstack.jit import KernelSpec, get_kernel
    return get_kernel(KernelSpec("ep/ipc_barrier.cuh", "deepstack::ipc_barrier_kernel", (_MAX_RANKS,)), _SIGNATURE)


def _copy_kernel():
    from torch_deepstack.jit import KernelSpec, get_kernel
    return get_kernel(KernelSpec("ep/intranode.cuh", "deepstack::ep::copy_bytes_kernel", (_MAX_RANKS,)), "ppl")


class IpcTransport:
    """The three transport moves (see transport.py) over peer-mapped receive areas."""

    @staticmethod
    def min_bytes(num_ranks: int) -> int:
        return 2 * num_ranks * 256

    def __init__(self, group, num_bytes: int, timeout_s: float = 120.0):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = R = dist.get_world_size(group)
        self.name = "ipc"
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.slot_bytes = (num_bytes // 2 // R) // 256 * 256
        if self.slot_bytes < 256:
            raise ValueError(f"num_nvl_bytes={num_bytes} is too small for the IPC transport on {R} ranks "
                             f"(at least {2 * R * 256} bytes)")
        self.area = torch.zeros(2, R, self.slot_bytes, dtype=torch.uint8, device=self.device)
        self.flags = torch.zeros(R, dtype=torch.int64, device=self.device)
        self.error = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.host_error = driver.HostMappedWords(1)     # the barrier kernel copies a set error word here
        torch.cuda.synchronize()
        # Every peer's area and flags are mapped into *this* GPU's context (cuIpcOpenMemHandle with lazy peer
        # access), so this GPU's kernels can store into them through raw pointers.
        mine = (driver.ipc_export(self.area.data_ptr()), driver.ipc_export(self.flags.data_ptr()), self.slot_bytes)
        everyone: list = [None] * R
        dist.all_gather_object(everyone, mine, group=group)
        sizes = [e[2] for e in everyone]
        if len(set(sizes)) != 1:     # every rank lays out its area the same way: sizes must match
            raise ValueError(f"ep.Buffer: every rank must pass the same buffer size; the IPC areas would be "
                             f"{[2 * R * b for b in sizes]} bytes on ranks 0..{R - 1}")
        self._opened: list[bytes] = []
        self.peer_base: list[int] = []             # each rank's area, as an address valid on this GPU
        flag_ptrs: list[int] = []
        for j, (area_h, flags_h, _) in enumerate(everyone):
            if j == self.rank:
                self.peer_base.append(self.area.data_ptr())
                flag_ptrs.append(self.flags.data_ptr())
            else:
                self.peer_base.append(self._import(area_h))
                flag_ptrs.append(self._import(flags_h))
        self.flag_table = torch.tensor(flag_ptrs, dtype=torch.int64, device=self.device)
        self._copy = _copy_kernel()
        self.epoch = torch.zeros(1, dtype=torch.int64, device=self.device)   # advanced by the kernel
        self.parity = 0
        self.timeout_ns = int(timeout_s * 1e9)
        self.kernel = _barrier_kernel()
        self.broken = False
        dist.barrier(group=group)

    # The fused kernels (intranode.py) pick the half of the receive area from the device-side epoch's parity, so
    # halves alternate also across CUDA-graph replays. The torch-copy moves below pick it on the host: from the
    # device epoch when they may sync, else from a host count of the barriers issued.
    fused = True

    # --- synchronisation --------------------------------------------------------------------------------------
    def _barrier(self) -> None:
        self.kernel.launch(1, _MAX_RANKS, self.flag_table, self.rank, self.world_size, self.epoch, self.timeout_ns,
                           self.error, self.host_error.device_ptr)
        self.note_barrier()

    def error_seen(self) -> bool:
        """Whether a barrier has reported an error so far (a host read of host-mapped memory: no sync)."""
        return self.host_error[0] != 0

    def note_barrier(self) -> None:
        """A barrier was issued on the stream (by the barrier kernel or inside a fused kernel)."""
        self.parity ^= 1

    def check_error(self) -> None:
        self._check()

    def _check(self) -> None:
        if self.broken:
            raise EPTransportError("the IPC transport is broken by an earlier timeout; create a new ep.Buffer")
        if torch.cuda.is_current_stream_capturing():
            return
        try:
            err = int(self.error.item())
        except RuntimeError as e:   # e.g. a fault writing into the memory of a peer that exited
            self.broken = True
            raise EPTransportError(f"IPC transport on rank {self.rank}: CUDA error after a move (a peer's "
                                   f"memory is gone?): {str(e).splitlines()[0]}") from e
        if err:
            self.broken = True
            raise EPTransportError(f"IPC barrier on rank {self.rank}: peer {err - 1} did not arrive within "
                                   f"{self.timeout_ns / 1e9:.0f} s (a peer is gone or stalled)")

    def _next_half(self) -> int:
        if not torch.cuda.is_current_stream_capturing():
            self.parity = int(self.epoch.item()) & 1
        return self.parity

    # --- moves ------------------------------------------------------------------------------------------------
    def all_to_all_fixed(self, send: torch.Tensor) -> torch.Tensor:
        R = self.world_size
        if send.shape[0] != R:
            raise ValueError(f"ipc all_to_all_fixed: first dim must be num_ranks={R}, got {tuple(send.shape)}")
        sb = send.contiguous().view(torch.uint8).reshape(R, -1)
        nb = sb.shape[1]
        out = torch.empty_like(sb)
        for lo in range(0, max(nb, 1), self.slot_bytes):
            hi = min(nb, lo + self.slot_bytes)
            p = self._next_half()
            if hi > lo:
                for j in range(R):
                    self._put(j, p, sb[j, lo:hi])
            self._barrier()
            if hi > lo:
                out[:, lo:hi].copy_(self.area[p, :, :hi - lo])
        self._check()
        return out.view(send.dtype).view(send.shape)

    def exchange_counts(self, t: torch.Tensor) -> torch.Tensor:
        return self.all_to_all_fixed(t.unsqueeze(0).expand(self.world_size, *t.shape).contiguous())

    def _global_rounds(self, local_bytes: int) -> int:
        dev = self.device if "nccl" in str(dist.get_backend(self.group)).lower() else torch.device("cpu")
        t = torch.tensor([-(-local_bytes // self.slot_bytes)], dtype=torch.int64, device=dev)
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
            return int(t.item())
        except RuntimeError as e:
            raise EPTransportError(f"IPC round count exchange on rank {self.rank} failed (a peer is gone?): "
                                   f"{str(e).splitlines()[0]}") from e

    def all_to_all_v(self, send: torch.Tensor, send_splits, recv_splits) -> torch.Tensor:
        R = self.world_size
        row = send[0].numel() * send.element_size() if send.shape[0] else \
            int(torch.tensor(send.shape[1:]).prod()) * send.element_size()
        sb = send.contiguous().view(torch.uint8).reshape(-1)
        out = torch.empty(sum(recv_splits), *send.shape[1:], dtype=send.dtype, device=send.device)
        ob = out.view(torch.uint8).reshape(-1)
        s_off = [0]
        for c in send_splits:
            s_off.append(s_off[-1] + c * row)
        r_off = [0]
        for c in recv_splits:
            r_off.append(r_off[-1] + c * row)
        rounds = self._global_rounds(max([c * row for c in list(send_splits) + list(recv_splits)] + [0]))
        for k in range(rounds):
            lo = k * self.slot_bytes
            p = self._next_half()
            for j in range(R):
                n = min(self.slot_bytes, send_splits[j] * row - lo)
                if n > 0:
                    self._put(j, p, sb[s_off[j] + lo:s_off[j] + lo + n])
            self._barrier()
            for i in range(R):
                n = min(self.slot_bytes, recv_splits[i] * row - lo)
                if n > 0:
                    ob[r_off[i] + lo:r_off[i] + lo + n].copy_(self.area[p, i, :n])
        self._check()
        return out

    def local_view(self, dtype: torch.dtype, size=None, offset: int = 0) -> torch.Tensor:
        flat = self.area.view(-1)[offset:]
        t = flat[: (flat.numel() // dtype.itemsize) * dtype.itemsize].view(dtype)
        return t if size is None else t[: int(torch.tensor(size).prod())].view(size)

    def _import(self, exported: tuple[bytes, int]) -> int:
        handle, offset = exported
        base = _open_shared(self.device.index, handle)
        self._opened.append(handle)
        return base + offset

    def _put(self, j: int, half: int, src: torch.Tensor) -> None:
        """Store the bytes of `src` (contiguous uint8) at the start of this rank's slot in rank j's half."""
        dst = self.peer_base[j] + (half * self.world_size + self.rank) * self.slot_bytes
        n = src.numel()
        self._copy.launch(max(1, min(64, -(-n // 65536))), 512, dst, src, n)

    def close(self) -> None:
        synced = not self.broken and not torch.cuda.is_current_stream_capturing()
        if synced:
            torch.cuda.synchronize()
        self.peer_base = [self.area.data_ptr()]
        self.flag_table = None
        self._intranode = None
        for h in self._opened:
            _close_shared(self.device.index, h)
        self._opened = []
        if synced:     # no kernel can still store into it (else the process reclaims the page at exit)
            self.host_error.free()
