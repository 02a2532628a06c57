"""Chunk engine: one per storage target (a directory on a local disk).

On-disk format (format 1):

    <target>/target.json            {"format": 1, "target_id": ..., "crc_block": 4096}
    <target>/chunks.db              SQLite: one row per chunk (committed and pending version)
    <target>/data/<xx>/<chunk>.v<N> the bytes of version N of a chunk, padded to 4 KiB, written once

Copy-on-write: an update never touches the file of the committed version. It writes a complete new version
file (O_DIRECT, then fdatasync), and only then records it in chunks.db (one SQLite transaction). A crash at
any point therefore leaves either the old committed version or the new one, both complete; files no row
references are removed when the engine opens. Readers hold a reference to the file they read, so a commit
that retires the old version never pulls bytes out from under them.

Several processes may open one target (embedded file systems shared by DataLoader workers, checkpoint ranks,
a trainer and an evaluator). Every engine holds a shared flock on <target>/engine.lock for its lifetime; the
garbage collection of unreferenced files runs only when an exclusive lock succeeds at open (no other engine,
in any process, is open, so no copy-on-write update is in flight), and skips files younger than the open.
The in-memory chunk map is a cache of chunks.db: a miss, a version file that vanished, or a CRC mismatch
re-reads that chunk's row and retries once; `revalidate()` drops the whole cache when another process has
committed to chunks.db since (SQLite's data_version). Version files are created with O_EXCL, so two
processes never write into one file, and each commit swaps the row inside one SQLite transaction and retires
exactly the versions that row referenced. An update's commit is a compare-and-swap in that transaction (see
`update`): one that read the chunk before another process committed to it re-reads and re-patches instead of
replacing the other's bytes.

Versions of a chunk count up from FIRST_VERSION while it exists; each update's version is one past the
chunk's highest. So a chunk holding its first version holds nothing but the bytes of the write that created it
(every later write merged into it makes a new version), which is what lets a failed write's cleanup remove
just the chunks it created, with `remove_version`.

Checksums: CRC32C of the whole chunk (`crc`), plus one CRC32C per `crc_block` bytes (`page_crcs`) so a small
random read can be verified without reading the whole chunk. A mismatch raises `ChunkCorrupt`.

Direct I/O: data files are opened with O_DIRECT and read/written through page-aligned buffers. Where the file
system refuses O_DIRECT the engine logs why and uses buffered I/O with fdatasync instead.
"""
from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import json
import logging
import mmap
import os
import random
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from torch_deepstack.storage import fastio
from torch_deepstack.storage.crc import crc32c
from torch_deepstack.storage.errors import (ChunkCorrupt, Conflict, InvalidArgument, NoSpace, NotFound,
                                            ReadOnly, StorageError)
from torch_deepstack.storage.paths import validate_chunk_id

log = logging.getLogger("torch_deepstack.storage")

ALIGN = 4096
FORMAT = 1
FIRST_VERSION = 1  # of a chunk that did not exist (see the module docstring)
UPDATE_ATTEMPTS = 64  # commits an update tries, losing each to another process's commit, before it gives up
O_DIRECT = getattr(os, "O_DIRECT", 0)


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def buffer_address(mv: memoryview) -> int:
    """Address of a writable, C-contiguous buffer (for O_DIRECT alignment checks)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(mv))


def aligned_buffer(size: int) -> mmap.mmap:
    """Anonymous mmap: page-aligned, as O_DIRECT requires."""
    return mmap.mmap(-1, max(align_up(size), ALIGN))


@dataclass(frozen=True)
class Version:
    ver: int
    length: int
    crc: int
    page_crcs: bytes  # packed uint32, one per crc_block

    def page_crc(self, i: int) -> int:
        return int.from_bytes(self.page_crcs[4 * i:4 * i + 4], "little")

    def to_json(self) -> dict:
        return {"ver": self.ver, "length": self.length, "crc": self.crc}


@dataclass
class ChunkMeta:
    chunk_id: str
    committed: Version | None = None
    pending: Version | None = None
    chain_ver: int = 0

    def to_json(self) -> dict:
        return {
            "chunk": self.chunk_id,
            "committed": self.committed.to_json() if self.committed else None,
            "pending": self.pending.to_json() if self.pending else None,
            "chain_ver": self.chain_ver,
        }


def next_version(m: ChunkMeta | None) -> int:
    """The version an update of a chunk gets: FIRST_VERSION where it does not exist, else one past its highest."""
    held = [v.ver for v in (m.committed, m.pending) if v] if m else []
    return max(held) + 1 if held else FIRST_VERSION


class _Handle:
    __slots__ = ("fd", "refs", "evicted")

    def __init__(self, fd: int):
        self.fd, self.refs, self.evicted = fd, 0, False


class _FdCache:
    """LRU of open version files. Handles are reference-counted: an fd is closed only once it is both evicted
    and unused, so a concurrent read can never land on a recycled descriptor."""

    def __init__(self, capacity: int = 512):
        self.capacity = capacity
        self.lock = threading.Lock()
        self.items: OrderedDict[str, _Handle] = OrderedDict()

    def acquire(self, path: str, flags: int) -> _Handle:
        with self.lock:
            h = self.items.get(path)
            if h is not None:
                self.items.move_to_end(path)
                h.refs += 1
                return h
        fd = os.open(path, flags)
        with self.lock:
            h = self.items.get(path)
            if h is not None:  # another thread opened it meanwhile
                os.close(fd)
            else:
                h = self.items[path] = _Handle(fd)
                while len(self.items) > self.capacity:
                    _, old = self.items.popitem(last=False)
                    old.evicted = True
                    if old.refs == 0:
                        os.close(old.fd)
            h.refs += 1
            return h

    def open_locked(self, path: str, flags: int) -> _Handle:
        """Open and insert `path` (caller holds self.lock); evicts the least recently used handles."""
        h = self.items[path] = _Handle(os.open(path, flags))
        while len(self.items) > self.capacity:
            _, old = self.items.popitem(last=False)
            old.evicted = True
            if old.refs == 0:
                os.close(old.fd)
        return h

    def release_many(self, handles: list) -> None:
        with self.lock:
            for h in handles:
                h.refs -= 1
                if h.evicted and h.refs == 0:
                    os.close(h.fd)

    def release(self, h: _Handle) -> None:
        with self.lock:
            h.refs -= 1
            if h.evicted and h.refs == 0:
                os.close(h.fd)

    def forget(self, path: str) -> None:
        with self.lock:
            h = self.items.pop(path, None)
            if h is not None:
                h.evicted = True
                if h.refs == 0:
                    os.close(h.fd)

    def close(self) -> None:
        with self.lock:
            for h in self.items.values():
                h.evicted = True
                if h.refs == 0:
                    os.close(h.fd)
            self.items.clear()


def page_crcs_of(data, crc_block: int) -> bytes:
    fast = fastio.block_crcs(data, crc_block) if fastio.load() is not None else None
    if fast is not None:
        return fast
    mv = memoryview(data).cast("B")
    out = array.array("I", (crc32c(mv[i:i + crc_block]) for i in range(0, len(mv), crc_block)))
    return out.tobytes()


class ChunkEngine:
    """Chunk store of one storage target. Thread-safe."""

    def __init__(self, root: str, target_id: str | None = None, *, create: bool = True, sync: bool = True,
                 crc_block: int = ALIGN, capacity_bytes: int | None = None, direct_io: bool = True,
                 read_only: bool = False):
        self.root = os.path.abspath(root)
        self.read_only = read_only
        if read_only:
            create = False
        info_path = os.path.join(self.root, "target.json")
        if os.path.exists(info_path):
            with open(info_path) as f:
                info = json.load(f)
            if info.get("format") != FORMAT:
                raise StorageError(f"{self.root}: unsupported chunk engine format {info.get('format')}")
            if target_id is not None and info["target_id"] != target_id:
                raise InvalidArgument(f"{self.root} belongs to target {info['target_id']!r}, not {target_id!r}")
        elif not create:
            raise NotFound(f"{self.root} is not a storage target (no target.json); run `deepstack fs mkfs`")
        else:
            if crc_block % ALIGN or crc_block <= 0:
                raise InvalidArgument(f"crc_block must be a positive multiple of {ALIGN}, got {crc_block}")
            os.makedirs(os.path.join(self.root, "data"), exist_ok=True)
            info = {"format": FORMAT, "target_id": target_id or os.path.basename(self.root), "crc_block": crc_block}
            tmp = info_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(info, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, info_path)
        self._data_root = os.path.join(self.root, "data")
        self.target_id: str = info["target_id"]
        self.crc_block: int = info["crc_block"]
        self.sync = sync
        self.capacity_bytes = capacity_bytes
        self._db_lock = threading.Lock()
        self._db = sqlite3.connect(os.path.join(self.root, "chunks.db"), isolation_level=None,
                                   check_same_thread=False, timeout=30.0)
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        if not read_only:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS chunks (id TEXT PRIMARY KEY, chain_ver INTEGER NOT NULL,"
                " ver INTEGER, len INTEGER, crc INTEGER, pcrc BLOB,"
                " pver INTEGER, plen INTEGER, pcrc_whole INTEGER, ppcrc BLOB)")
        self._meta: dict[str, ChunkMeta] = {}
        self._complete = False  # whether _meta holds every row (else misses go to chunks.db)
        self._data_version = None
        self._locks = [threading.Lock() for _ in range(256)]
        # Bumped whenever a cached committed version may change (commit, removal, row re-read, cache drop):
        # the array read path (array_read.py) keeps per-file chunk tables valid for one generation.
        self.generation = 0
        # Called (no arguments) when versions are retired or the cache is dropped: holders of version fds
        # (the array read path's chunk tables) give stale ones back, so removed files free their space.
        self.retire_hooks: list = []
        # Called as hook(chunk id, or None for every chunk), under the metadata lock, whenever a chunk's
        # committed version may have changed, before the change is acknowledged to anyone: the storage
        # service's short-circuit page (short_circuit.py) tells same-host clients holding fds to re-check.
        self.change_hooks: list = []
        self._meta_lock = threading.RLock()
        self._reserved = 0
        self._fds = _FdCache()
        self._tls = threading.local()
        self.direct_io = bool(direct_io and O_DIRECT)
        self.fallback_reason: str | None = None if direct_io else "disabled by caller"
        if self.direct_io:
            self._probe_direct_io()
        self._lock_fd = self._open_lock()
        gc = self._lock_fd is not None and not read_only and self._try_exclusive()
        try:
            self._load(gc=gc)
        finally:
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_SH)  # from exclusive (after GC) or first take

    # ------------------------------------------------------------------ setup
    def _open_lock(self) -> int | None:
        """The lifetime lock file. flock (not fcntl/lockf) locks belong to the open file, so two engines in one
        process exclude each other too, and a forked child sharing the engine keeps the parent's hold."""
        path = os.path.join(self.root, "engine.lock")
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            if not self.read_only:
                raise
        try:  # a read-only engine on a read-only directory: lock if the file exists, else go without
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None

    def _try_exclusive(self) -> bool:
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _probe_direct_io(self) -> None:
        if self.read_only:  # writes nothing: try an O_DIRECT read of target.json instead
            try:
                fd = os.open(os.path.join(self.root, "target.json"), os.O_RDONLY | O_DIRECT)
                try:
                    os.preadv(fd, [aligned_buffer(ALIGN)], 0)
                finally:
                    os.close(fd)
            except OSError as e:
                self.direct_io = False
                self.fallback_reason = f"O_DIRECT refused by the file system under {self.root}: {e.strerror}"
            return
        probe = os.path.join(self.root, "data", f".odirect_probe.{os.getpid()}.{id(self)}")
        try:
            fd = os.open(probe, os.O_CREAT | os.O_RDWR | O_DIRECT, 0o600)
            try:
                buf = aligned_buffer(ALIGN)
                os.pwrite(fd, buf, 0)
                os.preadv(fd, [buf], 0)
            finally:
                os.close(fd)
        except OSError as e:
            self.direct_io = False
            self.fallback_reason = f"O_DIRECT refused by the file system under {self.root}: {e.strerror}"
            log.warning("chunk engine %s: %s; using buffered I/O with fdatasync", self.target_id,
                        self.fallback_reason)
        finally:
            try:
                os.unlink(probe)
            except FileNotFoundError:
                pass

    _COLUMNS = "id, chain_ver, ver, len, crc, pcrc, pver, plen, pcrc_whole, ppcrc"

    @staticmethod
    def _from_row(row) -> ChunkMeta:
        cid, chain_ver, ver, ln, crc, pcrc, pver, plen, pcrcw, ppcrc = row
        m = ChunkMeta(cid, chain_ver=chain_ver)
        if ver is not None:
            m.committed = Version(ver, ln, crc, bytes(pcrc))
        if pver is not None:
            m.pending = Version(pver, plen, pcrcw, bytes(ppcrc))
        return m

    def _load_all(self) -> None:
        with self._db_lock:
            self._data_version = self._db.execute("PRAGMA data_version").fetchone()[0]
            rows = self._db.execute(f"SELECT {self._COLUMNS} FROM chunks").fetchall()
        with self._meta_lock:
            self._meta = {row[0]: self._from_row(row) for row in rows}
            self._changed(None)
            self._complete = True

    def _load(self, gc: bool) -> None:
        started = time.time()
        self._load_all()
        if not gc:
            return
        referenced = set()
        for cid, m in self._meta.items():
            for v in (m.committed, m.pending):
                if v is not None:
                    referenced.add(self._data_path(cid, v.ver))
        # Files written before a crash but never recorded are garbage of an unfinished copy-on-write update.
        # Only called with the exclusive lock (no other engine open); the age check is a second guard.
        data = os.path.join(self.root, "data")
        for sub in os.listdir(data):
            d = os.path.join(data, sub)
            if not os.path.isdir(d):
                continue
            for name in os.listdir(d):
                p = os.path.join(d, name)
                if p in referenced:
                    continue
                try:
                    if os.stat(p).st_mtime <= started:
                        os.unlink(p)
                except FileNotFoundError:
                    pass

    def _fetch(self, cid: str) -> ChunkMeta | None:
        """Re-read one chunk's row from chunks.db (another process may have changed it) into the cache."""
        with self._db_lock:
            row = self._db.execute(f"SELECT {self._COLUMNS} FROM chunks WHERE id = ?", (cid,)).fetchone()
        with self._meta_lock:
            old = self._meta.get(cid)
            if row is None:
                self._meta.pop(cid, None)
                if old is not None and old.committed is not None:
                    self._changed(cid)
                return None
            m = self._meta[cid] = self._from_row(row)
            if old is not None and old.committed != m.committed:
                self._changed(cid)
            return m

    def _cached(self, cid: str) -> ChunkMeta | None:
        m = self._meta.get(cid)
        if m is None and not self._complete:
            m = self._fetch(cid)
        return m

    def revalidate(self) -> bool:
        """Drop the chunk cache (and the open version files) if another process committed to chunks.db since
        the last check; chunks are then re-read from chunks.db on first use. Returns whether it did."""
        with self._db_lock:
            dv = self._db.execute("PRAGMA data_version").fetchone()[0]
            if dv == self._data_version:
                return False
            self._data_version = dv
        with self._meta_lock:
            self._meta = {}
            self._complete = False
            self._changed(None)
        self._fds.close()  # in-flight reads keep their descriptors until they release them
        for hook in self.retire_hooks:
            hook()
        return True

    def _changed(self, cid: str | None) -> None:
        """A committed version changed (caller holds _meta_lock): new generation, tell the hooks."""
        self.generation += 1
        for hook in self.change_hooks:
            hook(cid)

    def _data_path(self, cid: str, ver: int) -> str:
        return f"{self._data_root}/{cid[-2:]}/{cid}.v{ver}"

    def _lock_for(self, cid: str) -> threading.Lock:
        return self._locks[hash(cid) & 255]

    def chunk_lock(self, cid: str) -> threading.Lock:
        """The per-chunk lock; CRAQ forwarding and resync hold it across a whole update."""
        return self._lock_for(cid)

    # ------------------------------------------------------------------ metadata
    def meta(self, cid: str) -> ChunkMeta | None:
        return self._cached(cid)

    def list_chunks(self) -> dict[str, ChunkMeta]:
        if not self._complete:
            self._load_all()
        with self._meta_lock:
            return dict(self._meta)

    def used_bytes(self) -> int:
        if not self._complete:
            self._load_all()
        return sum(align_up(m.committed.length) for m in list(self._meta.values()) if m.committed)

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnly(f"target {self.target_id} at {self.root} was opened read-only")

    def _write_row(self, m: ChunkMeta) -> None:
        c, p = m.committed, m.pending
        if c is None and p is None:
            self._db.execute("DELETE FROM chunks WHERE id = ?", (m.chunk_id,))
        else:
            self._db.execute(
                "INSERT OR REPLACE INTO chunks VALUES (?,?,?,?,?,?,?,?,?,?)",
                (m.chunk_id, m.chain_ver,
                 c.ver if c else None, c.length if c else None, c.crc if c else None, c.page_crcs if c else None,
                 p.ver if p else None, p.length if p else None, p.crc if p else None, p.page_crcs if p else None))

    def _persist(self, m: ChunkMeta) -> None:
        with self._db_lock:
            self._write_row(m)

    def _swap(self, m: ChunkMeta, *, only_if=None) -> set[int] | None:
        """Replace the chunk's row in one transaction; returns the versions the replaced row referenced
        (read inside the transaction, so a commit by another process in between is retired too).
        only_if(replaced row as a ChunkMeta): replace it only where this holds, else change nothing, return None."""
        with self._db_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(f"SELECT {self._COLUMNS} FROM chunks WHERE id = ?",
                                       (m.chunk_id,)).fetchone()
                old = self._from_row(row) if row is not None else ChunkMeta(m.chunk_id)
                if only_if is not None and not only_if(old):
                    self._db.execute("ROLLBACK")
                    return None
                self._write_row(m)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            # Our own commit does not move data_version; another process's commit before ours did, but its row
            # is now replaced by ours, so nothing cached is stale on its account.
        return {v.ver for v in (old.committed, old.pending) if v is not None}

    # ------------------------------------------------------------------ read path
    def _bounce(self, size: int) -> mmap.mmap:
        buf = getattr(self._tls, "buf", None)
        if buf is None or len(buf) < size:
            buf = self._tls.buf = aligned_buffer(max(size, 1 << 20))
        return buf

    def read(self, cid: str, offset: int, length: int, dest: memoryview | None = None, *,
             version: Version | None = None) -> tuple[int, memoryview | bytes]:
        """Read committed bytes [offset, offset+length) of a chunk, verified against the page CRCs.

        Returns (n, data): n <= length bytes exist (0 for an absent chunk: a hole). With `dest` (a writable
        byte memoryview of at least `length`), data lands there and `data` is `dest[:n]`."""
        if offset < 0 or length < 0:
            raise InvalidArgument(f"offset and length must be >= 0, got {offset}, {length}")
        failed = None  # the version whose read failed last
        for _ in range(8):
            if version is not None:
                v = version
            else:
                m = self._cached(cid)
                v = m.committed if m is not None else None
            if v is None or offset >= v.length or length == 0:
                return 0, (dest[:0] if dest is not None else b"")
            n = min(length, v.length - offset)
            try:
                return n, self._read_version(cid, v, offset, n, dest)
            except (FileNotFoundError, ChunkCorrupt):
                # A commit (here or in another process) retired this version, or our cached row is older than
                # the file under its name: re-read the row and try again while it names a newer version. A
                # real corruption (or a lost file) fails again on the same version and is raised.
                if version is not None or failed == v:
                    raise
                failed = v
                self._fds.forget(self._data_path(cid, v.ver))
                self._fetch(cid)
        raise StorageError(f"chunk {cid} on {self.target_id}: kept changing during read")

    def _read_version(self, cid: str, v: Version, offset: int, n: int, dest: memoryview | None):
        blk = self.crc_block
        a0 = offset // blk * blk
        a1 = min(align_up(offset + n, blk), align_up(v.length))
        flags = os.O_RDONLY | (O_DIRECT if self.direct_io else 0)
        h = self._fds.acquire(self._data_path(cid, v.ver), flags)
        try:
            direct_into_dest = (dest is not None and offset == a0 and n == a1 - a0
                                and buffer_address(dest) % ALIGN == 0)
            if direct_into_dest:
                buf = dest[:n]
                got = os.preadv(h.fd, [buf], a0)
            else:
                bounce = self._bounce(a1 - a0)
                buf = memoryview(bounce)[:a1 - a0]
                got = os.preadv(h.fd, [buf], a0)
        finally:
            self._fds.release(h)
        if got < min(a1, v.length) - a0:
            raise ChunkCorrupt(f"chunk {cid} v{v.ver} on {self.target_id}: short file ({got} bytes at {a0})")
        # Verify every CRC block the read touched.
        for i, pos in enumerate(range(a0, a1, blk)):
            end = min(pos + blk, v.length) - a0
            if crc32c(buf[pos - a0:end]) != v.page_crc(a0 // blk + i):
                raise ChunkCorrupt(f"chunk {cid} v{v.ver} on target {self.target_id}: CRC32C mismatch in "
                                   f"block {a0 // blk + i}")
        if direct_into_dest:
            return dest[:n]
        src = buf[offset - a0:offset - a0 + n]
        if dest is not None:
            dest[:n] = src
            return dest[:n]
        return bytes(src)

    def read_many(self, reads) -> None:
        """Serve a batch of reads (objects with chunk, offset, length, dest; sets .n or .error) at once."""
        session = self.read_session(sum(r.length for r in reads), len(reads))
        session.add(reads)
        session.finish()

    def read_session(self, max_bytes: int, max_reads: int) -> "ReadSession":
        """A batch whose reads are added in waves (each submitted at once) and completed by finish()."""
        return ReadSession(self, max_bytes, max_reads)

    def read_full(self, cid: str, *, pending: bool = False) -> tuple[Version | None, bytes]:
        m = self._cached(cid)
        v = None if m is None else (m.pending if pending else m.committed)
        if v is None:
            return None, b""
        _, data = self.read(cid, 0, v.length, version=v)
        return v, bytes(data)

    def verify(self, cid: str) -> bool:
        """Re-read the whole committed chunk and check both its page CRCs and its whole-chunk CRC."""
        m = self._cached(cid)
        if m is None or m.committed is None:
            return True
        try:
            _, data = self.read(cid, 0, m.committed.length, version=m.committed)
        except (ChunkCorrupt, FileNotFoundError):
            return False
        return crc32c(data) == m.committed.crc

    # ------------------------------------------------------------------ write path
    def _write_file(self, path: str, data, exclusive: bool = False) -> None:
        self._check_writable()
        mv = memoryview(data).cast("B")
        need = align_up(len(mv))
        if self.capacity_bytes is not None:
            with self._meta_lock:  # reserve, so concurrent writers cannot overshoot together
                if self.used_bytes() + self._reserved + need > self.capacity_bytes:
                    raise NoSpace(f"target {self.target_id}: no space left ({self.capacity_bytes} bytes capacity)")
                self._reserved += need
        try:
            self._write_file_unchecked(path, mv, exclusive)
        finally:
            if self.capacity_bytes is not None:
                with self._meta_lock:
                    self._reserved -= need

    def _write_file_unchecked(self, path: str, mv: memoryview, exclusive: bool = False) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # exclusive: the name may belong to another process's version; never write into (or unlink) it.
        tmp_flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
        try:
            if self.direct_io:
                buf = aligned_buffer(len(mv))
                buf[:len(mv)] = mv
                fd = os.open(path, tmp_flags | O_DIRECT, 0o600)
                try:
                    if len(mv):
                        os.pwrite(fd, memoryview(buf)[:align_up(len(mv))], 0)
                    if self.sync:
                        os.fdatasync(fd)
                finally:
                    os.close(fd)
                    buf.close()
            else:
                fd = os.open(path, tmp_flags, 0o600)
                try:
                    os.pwrite(fd, mv, 0)
                    if self.sync:
                        os.fdatasync(fd)
                finally:
                    os.close(fd)
        except FileExistsError:
            raise
        except OSError as e:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"target {self.target_id}: disk full writing {os.path.basename(path)}") from e
            raise

    def _make_version(self, ver: int, data) -> Version:
        mv = memoryview(data).cast("B")
        return Version(ver, len(mv), crc32c(mv), page_crcs_of(mv, self.crc_block))

    def patched(self, cid: str, offset: int, data, chunk_size: int) -> bytearray:
        """New full content of a chunk: the committed bytes with `data` written at `offset`
        (the read-modify-write step of a CRAQ update; zero-fills a gap)."""
        m = self._cached(cid)
        return self._patch(cid, m.committed if m else None, offset, data, chunk_size)

    def _patch(self, cid: str, base: Version | None, offset: int, data, chunk_size: int) -> bytearray:
        """The bytes of version `base` (None: an absent chunk) with `data` written at `offset`."""
        mv = memoryview(data).cast("B")
        if offset < 0 or offset + len(mv) > chunk_size:
            raise InvalidArgument(f"write [{offset}, {offset + len(mv)}) outside chunk of {chunk_size} bytes")
        old_len = base.length if base else 0
        if offset == 0 and len(mv) >= old_len:
            return bytearray(mv)
        old = bytes(self.read(cid, 0, old_len, version=base)[1]) if old_len else b""
        new = bytearray(max(old_len, offset + len(mv)))
        new[:old_len] = old
        new[offset:offset + len(mv)] = mv
        return new

    def write_pending(self, cid: str, ver: int, content, chain_ver: int = 0) -> Version:
        """Store `content` as pending version `ver` (replacing any older pending one). Caller holds the lock."""
        self._check_writable()
        validate_chunk_id(cid)
        v = self._make_version(ver, content)
        path = self._data_path(cid, ver)
        self._write_file(path, content)
        with self._meta_lock:
            m = self._meta.get(cid) or ChunkMeta(cid)
            old_pending = m.pending
            m = ChunkMeta(cid, m.committed, v, max(chain_ver, m.chain_ver))
            self._persist(m)
            self._meta[cid] = m
            self.generation += 1
        if old_pending is not None and old_pending.ver != ver and (m.committed is None
                                                                   or old_pending.ver != m.committed.ver):
            self._remove_file(cid, old_pending.ver)
        return v

    def commit(self, cid: str, ver: int) -> None:
        """Pending version `ver` becomes committed; the old committed file is retired."""
        self._check_writable()
        with self._meta_lock:
            m = self._meta.get(cid)
            if m is None or m.pending is None or m.pending.ver != ver:
                if m is not None and m.committed is not None and m.committed.ver == ver:
                    return  # already committed (a repeated ack)
                raise NotFound(f"chunk {cid} on {self.target_id}: no pending version {ver} to commit")
            old = m.committed
            m = ChunkMeta(cid, m.pending, None, m.chain_ver)
            self._persist(m)
            self._meta[cid] = m
            self._changed(cid)
        if old is not None and old.ver != ver:
            self._remove_file(cid, old.ver)

    def put_committed(self, cid: str, ver: int, content, chain_ver: int = 0) -> Version:
        """Write and commit in one step (embedded mode, resync and repair). Caller holds the chunk lock."""
        validate_chunk_id(cid)
        v = self._make_version(ver, content)
        self._write_file(self._data_path(cid, ver), content)
        return self._commit_new(cid, v, chain_ver)

    def _commit_new(self, cid: str, v: Version, chain_ver: int, only_if=None) -> Version | None:
        """Make `v` (its file written) the committed version; with only_if (see _swap), None where it refused."""
        with self._meta_lock:
            m = self._meta.get(cid) or ChunkMeta(cid)
            m = ChunkMeta(cid, v, None, max(chain_ver, m.chain_ver))
            old = self._swap(m, only_if=only_if)
            if old is None:
                return None
            self._meta[cid] = m
            self._changed(cid)
        for x in old - {v.ver}:
            self._remove_file(cid, x)
        return v

    def update(self, cid: str, offset: int, data, chunk_size: int) -> Version:
        """Local copy-on-write update (no replication): patch, write new version, commit.

        Other processes may update the same chunk at once (the per-chunk lock orders this engine's threads
        only). The row is re-read first; the version file is created exclusively (O_EXCL), so no two updates
        share a file or a version number; and the commit is a compare-and-swap inside the row swap's SQLite
        transaction (no extra one). It goes through only while the row's committed version is still the one
        that was patched, or the update replaces all of the row's committed bytes (offset 0, at least its
        length: re-patching would write the same bytes), and while the new version is above every version the
        row names (versions only count up). Else another process committed in between: the update removes its
        version file, re-reads, re-patches and tries again (backing off from the second try on). After
        UPDATE_ATTEMPTS tries it raises Conflict, having changed nothing."""
        self._check_writable()
        validate_chunk_id(cid)
        mv = memoryview(data).cast("B")
        failed = None  # the version whose read failed last
        delay = 0.0005
        with self._lock_for(cid):
            for attempt in range(UPDATE_ATTEMPTS):
                if attempt > 1:
                    time.sleep(delay * (1 + random.random()))
                    delay = min(delay * 2, 0.01)
                m = self._fetch(cid)
                base = m.committed if m is not None else None
                try:
                    content = self._patch(cid, base, offset, mv, chunk_size)
                except (FileNotFoundError, ChunkCorrupt):
                    # Retired by another process's commit after our fetch: read the new row. The same version
                    # failing twice is a lost or corrupt file.
                    if failed is not None and failed == base:
                        raise
                    failed = base
                    continue
                v = self._make_version(next_version(m), content)
                for _ in range(64):
                    try:
                        self._write_file(self._data_path(cid, v.ver), content, exclusive=True)
                        break
                    except FileExistsError:  # another process's version (in flight or just committed)
                        v = Version(v.ver + 1, v.length, v.crc, v.page_crcs)
                else:
                    raise StorageError(f"chunk {cid} on {self.target_id}: no free version number")
                covers = offset == 0 and len(mv) >= (base.length if base else 0)  # content is `data` alone

                def unchanged(row: ChunkMeta, base=base, v=v, covers=covers) -> bool:
                    cur = row.committed
                    return v.ver >= next_version(row) and (
                        cur == base or (covers and (cur is None or cur.length <= v.length)))
                done = self._commit_new(cid, v, 0, only_if=unchanged)
                if done is not None:
                    return done
                try:  # lost to another process's commit; no row ever named this file
                    os.unlink(self._data_path(cid, v.ver))
                except FileNotFoundError:
                    pass
        raise Conflict(f"chunk {cid} on {self.target_id}: update lost to other processes' commits "
                       f"{UPDATE_ATTEMPTS} times in a row; nothing written")

    def remove(self, cid: str) -> bool:
        self._check_writable()
        with self._lock_for(cid):
            with self._meta_lock:
                self._meta.pop(cid, None)
                old = self._swap(ChunkMeta(cid))
                self._changed(cid)
            for ver in old:
                self._remove_file(cid, ver)
            return bool(old)

    def remove_version(self, cid: str, ver: int) -> bool:
        """Remove the chunk only while `ver` is its committed version (or, with none committed, its pending one);
        returns whether it did. A version written since (here or by another process) stays: the check and the
        removal are one SQLite transaction."""
        self._check_writable()
        validate_chunk_id(cid)

        def holds_ver(m: ChunkMeta) -> bool:
            current = m.committed or m.pending
            return current is not None and current.ver == ver
        with self._lock_for(cid):
            with self._meta_lock:
                old = self._swap(ChunkMeta(cid), only_if=holds_ver)
                if old is None:
                    return False
                self._meta.pop(cid, None)
                self._changed(cid)
            for v in old:
                self._remove_file(cid, v)
            return True

    def _remove_file(self, cid: str, ver: int) -> None:
        path = self._data_path(cid, ver)
        for hook in self.retire_hooks:
            hook()
        self._fds.forget(path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self._fds.close()
        with self._db_lock:
            self._db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the shared lock (unless a forked child still holds the file)
            self._lock_fd = None


class ReadSession:
    """Batched reads of one chunk engine.

    With the C helper each `add()` packs its reads into I/O records and submits them right away (io_uring, or
    native AIO), so the kernel works on one wave while Python prepares the next; `finish()` waits for all,
    then checks every block's CRC32C (computed in C) and fills in `.n` / `.error`. Aligned reads into aligned
    buffers land in place; the others go through one bounce arena sized from `max_bytes`. Without the helper
    each read is one preadv."""

    def __init__(self, engine: ChunkEngine, max_bytes: int, max_reads: int):
        self.e = engine
        self.lib = fastio.load()
        self.waves: list[tuple] = []
        self.handles: list[_Handle] = []
        self.slow: list = []
        if self.lib is None:
            return
        self.pipe = fastio.Pipeline()
        blk = engine.crc_block
        self.arena_size = max_bytes + 2 * blk * max_reads
        self.arena_addr = 0
        self.bpos = 0

    def add(self, reads) -> None:
        e = self.e
        if not reads:
            return
        if self.lib is None:
            for r in reads:
                try:
                    r.n, _ = e.read(r.chunk, r.offset, r.length, r.dest)
                except BaseException as exc:  # noqa: BLE001 - reported per read
                    r.error = exc
            return
        blk = e.crc_block
        flags = os.O_RDONLY | (O_DIRECT if e.direct_io else 0)
        meta, fds, rec = e._meta, e._fds, fastio.IO_STRUCT
        pack, size = rec.pack_into, rec.size
        ios = bytearray(size * len(reads))
        crcs = bytearray(4 * sum(r.length // blk + 2 for r in reads))
        crc_addr = buffer_address(memoryview(crcs))
        todo, exp, handles = [], [], self.handles
        crc_total = 0
        data_root = e._data_root
        with fds.lock:  # one lock round for the whole wave's file handles
            for r in reads:
                m = meta.get(r.chunk)
                if m is None and not e._complete:  # not cached: the slow path re-reads the row
                    self.slow.append(r)
                    continue
                v = m.committed if m is not None else None
                off = r.offset
                if v is None or off >= v.length or r.length <= 0:
                    r.n = 0
                    continue
                vlen = v.length
                n = r.length if r.length < vlen - off else vlen - off
                a0 = off - off % blk
                a1 = -(-(off + n) // blk) * blk
                end_file = -(-vlen // ALIGN) * ALIGN
                if a1 > end_file:
                    a1 = end_file
                path = f"{data_root}/{r.chunk[-2:]}/{r.chunk}.v{v.ver}"
                h = fds.items.get(path)
                if h is None:
                    try:
                        h = fds.open_locked(path, flags)
                    except FileNotFoundError:  # retired by a concurrent commit: the retrying path handles it
                        self.slow.append(r)
                        continue
                h.refs += 1
                handles.append(h)
                valid = (a1 if a1 < vlen else vlen) - a0
                ncrc = -(-valid // blk)
                dest_addr = buffer_address(r.dest)
                k = len(todo)
                if off == a0 and n == a1 - a0 and dest_addr % ALIGN == 0:
                    pack(ios, k * size, h.fd, a0, a1 - a0, dest_addr, valid, blk, crc_addr + 4 * crc_total,
                         0, 0, 0, 0)
                else:
                    if not self.arena_addr:
                        self.arena_addr = buffer_address(memoryview(e._bounce(self.arena_size)))
                    if self.bpos + (a1 - a0) > self.arena_size:
                        raise InvalidArgument("read session exceeded the size it was opened for")
                    pack(ios, k * size, h.fd, a0, a1 - a0, self.arena_addr + self.bpos, valid, blk,
                         crc_addr + 4 * crc_total, dest_addr, off - a0, n, 0)
                    self.bpos += a1 - a0
                first = a0 // blk
                exp.append(v.page_crcs[4 * first:4 * (first + ncrc)])
                todo.append((r, n, valid, crc_total, ncrc))
                crc_total += ncrc
        if todo:
            self.waves.append((ios, crcs, exp, todo, crc_total))
            try:
                self.pipe.submit(ios, 0, len(todo))
            except BaseException:
                self.finish()
                raise

    def finish(self) -> None:
        e = self.e
        try:
            if self.lib is not None:
                self.pipe.reap()  # never give buffers or handles back while reads are in flight
        finally:
            if self.handles:
                e._fds.release_many(self.handles)
                self.handles = []
        for r in self.slow:
            try:
                r.n, _ = e.read(r.chunk, r.offset, r.length, r.dest)
            except BaseException as exc:  # noqa: BLE001 - reported per read
                r.error = exc
        self.slow = []
        for ios, crcs, exp, todo, crc_total in self.waves:
            expected = b"".join(exp)
            all_ok = crcs[:4 * crc_total] == expected
            for k, (r, n, valid, coff, ncrc) in enumerate(todo):
                res = fastio.result_of(ios, k)
                if res < 0:
                    r.error = OSError(-res, f"read of chunk {r.chunk} on {e.target_id}: {os.strerror(-res)}")
                elif res < valid or (not all_ok and
                                     crcs[4 * coff:4 * (coff + ncrc)] != expected[4 * coff:4 * (coff + ncrc)]):
                    # Short or mismatching: our cached row may be older than the file under its name (another
                    # process replaced the chunk). The single-read path re-reads the row, retries once and
                    # reports ChunkCorrupt if it fails again.
                    try:
                        r.n, _ = e.read(r.chunk, r.offset, r.length, r.dest)
                    except BaseException as exc:  # noqa: BLE001 - reported per read
                        r.error = exc
                else:
                    r.n = n
        self.waves = []
