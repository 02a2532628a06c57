"""The array read path: a whole batch of (file, offset, length, destination) requests planned, read and
verified in ONE call into the C helper (src/storage/fastio.cpp, `ds_table_read`).

The general read path (client._plan + chunk_engine.ReadSession) spends ~5-10 us of Python per request on
chunk lookup, offset arithmetic and request objects, which small (4 KiB) reads cannot hide. Here Python keeps,
per file, a `ChunkTable` (numpy arrays: the open fd of each chunk's committed version, its length and its page
CRC32Cs) and hands C a packed int64 array of requests; C finds each request's chunk, aligns it, reads the
batch through io_uring (native AIO where io_uring is refused), checks every block's CRC32C against the table
and copies unaligned requests out of a bounce arena.

Only the plain case is served here. A request that crosses a chunk, whose chunk is not loaded, whose read
is short, whose CRCs do not match or whose I/O fails comes back marked and is replayed, with the same bytes
and destination, through the general path, which re-reads the chunk's row, retries once and raises the
precise error (ChunkCorrupt, ...). So this path changes cost, never results.

Staleness: a table is valid for one engine `generation` (bumped by every commit, removal, row re-read and
cache drop in the engine) and one inode length. It holds a reference on each fd it uses, so a concurrent
commit that retires a version can never close (and recycle) a descriptor a read is using; such a read returns
the version that was committed when the batch began, as the general path does.
"""
from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

from torch_deepstack.storage import fastio
from torch_deepstack.storage.chunk_engine import O_DIRECT

SLOW, LOAD, BAD = -1000000, -1000001, -1000002  # DS_SLOW, DS_LOAD, DS_BAD in fastio.cpp


def _max_open() -> int:
    """A quarter of the process's fd limit (DataLoader workers each count separately), at most 4096."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 16
    except (ImportError, OSError, ValueError):
        soft = 1024
    return max(16, min(4096, soft // 4))


MAX_OPEN = _max_open()  # fds all tables of one backend may hold before they are dropped and rebuilt
MAX_TABLE_BYTES = 64 << 20  # a file whose chunk table would be larger is served by the general path


class _Table(ctypes.Structure):
    _fields_ = [("file_len", ctypes.c_int64), ("chunk_size", ctypes.c_int64), ("crc_block", ctypes.c_int64),
                ("nchunks", ctypes.c_int64), ("crc_stride", ctypes.c_int64), ("fd", ctypes.c_void_p),
                ("vlen", ctypes.c_void_p), ("crcs", ctypes.c_void_p), ("strict", ctypes.c_int64)]


class ChunkTable:
    """One file's chunks as the C planner sees them; chunks are loaded (row looked up, fd opened) on first use."""

    def __init__(self, engine, inode: dict, generation: int):
        self.engine, self.generation = engine, generation
        self.ino_id, self.length, self.chunk_size = inode["id"], inode["length"], inode["chunk_size"]
        cs, blk = self.chunk_size, engine.crc_block
        self.nchunks = -(-self.length // cs)
        self.stride = -(-cs // blk)
        if self.nchunks * (self.stride * 4 + 16) > MAX_TABLE_BYTES:
            self.nchunks = 0  # no rows: C sends every request inside the file to the general path
        self.fd = np.full(self.nchunks, -1, np.int64)  # -1 not loaded, -3 no committed version (general path)
        self.vlen = np.zeros(self.nchunks, np.int64)
        self.crcs = np.zeros((self.nchunks, self.stride), np.uint32)
        self.handles: list = []
        self.lock = threading.Lock()
        self.users = 0
        self.retired = False
        self.struct = _Table(self.length, cs, blk, self.nchunks, self.stride, self.fd.ctypes.data,
                             self.vlen.ctypes.data, self.crcs.ctypes.data, 0)
        self.address = ctypes.addressof(self.struct)
        self.ptrs = np.array([self.address], np.uint64)
        self.ptrs_address = self.ptrs.ctypes.data  # read_tables' argument for this table alone

    def load(self, chunks) -> None:
        """Look up and open the given chunk indices (not yet loaded ones); caller holds self.lock."""
        e = self.engine
        flags = os.O_RDONLY | (O_DIRECT if e.direct_io else 0)
        prefix = f"{self.ino_id:016x}-"
        for idx in chunks:
            idx = int(idx)
            if idx < 0 or idx >= self.nchunks or self.fd[idx] != -1:
                continue
            cid = f"{prefix}{idx:08x}"
            m = e._cached(cid)
            v = m.committed if m is not None else None
            if v is None or v.length == 0:
                # No committed version: a hole of a sparse file, or a file removed while this handle was open. The
                # general path tells them apart (zeros or NotFound), so it serves these chunks, not C's zero-fill.
                self.fd[idx] = -3
                continue
            if len(v.page_crcs) > 4 * self.stride:
                continue  # a chunk longer than this file's chunk size: leave it to the general path
            try:
                h = e._fds.acquire(e._data_path(cid, v.ver), flags)
            except OSError:  # retired by a concurrent commit, or out of fds: the general path handles it
                continue
            self.handles.append(h)
            self.crcs[idx, :len(v.page_crcs) // 4] = np.frombuffer(v.page_crcs, "<u4")
            self.vlen[idx] = v.length
            self.fd[idx] = h.fd  # last: a loaded fd means the row above is complete

    def release(self) -> None:
        """Give the fds back (once retired and unused)."""
        if self.handles:
            self.engine._fds.release_many(self.handles)
            self.handles = []


def read_tables(tables: list, req: np.ndarray, out: int, out_size: int, crcs: np.ndarray | None,
                spin_us: float | None, load) -> int:
    """One native call (ds_table_read) reads `req` through `tables` (chunk tables: .ptrs, .address, .chunk_size).
    Requests marked LOAD hit chunks a table has not opened yet: `load(table, chunk_ids)` opens them and just those
    requests are read again; any still unloadable become SLOW. Returns the call's count of requests left to the
    general path (> 0 when any is SLOW); raises OSError when the batch itself failed."""
    if len(tables) == 1:
        ptrs, ptrs_address = tables[0].ptrs, tables[0].ptrs_address
    else:
        ptrs = np.array([t.address for t in tables], np.uint64)
        ptrs_address = address(ptrs)
    ring = fastio.uring()
    ctx = 0 if ring else fastio.aio_context()
    spin = fastio.SPIN_US if spin_us is None else spin_us
    left = fastio._lib.ds_table_read(ptrs_address, len(tables), address(req), len(req), out, out_size,
                                     ring, ctx, spin, 0 if crcs is None else address(crcs))
    if left == 0:  # the common case: every request served
        return 0
    return _read_loaded(tables, ptrs, req, out, out_size, crcs, ring, ctx, spin, load, left)


def address(a: np.ndarray) -> int:
    """Address of a C-contiguous, writable numpy array (a quarter of what `a.ctypes.data` costs: this runs
    several times per batched read)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(a))


def _read_loaded(tables, ptrs, req, out, out_size, crcs, ring, ctx, spin, load, left: int) -> int:
    """After a native read returned `left`: load the chunks of requests marked LOAD and read just those again."""
    lib = fastio._lib
    if left > 0:  # chunks seen for the first time: load them, then read just those requests again
        again = np.flatnonzero(req[:, 3] == LOAD)
        if again.size:
            sub = req[again]
            for k, t in enumerate(tables):
                rows = sub[sub[:, 4] == k]
                if rows.size:
                    load(t, np.unique(rows[:, 0] // t.chunk_size))
            sub_crcs = None if crcs is None else np.empty(len(sub), np.int64)
            left = lib.ds_table_read(address(ptrs), len(tables), address(sub), len(sub), out, out_size,
                                     ring, ctx, spin, 0 if sub_crcs is None else address(sub_crcs))
            sub[sub[:, 3] == LOAD, 3] = SLOW  # could not be loaded: the general path decides
            req[again, 3] = sub[:, 3]
            if crcs is not None:
                crcs[again] = sub_crcs
    if left < 0:
        raise OSError(-left, f"batched read failed: {os.strerror(-left)}")
    return left


class ArrayReader:
    """Per-backend cache of ChunkTables plus the call into C. Thread-safe."""

    def __init__(self, engine, spin_us: int | None = None):
        self.engine = engine
        self.spin_us = spin_us  # completion polling window (None: fastio.SPIN_US)
        self.tables: dict[int, ChunkTable] = {}
        self.lock = threading.Lock()
        self.open_fds = 0
        engine.retire_hooks.append(self.drop_stale)

    def drop_stale(self) -> None:
        """Give back the fds of tables from an older engine generation (a version was retired or the cache
        dropped): without this a removed file would keep its disk space while its table lived."""
        gen = self.engine.generation
        with self.lock:
            for t in [t for t in self.tables.values() if t.generation != gen]:
                self._retire(t)

    def _table(self, inode: dict) -> ChunkTable:
        """The current table for this inode (counted as in use: pair with _done)."""
        e = self.engine
        gen = e.generation
        with self.lock:
            t = self.tables.get(inode["id"])
            if t is None or t.generation != gen or t.length != inode["length"] \
                    or t.chunk_size != inode["chunk_size"]:
                if t is not None:
                    self._retire(t)
                if self.open_fds > MAX_OPEN:
                    for old in list(self.tables.values()):
                        self._retire(old)
                t = self.tables[inode["id"]] = ChunkTable(e, inode, gen)
            t.users += 1
            return t

    def _retire(self, t: ChunkTable) -> None:  # caller holds self.lock
        if self.tables.get(t.ino_id) is t:
            del self.tables[t.ino_id]
        self.open_fds -= len(t.handles)
        t.retired = True
        if t.users == 0:
            t.release()

    def _done(self, t: ChunkTable) -> None:
        with self.lock:
            t.users -= 1
            if t.retired and t.users == 0:
                t.release()

    def read(self, inodes: list[dict], req: np.ndarray, out: int, out_size: int,
             crcs: np.ndarray | None = None) -> np.ndarray:
        """req: int64 [n, 5] rows (file offset, length, offset in the output buffer at address `out` of
        `out_size` bytes, -, index into `inodes`). Returns column 3: each request's byte count (holes read as
        zeros), SLOW for those the general path must serve, BAD for invalid ones. crcs (int64 [n], optional)
        receives each request's CRC32C where the block checks give it without another pass, else -1."""
        tables: list[ChunkTable] = []
        try:
            for ino in inodes:
                tables.append(self._table(ino))
            read_tables(tables, req, out, out_size, crcs, self.spin_us, self._load)
            return req[:, 3]
        finally:
            for t in tables:
                self._done(t)

    def _load(self, t: ChunkTable, chunks) -> None:
        with t.lock:
            before = len(t.handles)
            t.load(chunks)
            added = len(t.handles) - before
        with self.lock:
            self.open_fds += added

    def close(self) -> None:
        if self.drop_stale in self.engine.retire_hooks:
            self.engine.retire_hooks.remove(self.drop_stale)
        with self.lock:
            for t in list(self.tables.values()):
                self._retire(t)


class Waves:
    """One batch read submitted in waves on this thread's io_uring (ds_waves_submit / ds_waves_wait): batch_read
    submits its first rows while Python still builds the rest. Use from one thread, submit() each wave's rows
    (as ArrayReader.read takes them, absolute addresses), then wait() once: it fills column 3 of every wave's
    rows as read() would."""

    def __init__(self, reader: "ArrayReader"):
        self.reader = reader
        self.ring = fastio.uring()
        self.tables: list[ChunkTable] = []
        self.waves: list = []  # (req, ptrs): kept alive while the kernel and C use them
        self.handle = 0

    def submit(self, inodes: list[dict], req: np.ndarray) -> None:
        r = self.reader
        while len(self.tables) < len(inodes):
            self.tables.append(r._table(inodes[len(self.tables)]))
        ptrs = np.array([t.address for t in self.tables], np.uint64)
        h = fastio._lib.ds_waves_submit(self.handle, address(ptrs), len(ptrs), address(req), len(req), 0,
                                        1 << 62, self.ring, 0)
        if not h:
            self.wait()  # what is in flight first; then report
            raise MemoryError("batched read: out of memory planning a wave")
        self.handle = h
        self.waves.append((req, ptrs))

    def wait(self) -> None:
        r = self.reader
        try:
            if not self.handle:
                return
            spin = fastio.SPIN_US if r.spin_us is None else r.spin_us
            left = fastio._lib.ds_waves_wait(self.handle, self.ring, spin)
            self.handle = 0
            if left < 0:
                raise OSError(-left, f"batched read failed: {os.strerror(-left)}")
            if left:
                ptrs = np.array([t.address for t in self.tables], np.uint64)
                for req, _ in self.waves:
                    _read_loaded(self.tables, ptrs, req, 0, 1 << 62, None, self.ring, 0, spin, r._load,
                                 int((req[:, 3] < 0).sum()))
        finally:
            if not self.handle:  # a failed wait keeps the tables (and their fds): reads may still be in flight
                for t in self.tables:
                    r._done(t)
                self.tables = []


def supported() -> bool:
    return fastio.load() is not None and hasattr(fastio._lib, "ds_table_read")


def waves_supported() -> bool:
    """Waves need the C helper and this thread's io_uring (native AIO reads a batch in one call instead)."""
    return supported() and bool(fastio.uring())


__all__ = ["ArrayReader", "ChunkTable", "Waves", "SLOW", "LOAD", "BAD", "supported", "waves_supported"]
