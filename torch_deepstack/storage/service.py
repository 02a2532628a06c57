"""Storage service: one process serving several targets (chunk engines) over authenticated TCP.

* Batched reads: one `read` RPC carries many (target, chunk, offset, length) items; the reply payload is the
  concatenated bytes, which the client receives straight into its buffers. Any replica whose public state is
  serving answers with its committed version.
* CRAQ writes: the client sends a chunk update to the chain head. The head takes the chunk lock, builds the
  new full chunk (read-modify-write), stores it as a pending version, forwards it to its successor, which does
  the same; the tail commits and acknowledges; every node commits on the way back, and the head answers the
  client only then. Each hop checks the chain version and rejects stale routing. When a successor dies the
  hop waits for the manager's new chain and forwards to the new successor.
* Resync: when the manager marks a target `syncing`, the chain's last serving target (its predecessor) diffs
  chunk versions against it, copies what differs under the chunk lock, removes extras, then sends sync-done.
* Heartbeats renew the lease at the manager every lease/3 seconds; their answer is the routing table. A
  service that cannot renew its lease stops accepting writes (it may have been replaced in its chains).
* Short-circuit reads (short_circuit.py): same-host clients get fds of committed chunk versions over a Unix
  socket and read them themselves, validated against a shared page of serving times and chunk generations
  that this service keeps current (`short_circuit=False` / `--no-short-circuit` turns it off).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

from torch_deepstack.storage import fastio
from torch_deepstack.storage.chunk_engine import FIRST_VERSION, ChunkEngine, aligned_buffer, next_version
from torch_deepstack.storage.errors import (InvalidArgument, NotFound, NotServing, StaleRouting, StorageError,
                                            Unavailable)
from torch_deepstack.storage.paths import validate_chunk_id
from torch_deepstack.storage.rpc import RpcClient, RpcClients, RpcServer
from torch_deepstack.storage.short_circuit import ShortCircuitServer, machine_id

log = logging.getLogger("torch_deepstack.storage.service")


class _Read:
    __slots__ = ("chunk", "offset", "length", "dest", "n", "error")

    def __init__(self):
        self.chunk, self.offset, self.length, self.dest, self.n, self.error = "", 0, 0, None, 0, None


class _ChunkLocks:
    """Exact per-chunk locks (no striping: two chunks sharing a lock could deadlock across chains)."""

    def __init__(self):
        self._locks: "weakref.WeakValueDictionary[str, threading.Lock]" = weakref.WeakValueDictionary()
        self._guard = threading.Lock()

    def get(self, key: str) -> threading.Lock:
        with self._guard:
            lock = self._locks.get(key)
            if lock is None:
                lock = threading.Lock()
                self._locks[key] = lock
            return lock


def _int(args: dict, name: str, lo: int = 0, hi: int = 1 << 62) -> int:
    v = args.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise InvalidArgument(f"{name} must be an int in [{lo}, {hi}], got {v!r}")
    return v


def _str(args: dict, name: str) -> str:
    v = args.get(name)
    if not isinstance(v, str) or not v or len(v) > 128:
        raise InvalidArgument(f"{name} must be a non-empty str, got {v!r}")
    return v


class StorageService:
    def __init__(self, service_id: str, targets: dict[str, str], manager: tuple[str, int], secret: bytes, *,
                 host: str = "127.0.0.1", port: int = 0, sync: bool = True, rpc_timeout: float = 10.0,
                 capacity_bytes: int | None = None, short_circuit: bool = True):
        fastio.SPIN_US = 0  # no completion polling in services (see fastio.SPIN_US)
        self.service_id = service_id
        self.boot = os.urandom(8).hex()  # identifies this incarnation: the manager spots restarts by it
        self.secret = secret
        self.engines: dict[str, ChunkEngine] = {}
        for tid, path in targets.items():
            if not tid.startswith(service_id + "-t"):
                raise InvalidArgument(f"target id {tid!r} must be '<service id>-t<N>' (service {service_id!r})")
            self.engines[tid] = ChunkEngine(path, tid, sync=sync, capacity_bytes=capacity_bytes)
        self.uptodate: dict[str, bool] = {tid: False for tid in self.engines}
        self.manager = RpcClient(manager[0], manager[1], secret, timeout=rpc_timeout)
        self.rpc_timeout = rpc_timeout
        self.routing: dict | None = None
        self._routing_lock = threading.Lock()
        self._routing_changed = threading.Condition(self._routing_lock)
        self._last_lease = 0.0
        self._peers = RpcClients(self.secret, self.rpc_timeout)
        self._locks = _ChunkLocks()
        self._syncing: set[str] = set()
        self._tls = threading.local()
        self._writer = ThreadPoolExecutor(max_workers=16, thread_name_prefix=f"write-{service_id}")
        self._inflight: dict[tuple[str, int], int] = {}  # (chain, chain version) -> writes being applied
        self._inflight_cv = threading.Condition()
        self._stop = threading.Event()
        handlers = {
            "read": self._rpc_read, "write": self._rpc_write, "replicate": self._rpc_replicate,
            "remove": self._rpc_remove, "remove_versions": self._rpc_remove_versions,
            "dump_meta": self._rpc_dump_meta, "sync_write": self._rpc_sync_write,
            "sync_remove": self._rpc_sync_remove, "sync_done": self._rpc_sync_done, "verify": self._rpc_verify,
            "repair": self._rpc_repair, "ping": lambda a, p: ({"service": self.service_id}, None),
            "short_circuit": self._rpc_short_circuit,
        }
        self.short_circuit = None
        if short_circuit:
            try:
                self.short_circuit = ShortCircuitServer(service_id, self.engines, secret, self.boot)
            except (OSError, AttributeError) as e:  # no memfd / abstract Unix sockets here: RPC reads only
                log.warning("%s: short-circuit reads unavailable (%s); clients read through RPC", service_id, e)
        self.server = RpcServer(handlers, secret, host, port, name=f"storage-{service_id}")

    # ------------------------------------------------------------------ routing
    @property
    def address(self) -> str:
        return self.server.address

    def _heartbeat_once(self) -> None:
        states = {tid: ("uptodate" if ok else "online") for tid, ok in self.uptodate.items()}
        sent_at = time.monotonic()  # the manager's lease for us runs from a later moment than this
        routing, _ = self.manager.call("heartbeat", {"service_id": self.service_id, "address": self.address,
                                                     "targets": states, "boot": self.boot},
                                       timeout=self.rpc_timeout)
        self._last_lease = time.monotonic()
        for c in routing["chains"].values():
            for t in c["targets"]:
                if t["id"] in self.uptodate and t["state"] == "serving":
                    self.uptodate[t["id"]] = True
        self._set_routing(routing)
        if self.short_circuit is not None:
            self.short_circuit.renew(routing, sent_at)
        self._start_syncs(routing)

    def _set_routing(self, routing: dict) -> None:
        if self.short_circuit is not None:
            self.short_circuit.restrict(routing)
        with self._routing_changed:
            self.routing = routing
            self._routing_changed.notify_all()

    def refresh_routing(self) -> dict:
        try:
            routing, _ = self.manager.call("routing", timeout=self.rpc_timeout)
            self._set_routing(routing)
        except Unavailable:
            pass
        if self.routing is None:
            raise Unavailable("no routing table yet (manager unreachable)")
        return self.routing

    def _heartbeat_loop(self, interval: float) -> None:
        while not self._stop.is_set():
            try:
                self._heartbeat_once()
            except StorageError as e:
                log.warning("%s: heartbeat failed: %s", self.service_id, e)
            self._stop.wait(interval)

    def _chain(self, chain_id: str, chain_ver: int) -> dict:
        """The chain as this service knows it, after checking the caller's chain version."""
        routing = self.routing
        if routing is None or chain_id not in routing["chains"]:
            routing = self.refresh_routing()
        chain = routing["chains"].get(chain_id)
        if chain is None:
            raise NotFound(f"unknown chain {chain_id!r}")
        if chain_ver > chain["version"]:  # the caller saw a newer table than we did: catch up
            chain = self.refresh_routing()["chains"][chain_id]
        if chain_ver != chain["version"]:
            raise StaleRouting(f"chain {chain_id}: request has version {chain_ver}, current is {chain['version']}")
        return chain

    def _peer(self, target_id: str) -> RpcClient:
        addr = (self.routing or {}).get("addresses", {}).get(target_id)
        if not addr:
            raise Unavailable(f"no address known for target {target_id}")
        return self._peers.get(addr)

    def _engine(self, target_id: str) -> ChunkEngine:
        eng = self.engines.get(target_id)
        if eng is None:
            raise NotFound(f"target {target_id!r} is not served by {self.service_id}")
        return eng

    def _check_lease(self) -> None:
        lease = (self.routing or {}).get("lease", 3.0)
        if time.monotonic() - self._last_lease > lease:
            raise NotServing(f"{self.service_id}: lease expired (manager unreachable); refusing writes")

    # ------------------------------------------------------------------ reads
    def _rpc_short_circuit(self, args, payload):
        """Where same-host clients find the short-circuit socket (and the host it is on)."""
        if self.short_circuit is None:
            raise NotServing(f"{self.service_id}: short-circuit reads are turned off")
        return {"socket": self.short_circuit.name, "machine": machine_id()}, None

    def _rpc_read(self, args, payload):
        """Batched read on one target. Columnar arguments (chain, ver, chunk, off, len: one entry per item)
        keep the per-item cost low; the reply lists n per item (-1: failed, see err) and the payload is the
        concatenated bytes."""
        tid = _str(args, "target")
        cols = [args.get(k) for k in ("chain", "ver", "chunk", "off", "len")]
        if not all(isinstance(c, list) for c in cols) or len({len(c) for c in cols}) != 1 or len(cols[0]) > 65536:
            raise InvalidArgument("read needs equal-length lists chain, ver, chunk, off, len (at most 65536)")
        eng = self._engine(tid)
        chain_ok: dict = {}
        reads, errs = [], {}
        total = 0
        for i, (chain_id, ver, cid, off, ln) in enumerate(zip(*cols)):
            r = _Read()
            reads.append(r)
            try:
                key = (chain_id, ver)
                err = chain_ok.get(key, 0)
                if err == 0:
                    err = chain_ok[key] = self._check_read_chain(chain_id, ver, tid)
                if err is not None:
                    raise err
                r.chunk = validate_chunk_id(cid)
                if type(off) is not int or type(ln) is not int or off < 0 or not 0 <= ln <= 64 << 20:
                    raise InvalidArgument(f"bad offset/length {off!r}/{ln!r}")
                r.offset, r.length = off, ln
                total += -(-ln // 4096) * 4096
            except StorageError as e:
                r.error = e
        # One page-aligned reply buffer; each read lands in its own aligned slot (zero-copy for aligned reads).
        arena = self._reply_arena(total) if total else None
        pos = 0
        ok = []
        for r in reads:
            if r.error is None:
                r.dest = arena[pos:pos + r.length]
                pos += -(-r.length // 4096) * 4096
                ok.append(r)
        eng.read_many(ok)
        ns, parts = [], []
        for i, r in enumerate(reads):
            if r.error is None:
                ns.append(r.n)
                parts.append(r.dest[:r.n])
            else:
                e = r.error if isinstance(r.error, StorageError) else StorageError(str(r.error))
                ns.append(-1)
                errs[i] = [e.code, str(e)]
        return {"n": ns, "err": errs}, parts

    def _check_read_chain(self, chain_id, ver, tid) -> StorageError | None:
        try:
            if not isinstance(chain_id, str) or type(ver) is not int:
                raise InvalidArgument("chain must be a str and ver an int")
            chain = self._chain(chain_id, ver)
            state = next((t["state"] for t in chain["targets"] if t["id"] == tid), None)
            if state != "serving":
                raise NotServing(f"target {tid} is {state or 'not in chain'}, not serving reads")
            return None
        except StorageError as e:
            return e

    def _reply_arena(self, size: int) -> memoryview:
        """Per-connection-thread reply buffer, reused: the reply is sent before the thread's next request."""
        buf = getattr(self._tls, "arena", None)
        if buf is None or len(buf) < size:
            buf = self._tls.arena = aligned_buffer(max(size, 1 << 20))
        return memoryview(buf)

    # ------------------------------------------------------------------ CRAQ writes
    def _successor(self, chain: dict, target_id: str) -> str | None:
        ids = [t["id"] for t in chain["targets"] if t["state"] in ("serving", "syncing")]
        if target_id not in ids:
            raise NotServing(f"target {target_id} is not a write member of chain {chain['id']}")
        i = ids.index(target_id)
        return ids[i + 1] if i + 1 < len(ids) else None

    def _forward(self, chain_id: str, target_id: str, method: str, args: dict, payload, deadline: float) -> None:
        """Send `method` to target_id's successor in the current chain; on failure wait for a new chain
        version and retry with whatever successor it names (none: we are the tail now)."""
        while True:
            chain = self.routing["chains"][chain_id]
            succ = self._successor(chain, target_id)
            if succ is None:
                return
            try:
                self._peer(succ).call(method, dict(args, chain=chain_id, chain_ver=chain["version"], target=succ),
                                      payload)
                return
            except (Unavailable, StaleRouting, NotServing) as e:
                if time.monotonic() > deadline:
                    raise Unavailable(f"chain {chain_id}: successor {succ} unreachable: {e}") from e
                log.info("%s: forward to %s failed (%s); waiting for a new chain", self.service_id, succ, e)
                old = chain["version"]
                with self._routing_changed:
                    self._routing_changed.wait(0.2)
                if self.routing["chains"][chain_id]["version"] == old:
                    self.refresh_routing()

    def _store_and_forward(self, eng, chain_id, tid, cid, ver, content, chain_ver, deadline) -> None:
        """Write our pending version while the successor receives the update: the disk write overlaps the
        rest of the chain instead of adding to it. Both must succeed before the caller commits."""
        local = self._writer.submit(eng.write_pending, cid, ver, content, chain_ver)
        try:
            self._forward(chain_id, tid, "replicate", {"chunk": cid, "ver": ver}, content, deadline)
        finally:
            local.result()

    @contextlib.contextmanager
    def _writing(self, chain_id: str, chain_ver: int):
        """Count a write (or remove) applied under a chain version, so a resync can wait out older ones."""
        key = (chain_id, chain_ver)
        with self._inflight_cv:
            self._inflight[key] = self._inflight.get(key, 0) + 1
        try:
            # The routing may have moved on between the version check and the count above; a resync that
            # started in that gap would not wait for us, so such a write must be retried under the new chain.
            current = self.routing["chains"][chain_id]["version"]
            if current != chain_ver:
                raise StaleRouting(f"chain {chain_id} changed to version {current} during the request")
            yield
        finally:
            with self._inflight_cv:
                self._inflight[key] -= 1
                if not self._inflight[key]:
                    del self._inflight[key]
                self._inflight_cv.notify_all()

    def _drain_older_writes(self, chain_id: str, chain_ver: int, timeout: float) -> None:
        """Wait until no write that passed its version check under an older chain version is still running:
        those never reach a target that joined later, so a resync must start after them."""
        with self._inflight_cv:
            if not self._inflight_cv.wait_for(
                    lambda: not any(c == chain_id and v < chain_ver for c, v in self._inflight), timeout):
                raise Unavailable(f"chain {chain_id}: writes under older versions still running")

    def _rpc_write(self, args, payload):
        self._check_lease()
        chain_id, tid = _str(args, "chain"), _str(args, "target")
        cid = validate_chunk_id(args.get("chunk"))
        chunk_size = _int(args, "chunk_size", 4096, 64 << 20)
        offset = _int(args, "offset", 0, chunk_size)
        chain = self._chain(chain_id, _int(args, "chain_ver"))
        head = chain["targets"][0]
        if head["id"] != tid or head["state"] != "serving":
            raise NotServing(f"target {tid} is not the serving head of chain {chain_id}")
        eng = self._engine(tid)
        deadline = time.monotonic() + self.rpc_timeout * 3
        with self._writing(chain_id, chain["version"]), self._locks.get(tid + cid):
            content = eng.patched(cid, offset, payload, chunk_size)
            ver = next_version(eng.meta(cid))
            try:
                self._store_and_forward(eng, chain_id, tid, cid, ver, content, chain["version"], deadline)
                eng.commit(cid, ver)
            except Exception:
                if ver == FIRST_VERSION:
                    self._undo_created(chain_id, tid, cid, ver)
                raise
        return {"ver": ver, "length": len(content)}, None

    def _undo_created(self, chain_id: str, tid: str, cid: str, ver: int) -> None:
        """A failed write that created a chunk may have left its version on some replicas (committed at the tail,
        pending elsewhere): remove it everywhere, best effort, while the caller still holds the chunk lock. The
        client could not do it safely later: this head may hold no version of the chunk, so the next write would
        get the same version number, and a version-checked removal would take that write's chunk."""
        try:
            self._engine(tid).remove_version(cid, ver)
            self._forward(chain_id, tid, "remove_versions", {"chunks": [cid], "vers": [ver]}, None, deadline=0)
        except StorageError as e:
            log.info("%s: could not undo failed write of chunk %s v%d: %s", self.service_id, cid, ver, e)

    def _rpc_replicate(self, args, payload):
        self._check_lease()
        chain_id, tid = _str(args, "chain"), _str(args, "target")
        cid, ver = validate_chunk_id(args.get("chunk")), _int(args, "ver", 1)
        chain = self._chain(chain_id, _int(args, "chain_ver"))
        self._successor(chain, tid)  # raises unless tid is serving or syncing in this chain
        eng = self._engine(tid)
        deadline = time.monotonic() + self.rpc_timeout * 2
        with self._writing(chain_id, chain["version"]), self._locks.get(tid + cid):
            self._store_and_forward(eng, chain_id, tid, cid, ver, payload, chain["version"], deadline)
            eng.commit(cid, ver)
        return {"ver": ver}, None

    def _rpc_remove(self, args, payload):
        self._check_lease()
        chain_id, tid = _str(args, "chain"), _str(args, "target")
        chunks = args.get("chunks")
        if not isinstance(chunks, list):
            raise InvalidArgument("remove needs chunks: a list of chunk ids")
        chunks = [validate_chunk_id(c) for c in chunks]
        chain = self._chain(chain_id, _int(args, "chain_ver"))
        self._successor(chain, tid)
        eng = self._engine(tid)
        with self._writing(chain_id, chain["version"]):
            for cid in chunks:
                with self._locks.get(tid + cid):
                    eng.remove(cid)
            self._forward(chain_id, tid, "remove", {"chunks": chunks}, None,
                          time.monotonic() + self.rpc_timeout * 2)
        return {"removed": len(chunks)}, None

    def _rpc_remove_versions(self, args, payload):
        """Remove each chunk only while its committed version is the one given (a failed write's cleanup: a
        newer version holds another writer's bytes). A method of its own rather than an argument of `remove`:
        a service that predates it refuses the call instead of ignoring the versions and removing anyway."""
        self._check_lease()
        chain_id, tid = _str(args, "chain"), _str(args, "target")
        chunks, vers = args.get("chunks"), args.get("vers")
        if not isinstance(chunks, list) or not isinstance(vers, list) or len(chunks) != len(vers):
            raise InvalidArgument("remove_versions needs equal-length lists chunks and vers")
        chunks = [validate_chunk_id(c) for c in chunks]
        if not all(type(v) is int and 1 <= v <= 1 << 62 for v in vers):
            raise InvalidArgument("remove_versions: each version must be an int >= 1")
        chain = self._chain(chain_id, _int(args, "chain_ver"))
        self._successor(chain, tid)
        eng = self._engine(tid)
        with self._writing(chain_id, chain["version"]), contextlib.ExitStack() as locked:
            # The chunk locks are held until every successor has applied the removal too, as a write holds its
            # lock until the chain committed: a write of the same chunk cannot reach some replicas before the
            # removal and others after it. Sorted, so two removals never wait on each other.
            for cid in sorted(set(chunks)):
                locked.enter_context(self._locks.get(tid + cid))
            removed = sum(eng.remove_version(cid, ver) for cid, ver in zip(chunks, vers))
            self._forward(chain_id, tid, "remove_versions", {"chunks": chunks, "vers": vers}, None,
                          time.monotonic() + self.rpc_timeout * 2)
        return {"removed": removed}, None

    # ------------------------------------------------------------------ resync
    def _start_syncs(self, routing: dict) -> None:
        for cid, chain in routing["chains"].items():
            serving = [t["id"] for t in chain["targets"] if t["state"] == "serving"]
            if not serving or serving[-1] not in self.engines or not self.uptodate.get(serving[-1]):
                continue
            for t in chain["targets"]:
                key = f"{cid}:{t['id']}"
                if t["state"] == "syncing" and key not in self._syncing:
                    self._syncing.add(key)
                    threading.Thread(target=self._sync, args=(cid, serving[-1], t["id"], key), daemon=True,
                                     name=f"sync-{t['id']}").start()

    def _sync(self, chain_id: str, src: str, dst: str, key: str) -> None:
        try:
            # Every write from now on reaches dst through the chain; the ones already running under an older
            # chain version do not, so let them finish before taking the snapshot that sync copies from.
            self._drain_older_writes(chain_id, self.routing["chains"][chain_id]["version"], self.rpc_timeout * 3)
            peer = self._peer(dst)
            remote, _ = peer.call("dump_meta", {"target": dst})
            eng = self._engine(src)
            local = eng.list_chunks()
            copied = removed = 0
            for cid, m in local.items():
                if m.committed is None:
                    continue
                with self._locks.get(src + cid):
                    m = eng.meta(cid)
                    if m is None or m.committed is None:
                        continue
                    r = remote.get(cid)
                    if r is not None and r["committed"] == m.committed.ver and r["crc"] == m.committed.crc:
                        continue
                    v, data = eng.read_full(cid)
                    peer.call("sync_write", {"target": dst, "chunk": cid, "ver": v.ver}, data)
                    copied += 1
            extra = [cid for cid in remote if cid not in local]
            for i in range(0, len(extra), 1024):
                peer.call("sync_remove", {"target": dst, "chunks": extra[i:i + 1024]})
                removed += len(extra[i:i + 1024])
            peer.call("sync_done", {"target": dst})
            log.info("%s: synced %s -> %s (%d copied, %d removed)", self.service_id, src, dst, copied, removed)
        except StorageError as e:
            log.warning("%s: sync %s -> %s failed: %s (will retry)", self.service_id, src, dst, e)
        finally:
            self._syncing.discard(key)

    def _rpc_dump_meta(self, args, payload):
        eng = self._engine(_str(args, "target"))
        out = {}
        for cid, m in eng.list_chunks().items():
            if m.committed is not None:
                out[cid] = {"committed": m.committed.ver, "crc": m.committed.crc}
        return out, None

    def _rpc_sync_write(self, args, payload):
        tid = _str(args, "target")
        cid, ver = validate_chunk_id(args.get("chunk")), _int(args, "ver", 1)
        eng = self._engine(tid)
        with self._locks.get(tid + cid):
            eng.put_committed(cid, ver, payload)
        return {}, None

    def _rpc_sync_remove(self, args, payload):
        tid = _str(args, "target")
        eng = self._engine(tid)
        for cid in args.get("chunks") or []:
            cid = validate_chunk_id(cid)
            with self._locks.get(tid + cid):
                eng.remove(cid)
        return {}, None

    def _rpc_sync_done(self, args, payload):
        tid = _str(args, "target")
        self._engine(tid)
        self.uptodate[tid] = True
        threading.Thread(target=self._heartbeat_quietly, daemon=True).start()  # report promptly
        return {}, None

    def _heartbeat_quietly(self):
        try:
            self._heartbeat_once()
        except StorageError:
            pass

    # ------------------------------------------------------------------ fsck
    def _rpc_verify(self, args, payload):
        tid = _str(args, "target")
        eng = self._engine(tid)
        bad, total = [], 0
        for cid, m in eng.list_chunks().items():
            if m.committed is None:
                continue
            total += 1
            if not eng.verify(cid):
                bad.append({"chunk": cid, "ver": m.committed.ver})
        return {"target": tid, "chunks": total, "corrupt": bad}, None

    def _rpc_repair(self, args, payload):
        """Copy a chunk from our (verified) target `source` to target `dest` elsewhere."""
        src, dst = _str(args, "source"), _str(args, "dest")
        cid = validate_chunk_id(args.get("chunk"))
        eng = self._engine(src)
        if not eng.verify(cid):
            raise StorageError(f"chunk {cid} on {src} is corrupt too; cannot repair from it")
        with self._locks.get(src + cid):
            v, data = eng.read_full(cid)
            if v is None:
                raise NotFound(f"chunk {cid} not on {src}")
            self._peer(dst).call("sync_write", {"target": dst, "chunk": cid, "ver": v.ver}, data)
        return {"ver": v.ver}, None

    # ------------------------------------------------------------------ lifecycle
    def start(self, heartbeat_interval: float | None = None) -> "StorageService":
        self.server.start()
        try:
            self._heartbeat_once()
        except StorageError as e:
            log.warning("%s: first heartbeat failed: %s", self.service_id, e)
        interval = heartbeat_interval or (self.routing or {}).get("lease", 3.0) / 3
        threading.Thread(target=self._heartbeat_loop, args=(interval,), daemon=True,
                         name=f"heartbeat-{self.service_id}").start()
        log.info("storage service %s on %s with targets %s", self.service_id, self.address, list(self.engines))
        return self

    def stop(self) -> None:
        self._stop.set()
        if self.short_circuit is not None:
            self.short_circuit.close()
        self.server.stop()
        self._writer.shutdown(wait=False)
        self.manager.close()
        self._peers.close()
        for e in self.engines.values():
            e.close()
