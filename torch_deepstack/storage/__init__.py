"""torch_deepstack.storage: a 3FS-style file system for PyTorch workloads.

    fs = torch_deepstack.storage.connect("/data/fs")                 # embedded: everything in-process
    fs = torch_deepstack.storage.connect("deepstack://127.0.0.1:9000", secret=...)   # a cluster

See docs/storage.md for the API, the architecture and the on-disk format.
"""
from __future__ import annotations

import os
import urllib.parse

from torch_deepstack.storage.client import (File, FileStat, FileSystem, ReadBatch, ReadRequest, ReadResult,
                                            ReadRing, writable_bytes)
from torch_deepstack.storage.errors import (AlreadyExists, AuthError, BadURI, ChunkCorrupt, DirectoryNotEmpty,
                                            InvalidArgument, InvalidPath, IsADirectory, NameTooLong, NoSpace,
                                            NotADirectory, NotFound, ReadOnly, StorageError,
                                            Unavailable)

ENV_URI = "DEEPSTACK_FS"
ENV_SECRET = "DEEPSTACK_FS_SECRET"
ENV_SECRET_FILE = "DEEPSTACK_FS_SECRET_FILE"


def parse_uri(uri: str) -> tuple[str, object]:
    """('embedded', abs_path) or ('cluster', (host, port)). Raises BadURI with the accepted forms."""
    if not isinstance(uri, (str, os.PathLike)):
        raise BadURI(f"expected a path or a URI string, got {type(uri).__name__}")
    uri = os.fspath(uri)
    if not uri:
        raise BadURI("empty URI: pass a directory path, file:///abs/dir or deepstack://host:port")
    if uri.startswith("deepstack://"):
        u = urllib.parse.urlparse(uri)
        try:
            port = u.port
        except ValueError:
            port = None
        if not u.hostname or port is None or u.path not in ("", "/") or u.query:
            raise BadURI(f"bad cluster URI {uri!r}: expected deepstack://host:port (the cluster manager)")
        return "cluster", (u.hostname, port)
    if uri.startswith("file://"):
        path = urllib.parse.unquote(uri[len("file://"):])
        if not path.startswith("/"):
            raise BadURI(f"bad file URI {uri!r}: expected file:///absolute/dir")
        return "embedded", path
    if "://" in uri:
        raise BadURI(f"unknown URI scheme in {uri!r}: use a directory path, file:///abs/dir or "
                     f"deepstack://host:port")
    return "embedded", os.path.abspath(uri)


def read_secret(secret: str | bytes | None = None) -> bytes | None:
    """The cluster's shared HMAC secret: the argument, else $DEEPSTACK_FS_SECRET, else the file named by
    $DEEPSTACK_FS_SECRET_FILE."""
    if secret is None:
        secret = os.environ.get(ENV_SECRET)
    if secret is None and os.environ.get(ENV_SECRET_FILE):
        with open(os.environ[ENV_SECRET_FILE], "rb") as f:
            secret = f.read().strip()
    if secret is None:
        return None
    return secret.encode() if isinstance(secret, str) else bytes(secret)


def connect(uri: str | os.PathLike | None = None, *, secret: str | bytes | None = None, create: bool = True,
            **options) -> FileSystem:
    """Open a deepstack file system.

    uri: a local directory (or file:///abs/dir) for the embedded stack, created on first use when
         create=True; or deepstack://host:port for a cluster (the manager's address). None reads $DEEPSTACK_FS.
    secret: the cluster's shared secret (else $DEEPSTACK_FS_SECRET / $DEEPSTACK_FS_SECRET_FILE).
    options: embedded: chunk_size, sync, io_threads, capacity_bytes, direct_io, read_only (refuse writes with
             ReadOnly; never garbage-collects; for DataLoader workers), spin_us (completion polling of
             batched reads; 0 when several processes read at once); cluster: timeout, io_threads, retry_for,
             short_circuit (read same-host replicas' chunk files directly; default on), spin_us (as above, for
             those reads).
    """
    if uri is None:
        uri = os.environ.get(ENV_URI)
        if not uri:
            raise BadURI(f"no file system given: pass a path or URI, or set ${ENV_URI}")
    kind, where = parse_uri(uri)
    if kind == "embedded":
        from torch_deepstack.storage.local import open_embedded

        return open_embedded(where, create=create, **options)
    key = read_secret(secret)
    if not key:
        raise AuthError(f"a cluster needs the shared secret: pass secret=..., or set ${ENV_SECRET} or "
                        f"${ENV_SECRET_FILE}")
    from torch_deepstack.storage.cluster_client import open_cluster

    host, port = where
    return open_cluster(host, port, key, **options)


__all__ = [
    "connect", "parse_uri", "FileSystem", "File", "FileStat", "ReadRequest", "ReadResult", "ReadBatch",
    "ReadRing", "writable_bytes", "StorageError", "NotFound", "AlreadyExists", "NotADirectory", "IsADirectory",
    "DirectoryNotEmpty", "InvalidPath", "InvalidArgument", "NameTooLong", "NoSpace", "ChunkCorrupt",
    "Unavailable", "AuthError", "BadURI", "ReadOnly",
]
