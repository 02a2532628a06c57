"""One transactional key-value interface, two engines: SQLite (embedded default) and etcd (clusters).

Metadata and cluster-manager state are written only through `KVEngine.transaction(fn)`: `fn(txn)` reads with
`get`/`scan` and writes with `put`/`delete`; the engine commits atomically and re-runs `fn` when a concurrent
transaction conflicts (so `fn` must have no side effects besides the txn). Both engines give serializable
isolation for what `fn` read:

* SQLite: `BEGIN IMMEDIATE` takes the database write lock for read-write transactions (one writer at a time,
  across threads and processes); read-only ones see a snapshot.
* etcd: optimistic. Every read happens at one snapshot revision; writes are buffered; commit is a single etcd
  `Txn` whose compares check that each key read is unchanged (mod revision, or still absent) and that no key in
  a scanned range was modified or created after the snapshot. On failure `fn` is re-run.

URIs: `sqlite:///abs/path/meta.db`, a plain path (SQLite), `etcd://host:port[/prefix]`.
"""
from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
import urllib.parse
from typing import Callable, TypeVar

from torch_deepstack.storage.errors import BadURI, Conflict, Unavailable

T = TypeVar("T")


def prefix_end(prefix: bytes) -> bytes:
    """Smallest key greater than every key starting with `prefix` (etcd's range_end convention)."""
    p = bytearray(prefix)
    while p:
        if p[-1] < 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    return b"\0"  # etcd: "\0" as range_end means "to the end of the keyspace"


class Txn:
    def get(self, key: bytes) -> bytes | None:
        raise NotImplementedError

    def put(self, key: bytes, value: bytes) -> None:
        raise NotImplementedError

    def delete(self, key: bytes) -> None:
        raise NotImplementedError

    def scan(self, prefix: bytes, limit: int | None = None) -> list[tuple[bytes, bytes]]:
        """All (key, value) with key starting with `prefix`, in key order."""
        raise NotImplementedError


class KVEngine:
    name = "abstract"
    max_retries = 64

    def _run_once(self, fn: Callable[[Txn], T], read_only: bool) -> T:
        raise NotImplementedError

    def transaction(self, fn: Callable[[Txn], T], *, read_only: bool = False) -> T:
        delay = 0.001
        for _ in range(self.max_retries):
            try:
                return self._run_once(fn, read_only)
            except Conflict:
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 0.05)
        raise Conflict(f"{self.name}: transaction still conflicting after {self.max_retries} retries")

    # Convenience single-key helpers (each its own transaction).
    def get(self, key: bytes) -> bytes | None:
        return self.transaction(lambda t: t.get(key), read_only=True)

    def put(self, key: bytes, value: bytes) -> None:
        self.transaction(lambda t: t.put(key, value))

    def scan(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        return self.transaction(lambda t: t.scan(prefix), read_only=True)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- SQLite
class _SQLiteTxn(Txn):
    def __init__(self, conn: sqlite3.Connection, read_only: bool):
        self.conn = conn
        self.read_only = read_only

    def get(self, key):
        row = self.conn.execute("SELECT v FROM kv WHERE k = ?", (bytes(key),)).fetchone()
        return None if row is None else bytes(row[0])

    def put(self, key, value):
        if self.read_only:
            raise RuntimeError("put() in a read-only transaction")
        self.conn.execute("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)", (bytes(key), bytes(value)))

    def delete(self, key):
        if self.read_only:
            raise RuntimeError("delete() in a read-only transaction")
        self.conn.execute("DELETE FROM kv WHERE k = ?", (bytes(key),))

    def scan(self, prefix, limit=None):
        end = prefix_end(prefix)
        sql = "SELECT k, v FROM kv WHERE k >= ? AND k < ? ORDER BY k"
        args: tuple = (bytes(prefix), end)
        if end == b"\0":
            sql, args = "SELECT k, v FROM kv WHERE k >= ? ORDER BY k", (bytes(prefix),)
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [(bytes(k), bytes(v)) for k, v in self.conn.execute(sql, args)]


class SQLiteKV(KVEngine):
    """Embedded engine: one SQLite file in WAL mode; connections are per thread."""

    name = "sqlite"

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._conn().execute("CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives process crashes (kill -9); only an OS crash may lose the last commits.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def _run_once(self, fn, read_only):
        conn = self._conn()
        try:
            conn.execute("BEGIN" if read_only else "BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise Conflict(str(e)) from e
            raise
        try:
            result = fn(_SQLiteTxn(conn, read_only))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.OperationalError as e:
            conn.execute("ROLLBACK")
            raise Conflict(str(e)) from e
        return result

    def close(self):
        with self._lock:
            for c in self._conns:
                try:
                    c.close()
                except sqlite3.Error:
                    pass
            self._conns.clear()
        self._local = threading.local()


# ------------------------------------------------------------------------------------------------ etcd
class _EtcdTxn(Txn):
    def __init__(self, engine: "EtcdKV"):
        self.e = engine
        self.revision = 0  # snapshot revision, fixed by the first read
        self.reads: dict[bytes, int] = {}  # key -> mod_revision seen (0: absent)
        self.ranges: list[bytes] = []  # scanned prefixes
        self.writes: dict[bytes, bytes | None] = {}  # None = delete

    def _range(self, key: bytes, range_end: bytes = b"", limit: int = 0):
        rpc = self.e.rpc
        req = rpc.RangeRequest(key=key, range_end=range_end, revision=self.revision, limit=limit)
        resp = self.e._call(self.e.client.kvstub.Range, req)
        if not self.revision:
            self.revision = resp.header.revision
        return resp.kvs

    def get(self, key):
        key = self.e.prefix + bytes(key)
        if key in self.writes:
            return self.writes[key]
        kvs = self._range(key)
        if kvs:
            self.reads[key] = kvs[0].mod_revision
            return bytes(kvs[0].value)
        self.reads[key] = 0
        return None

    def put(self, key, value):
        self.writes[self.e.prefix + bytes(key)] = bytes(value)

    def delete(self, key):
        self.writes[self.e.prefix + bytes(key)] = None

    def scan(self, prefix, limit=None):
        full = self.e.prefix + bytes(prefix)
        items = {}
        # Ask etcd for only as many keys as needed (each key read becomes a compare at commit, and etcd caps
        # a transaction's operations), allowing for keys this transaction deleted in the range.
        fetch = 0 if limit is None else limit + sum(1 for k, v in self.writes.items()
                                                    if v is None and k.startswith(full))
        for kv in self._range(full, prefix_end(full), fetch):
            self.reads[bytes(kv.key)] = kv.mod_revision
            items[bytes(kv.key)] = bytes(kv.value)
        self.ranges.append(full)
        for k, v in self.writes.items():
            if k.startswith(full):
                if v is None:
                    items.pop(k, None)
                else:
                    items[k] = v
        n = len(self.e.prefix)
        out = [(k[n:], items[k]) for k in sorted(items)]
        return out if limit is None else out[:limit]

    def commit(self):
        if not self.writes:
            return
        rpc = self.e.rpc
        C = rpc.Compare
        compares = []
        for key, mod in self.reads.items():
            if mod:
                compares.append(C(result=C.EQUAL, target=C.MOD, key=key, mod_revision=mod))
            else:
                compares.append(C(result=C.EQUAL, target=C.VERSION, key=key, version=0))
        if self.revision:
            for p in self.ranges:  # no key in a scanned range created or modified after the snapshot
                compares.append(C(result=C.LESS, target=C.MOD, key=p, range_end=prefix_end(p),
                                  mod_revision=self.revision + 1))
        ops = []
        for key, value in self.writes.items():
            if value is None:
                ops.append(rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key)))
            else:
                ops.append(rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value)))
        resp = self.e._call(self.e.client.kvstub.Txn, rpc.TxnRequest(compare=compares, success=ops, failure=[]))
        if not resp.succeeded:
            raise Conflict("etcd transaction conflicted")


class EtcdKV(KVEngine):
    """etcd v3 engine through the `etcd-sdk-python` client (module `pyetcd`)."""

    name = "etcd"

    def __init__(self, host: str = "127.0.0.1", port: int = 2379, prefix: bytes = b"/deepstack/",
                 timeout: float = 10.0):
        try:
            import pyetcd
            from pyetcd import etcdrpc
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("the etcd engine needs `pip install etcd-sdk-python protobuf`") from e
        self.client = pyetcd.client(host=host, port=port, timeout=timeout,
                                    grpc_options=[("grpc.max_receive_message_length", 256 << 20),
                                                  ("grpc.max_send_message_length", 64 << 20)])
        self.rpc = etcdrpc
        self.prefix = prefix
        self.timeout = timeout
        self.address = f"{host}:{port}"

    def _call(self, method, request):
        import grpc

        try:
            return method(request, self.timeout, credentials=self.client.call_credentials,
                          metadata=self.client.metadata)
        except grpc.RpcError as e:
            raise Unavailable(f"etcd at {self.address}: {e.code().name}: {e.details()}") from e

    def _run_once(self, fn, read_only):
        txn = _EtcdTxn(self)
        result = fn(txn)
        if not read_only:
            txn.commit()
        return result

    def close(self):
        try:
            self.client.close()
        except Exception:
            pass


def open_kv(uri: str) -> KVEngine:
    """Open a KV engine from `sqlite:///path`, a filesystem path, or `etcd://host:port[/prefix]`."""
    if not isinstance(uri, str) or not uri:
        raise BadURI(f"kv uri must be a non-empty string, got {uri!r}")
    if uri.startswith("etcd://"):
        u = urllib.parse.urlparse(uri)
        if not u.hostname:
            raise BadURI(f"etcd uri needs a host: {uri!r} (expected etcd://host:port[/prefix])")
        prefix = (u.path.rstrip("/") + "/").encode() if u.path not in ("", "/") else b"/deepstack/"
        return EtcdKV(u.hostname, u.port or 2379, prefix=prefix)
    if uri.startswith("sqlite://"):
        path = uri[len("sqlite://"):]
        if not path.startswith("/"):
            raise BadURI(f"sqlite uri needs an absolute path: {uri!r} (expected sqlite:///abs/path.db)")
        return SQLiteKV(path)
    if "://" in uri:
        raise BadURI(f"unknown kv scheme in {uri!r}: use sqlite:///path or etcd://host:port")
    return SQLiteKV(uri)


__all__ = ["KVEngine", "Txn", "SQLiteKV", "EtcdKV", "open_kv", "prefix_end"]
