"""Shared-memory batch buffers that DataLoader workers reuse instead of allocating one per batch.

A worker reads each batch straight into shared memory so that handing it to the main process copies nothing.
A fresh buffer per batch costs page zeroing and faults in the worker, a new mapping and faults in the main
process, and unmapping in both (~70 us of system time per 64 KiB sample with 2 workers). Here each worker keeps
a few *slabs* (memfd shared memory, mapped once in the worker and once in the main process) and reads every
batch into a free one.

Protocol (one slab = one memfd; its first page is a header of int64 words, the data follows page-aligned):

* The worker hands out a slab for generation g (its g-th batch in that slab) as a uint8 tensor built with
  `torch.frombuffer` over a memoryview of its mapping; a weak reference on that memoryview tells the worker
  when its own last tensor over the slab died.
* Tensors leave a worker through the DataLoader's result queue, i.e. `ForkingPickler`. In a worker that uses a
  pool, this module wraps the pickler's reducer for `torch.Tensor`: a tensor whose storage is a live slab is
  pickled as (slab key, generation, dtype, size, stride, offset), and the worker counts it in SENT (its own
  counter, mirrored in the header); every other tensor goes to torch's own reducer unchanged. The slab's fd
  travels with it (as multiprocessing's DupFd) until the main process has mapped the slab (it writes its pid
  into MAPPED).
* The main process rebuilds each tensor over its mapping of the slab with `torch.frombuffer` on one memoryview
  per (slab, generation) while that memoryview lives; the storages keep it alive, so it dies exactly when the
  last tensor, view or storage over it in the main process died. Its weak-reference callback then adds the
  number of tensors rebuilt on it to RELEASED in the header. Counting tensors, not batches, keeps this right
  when a batch leaves in several messages (an IterableDataset yielding the samples of one read one by one).
* The worker reuses a slab only when its own tensors over it are gone AND RELEASED == SENT. A batch the user
  keeps (or any view of it) is therefore never overwritten; a tensor pickled but never received keeps its slab
  out of use for good. When no slab is free and the pool is full, the worker falls back to a fresh
  shared-memory buffer (the old path), so nothing ever waits on the user.

The main process keeps its mappings while their worker lives (a daemon thread drops those of exited workers
once a second; tensors still alive keep their own mapping until they die).
"""
from __future__ import annotations

import mmap
import os
import secrets
import threading
import time
import weakref
from multiprocessing import reduction

import numpy as np
import torch

HEADER = 4096  # the header page; data starts page-aligned after it
MAGIC = 0x44534C4142303031  # "DSLAB001"
W_MAGIC, W_SENT, W_RELEASED, W_MAPPED, W_RETIRED = 0, 1, 2, 3, 4  # header words (int64)
SLAB_ROUND = 1 << 20  # slab data sizes are rounded up to 1 MiB


class _Slab:
    __slots__ = ("key", "fd", "size", "mm", "hdr", "ptr", "gen", "sent", "local", "ref", "__weakref__")

    def __init__(self, key: tuple, size: int):
        self.key, self.size = key, size
        self.fd = os.memfd_create(f"deepstack-batch-{key[2]}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, HEADER + size)
            self.mm = mmap.mmap(self.fd, HEADER + size)
        except BaseException:
            os.close(self.fd)
            raise
        self.hdr = np.frombuffer(self.mm, np.int64, 8)
        self.hdr[W_MAGIC] = MAGIC
        self.ptr = 0
        self.gen = 0
        self.sent = 0  # tensors over this slab pickled by this process (RELEASED counts those the consumer freed)
        self.local = False  # a tensor of this process still uses the slab
        self.ref = None

    def free(self) -> bool:
        return not self.local and int(self.hdr[W_RELEASED]) == self.sent

    def retire(self) -> None:
        """Never used again (too small): the main process may drop its mapping."""
        self.hdr[W_RETIRED] = 1
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.fd = -1


class WorkerPool:
    """The slabs of one process (a DataLoader worker). `acquire(n)` returns a uint8 tensor of n bytes in a free
    slab (4 KiB-aligned), or None when none is free and the pool is full (the caller then allocates a fresh
    shared buffer)."""

    def __init__(self, max_slabs: int):
        self.max_slabs = max_slabs
        self.slabs: list[_Slab] = []
        self.token = secrets.token_hex(4)
        self.count = 0
        self.lock = threading.Lock()
        self.fallbacks = 0  # batches that found no free slab
        self.reuses = 0

    def acquire(self, nbytes: int) -> torch.Tensor | None:
        if nbytes <= 0:
            return None
        with self.lock:
            slab = None
            free = [s for s in self.slabs if s.free()]
            fits = [s for s in free if s.size >= nbytes]
            if fits:
                slab = min(fits, key=lambda s: s.size)
                if slab.size > 2 * nbytes + SLAB_ROUND and len(self.slabs) < self.max_slabs:
                    slab = None  # far too large for this batch (a last, short one): keep it for full batches
                else:
                    self.reuses += 1
            if slab is None:
                if len(self.slabs) >= self.max_slabs:
                    if not free:
                        self.fallbacks += 1
                        return None
                    old = min(free, key=lambda s: s.size)  # all free ones too small: replace the smallest
                    self.slabs.remove(old)
                    _drop_local(old)
                    old.retire()
                self.count += 1
                slab = _Slab((os.getpid(), self.token, self.count), -(-nbytes // SLAB_ROUND) * SLAB_ROUND)
                self.slabs.append(slab)
            slab.gen += 1
            view = memoryview(slab.mm)[HEADER:HEADER + nbytes]
            slab.local = True
            slab.ref = weakref.ref(view, _local_released(slab, slab.gen))
            t = torch.frombuffer(view, dtype=torch.uint8)
            _LOCAL.pop(slab.ptr, None)
            slab.ptr = t.data_ptr()
            _LOCAL[slab.ptr] = slab
            return t


def _local_released(slab: _Slab, gen: int):
    def done(_ref, slab=slab, gen=gen):
        if slab.gen == gen:
            slab.local = False
    return done


def _drop_local(slab: _Slab) -> None:
    if _LOCAL.get(slab.ptr) is slab:
        del _LOCAL[slab.ptr]


# ---------------------------------------------------------------------------------------------- worker side
_LOCAL: dict[int, _Slab] = {}  # storage data pointer -> slab (this process's pool)
_POOL: WorkerPool | None = None
_POOL_PID = -1
_TORCH_REDUCER = None
_INSTALLED_PID = -1


def worker_pool(max_slabs: int) -> WorkerPool | None:
    """This process's pool (made on first use; installs the tensor reducer), or None where memfd is missing."""
    global _POOL, _POOL_PID
    if _POOL_PID != os.getpid():
        if not hasattr(os, "memfd_create"):
            return None
        _LOCAL.clear()
        _POOL, _POOL_PID = WorkerPool(max_slabs), os.getpid()
        _install_reducer()
    if max_slabs > _POOL.max_slabs:
        _POOL.max_slabs = max_slabs
    return _POOL


def _install_reducer() -> None:
    global _TORCH_REDUCER, _INSTALLED_PID
    if _INSTALLED_PID == os.getpid():
        return
    current = reduction.ForkingPickler._extra_reducers.get(torch.Tensor)
    if current is not _reduce_tensor:
        if current is None:
            from torch.multiprocessing import reductions as torch_reductions
            current = torch_reductions.reduce_tensor
        _TORCH_REDUCER = current
    reduction.ForkingPickler.register(torch.Tensor, _reduce_tensor)
    _INSTALLED_PID = os.getpid()


def _reduce_tensor(t: torch.Tensor):
    slab = None
    if _LOCAL and t.is_cpu and not t.requires_grad and t.layout is torch.strided:
        st = t.untyped_storage()
        slab = _LOCAL.get(st.data_ptr())
        if slab is not None and (not slab.local or st.nbytes() > slab.size):
            slab = None
    if slab is None:
        return _TORCH_REDUCER(t)
    slab.sent += 1  # before the tensor (and with it the slab's local use) can go away
    slab.hdr[W_SENT] = slab.sent
    fd = reduction.DupFd(slab.fd) if slab.hdr[W_MAPPED] == 0 else None
    return (_rebuild, (slab.key, fd, slab.size, slab.gen, st.nbytes(), t.dtype, tuple(t.shape), t.stride(),
                       t.storage_offset()))


# ---------------------------------------------------------------------------------------------- main side
_MAPPED: dict[tuple, list] = {}  # slab key -> [mmap, header array, tensors released so far]
_VIEWS: dict[tuple, tuple] = {}  # (slab key, generation) -> (weak ref to its memoryview, [tensors rebuilt on it])
_MAIN_LOCK = threading.Lock()
_COUNT_LOCK = threading.Lock()  # held only around integer updates: no allocation of containers, so no GC inside
_PRUNER: threading.Thread | None = None
_INHERITED: list = []  # a forked child's copies of its parent's mappings: never used, never unmapped
STATS = {"mapped": 0, "rebuilt": 0}


def _rebuild(key, fd, size, gen, nbytes, dtype, shape, stride, offset):
    with _MAIN_LOCK:
        m = _MAPPED.get(key)
        if fd is not None:
            raw = fd.detach()  # always take the fd, or it would stay parked in the worker
            try:
                if m is None:
                    mm = mmap.mmap(raw, HEADER + size)
                    hdr = np.frombuffer(mm, np.int64, 8)
                    if hdr[W_MAGIC] != MAGIC:
                        raise RuntimeError("deepstack batch buffer: bad slab header")
                    m = _MAPPED[key] = [mm, hdr, int(hdr[W_RELEASED])]
                    hdr[W_MAPPED] = os.getpid()
                    STATS["mapped"] += 1
                    _start_pruner()
            finally:
                os.close(raw)
        if m is None:
            raise RuntimeError(f"deepstack batch buffer {key} from DataLoader worker pid {key[0]} is not mapped "
                               f"in this process (pid {os.getpid()}); only the process that created the "
                               f"DataLoader can receive its batches")
        entry = _VIEWS.get((key, gen))
        view = entry[0]() if entry is not None else None
        if view is None:
            view = memoryview(m[0])[HEADER:HEADER + nbytes]
            count = [0]
            ref = weakref.ref(view, _released(m, (key, gen), count))
            _VIEWS[(key, gen)] = (ref, count)
        else:
            count = entry[1]
        count[0] += 1  # a strong reference to the view is held here: its callback cannot run meanwhile
        STATS["rebuilt"] += 1
    base = torch.frombuffer(view, dtype=torch.uint8)
    return torch.empty(0, dtype=dtype).set_(base.untyped_storage(), offset, shape, stride)


def _released(m: list, vkey: tuple, count: list):
    def done(ref, m=m, vkey=vkey, count=count, pid=os.getpid()):
        if os.getpid() != pid:  # a forked child's copy of the batch died: the parent may still hold it
            return
        entry = _VIEWS.get(vkey)
        if entry is not None and entry[0] is ref:
            _VIEWS.pop(vkey, None)
        with _COUNT_LOCK:
            m[2] += count[0]
            m[1][W_RELEASED] = m[2]
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prune() -> int:
    """Drop the mappings of exited workers and of retired slabs (live tensors keep theirs). Returns how many
    mappings remain."""
    with _MAIN_LOCK:
        for key in [k for k, (_, hdr, _) in _MAPPED.items() if hdr[W_RETIRED] or not _alive(k[0])]:
            del _MAPPED[key]
        return len(_MAPPED)


def _prune_loop() -> None:
    global _PRUNER
    while True:
        time.sleep(1.0)
        with _MAIN_LOCK:
            if not _MAPPED:
                _PRUNER = None
                return
        prune()


def _start_pruner() -> None:  # caller holds _MAIN_LOCK
    global _PRUNER
    if _PRUNER is None:
        _PRUNER = threading.Thread(target=_prune_loop, name="deepstack-batch-pruner", daemon=True)
        _PRUNER.start()


def _after_fork_in_child() -> None:
    global _MAPPED, _VIEWS, _PRUNER, _MAIN_LOCK, _COUNT_LOCK
    _LOCAL.clear()  # the parent's slabs are not the child's to send
    # The child shares these mappings; dropping them could unmap a user's tensor. Its copies of the parent's
    # batches never count as released (the callbacks check the pid): only the parent's own tensors do.
    _INHERITED.append((_MAPPED, _VIEWS))
    _MAPPED, _VIEWS = {}, {}
    _PRUNER = None
    _MAIN_LOCK, _COUNT_LOCK = threading.Lock(), threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)

__all__ = ["WorkerPool", "worker_pool", "prune", "STATS", "HEADER"]
