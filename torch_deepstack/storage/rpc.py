"""Authenticated RPC over TCP for the storage cluster (manager, storage services, clients).

Handshake: on connect the server sends a random 16-byte nonce. Then every frame in both directions is

    u32 body_len | 32-byte MAC | body
    body = u64 seq | u32 header_len | header (JSON) | payload

with MAC = HMAC-SHA256(secret, direction || nonce || seq || header || u32 payload_len || u32 CRC32C(payload)).
The header (method, arguments, sequence number) is thus authenticated, replays and reordering within a
connection are refused (seq must be exactly the next one), a frame from another connection cannot be spliced
in (the nonce differs), and payload bytes are bound to the header by their length and CRC32C (the same
checksum the chunk engine keeps). Payloads are not covered by the HMAC itself: that would cost ~0.6 ms per MiB
each way; run the cluster on a trusted network (or a tunnel) if payload forgery on the wire is in scope.

A request whose MAC does not verify gets one unauthenticated `{"error": "auth"}` frame and the connection is
closed. Large payloads are received straight into caller buffers (`sinks`), without an intermediate copy.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import socket
import struct
import threading
import time
from typing import Any, Callable

from torch_deepstack.storage.crc import crc32c
from torch_deepstack.storage.errors import AuthError, InvalidArgument, StorageError, Unavailable, error_from_code

log = logging.getLogger("torch_deepstack.storage.rpc")

NONCE_BYTES = 16
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 256 << 20
_LEN = struct.Struct("<I")
_SEQ_HLEN = struct.Struct("<QI")
_PL = struct.Struct("<II")
_ZERO_MAC = bytes(32)


def _mac(secret: bytes, direction: bytes, nonce: bytes, seq_hdr: bytes, header: bytes, plen: int, pcrc: int):
    h = hmac.new(secret, direction, "sha256")
    h.update(nonce)
    h.update(seq_hdr)
    h.update(header)
    h.update(_PL.pack(plen, pcrc))
    return h.digest()


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf))
    return buf


def _recv_into(sock: socket.socket, mv: memoryview) -> None:
    got = 0
    while got < len(mv):
        k = sock.recv_into(mv[got:])
        if k == 0:
            raise ConnectionError("connection closed by peer")
        got += k


def _tune(sock: socket.socket) -> None:
    """No Nagle delay for small RPCs; socket buffers big enough that a 1 MiB reply moves in few wake-ups."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:
            pass


def _sendall(sock: socket.socket, parts: list[memoryview]) -> None:
    """sendmsg until every part is out (it may send only a prefix of a large gather list)."""
    while parts:
        sent = sock.sendmsg(parts[:512])
        while sent and parts:
            if sent >= len(parts[0]):
                sent -= len(parts[0])
                parts.pop(0)
            else:
                parts[0] = parts[0][sent:]
                sent = 0


def _payload_parts(payload) -> list[memoryview]:
    if payload is None:
        return []
    if isinstance(payload, (list, tuple)):
        return [memoryview(p).cast("B") for p in payload]
    return [memoryview(payload).cast("B")]


class _Channel:
    """One authenticated connection (either side)."""

    def __init__(self, sock: socket.socket, secret: bytes, nonce: bytes, is_server: bool):
        self.sock, self.secret, self.nonce = sock, secret, nonce
        self.send_dir, self.recv_dir = (b"S", b"C") if is_server else (b"C", b"S")
        self.send_seq = 0
        self.recv_seq = 0
        self.rbuf = bytearray(self._RBUF)
        self.rpos = self.rend = 0

    # Buffered receive: one recv() usually brings a whole small frame (head, header and payload), instead of
    # three syscalls; large payloads bypass the buffer and land in their destination directly.
    _RBUF = 256 << 10

    def _read(self, n: int) -> memoryview:
        if self.rend - self.rpos < n:
            if self.rpos:
                left = self.rend - self.rpos
                self.rbuf[:left] = self.rbuf[self.rpos:self.rend]
                self.rpos, self.rend = 0, left
            if n > len(self.rbuf):
                self.rbuf.extend(bytes(n - len(self.rbuf)))
            mv = memoryview(self.rbuf)
            while self.rend < n:
                k = self.sock.recv_into(mv[self.rend:])
                if k == 0:
                    raise ConnectionError("connection closed by peer")
                self.rend += k
        out = memoryview(self.rbuf)[self.rpos:self.rpos + n]
        self.rpos += n
        return out

    def _read_into(self, dest: memoryview) -> None:
        have = min(self.rend - self.rpos, len(dest))
        if have:
            dest[:have] = memoryview(self.rbuf)[self.rpos:self.rpos + have]
            self.rpos += have
        if have < len(dest):
            _recv_into(self.sock, dest[have:])

    def send(self, header: dict, payload=None) -> None:
        parts = _payload_parts(payload)
        plen = sum(len(p) for p in parts)
        pcrc = 0
        for p in parts:
            pcrc = crc32c(p, pcrc)
        header = dict(header, plen=plen, pcrc=pcrc)
        hb = json.dumps(header, separators=(",", ":")).encode()
        self.send_seq += 1
        seq_hdr = _SEQ_HLEN.pack(self.send_seq, len(hb))
        mac = _mac(self.secret, self.send_dir, self.nonce, seq_hdr, hb, plen, pcrc)
        body_len = len(seq_hdr) + len(hb) + plen
        _sendall(self.sock, [memoryview(_LEN.pack(body_len)), memoryview(mac), memoryview(seq_hdr),
                             memoryview(hb)] + [p for p in parts if len(p)])

    def recv(self, sinks: Callable[[dict], list[memoryview] | None] | None = None) -> tuple[dict, Any]:
        """Receive one frame. `sinks(header)` may return buffers the payload is streamed into (zero-copy);
        otherwise the payload comes back as a bytearray."""
        head = bytes(self._read(4 + 32 + _SEQ_HLEN.size))
        (body_len,) = _LEN.unpack_from(head, 0)
        mac = bytes(head[4:36])
        seq, hlen = _SEQ_HLEN.unpack_from(head, 36)
        if hlen > MAX_HEADER or body_len > MAX_HEADER + MAX_PAYLOAD or hlen > body_len:
            raise AuthError("malformed frame (sizes out of range)")
        hb = bytes(self._read(hlen))
        if mac == _ZERO_MAC:
            try:
                err = json.loads(hb)
            except ValueError:
                err = {}
            if err.get("error") == "auth":
                raise AuthError(f"peer refused authentication: {err.get('message', 'wrong secret?')}")
            raise AuthError("unauthenticated frame")
        try:
            header = json.loads(hb)
            plen, pcrc = int(header["plen"]), int(header["pcrc"])
        except (ValueError, KeyError, TypeError):
            raise AuthError("malformed frame header") from None
        expected = _mac(self.secret, self.recv_dir, self.nonce, head[36:36 + _SEQ_HLEN.size], hb, plen, pcrc)
        if not hmac.compare_digest(mac, expected):
            raise AuthError("bad MAC: wrong shared secret or tampered frame")
        if seq != self.recv_seq + 1:
            raise AuthError(f"replayed or reordered frame (seq {seq}, expected {self.recv_seq + 1})")
        self.recv_seq = seq
        if body_len - _SEQ_HLEN.size - hlen != plen:
            raise AuthError("payload length does not match the authenticated header")
        bufs = sinks(header) if (sinks is not None and plen) else None
        if bufs is not None and sum(len(b) for b in bufs) == plen:
            crc = 0
            for b in bufs:
                self._read_into(b)
                crc = crc32c(b, crc)
            payload: Any = bufs
        else:
            payload = bytearray(plen)
            if plen:
                self._read_into(memoryview(payload))
            crc = crc32c(payload) if plen else 0
        if crc != pcrc:
            raise AuthError("payload CRC32C does not match the authenticated header")
        return header, payload


# ---------------------------------------------------------------------------------------------- server
Handler = Callable[[dict, Any], tuple[dict, Any]]


class ConnectionServer:
    """The connection bookkeeping of a thread-per-connection server (the TCP RPC server, the short-circuit fd
    socket): an accept loop that tracks every live connection, so that stopping closes the listener and then
    shuts each connection down. Subclasses call _init_listener() and, when ready, _start_accepting(); they
    define _serve(conn), which ends with _forget(conn)."""

    def _init_listener(self, sock: socket.socket, name: str) -> None:
        self.sock, self._thread_name = sock, name
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def _start_accepting(self) -> None:
        threading.Thread(target=self._accept_loop, name=f"{self._thread_name}-accept", daemon=True).start()

    def _prepare(self, conn: socket.socket) -> None:
        """Hook: per-connection socket options."""

    def _serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._prepare(conn)
            with self._lock:
                if self._stop.is_set():  # stopped while accepting: nobody would shut this one down
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name=f"{self._thread_name}-conn", daemon=True).start()

    def _forget(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.discard(conn)
        try:
            conn.close()
        except OSError:
            pass

    def _close_listener(self) -> None:
        self._stop.set()
        try:
            self.sock.close()
        except OSError:
            pass
        with self._lock:
            live = list(self._conns)
        for c in live:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass


class RpcServer(ConnectionServer):
    """Thread-per-connection server. `handlers[method](args, payload) -> (result dict, payload)`.
    Handlers raise StorageError subclasses; their `code` and message travel back to the caller."""

    def __init__(self, handlers: dict[str, Handler], secret: bytes, host: str = "127.0.0.1", port: int = 0,
                 name: str = "rpc"):
        if not secret:
            raise AuthError("an RPC server needs a non-empty shared secret")
        self.handlers, self.secret, self.name = handlers, secret, name
        self._init_listener(socket.create_server((host, port), reuse_port=False, backlog=128), name)
        self.host, self.port = self.sock.getsockname()[:2]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "RpcServer":
        self._start_accepting()
        return self

    def _prepare(self, conn: socket.socket) -> None:
        _tune(conn)

    def _serve(self, conn: socket.socket) -> None:
        nonce = os.urandom(NONCE_BYTES)
        ch = _Channel(conn, self.secret, nonce, is_server=True)
        try:
            conn.sendall(nonce)
            while not self._stop.is_set():
                try:
                    header, payload = ch.recv()
                except AuthError as e:
                    refusal = json.dumps({"error": "auth", "message": str(e)}).encode()
                    try:
                        conn.sendall(_LEN.pack(_SEQ_HLEN.size + len(refusal)) + _ZERO_MAC
                                     + _SEQ_HLEN.pack(0, len(refusal)) + refusal)
                    except OSError:
                        pass
                    log.warning("%s: refused a request: %s", self.name, e)
                    return
                method = header.get("m")
                fn = self.handlers.get(method) if isinstance(method, str) else None
                try:
                    if fn is None:
                        raise InvalidArgument(f"unknown method {method!r}")
                    result, out_payload = fn(header.get("a") or {}, payload)
                    ch.send({"ok": True, "r": result}, out_payload)
                except StorageError as e:
                    ch.send({"ok": False, "code": e.code, "msg": str(e)})
                except (ValueError, TypeError, KeyError) as e:
                    ch.send({"ok": False, "code": "invalid_argument", "msg": f"{type(e).__name__}: {e}"})
                except OSError as e:
                    ch.send({"ok": False, "code": "storage_error", "msg": f"{type(e).__name__}: {e}"})
        except (ConnectionError, OSError):
            pass
        finally:
            self._forget(conn)

    def stop(self) -> None:
        self._close_listener()


# ---------------------------------------------------------------------------------------------- client
class _Pending:
    __slots__ = ("ch", "method", "custom_timeout")

    def __init__(self, ch: _Channel, method: str, custom_timeout: bool):
        self.ch, self.method, self.custom_timeout = ch, method, custom_timeout


class RpcClient:
    """Pooled client of one server. Thread-safe: each call borrows one connection."""

    def __init__(self, host: str, port: int, secret: bytes, timeout: float = 10.0, connect_timeout: float = 2.0):
        self.host, self.port, self.secret = host, int(port), secret
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self._idle: list[_Channel] = []
        self._lock = threading.Lock()
        self._closed = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _connect(self) -> _Channel:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except OSError as e:
            raise Unavailable(f"cannot connect to {self.address}: {e.strerror or e}") from e
        _tune(sock)
        sock.settimeout(self.timeout)
        try:
            nonce = bytes(_recv_exact(sock, NONCE_BYTES))
        except (OSError, ConnectionError) as e:
            sock.close()
            raise Unavailable(f"{self.address}: handshake failed: {e}") from e
        return _Channel(sock, self.secret, nonce, is_server=False)

    def call(self, method: str, args: dict | None = None, payload=None, *,
             sinks: Callable[[dict], list[memoryview] | None] | None = None,
             timeout: float | None = None) -> tuple[Any, Any]:
        """Call `method`; returns (result, payload). Raises the server's StorageError, or Unavailable when
        the server cannot be reached or the connection breaks (the call may or may not have run)."""
        return self.finish(self.start(method, args, payload, timeout=timeout), sinks=sinks)

    def start(self, method: str, args: dict | None = None, payload=None, *,
              timeout: float | None = None) -> "_Pending":
        """Send a request without waiting for its answer (`finish` collects it). Starting requests to several
        servers before finishing any lets them work in parallel without client threads."""
        with self._lock:
            if self._closed:
                raise Unavailable(f"client of {self.address} is closed")
            ch = self._idle.pop() if self._idle else None
        if ch is None:
            ch = self._connect()
        if timeout is not None:
            ch.sock.settimeout(timeout)
        try:
            ch.send({"m": method, "a": args or {}}, payload)
        except (OSError, ConnectionError) as e:
            ch.sock.close()
            raise Unavailable(f"{self.address}: {method} failed: {e}") from e
        return _Pending(ch, method, timeout is not None)

    def finish(self, pending: "_Pending", *, sinks=None) -> tuple[Any, Any]:
        ch = pending.ch
        try:
            header, out = ch.recv(sinks)
        except AuthError:
            ch.sock.close()
            raise
        except (OSError, ConnectionError) as e:
            ch.sock.close()
            raise Unavailable(f"{self.address}: {pending.method} failed: {e}") from e
        if pending.custom_timeout:
            ch.sock.settimeout(self.timeout)
        with self._lock:
            if self._closed:
                ch.sock.close()
            else:
                self._idle.append(ch)
        if not header.get("ok"):
            raise error_from_code(header.get("code", "storage_error"), header.get("msg", "remote error"))
        return header.get("r"), out

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for ch in idle:
            try:
                ch.sock.close()
            except OSError:
                pass


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.05, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


class RpcClients:
    """One RpcClient per "host:port" address, made on first use; thread-safe."""

    def __init__(self, secret: bytes, timeout: float):
        self.secret, self.timeout = secret, timeout
        self._clients: dict[str, RpcClient] = {}
        self._lock = threading.Lock()

    def get(self, addr: str) -> RpcClient:
        with self._lock:
            c = self._clients.get(addr)
            if c is None:
                host, port = addr.rsplit(":", 1)
                c = self._clients[addr] = RpcClient(host, int(port), self.secret, timeout=self.timeout)
            return c

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            c.close()
