"""The client: POSIX-like file API plus a batched zero-copy read API (USRBIO-style), over any backend.

A `FileSystem` pairs a metadata store (local `MetaStore` or the manager's meta RPC) with a data backend
(one local chunk engine, or the storage cluster). See docs/storage.md for the public API.
"""
from __future__ import annotations

import ctypes
import io
import itertools
import logging
import queue
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from torch_deepstack.storage import pyrows
from torch_deepstack.storage.errors import (InvalidArgument, IsADirectory, NotFound, ReadOnly, StorageError)
from torch_deepstack.storage.paths import chunk_id, normalize, split_path
from torch_deepstack.storage.threads import ForkSafeExecutor

log = logging.getLogger("torch_deepstack.storage")


def buffer_address(mv: memoryview) -> int:
    """Address of a writable, C-contiguous buffer."""
    return ctypes.addressof(ctypes.c_char.from_buffer(mv))


# ---------------------------------------------------------------------------------------------- buffers
def writable_bytes(buf: Any, name: str = "out") -> memoryview:
    """A writable, flat byte view of a caller buffer, without copying.

    Accepts bytearray, memoryview, mmap, numpy arrays and CPU torch tensors (pinned or not); all must be
    C-contiguous. Data read into the view lands directly in the caller's memory."""
    mod = type(buf).__module__
    if mod.startswith("torch"):
        import torch

        if not isinstance(buf, torch.Tensor):
            raise InvalidArgument(f"{name}: expected a tensor or a writable buffer, got {type(buf).__name__}")
        if buf.device.type != "cpu":
            raise InvalidArgument(f"{name}: tensor must live in CPU (ideally pinned) memory, got {buf.device}; "
                                  f"copy to the GPU after the read completes")
        if not buf.is_contiguous():
            raise InvalidArgument(f"{name}: tensor must be contiguous")
        flat = buf.detach().reshape(-1)
        if flat.dtype != torch.uint8:
            flat = flat.view(torch.uint8)
        return memoryview(flat.numpy()).cast("B")
    try:
        mv = memoryview(buf)
    except TypeError:
        raise InvalidArgument(f"{name}: expected a writable buffer (bytearray, numpy array, CPU tensor, ...), "
                              f"got {type(buf).__name__}") from None
    if mv.readonly:
        raise InvalidArgument(f"{name}: buffer is read-only ({type(buf).__name__}); pass a bytearray or array")
    if not mv.c_contiguous:
        raise InvalidArgument(f"{name}: buffer must be C-contiguous")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def _fast_bytes(buf) -> memoryview | None:
    """writable_bytes() for the common cases (numpy uint8 rows, bytearray, byte memoryviews) or None."""
    if type(buf).__module__.startswith("torch"):
        return None
    try:
        mv = memoryview(buf)
    except TypeError:
        return None
    if mv.readonly or mv.ndim != 1 or mv.format != "B" or not mv.c_contiguous:
        return None
    return mv


# ---------------------------------------------------------------------------------------------- types
BAD_REQUEST = -1000002  # a read_array result for an invalid request (DS_BAD in fastio.cpp)
MAX_OFFSET = (1 << 63) - 1  # file offsets and lengths are int64 in metadata, the C read paths and the kernel


@dataclass
class FileStat:
    path: str
    inode: int
    type: str  # "file" | "dir"
    size: int
    chunk_size: int
    mtime: float
    ctime: float
    chains: list[str] = field(default_factory=list)

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"

    @classmethod
    def from_inode(cls, path: str, ino: dict) -> "FileStat":
        return cls(path, ino["id"], ino["type"], ino.get("length", 0), ino["chunk_size"], ino["mtime"],
                   ino["ctime"], list(ino.get("chains", [])))


@dataclass
class ChunkRead:
    """One piece of a read that falls inside one chunk (what backends serve)."""
    chain: str
    chunk: str
    offset: int
    length: int
    dest: memoryview
    n: int = 0
    error: BaseException | None = None


@dataclass
class ArrayReadResult:
    """Completion of `FileSystem.read_array`: `nbytes[i]` bytes of request i were read (short at end of file;
    -1 where it failed), `errors` maps failed request indices to their exception."""
    nbytes: Any  # np.ndarray of int64
    errors: dict = field(default_factory=dict)
    # With read_array(checksums=True): int64 per request, the CRC32C of its bytes where the read's own block
    # checks gave it without another pass (page-aligned, whole-block requests), -1 where they did not.
    crc32c: Any = None

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_first(self) -> None:
        """Raise the error of the lowest failed request index, if any."""
        if self.errors:
            raise self.errors[min(self.errors)]


@dataclass
class ReadRequest:
    file: Any  # path str or File
    offset: int
    length: int
    out: Any = None
    userdata: Any = None


_NONES = itertools.repeat(None)  # map()'s constant arguments (ReadResult's data and error)


# batch_read's parsed path needs three small int64 arrays and their addresses per call (~1.5 us to make); a thread
# reuses one set for batches of up to _SCRATCH_ROWS requests. A nested call on the same thread (not expected: the
# parser only reads attributes) gets fresh arrays.
_SCRATCH_ROWS = 64
_scratch = threading.local()  # .arrays: the thread's set (as _new_scratch returns it); .busy: lent out now


def _new_scratch(n: int) -> tuple:
    """rows [n, 5], ctl [2], sizes [8] and their three addresses."""
    import numpy as np

    from torch_deepstack.storage.array_read import address

    rows, ctl, sizes = np.empty((n, 5), np.int64), np.zeros(2, np.int64), np.zeros(8, np.int64)
    return rows, ctl, sizes, address(rows), address(ctl), address(sizes)


def _parse_scratch(n: int) -> tuple:
    """_new_scratch(n), from the thread's reused set where it is free; give it back with _release_scratch."""
    if n > _SCRATCH_ROWS or getattr(_scratch, "busy", False):
        return _new_scratch(n)
    s = getattr(_scratch, "arrays", None)
    if s is None:
        s = _scratch.arrays = _new_scratch(_SCRATCH_ROWS)
    _scratch.busy = True
    return (s[0][:n],) + s[1:]


def _release_scratch(view: tuple) -> None:
    if getattr(_scratch, "busy", False) and view[3] == _scratch.arrays[3]:  # the thread's set, not a fresh one
        _scratch.busy = False


class ReadResult:
    """Completion of one request: `nbytes` read (short at end of file), `data` a view of the bytes in the
    caller's buffer (or a fresh bytearray when no `out` was given), `error` set on failure, `request` the
    ReadRequest. batch_read makes one result per request on its hot path, hence the slots and the lazy parts:
    a request given as a tuple becomes a ReadRequest when first asked for, and `data` is made from the buffer
    when first read (a memoryview per request cost ~0.3 us that callers who check `ok` never use)."""

    __slots__ = ("_request", "nbytes", "_data", "error", "_out")

    def __init__(self, request, nbytes: int = 0, data: memoryview | None = None,
                 error: BaseException | None = None, out: Any = None):
        self._request, self.nbytes, self._data, self.error, self._out = request, nbytes, data, error, out

    @property
    def data(self) -> memoryview | None:
        d = self._data
        if d is None and self._out is not None and self.error is None:
            out = self._out
            mv = _fast_bytes(out)
            if mv is None:
                mv = writable_bytes(out)
            d = self._data = mv if self.nbytes == len(mv) else mv[:self.nbytes]
        return d

    @data.setter
    def data(self, value) -> None:
        self._data, self._out = value, None

    @property
    def request(self) -> ReadRequest:
        r = self._request
        if type(r) is not ReadRequest:
            r = self._request = ReadRequest(*r)
        return r

    @request.setter
    def request(self, value) -> None:
        self._request = value

    @property
    def userdata(self):
        r = self._request
        if type(r) is tuple:
            return r[4] if len(r) > 4 else None
        return r.userdata

    @property
    def ok(self) -> bool:
        return self.error is None

    def __repr__(self) -> str:
        return f"ReadResult(request={self.request!r}, nbytes={self.nbytes}, error={self.error!r})"


class DataBackend:
    """Where chunk bytes live. Implementations: LocalBackend (embedded), ClusterBackend (storage services)."""

    def read_chunks(self, reads: list[ChunkRead], deadline: float | None = None) -> None:
        """Fill each read's n or error. `deadline` (time.monotonic()) bounds waiting and retrying."""
        raise NotImplementedError

    def write_chunks(self, writes: list[tuple[str, str, int, memoryview, int]],
                     created: list[tuple[str, str, int]] | None = None) -> None:
        """writes: (chain, chunk id, offset in chunk, data, chunk_size); all or raise, once every write has
        finished. `created` receives (chain, chunk id, version) for each chunk a write created (the chunk did not
        exist: its version is chunk_engine.FIRST_VERSION), also when the call raises."""
        raise NotImplementedError

    def remove_chunks(self, items: list[tuple[str, str]]) -> None:
        raise NotImplementedError

    def remove_chunk_versions(self, items: list[tuple[str, str, int]]) -> None:
        """items: (chain, chunk id, version); each chunk is removed only while it still holds that version."""
        raise NotImplementedError

    def read_session(self, max_bytes: int, max_reads: int):
        """Optional: an object with add(reads) (submits at once) and finish(), or None (use read_chunks)."""
        return None

    def array_reads(self) -> bool:
        """Whether read_array below is implemented (and usable in this process)."""
        return False

    def begin_waves(self):
        """Optional: an object reading read_array's rows in waves (submit(inodes, req) each, wait() once; see
        array_read.Waves), or None."""
        return None

    def read_array(self, inodes: list[dict], req, out: int, out_size: int, crcs=None):
        """Optional vectorised reads (see array_read.py): req is an int64 [n, 5] array (file offset, length,
        offset of the destination from address `out`, -, index into inodes). Returns each request's byte count, or a negative value for
        requests the general path must serve; None where the backend has no such path. crcs (int64 [n],
        optional) receives each request's CRC32C where the read's block checks give it, else -1."""
        return None

    def revalidate(self) -> None:
        """Called after a path lookup: drop cached chunk state that other processes may have changed."""

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- files
class File(io.RawIOBase):
    """A file handle. Reads come straight from storage (no page cache); writes are buffered per handle and
    written chunk by chunk on flush/close (each chunk update is atomic: copy-on-write, and replicated in a
    cluster). The file length is published to metadata on flush."""

    def __init__(self, fs: "FileSystem", path: str, inode: dict, mode: str):
        super().__init__()
        self.fs, self.path, self.mode = fs, path, mode
        self._inode = inode
        self._pos = inode["length"] if "a" in mode else 0
        self._wbuf = bytearray()
        self._wpos = 0  # file offset of _wbuf[0]
        self._close_failed = False  # close() raised with bytes still buffered (see __del__)
        self._gone = False  # a flush found the file removed or replaced since open
        self._readable = "r" in mode or "+" in mode
        self._writable = any(c in mode for c in "wxa+")

    # ------------------------------------------------------------ io.RawIOBase
    def readable(self) -> bool:
        return self._readable

    def writable(self) -> bool:
        return self._writable

    def seekable(self) -> bool:
        return True

    @property
    def inode(self) -> int:
        return self._inode["id"]

    @property
    def size(self) -> int:
        return max(self._inode["length"], self._wpos + len(self._wbuf) if self._wbuf else 0)

    @property
    def chunk_size(self) -> int:
        return self._inode["chunk_size"]

    @property
    def layout(self) -> dict:
        return self._inode

    def refresh(self) -> None:
        """Re-read the file's inode (to see the length and chunks another writer published)."""
        self._inode = self.fs.meta.inode(self._inode["id"])
        self.fs.backend.revalidate()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}.get(whence)
        if base is None:
            raise InvalidArgument(f"whence must be 0, 1 or 2, got {whence}")
        if base + offset < 0:
            raise InvalidArgument(f"negative seek position {base + offset}")
        if base + offset > MAX_OFFSET:
            raise InvalidArgument(f"offset: seek position {base + offset} is past the largest file offset "
                                  f"{MAX_OFFSET}")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buf) -> int:
        self._check_read()
        mv = writable_bytes(buf, "buf")
        n = self.pread_into(self._pos, mv)
        self._pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        self._check_read()
        if size is None or size < 0:
            size = max(0, self.size - self._pos)
        out = bytearray(size)
        n = self.readinto(out)
        return bytes(out[:n])

    def readall(self) -> bytes:
        return self.read(-1)

    def pread(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        return bytes(out[:self.pread_into(offset, out)])

    def pread_into(self, offset: int, out) -> int:
        self._check_read()
        if self._wbuf:
            self.flush()
        mv = writable_bytes(out)
        res = self.fs.batch_read([ReadRequest(self, offset, len(mv), mv)])[0]
        if res.error is not None:
            raise res.error
        return res.nbytes

    def write(self, data) -> int:
        self._check_write()
        mv = memoryview(data).cast("B")
        if self._pos + len(mv) > MAX_OFFSET:  # a length past int64 could be published but never read back
            raise InvalidArgument(f"offset: writing {len(mv)} bytes at offset {self._pos} ends past the largest "
                                  f"file offset {MAX_OFFSET}")
        if self._wbuf and self._pos != self._wpos + len(self._wbuf):
            self.flush()
        if not self._wbuf:
            self._wpos = self._pos
        self._wbuf += mv
        self._pos += len(mv)
        if len(self._wbuf) >= self.fs.write_buffer_bytes:
            try:
                self.flush()
            except BaseException:
                # A write that raises wrote nothing (a retry must not add its bytes twice); what earlier
                # writes buffered stays for the next flush.
                del self._wbuf[len(self._wbuf) - len(mv):]
                self._pos -= len(mv)
                raise
        return len(mv)

    def pwrite(self, data, offset: int) -> int:
        self.seek(offset)
        return self.write(data)

    def flush(self) -> None:
        if self.closed or not self._wbuf:
            return
        data, pos = memoryview(bytes(self._wbuf)), self._wpos
        created = self.fs._write_range(self._inode, pos, data)
        try:
            self._inode = self.fs.meta.set_length(self._inode["id"], pos + len(data))
        except NotFound:
            # Removed (or replaced) while open: the chunks just written belong to no file; reclaim them.
            self.fs._reclaim_unpublished(self._inode, pos, len(data), created)
            self._gone = True  # for good: inode ids are never reused
            raise
        # Only now: a failed write keeps the bytes buffered, so a retried flush()/close() still writes them.
        self._wbuf = bytearray()
        self._close_failed = False

    def close(self) -> None:
        """Flush, then close. A close whose write fails raises that error (the write tried once) and leaves the
        handle open with the bytes buffered, so a retried close() or flush() writes them; except where the file
        was removed or replaced while open (NotFound): no retry could write them, so the handle closes."""
        if self.closed:
            return
        try:
            self.flush()
        except BaseException:
            if self._gone:
                self._wbuf = bytearray()
                super().close()
            else:
                self._close_failed = True
            raise
        super().close()  # io.RawIOBase.close() flushes again: nothing is buffered now

    def __del__(self):
        # A handle dropped after its close() failed: the caller saw the error, so do not write the bytes later,
        # behind its back (another handle may have written that range since); IOBase's finalizer closes it.
        if getattr(self, "_close_failed", False) and self._wbuf:
            log.debug("%s: dropped with %d unwritten bytes after its close() failed", self.path, len(self._wbuf))
            self._wbuf = bytearray()
        super().__del__()

    def _check_read(self):
        if self.closed:
            raise ValueError("I/O operation on closed file")
        if not self._readable:
            raise io.UnsupportedOperation(f"{self.path} was opened with mode {self.mode!r}, not for reading")

    def _check_write(self):
        if self.closed:
            raise ValueError("I/O operation on closed file")
        if not self._writable:
            raise io.UnsupportedOperation(f"{self.path} was opened with mode {self.mode!r}, not for writing")

    def __repr__(self) -> str:
        return f"<deepstack File {self.path!r} mode={self.mode!r} inode={self.inode}>"


# ---------------------------------------------------------------------------------------------- batches
class ReadBatch:
    """Handle of a submitted batch: `wait(timeout)` returns the results; callbacks run on completion."""

    def __init__(self, future: Future):
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> list[ReadResult]:
        return self._future.result(timeout)

    result = wait


class ReadRing:
    """USRBIO-style ring: `prepare()` requests (not thread-safe, like hf3fs_prep_io), `submit()` them as one
    batch, `wait(min_results, timeout)` for completions in the order they finish."""

    def __init__(self, fs: "FileSystem", entries: int = 1024):
        if not isinstance(entries, int) or entries <= 0:
            raise InvalidArgument(f"entries must be a positive int, got {entries!r}")
        self.fs, self.entries = fs, entries
        self._prepared: list[ReadRequest] = []
        self._inflight = 0
        self._done: queue.Queue[ReadResult] = queue.Queue()
        self._lock = threading.Lock()

    def prepare(self, file, offset: int, length: int, out=None, userdata=None) -> int:
        with self._lock:
            if len(self._prepared) + self._inflight >= self.entries:
                raise StorageError(f"ring full ({self.entries} entries): wait() for completions first")
            self._prepared.append(ReadRequest(file, offset, length, out, userdata))
            return len(self._prepared) - 1

    def submit(self) -> "ReadRing":
        with self._lock:
            reqs, self._prepared = self._prepared, []
            self._inflight += len(reqs)
        if reqs:
            self.fs.submit_reads(reqs, callback=self._complete)
        return self

    def _complete(self, res: ReadResult) -> None:
        self._done.put(res)

    def wait(self, min_results: int = 1, max_results: int = 0, timeout: float | None = None) -> list[ReadResult]:
        out: list[ReadResult] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(out) < min_results:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                out.append(self._done.get(timeout=left))
            except queue.Empty:
                break
        while (max_results <= 0 or len(out) < max_results):
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                break
        with self._lock:
            self._inflight -= len(out)
        return out


# ---------------------------------------------------------------------------------------------- file system
_MODES = {"r": "rb", "rb": "rb", "w": "wb", "wb": "wb", "x": "xb", "xb": "xb", "a": "ab", "ab": "ab",
          "r+": "r+b", "r+b": "r+b", "rb+": "r+b", "w+": "w+b", "w+b": "w+b", "wb+": "w+b"}


class FileSystem:
    """Client of one deepstack file system (embedded or cluster). Thread-safe."""

    write_buffer_bytes = 16 << 20  # per open file: several chunk updates go out (and replicate) at once
    READ_WAVE = 16  # requests planned and submitted per wave in a large batch

    def __init__(self, meta, backend: DataBackend, uri: str, *, io_threads: int = 16, read_only: bool = False):
        self.meta = meta
        self.read_only = read_only
        self.backend = backend
        self.uri = uri
        self.io_threads = io_threads  # backends hold the I/O threads; this pool only runs submit_reads batches
        self._async_pool = ForkSafeExecutor(4, "deepstack-batch")
        self._closed = False

    # ------------------------------------------------------------ namespace
    def stat(self, path: str) -> FileStat:
        return FileStat.from_inode(normalize(path), self.meta.stat(path))

    def exists(self, path: str) -> bool:
        try:
            self.meta.stat(path)
            return True
        except NotFound:
            return False

    def listdir(self, path: str = "/") -> list[str]:
        return [name for name, _ in self.meta.listdir(path)]

    def scandir(self, path: str = "/") -> list[tuple[str, str]]:
        """(name, "file" | "dir") for each entry."""
        return list(self.meta.listdir(path))

    def _check_writable(self, what: str) -> None:
        if self.read_only:
            raise ReadOnly(f"{what}: {self.uri} was opened with read_only=True")

    def mkdir(self, path: str, *, parents: bool = False, exist_ok: bool = False, chunk_size: int | None = None,
              stripe: int | None = None) -> FileStat:
        self._check_writable(f"mkdir {path!r}")
        return FileStat.from_inode(normalize(path), self.meta.mkdir(path, parents=parents, exist_ok=exist_ok,
                                                                     chunk_size=chunk_size, stripe=stripe))

    def makedirs(self, path: str, exist_ok: bool = True, **layout) -> FileStat:
        return self.mkdir(path, parents=True, exist_ok=exist_ok, **layout)

    def rename(self, src: str, dst: str) -> None:
        self._check_writable(f"rename {src!r}")
        replaced = self.meta.rename(src, dst)
        if replaced:
            self._drop_chunks([replaced])

    def remove(self, path: str, *, recursive: bool = False) -> None:
        self._check_writable(f"remove {path!r}")
        self._drop_chunks(self.meta.remove(path, recursive=recursive))

    def _drop_chunks(self, inodes: Iterable[dict]) -> None:
        items = []
        for ino in inodes:
            cs, chains = ino["chunk_size"], ino["chains"]
            for idx in range((ino["length"] + cs - 1) // cs):
                items.append((chains[idx % len(chains)], chunk_id(ino["id"], idx)))
        if items:
            self.backend.remove_chunks(items)

    # ------------------------------------------------------------ files
    def open(self, path: str, mode: str = "rb", *, chunk_size: int | None = None) -> File:
        m = _MODES.get(mode)
        if m is None:
            raise InvalidArgument(f"mode must be one of {sorted(set(_MODES))} (binary only), got {mode!r}")
        split_path(path)
        if m != "rb":
            self._check_writable(f"open {path!r} with mode {mode!r}")
        if m == "rb" or m == "r+b":
            ino = self.meta.stat(path)
            if ino["type"] == "dir":
                raise IsADirectory(f"is a directory: {path!r}")
            self.backend.revalidate()  # after the lookup: chunks the length covers were committed before it
        else:
            ino, old = self.meta.create(path, exclusive=m == "xb", truncate=m in ("wb", "w+b"),
                                        chunk_size=chunk_size)
            if old is not None:
                self._drop_chunks([old])
        return File(self, normalize(path), ino, m)

    def read_bytes(self, path: str) -> bytes:
        with self.open(path, "rb") as f:
            return f.read()

    def write_bytes(self, path: str, data, *, chunk_size: int | None = None) -> int:
        with self.open(path, "wb", chunk_size=chunk_size) as f:
            return f.write(data)

    def _write_range(self, inode: dict, pos: int, data: memoryview) -> list[tuple[str, str, int]]:
        """Write the chunks of [pos, pos + len(data)); returns the chunks it created (see write_chunks)."""
        cs, chains = inode["chunk_size"], inode["chains"]
        writes = []
        off = 0
        while off < len(data):
            idx, in_chunk = divmod(pos + off, cs)
            n = min(cs - in_chunk, len(data) - off)
            writes.append((chains[idx % len(chains)], chunk_id(inode["id"], idx), in_chunk, data[off:off + n], cs))
            off += n
        created = []
        try:
            self.backend.write_chunks(writes, created)
        except BaseException:
            self._reclaim_unpublished(inode, pos, len(data), created)
            raise
        return created

    def _reclaim_unpublished(self, inode: dict, pos: int, n: int, created: list[tuple[str, str, int]]) -> None:
        """After a failed write of [pos, pos + n): remove the chunks it created that no published length covers
        (unreachable, they would only hold space). Best effort: the write's own error is what callers see.

        The length is re-read from metadata, not taken from the handle's cached inode: another handle may have
        extended the file (and acknowledged its chunks) since this one looked. Another handle may also be
        writing the same chunks past the end right now and publish its length after this cleanup. So only the
        chunks this write created go, each only while it still holds the version this write gave it (a later
        write merges into a new version); a chunk this write merged into may hold the other handle's bytes
        and stays."""
        try:
            cs, chains = inode["chunk_size"], inode["chains"]
            try:
                length = self.meta.inode(inode["id"])["length"]
            except NotFound:  # the file is gone (inode ids are never reused): none of its chunks is reachable
                gone = [(chains[idx % len(chains)], chunk_id(inode["id"], idx))
                        for idx in range(pos // cs, -(-(pos + n) // cs))]
                if gone:
                    self.backend.remove_chunks(gone)
                return
            unpublished = {chunk_id(inode["id"], idx) for idx in range(-(-length // cs), -(-(pos + n) // cs))}
            mine = [c for c in created if c[1] in unpublished]
            if mine:
                self.backend.remove_chunk_versions(mine)
        except Exception:  # noqa: BLE001 - the original error matters more; chunks left stay unreachable
            pass

    # ------------------------------------------------------------ batched reads
    def _plan(self, requests: Sequence[ReadRequest], inodes: dict[str, dict] | None = None):
        """Split requests into per-chunk pieces (ChunkRead) whose `dest` are views of the caller's buffers.
        This runs once per request on the hot path, hence the inlined checks."""
        inodes = {} if inodes is None else inodes
        results, pieces = [], []
        looked_up = False
        for req in requests:
            res = ReadResult(req)
            results.append(res)
            try:
                f = req.file
                if type(f) is File:
                    ino = f._inode
                elif isinstance(f, str):
                    key = normalize(f)
                    ino = inodes.get(key)
                    if ino is None:
                        ino = inodes[key] = self.meta.stat(key)
                        looked_up = True
                elif isinstance(f, File):
                    ino = f._inode
                else:
                    raise InvalidArgument(f"request file must be a path or a File, got {type(f).__name__}")
                if ino["type"] != "file":
                    raise IsADirectory(f"is a directory: {f!r}")
                off, length = req.offset, req.length
                if type(off) is not int or type(length) is not int or off < 0 or length < 0:
                    if not (isinstance(off, int) and isinstance(length, int)) or off < 0 or length < 0:
                        raise InvalidArgument(f"offset and length must be ints >= 0, got {off!r}, {length!r}")
                out = req.out
                if out is None:
                    mv = memoryview(bytearray(length))
                else:
                    mv = _fast_bytes(out)
                    if mv is None:
                        mv = writable_bytes(out)
                if len(mv) < length:
                    raise InvalidArgument(f"out buffer has {len(mv)} bytes, request needs {length}")
                end = ino["length"]
                n = length if off + length <= end else (end - off if end > off else 0)
                res.nbytes, res.data = n, mv[:n]
                cs, chains = ino["chunk_size"], ino["chains"]
                prefix = f"{ino['id']:016x}-"
                idx, in_chunk = divmod(off, cs)
                if in_chunk + n <= cs:  # the common case: the request lies inside one chunk
                    mine = [ChunkRead(chains[idx % len(chains)], f"{prefix}{idx:08x}", in_chunk, n, mv[:n])] \
                        if n else []
                else:
                    mine = []
                    pos, stop = off, off + n
                    while pos < stop:
                        idx, in_chunk = divmod(pos, cs)
                        ln = min(cs - in_chunk, stop - pos)
                        d = pos - off
                        mine.append(ChunkRead(chains[idx % len(chains)], f"{prefix}{idx:08x}", in_chunk, ln,
                                              mv[d:d + ln]))
                        pos += ln
                pieces.append((res, mine))
            except BaseException as e:  # noqa: BLE001 - reported per request
                res.error, res.data, res.nbytes = e, None, 0
        if looked_up:
            self.backend.revalidate()
        return results, pieces

    def batch_read(self, requests: Iterable, *, timeout: float | None = None) -> list[ReadResult]:
        """Read many (file, offset, length[, out[, userdata]]) requests in one batch; blocks until done.

        `file` is a path or an open `File`; `out` a caller buffer (bytearray, numpy, CPU/pinned tensor) the
        bytes land in without an extra copy. Results come back in request order; per-request failures are
        reported in `ReadResult.error`, not raised. `timeout` (seconds) bounds how long a cluster read waits
        for and retries replicas; requests still failing then carry `TimeoutError` or the last replica's
        error. (Local reads always run to completion.)"""
        reqs = requests if type(requests) is list else list(requests)
        if reqs and self.backend.array_reads():
            results = self._batch_read_native(reqs, timeout)
            if results is not None:
                return results
        return self._batch_read_general([r if type(r) is ReadRequest else ReadRequest(*r) for r in reqs], timeout)

    def _batch_read_native(self, reqs: list, timeout: float | None) -> list[ReadResult] | None:
        """batch_read through the backend's array path (one native call plans, reads and checks the batch)
        when every request (a ReadRequest or a tuple) names an open File and a valid range; None when any does
        not (the general path then serves the whole batch and reports per-request errors). A request that
        crosses chunks is read as one row per chunk. Requests the native path leaves alone (retries, errors)
        go through the general path.

        The loop below is batch_read's per-request cost (~1 us of Python): keep it lean. Where the backend
        reads in waves (embedded storage on io_uring), a batch of 16 or more submits its first WAVE_FIRST rows
        as soon as they are built, so the device reads them while Python builds the rest."""
        import numpy as np

        if len(reqs) >= self.PARSE_MIN:
            lib = pyrows.load()
            if lib is not None:
                results = self._batch_read_parsed(lib, reqs, timeout)
                if results is not None:
                    return results
        waves = self.backend.begin_waves() if len(reqs) >= 2 * self.WAVE_FIRST else None
        cut = self.WAVE_FIRST if waves is not None else -1
        parts: list = []  # per wave: (rows array, index of its first request, its requests, its extras)
        which_of: dict = {}
        inodes, flat, outs = [], [], []  # flat: 5 int64 per row (one np.array of ints: half the cost of tuples)
        keep: list = []  # buffer exports held until the reads are done (a bytearray cannot be resized under them)
        extra: list = []  # (request index, row) of the second and later chunks of chunk-crossing requests
        add_out, add_keep = outs.append, keep.append
        from_buffer, addressof = ctypes.c_char.from_buffer, ctypes.addressof
        ndarray = np.ndarray
        torch = sys.modules.get("torch")
        Tensor = torch.Tensor if torch is not None else ndarray
        top = MAX_OFFSET
        ok = False
        try:
            for r in reqs:
                if len(outs) == cut:  # the first wave goes to the device now
                    parts.append(self._submit_wave(waves, inodes, flat, extra, 0, cut))
                    flat, extra = [], []
                if type(r) is tuple and 3 <= len(r) <= 5:
                    f, off, length = r[0], r[1], r[2]
                    out = r[3] if len(r) > 3 else None
                elif type(r) is ReadRequest:
                    f, off, length, out = r.file, r.offset, r.length, r.out
                else:
                    return None
                if type(f) is not File or type(off) is not int or type(length) is not int or off < 0 \
                        or length < 0 or off + length > top:  # past int64: the rows cannot hold it
                    return None
                wc = which_of.get(f)
                if wc is None:
                    if f._inode["type"] != "file":
                        return None
                    wc = which_of[f] = (len(inodes), f._inode["chunk_size"])
                    inodes.append(f._inode)
                w, cs = wc
                # The destination's address and size, by type (a memoryview per request cost ~0.3 us, a
                # tensor's numpy view ~3 us); anything unusual is left to the general path's checks.
                to = type(out)
                if length == 0:  # nothing to read; the buffer must still be a valid one
                    if out is None:
                        out = bytearray()
                    else:
                        try:
                            writable_bytes(out)
                        except InvalidArgument:
                            return None
                    addr = 0
                elif to is ndarray:  # from_buffer refuses read-only and non-contiguous arrays
                    if out.nbytes < length:
                        return None
                    try:
                        c = from_buffer(out)
                    except (TypeError, ValueError, BufferError):
                        return None
                    addr = addressof(c)
                    add_keep(c)
                elif to is Tensor:
                    try:
                        if not out.is_cpu or not out.is_contiguous() or out.nbytes < length:
                            return None
                    except RuntimeError:  # e.g. a sparse tensor
                        return None
                    addr = out.data_ptr()  # the request list keeps the tensor alive
                elif out is None:
                    try:
                        out = bytearray(length)
                    except MemoryError:  # the general path reports it for this request alone
                        return None
                    c = from_buffer(out)
                    addr = addressof(c)
                    add_keep(c)
                else:
                    try:
                        mv = memoryview(out)
                    except TypeError:
                        return None
                    if mv.readonly or not mv.c_contiguous or mv.nbytes < length:
                        return None
                    if mv.ndim != 1 or mv.format != "B":
                        mv = mv.cast("B")
                    addr = addressof(from_buffer(mv))
                    add_keep(mv)
                first = cs - off % cs
                if length > first:  # crosses chunks: one row per chunk
                    i = len(outs)
                    for pos in range(off + first, off + length, cs):
                        extra.append((i, (pos, min(cs, off + length - pos), addr + pos - off, 0, w)))
                    flat.extend((off, first, addr, 0, w))
                else:
                    flat.extend((off, length, addr, 0, w))
                add_out(out)
            start = parts[-1][1] + parts[-1][2] if parts else 0
            if waves is not None:
                parts.append(self._submit_wave(waves, inodes, flat, extra, start, len(outs) - start))
                waves.wait()
            else:
                req = self._rows(flat, extra)
                got = self.backend.read_array(inodes, req, 0, 1 << 62)  # requests carry absolute addresses
                if got is None:
                    return None
                req[:, 3] = got
                parts.append((req, 0, len(outs), extra))
            ok = True
        finally:
            if not ok and parts and waves is not None:
                waves.wait()  # reads in flight land in the caller's buffers: let them finish first
        del keep
        if len(parts) == 1 and not parts[0][3]:
            got = parts[0][0][:, 3].tolist()
        else:
            got_a = np.empty(len(outs), np.int64)
            for req, first_req, count, ext in parts:
                g = req[:, 3]
                got_a[first_req:first_req + count] = g[:count]
                for j, (i, _) in enumerate(ext, count):  # a crossing request: the sum of its rows, unless any
                    n = g[j]                               # of them must take the general path
                    got_a[i] = n + got_a[i] if n >= 0 and got_a[i] >= 0 else min(n, got_a[i])
            got = got_a.tolist()
        return self._native_results(reqs, outs, got, timeout)

    def _native_results(self, reqs: list, outs: list, got: list, timeout: float | None) -> list[ReadResult]:
        """One ReadResult per request from the native path's byte counts; those it left (negative counts) are
        read again, into the same buffers, by the general path."""
        if not got or min(got) >= 0:  # all served (the common case): one map, ~0.2 us per request less
            return list(map(ReadResult, reqs, got, _NONES, _NONES, outs))
        results, slow = [], []
        add = results.append
        for r, out, n in zip(reqs, outs, got):
            if n >= 0:
                add(ReadResult(r, n, None, None, out))
            else:
                slow.append(len(results))
                add(None)
        return self._redo_slow(results, slow, reqs, outs, timeout)

    def _redo_slow(self, results: list, slow: list[int], reqs: list, outs: list,
                   timeout: float | None) -> list[ReadResult]:
        """Serves the requests at indices `slow` (left by the native path) through the general path, into the
        same buffers, and puts their results in place."""
        if slow:
            redo = [reqs[k] if type(reqs[k]) is ReadRequest else ReadRequest(*reqs[k]) for k in slow]
            again = self._batch_read_general([ReadRequest(q.file, q.offset, q.length, outs[k], q.userdata)
                                              for k, q in zip(slow, redo)], timeout)
            for k, q, res in zip(slow, redo, again):
                res.request = q
                results[k] = res
        return results

    PARSE_MIN = 4  # batches this long or longer have their requests parsed in C (when it is available)

    def _batch_read_parsed(self, lib, reqs: list, timeout: float | None) -> list[ReadResult] | None:
        """batch_read's native path with the requests parsed in C (pyrows.cpp): one call turns the request list
        into rows, another reads them, a third makes the results (~0.05 us each against ~0.3 for ReadResult(...)
        in Python; that made results while the device read, EARLY_RESULTS_MIN and its split submit/wait, no longer
        pays: synchronous read 2-3% faster at 4 KiB qd 32-128 in alternating calls, 2026-12-01). None where a
        request is not a plain one (the Python loop then decides)."""
        n = len(reqs)
        which_of: dict = {}
        inodes, outs, handles = [], [], []
        torch = sys.modules.get("torch")
        tensor = torch.Tensor if torch is not None else None
        scratch = _parse_scratch(n)
        # ctl: the parser's status and the handle of its buffer exports (it sets both); sizes: chunk size per file
        rows, ctl, sizes, base, ctl_at, sizes_at = scratch
        try:
            r = reqs[0]  # the first request's File up front: a batch on one file then parses in one call
            f = r[0] if type(r) is tuple and r else getattr(r, "file", None)
            if type(f) is File and f._inode["type"] == "file":
                which_of[f] = 0
                sizes[0] = f._inode["chunk_size"]
                inodes.append(f._inode)
            start = 0
            while True:
                ctl[1] = 0
                try:
                    i = lib.ds_rows_parse(reqs, start, File, ReadRequest, tensor, which_of, sizes_at,
                                          len(inodes), base + 40 * start, outs, ctl_at, ctl_at + 8)
                finally:
                    if ctl[1]:
                        handles.append(int(ctl[1]))
                status = int(ctl[0])
                if status == 0:
                    break
                if status != 1:
                    return None
                r = reqs[i]  # a File seen for the first time: give it an index, go on from there
                f = r[0] if type(r) is tuple else r.file
                if f._inode["type"] != "file":
                    return None
                if len(inodes) == len(sizes):  # many files: a longer chunk-size table
                    import numpy as np

                    from torch_deepstack.storage.array_read import address

                    sizes = np.concatenate([sizes, np.zeros(len(sizes), np.int64)])
                    sizes_at = address(sizes)
                which_of[f] = len(inodes)
                sizes[len(inodes)] = f._inode["chunk_size"]
                inodes.append(f._inode)
                start = i
            got = self.backend.read_array(inodes, rows, 0, 1 << 62)  # rows carry absolute addresses
            if got is None:
                return None
            results = lib.ds_rows_results(reqs, outs, base, ReadResult)  # None: some request left
            if results is not None:
                return results
            got = got.tolist()
        finally:
            for h in handles:  # the reads are over (read_array is synchronous): the buffers may move again
                lib.ds_rows_release(h)
            _release_scratch(scratch)
        return self._native_results(reqs, outs, got, timeout)

    WAVE_FIRST = 8  # requests in batch_read's first wave (see _batch_read_native)

    @staticmethod
    def _rows(flat: list, extra: list):
        import numpy as np

        for _, row in extra:
            flat.extend(row)
        return np.array(flat, np.int64).reshape(-1, 5)

    def _submit_wave(self, waves, inodes, flat, extra, first_req: int, count: int):
        req = self._rows(flat, [(i - first_req, row) for i, row in extra])
        waves.submit(inodes, req)
        return req, first_req, count, [(i, row) for i, row in extra]

    def _batch_read_general(self, reqs: list[ReadRequest], timeout: float | None) -> list[ReadResult]:
        deadline = None if timeout is None else time.monotonic() + timeout
        session = None
        if len(reqs) > self.READ_WAVE:
            hint = sum(r.length for r in reqs if isinstance(r.length, int) and r.length > 0)
            session = self.backend.read_session(hint, 2 * len(reqs))
        if session is None:
            results, pieces = self._plan(reqs)
            flat = [p for _, ps in pieces for p in ps]
            if flat:
                self.backend.read_chunks(flat, deadline)
        else:
            # Plan and submit in waves: the kernel reads wave k while Python plans wave k+1.
            results, pieces, inodes = [], [], {}
            try:
                for i in range(0, len(reqs), self.READ_WAVE):
                    res, ps = self._plan(reqs[i:i + self.READ_WAVE], inodes)
                    results += res
                    pieces += ps
                    session.add([p for _, pp in ps for p in pp])
            finally:
                session.finish()
        holes = []  # (result, pieces) with a chunk missing or shorter than the file's length
        for res, ps in pieces:
            for p in ps:
                if p.error is not None:
                    res.error, res.data, res.nbytes = p.error, None, 0
                    break
                if p.n < p.length:
                    holes.append((res, ps))
                    break
        if holes:
            self._fill_holes(holes)
        return results

    def _fill_holes(self, holes: list) -> None:
        """Zero-fill the missing bytes of these reads, where the file still exists: a hole of a sparse file. A
        handle whose file was removed or replaced (its inode is gone, its chunks dropped) gets NotFound instead
        of zeros. Only reads that met a hole pay this metadata lookup (once per inode and batch)."""
        alive: dict[int, BaseException | None] = {}
        for res, ps in holes:
            ino = int(ps[0].chunk.split("-")[0], 16)
            if ino not in alive:
                try:
                    self.meta.inode(ino)
                    alive[ino] = None
                except NotFound:
                    f = res.request.file
                    alive[ino] = NotFound(f"{f.path if isinstance(f, File) else f!r}: the file was removed or "
                                          f"replaced while open (inode {ino} no longer exists)")
                except Exception as e:  # noqa: BLE001 - cannot tell a hole from lost data: report, per request
                    alive[ino] = e
            err = alive[ino]
            if err is not None:
                res.error, res.data, res.nbytes = err, None, 0
                continue
            for p in ps:
                if p.error is not None:
                    res.error, res.data, res.nbytes = p.error, None, 0
                    break
                if p.n < p.length:  # a hole (chunk never written, or shorter than the file): zeros
                    p.dest[p.n:p.length] = bytes(p.length - p.n)

    def read_array(self, files, offsets, lengths, out, out_offsets=None, *, which=None,
                   timeout: float | None = None, checksums: bool = False) -> ArrayReadResult:
        """Vectorised `batch_read`: request i reads lengths[i] bytes at offsets[i] of files[which[i]] into
        out[out_offsets[i]:out_offsets[i] + lengths[i]], all in one batch, blocking until done.

        files: one File or path, or a sequence of them (then `which` gives each request's file index; default
        0). offsets, lengths, out_offsets (default: back to back) are 1-D integer arrays of one length; out is
        one writable buffer (bytearray, numpy array, CPU/pinned tensor). Embedded storage plans, reads and
        CRC-checks the whole batch in one native call; other backends (and requests the native path leaves
        alone) go through `batch_read`, so results are the same either way. Bad arguments raise
        InvalidArgument; per-request failures come back in `ArrayReadResult.errors`. checksums=True also
        fills `ArrayReadResult.crc32c` (see there): an end-to-end check of page-aligned samples for free."""
        import numpy as np

        if type(files) is File and files._inode["type"] == "file":  # the common case, without the loop below
            handles, inodes, looked_up = [files], [files._inode], False
            files = ()
        elif isinstance(files, (str, File)):
            files = [files]
            handles, inodes, looked_up = [], [], False
        else:
            handles, inodes, looked_up = [], [], False
        for f in files:
            if isinstance(f, File):
                ino = f._inode
            elif isinstance(f, str):
                ino = self.meta.stat(f)
                looked_up = True
                f = File(self, normalize(f), ino, "rb")
            else:
                raise InvalidArgument(f"files: expected paths or Files, got {type(f).__name__}")
            if ino["type"] != "file":
                raise IsADirectory(f"is a directory: {f.path!r}")
            handles.append(f)
            inodes.append(ino)
        if not handles:
            raise InvalidArgument("files: expected at least one File or path")
        if looked_up:
            self.backend.revalidate()

        n = len(offsets) if hasattr(offsets, "__len__") else -1
        req = (np.zeros if which is None else np.empty)((max(n, 0), 5), np.int64)  # zeros: file index 0
        ndarray, i64, shape = np.ndarray, np.int64, (n,)
        for col, a in enumerate((offsets, lengths, out_offsets, None, which)):
            if a is None:
                continue
            if not (type(a) is ndarray and a.dtype == i64 and a.shape == shape):  # else: convert, or say why not
                name = ("offsets", "lengths", "out_offsets", "", "which")[col]
                a = np.asarray(a)
                if a.size and a.dtype.kind not in "iu":
                    raise InvalidArgument(f"{name}: expected integers, got dtype {a.dtype}")
                if a.shape != shape:
                    raise InvalidArgument(f"{name}: expected a 1-D array of {n} entries (one per request), got "
                                          f"shape {tuple(a.shape)}")
            req[:, col] = a
        if out_offsets is None and n > 1:  # back to back: an exclusive scan of the lengths (row 0 is 0 already)
            req[0, 2] = 0
            req[:-1, 1].cumsum(out=req[1:, 2])
        elif out_offsets is None and n == 1:
            req[0, 2] = 0
        mv = None
        if type(out) is ndarray and out.nbytes:  # the common buffer, without a memoryview (~0.4 us)
            try:
                mv = ctypes.c_char.from_buffer(out)  # holds the buffer until the read is over
                base, size = ctypes.addressof(mv), out.nbytes
            except (TypeError, ValueError, BufferError):  # read-only or not contiguous: writable_bytes says so
                mv = None
        if mv is None:
            mv = writable_bytes(out)
            size = len(mv)
            base = buffer_address(mv) if size else 0
        if n == 0:
            return ArrayReadResult(np.zeros(0, np.int64), crc32c=np.zeros(0, np.int64) if checksums else None)
        native = self.backend.array_reads()
        crcs = (np.empty(n, np.int64) if native else np.full(n, -1, np.int64)) if checksums else None
        got = self.backend.read_array(inodes, req, base, size, crcs) if native else None
        if got is None:  # no native path: check here what it checks
            if crcs is not None:
                crcs.fill(-1)
            got = np.full(n, -1, np.int64)
            o, ln, d, w = req[:, 0], req[:, 1], req[:, 2], req[:, 4]
            got[(o < 0) | (ln < 0) | (d < 0) | (d + ln > size) | (w < 0) | (w >= len(handles))] = BAD_REQUEST
        nbytes = np.array(got, np.int64)
        if (min(nbytes.tolist()) if n <= 64 else nbytes.min()) >= 0:  # the common case: all served natively
            return ArrayReadResult(nbytes, {}, crcs)
        bad = np.flatnonzero(nbytes == BAD_REQUEST)
        if bad.size:
            k = int(bad[0])
            raise InvalidArgument(f"request {k}: offset {req[k, 0]}, length {req[k, 1]}, out offset {req[k, 2]}, "
                                  f"file index {req[k, 4]}: offsets and lengths must be >= 0, the output range "
                                  f"must lie inside out ({size} bytes), the file index in [0, {len(handles)})")
        slow = np.flatnonzero(nbytes < 0)
        errors = {}
        if slow.size:  # the general path: per-chunk splitting, retries and precise errors
            if type(mv) is not memoryview:
                mv = writable_bytes(out)
            reqs = [ReadRequest(handles[int(req[k, 4])], int(req[k, 0]), int(req[k, 1]),
                                mv[int(req[k, 2]):int(req[k, 2] + req[k, 1])], k) for k in slow.tolist()]
            for r in self.batch_read(reqs, timeout=timeout):
                if r.error is not None:
                    errors[r.request.userdata] = r.error
                else:
                    nbytes[r.request.userdata] = r.nbytes
            if crcs is not None:
                crcs[slow] = -1  # served by the general path: no block CRCs at hand
        return ArrayReadResult(nbytes, errors, crcs)

    def submit_read_array(self, *args, **kwargs) -> Future:
        """Asynchronous `read_array` (same arguments): a Future of its ArrayReadResult."""
        return self._async_pool.submit(self.read_array, *args, **kwargs)

    def submit_reads(self, requests: Iterable, *, callback: Callable[[ReadResult], Any] | None = None
                     ) -> ReadBatch:
        """Asynchronous `batch_read`: returns at once; `ReadBatch.wait()` or `callback(result)` per request."""
        reqs = [r if isinstance(r, ReadRequest) else ReadRequest(*r) for r in requests]

        def run():
            try:
                results = self.batch_read(reqs)
            except BaseException as e:  # noqa: BLE001 - delivered to each request
                results = [ReadResult(r, error=e) for r in reqs]
            if callback is not None:
                for r in results:
                    callback(r)
            return results
        return ReadBatch(self._async_pool.submit(run))

    def read_ring(self, entries: int = 1024) -> ReadRing:
        return ReadRing(self, entries)

    # ------------------------------------------------------------ lifecycle
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._async_pool.shutdown(wait=True)
        self.backend.close()
        close = getattr(self.meta, "close", None)
        if close:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"<deepstack FileSystem {self.uri}>"
