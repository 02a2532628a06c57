"""Short-circuit local reads: a cluster client on the same host as a serving replica reads that replica's
chunk files itself (HDFS's short-circuit reads), instead of paying two process hops per read.

Service side (`ShortCircuitServer`, one per storage service):

* Listens on an abstract Unix-domain socket (SOCK_SEQPACKET, name `deepstack-sc-<service>-<boot>`), found
  through the service's `short_circuit` RPC, which also returns the machine's boot id so a client on another
  host (or network namespace) never tries it.
* Every message is authenticated like the TCP RPC: HMAC-SHA256 with the cluster secret over a per-connection
  server nonce, a direction byte, a sequence number and the whole message.
* `hello` returns a shared page (a memfd, passed with SCM_RIGHTS, mapped read-only by the client):
  per target a `serving_until` time (CLOCK_MONOTONIC, system-wide), a target generation and 4096
  generation slots. The service
  sets `serving_until` to (send time of its last acknowledged heartbeat + 0.9 lease) while its own routing
  says the target is serving, and to 0 otherwise: the manager declares a service dead only a full lease
  after it last heard from it, so before `serving_until` no chain change can have dropped the target. The
  chunk engine bumps the generation slot of a chunk (hash of its id) and the target generation whenever a
  committed version changes (commit, resync, repair, removal), under its metadata lock and before the change
  is acknowledged.
* `open(target, chunks)` returns, per chunk, the committed version, its length, its page CRC32Cs, its slot
  and the slot's generation (read with the version under the engine's metadata lock), the target
  generation at that moment, and an fd of the
  version file (SCM_RIGHTS). Versions are copy-on-write files that are never modified, so the fd reads
  exactly that version for as long as it is held.

Client side (`ShortCircuitReader`, inside `ClusterBackend.read_array`):

* Per file a chunk table in the layout the C planner reads (`ds_table_read`, as embedded reads do), in
  strict mode: holes and reads past a chunk's committed length are not zero-filled but go to the RPC path,
  which confirms short answers with another replica.
* After the batch's I/O completes, every request is validated: its session is alive (the Unix socket has not
  hung up: a dead or restarted service is noticed at once), its target's `serving_until` lies in the future
  and its chunk's generation slot still holds the value granted with the fd (checked per chunk only when the
  target generation moved since the grants: with no writes the check is a few scalar reads per batch). A
  request that fails any check, reads short, fails its CRC32C or meets a chunk without a local serving
  replica is served by the RPC path (replica choice, retries, precise errors); the table is dropped and
  rebuilt on the next batch. So a read
  returns a version that was committed on a serving replica at the moment of the check, as a read served by
  the service does: never uncommitted or stale data.

Switches: `connect(..., short_circuit=False)` or `DEEPSTACK_SHORT_CIRCUIT=0` on the client;
`deepstack fs serve storage --no-short-circuit` on the service.
"""
from __future__ import annotations

import hmac
import json
import logging
import mmap
import os
import select
import socket
import struct
import threading
import time
import zlib

from torch_deepstack.storage.chunk_engine import O_DIRECT
from torch_deepstack.storage.errors import AuthError, InvalidArgument, StorageError, Unavailable
from torch_deepstack.storage.paths import validate_chunk_id
from torch_deepstack.storage.rpc import ConnectionServer

log = logging.getLogger("torch_deepstack.storage.short_circuit")

NSLOTS = 4096  # generation slots per target
NONCE_BYTES = 16
MAX_MESSAGE = 1 << 20
MAX_CHUNKS = 128  # per open request (SCM_RIGHTS carries at most 253 fds per message)
MAX_REPLY_CRC_BYTES = 96 << 10  # keeps a reply under the socket's send buffer
SERVING_FRACTION = 0.9  # of the lease: serving_until = heartbeat send time + this * lease
_HEAD = struct.Struct("<QI")  # seq, header length


def enabled_by_env() -> bool:
    return os.environ.get("DEEPSTACK_SHORT_CIRCUIT", "1") != "0"


def machine_id() -> str:
    """This kernel's boot id: equal only for processes on the same host."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


def slot_of(cid: str) -> int:
    return zlib.crc32(cid.encode()) % NSLOTS


def _seal(secret: bytes, direction: bytes, nonce: bytes, seq: int, header: dict, blob: bytes = b"") -> bytes:
    hb = json.dumps(header, separators=(",", ":")).encode()
    body = _HEAD.pack(seq, len(hb)) + hb + blob
    return hmac.new(secret, direction + nonce + body, "sha256").digest() + body


def _unseal(secret: bytes, direction: bytes, nonce: bytes, seq: int, msg: bytes) -> tuple[dict, memoryview]:
    if len(msg) < 32 + _HEAD.size:
        raise AuthError("short-circuit: malformed message")
    mac, body = msg[:32], memoryview(msg)[32:]
    if not hmac.compare_digest(mac, hmac.new(secret, direction + nonce + body, "sha256").digest()):
        raise AuthError("short-circuit: bad MAC (wrong shared secret or tampered message)")
    got_seq, hlen = _HEAD.unpack_from(body, 0)
    if got_seq != seq:
        raise AuthError(f"short-circuit: replayed or reordered message (seq {got_seq}, expected {seq})")
    if _HEAD.size + hlen > len(body):
        raise AuthError("short-circuit: malformed message")
    header = json.loads(bytes(body[_HEAD.size:_HEAD.size + hlen]))
    return header, body[_HEAD.size + hlen:]


def _recv(sock: socket.socket, maxfds: int = 0) -> tuple[bytes, list[int]]:
    msg, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, maxfds)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise AuthError("short-circuit: truncated message")
    return msg, fds


# ---------------------------------------------------------------------------------------------- service
class ShortCircuitServer(ConnectionServer):
    """The service's side: the shared page, the generation hooks and the Unix socket."""

    def __init__(self, service_id: str, engines: dict, secret: bytes, boot: str):
        self.secret, self.engines = secret, engines
        self.tids = list(engines)
        self.name = f"deepstack-sc-{service_id}-{boot}"
        n = len(self.tids)
        self.glob_offset = -(-8 * n // 64) * 64
        self.gens_offset = self.glob_offset + -(-8 * n // 64) * 64
        self.size = -(-(self.gens_offset + 8 * n * NSLOTS) // mmap.PAGESIZE) * mmap.PAGESIZE
        self.memfd = os.memfd_create(f"deepstack-sc-{service_id}", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, self.size)
        self.page = mmap.mmap(self.memfd, self.size)
        self.until = memoryview(self.page)[:8 * n].cast("d")
        self.glob = memoryview(self.page)[self.glob_offset:self.glob_offset + 8 * n].cast("Q")
        self.gens = memoryview(self.page)[self.gens_offset:self.gens_offset + 8 * n * NSLOTS].cast("Q")
        self._hooks = []
        for k, tid in enumerate(self.tids):
            hook = self._bumper(k)
            engines[tid].change_hooks.append(hook)
            self._hooks.append((engines[tid], hook))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.bind("\0" + self.name)
        sock.listen(64)
        self._init_listener(sock, f"sc-{service_id}")
        self._start_accepting()

    def _bumper(self, k: int):
        gens, glob, base = self.gens, self.glob, k * NSLOTS

        def bump(cid):  # called under the engine's metadata lock: one writer per target at a time
            if cid is None:
                for i in range(base, base + NSLOTS):
                    gens[i] += 1
            else:
                i = base + slot_of(cid)
                gens[i] += 1
            glob[k] += 1
        return bump

    # ------------------------------------------------------------------ serving state
    def renew(self, routing: dict, sent_at: float) -> None:
        """After an acknowledged heartbeat sent at `sent_at`: serving targets may serve until the lease
        (as the manager counts it) could have run out; the others not at all."""
        until = sent_at + SERVING_FRACTION * float(routing.get("lease", 3.0))
        states = self._states(routing)
        for k, tid in enumerate(self.tids):
            self.until[k] = until if states.get(tid) == "serving" else 0.0

    def restrict(self, routing: dict) -> None:
        """A routing table that renews no lease: only withdraw targets it shows not serving."""
        states = self._states(routing)
        for k, tid in enumerate(self.tids):
            if states.get(tid) != "serving":
                self.until[k] = 0.0

    @staticmethod
    def _states(routing: dict) -> dict:
        return {t["id"]: t["state"] for c in routing.get("chains", {}).values() for t in c["targets"]}

    # ------------------------------------------------------------------ socket
    def _serve(self, conn: socket.socket) -> None:
        nonce = os.urandom(NONCE_BYTES)
        seq = 0
        try:
            conn.send(nonce)
            while not self._stop.is_set():
                msg, fds = _recv(conn)
                for fd in fds:  # clients send none
                    os.close(fd)
                if not msg:
                    return
                seq += 1
                header, _ = _unseal(self.secret, b"C", nonce, seq, msg)
                method = header.get("m")
                if method == "hello":
                    reply, blob, out_fds, handles = {"targets": self.tids, "nslots": NSLOTS, "size": self.size,
                                                     "glob_offset": self.glob_offset,
                                                     "gens_offset": self.gens_offset}, b"", [self.memfd], []
                elif method == "open":
                    reply, blob, out_fds, handles = self._open(header)
                else:
                    reply, blob, out_fds, handles = {"error": f"unknown method {method!r}"}, b"", [], []
                seq += 1
                try:
                    socket.send_fds(conn, [_seal(self.secret, b"S", nonce, seq, reply, blob)], out_fds)
                finally:
                    for eng, hs in handles:
                        eng._fds.release_many(hs)
        except AuthError as e:
            log.warning("short-circuit: refused a client: %s", e)
        except (OSError, ValueError):
            pass
        finally:
            self._forget(conn)

    def _open(self, header: dict):
        tid, chunks = header.get("target"), header.get("chunks")
        if tid not in self.engines or not isinstance(chunks, list) or len(chunks) > MAX_CHUNKS:
            return {"error": f"open needs a target of this service and at most {MAX_CHUNKS} chunks"}, b"", [], []
        k = self.tids.index(tid)
        eng = self.engines[tid]
        items, blobs, fds, hs = [], [], [], []
        crc_bytes = 0
        flags = os.O_RDONLY | (O_DIRECT if eng.direct_io else 0)
        serving = self.until[k] > time.monotonic()
        for cid in chunks:
            try:
                cid = validate_chunk_id(cid)
            except StorageError:
                items.append(None)
                continue
            item = None
            if serving and crc_bytes < MAX_REPLY_CRC_BYTES:
                slot = slot_of(cid)
                with eng._meta_lock:  # the generations and the version they vouch for, read together
                    gen, glob = self.gens[k * NSLOTS + slot], self.glob[k]
                    m = eng._cached(cid)
                    v = m.committed if m is not None else None
                    if v is not None and v.length > 0:
                        try:
                            h = eng._fds.acquire(eng._data_path(cid, v.ver), flags)
                        except OSError:  # missing version file: the RPC path reports it
                            h = None
                        if h is not None:
                            hs.append(h)
                            fds.append(h.fd)
                            item = [v.ver, v.length, slot, gen, len(v.page_crcs), eng.crc_block, glob]
                            blobs.append(v.page_crcs)
                            crc_bytes += len(v.page_crcs)
            items.append(item)
        return {"items": items}, b"".join(blobs), fds, [(eng, hs)]

    def close(self) -> None:
        self._stop.set()
        for k in range(len(self.tids)):
            self.until[k] = 0.0
        for eng, hook in self._hooks:
            if hook in eng.change_hooks:
                eng.change_hooks.remove(hook)
        self._close_listener()


# ---------------------------------------------------------------------------------------------- client
class Session:
    """One client's connection to one service's short-circuit socket, with the shared page mapped."""

    def __init__(self, name: str, secret: bytes, timeout: float = 5.0):
        self.secret = secret
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        self.seq = 0
        self.lock = threading.Lock()
        self.dead = False
        self.page = None
        try:
            self.sock.connect("\0" + name)
            self.nonce = self.sock.recv(64)
            if len(self.nonce) != NONCE_BYTES:
                raise Unavailable("short-circuit: bad handshake")
            hello, _, fds = self._call({"m": "hello"}, 1)
            if len(fds) != 1:
                raise Unavailable("short-circuit: no shared page in hello")
            try:
                self.page = mmap.mmap(fds[0], hello["size"], prot=mmap.PROT_READ)
            finally:
                os.close(fds[0])
        except BaseException:
            self.sock.close()
            raise
        import numpy as np

        self.tindex = {tid: k for k, tid in enumerate(hello["targets"])}
        n = len(hello["targets"])
        self.nslots = hello["nslots"]
        self.until = np.frombuffer(self.page, np.float64, n)
        self.glob = np.frombuffer(self.page, np.uint64, n, hello["glob_offset"])
        self.gens = np.frombuffer(self.page, np.uint64, n * self.nslots, hello["gens_offset"])
        self.poller = select.poll()
        self.poller.register(self.sock, select.POLLIN | select.POLLHUP | select.POLLERR)

    def _call(self, header: dict, maxfds: int):
        with self.lock:
            if self.dead:
                raise Unavailable("short-circuit session is closed")
            try:
                self.seq += 1
                self.sock.send(_seal(self.secret, b"C", self.nonce, self.seq, header))
                msg, fds = _recv(self.sock, maxfds)
                if not msg:
                    raise Unavailable("short-circuit: service closed the connection")
                self.seq += 1
                try:
                    reply, blob = _unseal(self.secret, b"S", self.nonce, self.seq, msg)
                except BaseException:
                    for fd in fds:
                        os.close(fd)
                    raise
            except (OSError, ValueError) as e:
                self.dead = True
                if isinstance(e, StorageError):
                    raise
                raise Unavailable(f"short-circuit: {e}") from e
        if "error" in reply:
            for fd in fds:
                os.close(fd)
            raise InvalidArgument(f"short-circuit: {reply['error']}")
        return reply, blob, fds

    def alive(self) -> bool:
        """False once the service hung up (died, restarted, stopped): checked before trusting any read."""
        if not self.dead and self.poller.poll(0):
            self.dead = True
        return not self.dead

    def open(self, tid: str, cids: list[str]) -> list:
        """Per chunk None (no local committed copy to hand out) or
        (ver, length, slot, gen, crc_block, page CRCs, fd, target generation)."""
        reply, blob, fds = self._call({"m": "open", "target": tid, "chunks": cids}, MAX_CHUNKS)
        items = reply.get("items")
        if not isinstance(items, list) or len(items) != len(cids) or \
                len(fds) != sum(it is not None for it in items):
            for fd in fds:
                os.close(fd)
            self.dead = True
            raise Unavailable("short-circuit: malformed open reply")
        out, pos, k = [], 0, 0
        for it in items:
            if it is None:
                out.append(None)
                continue
            ver, length, slot, gen, nb, crc_block, glob = it
            out.append((ver, length, slot, gen, crc_block, bytes(blob[pos:pos + nb]), fds[k], glob))
            pos += nb
            k += 1
        return out

    def close(self) -> None:
        self.dead = True
        try:
            self.sock.close()
        except OSError:
            pass


__all__ = ["ShortCircuitServer", "Session", "machine_id", "slot_of", "enabled_by_env", "NSLOTS"]
