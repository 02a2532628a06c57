"""Client side of a storage cluster: metadata through the manager, chunk data straight to storage services.

Reads pick, per chunk, a serving replica: one on this host first (the nearest), then replicas that have not
failed recently, spread by a hash of the chunk id so load covers every replica. Items are grouped into one
batched `read` RPC per service; bytes are received straight into the caller's buffers. A failed item
(service down, corrupt chunk, stale routing, target not serving) is retried on another replica after a
routing refresh, until every replica has been tried or the deadline passes.

Short-circuit reads (short_circuit.py): a client on the same host as a serving replica reads its chunk files
itself through fds the service hands over, in batches planned and checked in C like embedded reads, and
validated against the service's shared page; what that path does not serve goes through the RPC path above.
`short_circuit=False` (or DEEPSTACK_SHORT_CIRCUIT=0) turns it off.
"""
from __future__ import annotations

import socket
import time
import zlib
from torch_deepstack.storage.threads import ForkSafeExecutor, run_each

from torch_deepstack.storage import array_read
from torch_deepstack.storage.chunk_engine import FIRST_VERSION
from torch_deepstack.storage.client import ChunkRead, DataBackend, FileSystem
from torch_deepstack.storage.errors import (InvalidArgument, NotServing, StaleRouting, StorageError, Unavailable,
                                            error_from_code)
from torch_deepstack.storage.rpc import RpcClient, RpcClients
from torch_deepstack.storage.short_circuit import enabled_by_env as short_circuit_by_env

RETRYABLE = (Unavailable, StaleRouting, NotServing)


def _local_hosts() -> set[str]:
    hosts = {"127.0.0.1", "localhost", "::1"}
    try:
        hosts.add(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass
    return hosts


class RemoteMeta:
    """MetaStore's interface, served by the manager. Retries while the manager is unreachable (restarts)."""

    def __init__(self, manager: RpcClient, retry_for: float = 15.0):
        self.rpc, self.retry_for = manager, retry_for

    def _call(self, name, *args, **kwargs):
        deadline = time.monotonic() + self.retry_for
        while True:
            try:
                return self.rpc.call("meta." + name, {"args": list(args), "kwargs": kwargs})[0]
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def __getattr__(self, name):
        if name in ("stat", "inode", "listdir", "mkdir", "create", "set_length", "rename", "remove",
                    "all_file_inodes", "purge_trash"):
            return lambda *a, **k: self._call(name, *a, **k)
        raise AttributeError(name)

    def close(self):
        self.rpc.close()


class ClusterBackend(DataBackend):
    def __init__(self, manager: RpcClient, secret: bytes, *, timeout: float = 10.0, io_threads: int = 16,
                 retry_for: float = 30.0, short_circuit: bool | None = None, spin_us: int | None = None):
        self.manager, self.secret, self.timeout = manager, secret, timeout
        self.retry_for = retry_for
        self.pool = ForkSafeExecutor(io_threads, "deepstack-cluster")
        self._clients = RpcClients(secret, timeout)
        self._failed: dict[str, float] = {}  # target -> monotonic time of last failure
        self._local = _local_hosts()
        self.routing: dict = {}
        if short_circuit is None:
            short_circuit = short_circuit_by_env()
        self._sc = None
        self._local_of: tuple = (None, False)  # (routing table, whether it names a service on this host)
        if short_circuit:
            from torch_deepstack.storage.short_circuit_read import ShortCircuitReader

            self._sc = ShortCircuitReader(self, secret, spin_us)
        self.refresh()

    # ------------------------------------------------------------------ routing
    def refresh(self) -> dict:
        deadline = time.monotonic() + self.retry_for
        while True:
            try:
                routing = self.manager.call("routing")[0]
                if self._sc is not None and routing != self.routing:
                    self._sc.routing_changed()
                self.routing = routing
                return self.routing
            except Unavailable:
                if self.routing or time.monotonic() > deadline:  # keep using the cached table
                    if not self.routing:
                        raise
                    return self.routing
                time.sleep(0.2)

    def _client(self, target: str) -> RpcClient:
        addr = self.routing["addresses"].get(target)
        if not addr:
            raise Unavailable(f"target {target} has no known address")
        return self._clients.get(addr)

    def _replicas(self, chain_id: str, chunk: str, exclude: set[str]) -> list[str]:
        chain = self.routing["chains"][chain_id]
        cands = [t["id"] for t in chain["targets"] if t["state"] == "serving" and t["id"] not in exclude]
        now = time.monotonic()
        h = zlib.crc32(chunk.encode())

        def rank(tid):
            addr = self.routing["addresses"].get(tid) or ""
            local = addr.rsplit(":", 1)[0] in self._local
            recent_fail = now - self._failed.get(tid, -1e9) < 5.0
            return (recent_fail, not local, (zlib.crc32(tid.encode()) ^ h) & 0xFFFF)
        return sorted(cands, key=rank)

    # ------------------------------------------------------------------ reads
    def array_reads(self) -> bool:
        """Whether short-circuit reads may serve batches (on: the switch, the C helper, a same-host replica)."""
        if self._sc is None or not array_read.supported():
            return False
        routing = self.routing
        if self._local_of[0] is not routing:  # once per routing table, not per batch
            self._local_of = (routing, any(a and a.rsplit(":", 1)[0] in self._local
                                           for a in routing.get("addresses", {}).values()))
        return self._local_of[1]

    def read_array(self, inodes, req, out, out_size, crcs=None):
        return self._sc.read(inodes, req, out, out_size, crcs) if self._sc is not None else None

    @property
    def short_circuit_stats(self) -> dict:
        """Requests served by short-circuit reads, and those it handed to the RPC path (None when off)."""
        if self._sc is None:
            return None
        return {"served": self._sc.served, "passed": self._sc.passed, "sessions": len(self._sc.sessions)}

    def _start_read(self, target: str, items: list[tuple[ChunkRead, str]], timeout: float | None = None):
        """Send one batched read RPC to the service of `target` (answer collected by _finish_read)."""
        chains = self.routing["chains"]
        reads = [r for r, _ in items]
        args = {"target": target, "chain": [r.chain for r in reads],
                "ver": [chains[r.chain]["version"] for r in reads], "chunk": [r.chunk for r in reads],
                "off": [r.offset for r in reads], "len": [r.length for r in reads]}
        try:
            client = self._client(target)
            return client, client.start("read", args, timeout=timeout), reads
        except StorageError as e:
            self._fail(target, reads, e)
            return None

    def _fail(self, target, reads, e):
        self._failed[target] = time.monotonic()
        for r in reads:
            r.error = e

    def _finish_read(self, target: str, started) -> None:
        client, pending, reads = started

        def sinks(header):
            bufs = []
            for r, n in zip(reads, header["r"]["n"]):
                if n >= 0:
                    if n > r.length:
                        return None  # malformed answer: take the payload as bytes and fail below
                    bufs.append(r.dest[:n])
            return bufs
        try:
            result, payload = client.finish(pending, sinks=sinks)
            if not isinstance(payload, list) and len(payload):
                raise StorageError(f"{target}: malformed read reply")
        except StorageError as e:
            self._fail(target, reads, e)
            return
        errs = result["err"]
        for i, (r, n) in enumerate(zip(reads, result["n"])):
            if n >= 0:
                r.n, r.error = n, None
            else:
                code, msg = errs[str(i)]
                r.error = error_from_code(code, msg)
                if code == "corrupt":
                    self._failed[target] = time.monotonic()

    SPLIT = 256 << 10  # large reads are split into pieces of this size, served by different replicas at once

    def read_chunks(self, reads: list[ChunkRead], deadline: float | None = None) -> None:
        big = [r for r in reads if r.length > self.SPLIT]
        if not big:
            return self._read_chunks(reads, deadline)
        parts: dict[int, list[ChunkRead]] = {}
        flat = [r for r in reads if r.length <= self.SPLIT]
        for r in big:
            ps = [ChunkRead(r.chain, r.chunk, r.offset + o, min(self.SPLIT, r.length - o), r.dest[o:o + self.SPLIT])
                  for o in range(0, r.length, self.SPLIT)]
            parts[id(r)] = ps
            flat += ps
        self._read_chunks(flat, deadline)
        for r in big:
            n = 0
            for p in parts[id(r)]:
                if p.error is not None:
                    r.error = p.error
                    break
                n += p.n
                if p.n < p.length:  # end of the chunk's data
                    break
            r.n = n

    def _read_chunks(self, reads: list[ChunkRead], deadline: float | None = None) -> None:
        tried: dict[int, set[str]] = {id(r): set() for r in reads}
        own = time.monotonic() + self.retry_for
        deadline = own if deadline is None else min(deadline, own)
        self._read_loop(reads, deadline, tried)
        # A replica that lacks a chunk answers like a hole (0 bytes). Holes are rare inside a file, so confirm
        # every short answer with one other replica and keep the longer one: a replica that missed data must
        # never turn into silent zeros.
        short = [r for r in reads if r.error is None and r.n < r.length]
        if short:
            probes = [(r, ChunkRead(r.chain, r.chunk, r.offset, r.length, memoryview(bytearray(r.length))))
                      for r in short]
            ptried = {id(p): set(tried[id(r)]) for r, p in probes}
            self._read_loop([p for _, p in probes], deadline, ptried)
            for r, p in probes:
                if p.error is None and p.n > r.n:
                    r.dest[:p.n] = p.dest[:p.n]
                    r.n = p.n

    def _read_loop(self, reads: list[ChunkRead], deadline: float, tried: dict[int, set[str]]) -> None:
        pending = list(reads)
        while pending:
            groups: dict[str, list] = {}
            for r in pending:
                try:
                    reps = self._replicas(r.chain, f"{r.chunk}@{r.offset // self.SPLIT}", tried[id(r)])
                except KeyError:
                    r.error = StorageError(f"unknown chain {r.chain!r}")
                    continue
                if not reps:
                    if r.error is None:
                        r.error = Unavailable(f"chunk {r.chunk}: no serving replica in chain {r.chain}")
                    continue
                tried[id(r)].add(reps[0])
                groups.setdefault(reps[0], []).append((r, reps[0]))
            if not groups:
                return
            # All services work at once: send every group's request, then collect the answers.
            left = deadline - time.monotonic()
            if left <= 0:
                for items in groups.values():
                    for r, _ in items:
                        r.error = TimeoutError(f"chunk {r.chunk}: read deadline passed")
                return
            started = [(t, self._start_read(t, items, min(self.timeout, left))) for t, items in groups.items()]
            for t, st in started:
                if st is not None:
                    self._finish_read(t, st)
            retry = [r for items in groups.values() for r, _ in items
                     if isinstance(r.error, StorageError)
                     and r.error.code in ("unavailable", "stale_routing", "not_serving", "corrupt")]
            if not retry:
                return
            if time.monotonic() > deadline:
                return
            if any(r.error.code != "corrupt" for r in retry):
                self.refresh()
                for r in retry:  # a routing change may bring a replica back into play
                    if r.error.code in ("stale_routing", "not_serving"):
                        tried[id(r)].clear()
                if all(r.error.code == "unavailable" for r in retry):
                    time.sleep(0.05)
            pending = retry

    # ------------------------------------------------------------------ writes
    def _call_head(self, chain_id: str, method: str, args: dict, payload=None, *, timeout=None, what: str):
        """Send an update to the chain's head with the current chain version, retrying (with backoff and a
        routing refresh) while the chain is between heads or the routing is stale, up to `retry_for` seconds."""
        deadline = time.monotonic() + self.retry_for
        delay = 0.05
        while True:
            chain = self.routing["chains"][chain_id]
            head = chain["targets"][0]
            try:
                if head["state"] != "serving":
                    raise NotServing(f"chain {chain_id} has no serving head")
                return self._client(head["id"]).call(
                    method, {"chain": chain_id, "chain_ver": chain["version"], "target": head["id"], **args},
                    payload, timeout=timeout)
            except RETRYABLE as e:
                if time.monotonic() > deadline:
                    raise Unavailable(f"{what} on chain {chain_id} failed: {e}") from e
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
                self.refresh()

    def _write_one(self, w) -> int:
        """Returns the chunk version the write committed."""
        chain_id, cid, off, data, cs = w
        result, _ = self._call_head(chain_id, "write", {"chunk": cid, "offset": off, "chunk_size": cs}, data,
                                    timeout=self.timeout * 4, what=f"write of chunk {cid}")
        return result["ver"]

    def write_chunks(self, writes, created=None) -> None:
        def one(w):
            ver = self._write_one(w)
            if created is not None and ver == FIRST_VERSION:
                created.append((w[0], w[1], ver))
        run_each(self.pool, one, writes)

    def remove_chunks(self, items) -> None:
        by_chain: dict[str, list[str]] = {}
        for chain, cid in items:
            by_chain.setdefault(chain, []).append(cid)
        for chain_id, cids in by_chain.items():
            self._call_head(chain_id, "remove", {"chunks": cids}, what=f"removal of {len(cids)} chunks")

    def remove_chunk_versions(self, items) -> None:
        by_chain: dict[str, tuple[list[str], list[int]]] = {}
        for chain, cid, ver in items:
            cids, vers = by_chain.setdefault(chain, ([], []))
            cids.append(cid)
            vers.append(ver)
        for chain_id, (cids, vers) in by_chain.items():
            self._call_head(chain_id, "remove_versions", {"chunks": cids, "vers": vers},
                            what=f"removal of {len(cids)} chunk versions")

    def service_call(self, target: str, method: str, args: dict, payload=None):
        return self._client(target).call(method, args, payload)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        if self._sc is not None:
            self._sc.close()
        self._clients.close()


def open_cluster(host: str, port: int, secret: bytes, *, timeout: float = 10.0, io_threads: int = 16,
                 retry_for: float = 30.0, short_circuit: bool | None = None,
                 spin_us: int | None = None) -> FileSystem:
    """short_circuit: read same-host replicas' chunk files directly (default: on unless
    DEEPSTACK_SHORT_CIRCUIT=0); False sends every read through the storage services. spin_us: how long those
    reads poll for completions before sleeping (default $DEEPSTACK_SPIN_US or 100; 0 when several processes
    read at once)."""
    if spin_us is not None and (not isinstance(spin_us, int) or spin_us < 0):
        raise InvalidArgument(f"spin_us must be an int >= 0, got {spin_us!r}")
    manager = RpcClient(host, port, secret, timeout=timeout)
    try:
        backend = ClusterBackend(manager, secret, timeout=timeout, io_threads=io_threads, retry_for=retry_for,
                                 short_circuit=short_circuit, spin_us=spin_us)
    except BaseException:
        manager.close()
        raise
    meta = RemoteMeta(RpcClient(host, port, secret, timeout=timeout), retry_for=retry_for)
    return FileSystem(meta, backend, f"deepstack://{host}:{port}", io_threads=io_threads)
