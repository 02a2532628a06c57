"""A picklable handle on a deepstack file system that connects lazily, once per process.

DataLoader workers get the dataset by fork (a copy of the parent's memory, including its live client with
dead I/O threads) or by spawn/forkserver (a pickle). Either way the worker must open its own client: the handle
keys clients by `os.getpid()`, never pickles a live one, and shares one client per (process, URI).
"""
from __future__ import annotations

import os
import threading

from torch_deepstack import storage

_CLIENTS: dict[tuple, storage.FileSystem] = {}  # (pid, uri, options) -> client
_LOCK = threading.Lock()
# Clients inherited across fork hold the parent's threads and SQLite handles: the child must neither use nor
# close them (closing could disturb the parent's files), so they are parked here for the process's lifetime.
_INHERITED: list = []


class FSHandle:
    """`get()` returns this process's client for the file system named by `fs` (a FileSystem or a URI)."""

    def __init__(self, fs: storage.FileSystem | str | os.PathLike, *, secret: str | bytes | None = None,
                 options: dict | None = None):
        self.options = dict(options or {})  # connect() options for clients this handle opens
        self._given: storage.FileSystem | None = None
        if isinstance(fs, storage.FileSystem):
            self.uri = fs.uri
            self._given, self._given_pid = fs, os.getpid()  # used as is in this process, never pickled
        elif isinstance(fs, (str, os.PathLike)):
            self.uri = os.fspath(fs)
        else:
            raise TypeError(f"fs: expected a torch_deepstack.storage.FileSystem or a URI/path string, "
                            f"got {type(fs).__name__}")
        self.secret = secret

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_given"] = None
        return state

    def get(self) -> storage.FileSystem:
        given = self._given
        if given is not None and self._given_pid == os.getpid() and not _closed(given):
            return given
        options = self.options
        if "spin_us" not in options and _in_dataloader_worker():
            # Several worker processes read at once: a reader polling for its completions would take a core
            # from the others (measured: 8 workers at 4 KiB, 81k samples/s without polling, 59k with). Cluster
            # clients poll only in their short-circuit reads, which are the same local reads.
            options = {**options, "spin_us": 0}
        key = (os.getpid(), self.uri, tuple(sorted(options.items())))
        fs = _CLIENTS.get(key)
        if fs is not None and not _closed(fs):
            return fs
        with _LOCK:
            fs = _CLIENTS.get(key)
            if fs is None or _closed(fs):
                for k in [k for k in _CLIENTS if k[0] != os.getpid()]:
                    _INHERITED.append(_CLIENTS.pop(k))
                fs = _CLIENTS[key] = storage.connect(self.uri, secret=self.secret, create=False, **options)
        return fs

    def __repr__(self) -> str:
        return f"FSHandle({self.uri!r})"


def _in_dataloader_worker() -> bool:
    import sys

    data = sys.modules.get("torch.utils.data")  # only a process that imported torch can be a worker
    return data is not None and data.get_worker_info() is not None


def _closed(fs) -> bool:
    return bool(getattr(fs, "_closed", False))


def join(*parts: str) -> str:
    """Join storage path components with '/' (storage paths are POSIX-like regardless of the host OS)."""
    out = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
    return "/" + out
