"""Loader of the small C helper `src/storage/fastio.cpp` (batched AIO reads + CRC32C).

Built on first use with the system C++ compiler (a fraction of a second), cached by content hash under
$DEEPSTACK_CACHE_DIR or ~/.cache/torch_deepstack/storage, and loaded with ctypes (which releases the GIL for
the call). Everything works without it: `load()` returns None when the source, the compiler or the build is
missing, or when DEEPSTACK_FASTIO=0, and the chunk engine then reads with os.preadv.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading

import struct

log = logging.getLogger("torch_deepstack.storage")

# struct ds_io: fd, offset, length, buf, valid, crc_block, crc_out, copy_dst, copy_src_off, copy_len, result
IO_STRUCT = struct.Struct("<qqqQqqQQqqq")
_RESULT = struct.Struct("<q")
_RESULT_OFFSET = IO_STRUCT.size - 8
AIO_DEPTH = 256
# Hybrid polling window: poll the completion ring this long before sleeping (0 disables). A small read
# usually completes inside it, which saves a sleep/wake-up per batch (a large share of a 4 KiB read's cost).
# Storage services set it to 0: several of them share a machine, and they serve many reads at once anyway.
# Batches that do not poll (0 here, or a thread preempted while polling: see wait_begin in fastio.cpp) sleep on
# the thread's DEFER_TASKRUN io_uring, woken once per batch as fio is.
SPIN_US = int(os.environ.get("DEEPSTACK_SPIN_US", "100"))

_lib = None
_tried = False
_lock = threading.Lock()
_tls = threading.local()
reason: str | None = None


def _source(name: str = "fastio.cpp") -> str | None:
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for cand in (os.path.join(os.path.dirname(pkg), "src", "storage", name),
                 os.path.join(pkg, "_src", "storage", name)):
        if os.path.exists(cand):
            return cand
    return None


def _build(src: str, extra: tuple = (), stem: str = "fastio") -> str:
    with open(src, "rb") as f:
        digest = hashlib.sha256(f.read() + repr(extra).encode()).hexdigest()[:16] if extra else \
            hashlib.sha256(f.read()).hexdigest()[:16]
    cache = os.environ.get("DEEPSTACK_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                  "torch_deepstack")
    out_dir = os.path.join(cache, "storage")
    so = os.path.join(out_dir, f"{stem}-{digest}.so")
    if os.path.exists(so):
        return so
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++/c++/clang++) on PATH")
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        r = subprocess.run([cxx, "-O2", "-shared", "-fPIC", *extra, "-o", tmp, src], capture_output=True,
                           text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {r.stderr.strip()[-500:]}")
        os.replace(tmp, so)  # atomic: concurrent builders race harmlessly
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return so


def load_once(module, env: str, opener, what: str, fallback: str):
    """Build and load an optional native helper once per process (thread-safe), for fastio and pyrows: sets
    module._lib to opener()'s library, or to None with module.reason when it cannot be had (disabled by env=0, no
    source, compiler or headers: the caller keeps its Python path), and returns module._lib."""
    if module._tried:
        return module._lib
    with module._lock:
        if not module._tried:
            try:
                if os.environ.get(env, "1") == "0":
                    raise RuntimeError(f"disabled by {env}=0")
                module._lib = opener()
            except Exception as e:  # noqa: BLE001 - any failure means: use the Python path
                module.reason = str(e)
                log.info("%s unavailable (%s); %s", what, module.reason, fallback)
                module._lib = None
            module._tried = True
        return module._lib


def _open():
    src = _source()
    if src is None:
        raise RuntimeError("src/storage/fastio.cpp not found")
    lib = ctypes.CDLL(_build(src))
    lib.ds_read_batch.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int]
    lib.ds_read_batch.restype = ctypes.c_int
    lib.ds_submit.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_uint64]
    lib.ds_submit.restype = ctypes.c_int
    lib.ds_reap.argtypes = [ctypes.c_int, ctypes.c_uint64]
    lib.ds_reap.restype = ctypes.c_int
    lib.ds_ring_setup.argtypes = [ctypes.c_uint]
    lib.ds_ring_setup.restype = ctypes.c_uint64
    lib.ds_ring_submit.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_uint64]
    lib.ds_ring_submit.restype = ctypes.c_int
    lib.ds_ring_reap.argtypes = [ctypes.c_int, ctypes.c_uint64, ctypes.c_int]
    lib.ds_ring_reap.restype = ctypes.c_int
    lib.ds_aio_setup.argtypes = [ctypes.c_int]
    lib.ds_aio_setup.restype = ctypes.c_uint64
    lib.ds_block_crcs.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_void_p]
    lib.ds_block_crcs.restype = None
    lib.ds_crc32c.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32]
    lib.ds_crc32c.restype = ctypes.c_uint32
    lib.ds_table_read.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                  ctypes.c_uint64, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint64,
                                  ctypes.c_int, ctypes.c_void_p]
    lib.ds_table_read.restype = ctypes.c_int64
    lib.ds_waves_submit.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                    ctypes.c_int64, ctypes.c_uint64, ctypes.c_int64, ctypes.c_uint64,
                                    ctypes.c_void_p]
    lib.ds_waves_submit.restype = ctypes.c_uint64
    lib.ds_waves_wait.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int]
    lib.ds_waves_wait.restype = ctypes.c_int64
    lib.ds_crc_many.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                ctypes.c_void_p]
    lib.ds_crc_many.restype = None
    lib.ds_crc32c_combine.argtypes = [ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint64]
    lib.ds_crc32c_combine.restype = ctypes.c_uint32
    lib.ds_busy_samples.argtypes = []
    lib.ds_busy_samples.restype = ctypes.c_uint64
    return lib


def load():
    """The ctypes library, or None (see `reason`)."""
    if _tried:
        return _lib
    return load_once(sys.modules[__name__], "DEEPSTACK_FASTIO", _open, "storage fast I/O helper", "using os.preadv")


_uring_ok = True


def _forget_rings_after_fork() -> None:
    # A forked child must not share its parent's io_uring / AIO context: it makes its own on first use.
    global _tls
    _tls = threading.local()


os.register_at_fork(after_in_child=_forget_rings_after_fork)


def uring() -> int:
    """This thread's io_uring pair (a plain ring for polled batches and a DEFER_TASKRUN one for sleeping batches,
    see ds_ring_setup; 0 where io_uring is unavailable, e.g. blocked by a seccomp policy). Per thread: the
    DEFER_TASKRUN ring may only be used by the thread that made it."""
    global _uring_ok
    ring = getattr(_tls, "ring", None)
    if ring is None:
        ring = _lib.ds_ring_setup(AIO_DEPTH) if _uring_ok else 0
        if not ring and _uring_ok:
            _uring_ok = False
            log.info("io_uring unavailable here; batched reads use native AIO")
        _tls.ring = ring
    return ring


def aio_context() -> int:
    """One AIO context per thread (completions of one thread's batch never go to another)."""
    ctx = getattr(_tls, "ctx", None)
    if ctx is None:
        ctx = _lib.ds_aio_setup(AIO_DEPTH)
        if not ctx:
            raise OSError("io_setup failed (too many AIO contexts?)")
        _tls.ctx = ctx
    return ctx


def block_crcs(data, block: int) -> bytes | None:
    """Packed little-endian CRC32C of each `block` bytes of data, in one C call (None without the helper)."""
    if _lib is None:
        return None
    mv = memoryview(data).cast("B")
    n = len(mv)
    out = bytearray(4 * ((n + block - 1) // block))
    if n:
        src = mv if not mv.readonly else memoryview(bytearray(mv))  # ctypes needs a writable export
        _lib.ds_block_crcs(ctypes.addressof(ctypes.c_char.from_buffer(src)), n, block,
                           ctypes.addressof(ctypes.c_char.from_buffer(out)))
    return bytes(out)


def crc_many(base_address: int, starts, lengths):
    """CRC32C of the byte ranges [base_address + starts[i], + lengths[i]) in one C call: a uint32 numpy array,
    or None without the helper. The caller guarantees the ranges lie inside memory it holds."""
    if load() is None:
        return None
    import numpy as np

    starts = np.ascontiguousarray(starts, dtype=np.int64)
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    out = np.empty(len(starts), np.uint32)
    if len(starts):
        _lib.ds_crc_many(base_address, starts.ctypes.data, lengths.ctypes.data, len(starts), out.ctypes.data)
    return out


def read_one(ios: bytearray) -> None:
    """Run the first packed record synchronously (pread, CRCs, copy-out)."""
    addr = ctypes.addressof(ctypes.c_char.from_buffer(ios))
    rc = _lib.ds_read_batch(addr, 1, 0, AIO_DEPTH)
    if rc < 0:
        raise OSError(-rc, f"read failed: {os.strerror(-rc)}")


class Pipeline:
    """Submits packed IO_STRUCT records (in any number of separate bytearrays) and reaps them all at once.
    Completions find their record by address, so a caller can pack and submit wave k+1 while wave k is in
    flight. At most AIO_DEPTH reads are in flight; submitting more first reaps what is in flight."""

    def __init__(self):
        self.ring = uring()
        if self.ring:
            self.ctx, self._submit = self.ring, _lib.ds_ring_submit
            # ds_ring_reap polls only for the last two reads: with many in flight the wait is long and
            # polling would just take a core away from the kernel completing them.
            self._reap = lambda count, ctx: _lib.ds_ring_reap(count, ctx, SPIN_US)
        else:
            self.ctx, self._submit, self._reap = aio_context(), _lib.ds_submit, _lib.ds_reap
        self.inflight = 0

    def submit(self, ios: bytearray, start: int, count: int) -> None:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(ios))
        while count > 0:
            room = AIO_DEPTH - self.inflight
            if room <= 0:
                self.reap()
                continue
            m = min(count, room)
            got = self._submit(addr, start, m, self.ctx)
            self.inflight += max(got, 0)  # records that failed to submit already carry -errno
            start += m
            count -= m

    def reap(self) -> None:
        if self.inflight:
            rc = self._reap(self.inflight, self.ctx)
            self.inflight = 0
            if rc < 0:
                raise OSError(-rc, f"I/O wait failed: {os.strerror(-rc)}")


def result_of(ios: bytearray, k: int) -> int:
    return _RESULT.unpack_from(ios, k * IO_STRUCT.size + _RESULT_OFFSET)[0]
