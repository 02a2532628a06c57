"""The client half of short-circuit local reads (see short_circuit.py for the protocol and the guarantees).

`ShortCircuitReader.read` serves a batch the way embedded reads do (one `ds_table_read` call: plan, read
through io_uring, check every block's CRC32C), with chunk tables whose fds come from same-host storage
services, then validates every request against the services' shared pages. Whatever it does not serve comes
back as SLOW and goes through the RPC path.
"""
from __future__ import annotations

import ctypes
import logging
import os
import threading
import time

import numpy as np

from torch_deepstack.storage.array_read import MAX_OPEN, MAX_TABLE_BYTES, SLOW, read_tables
from torch_deepstack.storage.array_read import _Table as _CTable
from torch_deepstack.storage.errors import StorageError
from torch_deepstack.storage.paths import chunk_id
from torch_deepstack.storage.short_circuit import MAX_CHUNKS, MAX_REPLY_CRC_BYTES, Session, machine_id

log = logging.getLogger("torch_deepstack.storage.short_circuit")

CRC_BLOCK = 4096
NOT_HERE = -3  # chunk fd value: no local serving replica handed it out (the RPC path reads it)


class _SCTable:
    """One file's chunks as the C planner sees them (strict mode), plus per chunk where its fd came from
    (session, target index, generation slot and the generation granted with it)."""

    def __init__(self, inode: dict, epoch: int):
        self.ino_id, self.length, self.chunk_size = inode["id"], inode["length"], inode["chunk_size"]
        self.chains = list(inode["chains"])
        self.epoch = epoch
        cs = self.chunk_size
        self.nchunks = -(-self.length // cs)
        self.stride = -(-cs // CRC_BLOCK)
        if self.nchunks * (self.stride * 4 + 48) > MAX_TABLE_BYTES:
            self.nchunks = 0  # C sends every request to the RPC path
        n = self.nchunks
        self.fd = np.full(n, -1, np.int64)
        self.vlen = np.zeros(n, np.int64)
        self.crcs = np.zeros((n, self.stride), np.uint32)
        self.sess = np.full(n, -1, np.int64)
        self.tk = np.zeros(n, np.int64)
        self.gidx = np.zeros(n, np.int64)
        self.gen = np.zeros(n, np.uint64)
        self.sessions: list[Session] = []
        # (session index, target index) -> the target generation all of this table's grants from it were
        # valid at, or None when they were made at different ones (then chunks are checked one by one)
        self.bases: dict[tuple[int, int], int | None] = {}
        self.owned: list[int] = []
        self.lock = threading.Lock()
        self.users = 0
        self.retired = False
        self.struct = _CTable(self.length, cs, CRC_BLOCK, n, self.stride, self.fd.ctypes.data,
                              self.vlen.ctypes.data, self.crcs.ctypes.data, 1)
        self.address = ctypes.addressof(self.struct)
        self.ptrs = np.array([self.address], np.uint64)  # the table list of a one-file batch
        self.ptrs_address = self.ptrs.ctypes.data

    def session_index(self, s: Session) -> int:
        for i, x in enumerate(self.sessions):
            if x is s:
                return i
        self.sessions.append(s)
        return len(self.sessions) - 1

    def release(self) -> None:
        fds, self.owned = self.owned, []
        for fd in fds:
            os.close(fd)

    def note_grant(self, si: int, tk: int, glob: int) -> None:  # caller holds self.lock
        key = (si, tk)
        if key not in self.bases:
            self.bases[key] = glob
        elif self.bases[key] != glob:
            self.bases[key] = None

    def stale(self):
        """After a batch's I/O: None when every chunk loaded here is still what its service granted (its
        session alive, its target within its serving time, its generation unchanged); True when nothing here
        can be trusted; else a bool array of the chunks that changed."""
        with self.lock:
            pairs = list(self.bases.items())
            untils = [float(self.sessions[si].until[tk]) for (si, tk), _ in pairs]  # read before the clock
            now = time.monotonic()
            bad = None
            for ((si, tk), base), until in zip(pairs, untils):
                s = self.sessions[si]
                if until <= now or not s.alive():
                    return True
                cur = int(s.glob[tk])
                if cur == base:  # nothing on that target changed since the grants: no per-chunk check
                    continue
                idx = np.flatnonzero((self.sess == si) & (self.tk == tk) & (self.fd >= 0))
                changed = s.gens[self.gidx[idx]] != self.gen[idx]
                if changed.any():
                    if bad is None:
                        bad = np.zeros(self.nchunks, bool)
                    bad[idx[changed]] = True
                else:
                    self.bases[(si, tk)] = cur  # read before the slots: valid from here on
            return bad


class ShortCircuitReader:
    """Per-ClusterBackend state: sessions with same-host services, chunk tables, counters. Thread-safe."""

    def __init__(self, backend, secret: bytes, spin_us: int | None = None):
        self.backend, self.secret, self.spin_us = backend, secret, spin_us
        self.sessions: dict[str, Session] = {}  # service address -> session
        self.refused: dict[str, float] = {}  # service address -> no new attempt before this monotonic time
        self.tables: dict[int, _SCTable] = {}
        self.lock = threading.Lock()
        self.slock = threading.Lock()
        self.epoch = 0
        self.open_fds = 0
        self.pid = os.getpid()
        self.served = 0  # requests (or chunk pieces of them) completed here (read and validated)
        self.passed = 0  # requests handed to the RPC path

    # ------------------------------------------------------------------ state
    def routing_changed(self) -> None:
        """The client's routing table changed: rebuild tables (a replica may have left or joined)."""
        with self.lock:
            self.epoch += 1

    def _after_fork(self) -> None:
        """A forked child (DataLoader worker) must not talk on its parent's sockets: start afresh."""
        for s in self.sessions.values():
            s.close()
        for t in self.tables.values():
            t.release()
        self.sessions, self.refused, self.tables = {}, {}, {}
        self.lock, self.slock = threading.Lock(), threading.Lock()
        self.open_fds = 0
        self.pid = os.getpid()

    def _session(self, tid: str, now: float) -> Session | None:
        addr = self.backend.routing.get("addresses", {}).get(tid)
        if not addr:
            return None
        with self.slock:
            s = self.sessions.get(addr)
            if s is not None:
                if s.alive():
                    return s
                del self.sessions[addr]
                s.close()
                self.refused[addr] = now + 0.2  # the service restarts or is gone: ask again shortly
            if self.refused.get(addr, 0.0) > now:
                return None
            if addr.rsplit(":", 1)[0] not in self.backend._local:
                self.refused[addr] = float("inf")
                return None
            try:
                info, _ = self.backend._clients.get(addr).call("short_circuit", {}, timeout=2.0)
                if info.get("machine") != machine_id():
                    self.refused[addr] = now + 60.0
                    return None
                s = Session(info["socket"], self.secret)
            except (StorageError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                log.info("short-circuit reads from %s unavailable: %s", addr, e)
                self.refused[addr] = now + 5.0
                return None
            self.sessions[addr] = s
            return s

    def _table(self, inode: dict) -> _SCTable:
        with self.lock:
            t = self.tables.get(inode["id"])
            if t is not None and (t.epoch != self.epoch or t.length != inode["length"]
                                  or t.chunk_size != inode["chunk_size"] or t.chains != inode["chains"]):
                self._retire(t)
                t = None
            if t is None:
                if self.open_fds > MAX_OPEN:
                    for old in list(self.tables.values()):
                        self._retire(old)
                t = self.tables[inode["id"]] = _SCTable(inode, self.epoch)
            t.users += 1
            return t

    def _retire(self, t: _SCTable) -> None:  # caller holds self.lock
        if self.tables.get(t.ino_id) is t:
            del self.tables[t.ino_id]
        if not t.retired:
            t.retired = True
            self.open_fds -= len(t.owned)
        if t.users == 0:
            t.release()

    def _done(self, t: _SCTable) -> None:
        with self.lock:
            t.users -= 1
            if t.retired and t.users == 0:
                t.release()

    # ------------------------------------------------------------------ loading
    def _load(self, t: _SCTable, chunks) -> None:
        """Ask same-host services for the fds of these chunks (not yet loaded ones)."""
        b = self.backend
        now = time.monotonic()
        added = 0
        with t.lock:
            groups: dict = {}
            for idx in chunks:
                idx = int(idx)
                if idx < 0 or idx >= t.nchunks or t.fd[idx] != -1:
                    continue
                cid = chunk_id(t.ino_id, idx)
                try:
                    reps = b._replicas(t.chains[idx % len(t.chains)], cid, set())
                except KeyError:
                    reps = []
                chosen = None
                for tid in reps:  # serving replicas, nearest and least recently failed first
                    if now - b._failed.get(tid, -1e9) < 5.0:
                        continue
                    s = self._session(tid, now)
                    k = s.tindex.get(tid) if s is not None else None
                    if k is not None and s.until[k] > now:
                        chosen = (s, tid)
                        break
                if chosen is None:
                    t.fd[idx] = NOT_HERE
                else:
                    groups.setdefault(chosen, []).append(idx)
            per = max(1, min(MAX_CHUNKS, MAX_REPLY_CRC_BYTES // (4 * t.stride)))
            for (s, tid), idxs in groups.items():
                si, k = t.session_index(s), s.tindex[tid]
                for i in range(0, len(idxs), per):
                    part = idxs[i:i + per]
                    try:
                        got = s.open(tid, [chunk_id(t.ino_id, j) for j in part])
                    except StorageError as e:
                        log.info("short-circuit open on %s failed: %s", tid, e)
                        got = [None] * len(part)
                    for j, g in zip(part, got):
                        if g is None:
                            t.fd[j] = NOT_HERE
                            continue
                        ver, length, slot, gen, blk, crcs, fd, glob = g
                        t.owned.append(fd)
                        added += 1
                        if blk != CRC_BLOCK or len(crcs) > 4 * t.stride or length > t.chunk_size:
                            t.fd[j] = NOT_HERE
                            continue
                        t.crcs[j, :len(crcs) // 4] = np.frombuffer(crcs, "<u4")
                        t.vlen[j] = length
                        t.sess[j], t.tk[j], t.gidx[j], t.gen[j] = si, k, k * s.nslots + slot, gen
                        t.note_grant(si, k, glob)
                        t.fd[j] = fd  # last: a loaded fd means the row above is complete
        with self.lock:
            if t.retired:
                return  # its fds are counted nowhere; they close with the table
            self.open_fds += added

    # ------------------------------------------------------------------ reads
    def read(self, inodes: list[dict], req: np.ndarray, out: int, out_size: int,
             crcs: np.ndarray | None = None) -> np.ndarray:
        """Same contract as ArrayReader.read: column 3 of req gets each request's byte count, SLOW for the
        requests the RPC path must serve, BAD for invalid ones; crcs as there."""
        if os.getpid() != self.pid:
            self._after_fork()
        tables: list[_SCTable] = []
        try:
            for ino in inodes:
                tables.append(self._table(ino))
            left = read_tables(tables, req, out, out_size, crcs, self.spin_us, self._load)
            rejected = self._validate(tables, req)
            res = req[:, 3]
            if left or rejected:
                self.passed += int(np.count_nonzero(res == SLOW))
                self.served += int(np.count_nonzero(res > 0))
            else:  # all completed here (zero-byte requests past the end of a file count too)
                self.served += len(res)
            return res
        finally:
            for t in tables:
                self._done(t)

    def _validate(self, tables: list[_SCTable], req: np.ndarray) -> bool:
        """After the I/O: keep a result only if its service is alive, its target still within its serving
        time and its chunk's generation unchanged since the fd was granted (else: SLOW, table rebuilt).
        Returns whether any result was rejected."""
        rejected = False
        for k, t in enumerate(tables):
            if not t.bases:
                continue  # nothing loaded from a service: no request was served here
            bad = t.stale()
            if bad is None:
                continue
            rows = (req[:, 4] == k) & (req[:, 3] > 0)
            if bad is not True:
                rows &= bad[np.minimum(req[:, 0] // t.chunk_size, t.nchunks - 1)]
            req[rows, 3] = SLOW
            rejected = True
            with self.lock:
                self._retire(t)
        return rejected

    def close(self) -> None:
        with self.lock:
            for t in list(self.tables.values()):
                self._retire(t)
        with self.slock:
            for s in self.sessions.values():
                s.close()
            self.sessions = {}


__all__ = ["ShortCircuitReader", "NOT_HERE"]
