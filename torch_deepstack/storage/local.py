"""Embedded mode: the whole stack in-process over one local directory (no servers).

Layout of an embedded file system directory:

    <dir>/deepstack-fs.json   {"kind": "embedded", "format": 1}
    <dir>/meta.db             metadata (SQLite KV engine)
    <dir>/target/             one chunk engine (see chunk_engine.py), chain "c0"
"""
from __future__ import annotations

import json
import os
from torch_deepstack.storage.threads import ForkSafeExecutor, run_each, wait_all

from torch_deepstack.storage import array_read, fastio
from torch_deepstack.storage.chunk_engine import FIRST_VERSION, ChunkEngine
from torch_deepstack.storage.client import ChunkRead, DataBackend, FileSystem
from torch_deepstack.storage.errors import InvalidArgument, NotFound, StorageError
from torch_deepstack.storage.kv import SQLiteKV
from torch_deepstack.storage.meta import DEFAULT_CHUNK_SIZE, MetaStore

MARKER = "deepstack-fs.json"


def run_sliced(pool: ForkSafeExecutor, items: list, fn, max_slices: int) -> None:
    """Run fn(slice) over contiguous slices of items: one slice inline, the rest on the pool. Batching slices
    (instead of one task per item) keeps thread hand-offs off the per-request cost of small reads."""
    if len(items) <= 1 or max_slices <= 1:
        fn(items)
        return
    k = min(len(items), max_slices)
    step = (len(items) + k - 1) // k
    slices = [items[i:i + step] for i in range(0, len(items), step)]
    futs = [pool.submit(fn, s) for s in slices[1:]]
    try:
        fn(slices[0])
    finally:
        wait_all(futs)


class LocalBackend(DataBackend):
    """All chunks on one chunk engine; reads fan out over threads (preadv releases the GIL)."""

    def __init__(self, engine: ChunkEngine, io_threads: int = 16, spin_us: int | None = None):
        self.engine = engine
        self.io_threads = io_threads
        self.pool = ForkSafeExecutor(io_threads, "deepstack-local")
        self._arrays = array_read.ArrayReader(engine, spin_us)

    def _read_slice(self, reads: list[ChunkRead]) -> None:
        eng = self.engine
        for r in reads:
            try:
                r.n, _ = eng.read(r.chunk, r.offset, r.length, r.dest)
            except BaseException as e:  # noqa: BLE001 - reported per piece
                r.error = e

    def read_chunks(self, reads, deadline=None):  # local reads complete; nothing to bound
        if fastio.load() is not None:
            self.engine.read_many(reads)  # one AIO batch: the kernel sees the whole queue depth
        else:
            run_sliced(self.pool, reads, self._read_slice, self.io_threads)

    def read_session(self, max_bytes, max_reads):
        return self.engine.read_session(max_bytes, max_reads) if fastio.load() is not None else None

    def array_reads(self):
        return array_read.supported()

    def read_array(self, inodes, req, out, out_size, crcs=None):
        return self._arrays.read(inodes, req, out, out_size, crcs) if array_read.supported() else None

    def begin_waves(self):
        return array_read.Waves(self._arrays) if array_read.waves_supported() else None

    def revalidate(self):
        self.engine.revalidate()

    def write_chunks(self, writes, created=None):
        def one(w):
            chain, cid, off, data, cs = w
            ver = self.engine.update(cid, off, data, cs).ver
            if created is not None and ver == FIRST_VERSION:
                created.append((chain, cid, ver))
        run_each(self.pool, one, writes)

    def remove_chunks(self, items):
        for _, cid in items:
            self.engine.remove(cid)

    def remove_chunk_versions(self, items):
        for _, cid, ver in items:
            self.engine.remove_version(cid, ver)

    def close(self):
        self.pool.shutdown(wait=True)
        self._arrays.close()
        self.engine.close()


def mkfs_embedded(path: str, *, chunk_size: int = DEFAULT_CHUNK_SIZE, stripe: int = 1) -> None:
    path = os.path.abspath(path)
    marker = os.path.join(path, MARKER)
    if os.path.exists(marker):
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise InvalidArgument(f"{path} exists and is not a directory")
    os.makedirs(path, exist_ok=True)
    kv = SQLiteKV(os.path.join(path, "meta.db"))
    try:
        MetaStore(kv).init(chunk_size=chunk_size, stripe=stripe)
    finally:
        kv.close()
    ChunkEngine(os.path.join(path, "target"), "t0").close()
    with open(marker + ".tmp", "w") as f:
        json.dump({"kind": "embedded", "format": 1}, f)
    os.replace(marker + ".tmp", marker)


def open_embedded(path: str, *, create: bool = True, chunk_size: int = DEFAULT_CHUNK_SIZE, sync: bool = True,
                  io_threads: int = 16, capacity_bytes: int | None = None, direct_io: bool = True,
                  read_only: bool = False, spin_us: int | None = None) -> FileSystem:
    """Open (or create) an embedded file system. Several processes may open one directory at once (see
    docs/storage.md); read_only=True refuses every write with `ReadOnly` and never removes anything.
    spin_us: how long a batched read polls for completions before sleeping (default $DEEPSTACK_SPIN_US or
    100; 0 never polls: right when several processes read at once, e.g. DataLoader workers)."""
    path = os.path.abspath(path)
    marker = os.path.join(path, MARKER)
    if not os.path.exists(marker):
        if not create or read_only:
            raise NotFound(f"{path} is not a deepstack file system (no {MARKER}); create it with "
                           f"connect(path, create=True) or `deepstack fs mkfs {path}`")
        if os.path.isdir(path) and os.listdir(path):
            raise StorageError(f"{path} is a non-empty directory that is not a deepstack file system; "
                               f"refusing to create one inside it")
        mkfs_embedded(path, chunk_size=chunk_size)
    kv = SQLiteKV(os.path.join(path, "meta.db"))
    meta = MetaStore(kv)
    engine = ChunkEngine(os.path.join(path, "target"), "t0", create=False, sync=sync,
                         capacity_bytes=capacity_bytes, direct_io=direct_io, read_only=read_only)
    meta.close = kv.close  # type: ignore[attr-defined]
    if spin_us is not None and (not isinstance(spin_us, int) or spin_us < 0):
        raise InvalidArgument(f"spin_us must be an int >= 0, got {spin_us!r}")
    return FileSystem(meta, LocalBackend(engine, io_threads, spin_us), "file://" + path, io_threads=io_threads,
                      read_only=read_only)
