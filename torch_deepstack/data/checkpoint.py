"""A torch.distributed.checkpoint (DCP) backend on deepstack storage, with atomic saves.

    import torch.distributed.checkpoint as dcp
    from torch_deepstack.data import DeepstackStorageWriter, DeepstackStorageReader

    dcp.save(state, storage_writer=DeepstackStorageWriter("/data/fs", "/ckpt/run1"))
    dcp.load(state, storage_reader=DeepstackStorageReader("/data/fs", "/ckpt/run1"))

Layout of a checkpoint directory `<path>` on storage:

    <path>/LATEST          the name of the committed version ("v00000003"), replaced by an atomic rename
    <path>/v00000003/      a complete DCP checkpoint: .metadata plus one data file per rank (__<rank>_<n>.distcp)

Every save writes a new version directory; the coordinator commits it in `finish()` (after every rank's data
is written) by renaming a fresh LATEST over the old one, then deletes versions older than `keep_last`. A
crash anywhere before that rename leaves LATEST naming the previous complete version, which is what a reader
loads. DCP's file format is unchanged: the tensors are DCP's own torch.save/byte records, so DCP's resharding
and planners work as with FileSystemWriter.
"""
from __future__ import annotations

import io
import logging
import os
import secrets
import weakref
from contextlib import contextmanager
from typing import Any, Generator

import dataclasses

from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystemBase, _StoragePrefix

from torch_deepstack import storage

logger = logging.getLogger(__name__)
from torch_deepstack.data._fs import FSHandle, join

LATEST = "LATEST"
_VERSION_PREFIX = "v"


def _version_name(n: int) -> str:
    return f"{_VERSION_PREFIX}{n:08d}"


def _version_number(name: str) -> int | None:
    if name.startswith(_VERSION_PREFIX) and name[1:].isdigit():
        return int(name[1:])
    return None


class DeepstackDCPFileSystem(FileSystemBase):
    """DCP's file-system interface over a deepstack FileSystem (paths are storage paths)."""

    def __init__(self, handle: FSHandle, read_buffer: int = 8 << 20):
        self.handle = handle
        self.read_buffer = read_buffer

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        fs = self.handle.get()
        f = fs.open(str(path), mode)
        # DCP reads many small records with seek+read: buffer them so each is not a storage round trip.
        stream = io.BufferedReader(f, self.read_buffer) if "r" in mode and "+" not in mode else f
        try:
            yield stream
        finally:
            stream.close()

    def concat_path(self, path: str | os.PathLike, suffix: str) -> str:
        return join(str(path), suffix)

    def init_path(self, path: str | os.PathLike) -> str:
        return join(str(path))

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        self.handle.get().rename(str(path), str(new_path))

    def mkdir(self, path: str | os.PathLike) -> None:
        self.handle.get().makedirs(str(path), exist_ok=True)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return False  # never auto-selected by DCP: pass our writer/reader explicitly

    def exists(self, path: str | os.PathLike) -> bool:
        return self.handle.get().exists(str(path))

    def rm_file(self, path: str | os.PathLike) -> None:
        self.handle.get().remove(str(path))

    def ls(self, path: str | os.PathLike) -> list[str]:
        return [join(str(path), n) for n in self.handle.get().listdir(str(path))]


class _Fixed:
    def __init__(self, fs: storage.FileSystem):
        self.fs, self.uri = fs, fs.uri

    def get(self) -> storage.FileSystem:
        return self.fs


def read_latest(fs: storage.FileSystem, base: str) -> str | None:
    """The committed version directory name under `base`, or None when nothing was ever committed."""
    try:
        name = fs.read_bytes(join(base, LATEST)).decode().strip()
    except FileNotFoundError:
        return None
    if _version_number(name) is None:
        raise ValueError(f"{join(base, LATEST)} holds {name!r}, not a checkpoint version name (corrupt)")
    return name


@dataclasses.dataclass
class _VersionedPrefix(_StoragePrefix):
    version: str = ""


class DeepstackStorageWriter(FileSystemWriter):
    """DCP StorageWriter saving into `path` on deepstack storage `fs` (a FileSystem or URI), atomically.

    keep_last: committed versions to keep (older ones are deleted after a commit). thread_count: I/O threads
    per rank. Other keyword arguments go to FileSystemWriter (single_file_per_rank, per_thread_copy_ahead)."""

    def __init__(self, fs: storage.FileSystem | str, path: str, *, keep_last: int = 1, thread_count: int = 1,
                 secret: str | bytes | None = None, **kwargs: Any):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        # sync_files=False: storage makes every chunk durable itself; fsync of a storage handle means nothing.
        super().__init__(path, sync_files=False, thread_count=thread_count, overwrite=True, **kwargs)
        self._handle = FSHandle(fs, secret=secret)
        self.fs = DeepstackDCPFileSystem(self._handle)
        self.base = join(str(path))
        self.keep_last = keep_last
        self.path = self.base
        self.version: str | None = None

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id:
            self.base = join(str(checkpoint_id))
        super().reset(None)
        self.path = self.base

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        super().set_up_storage_writer(is_coordinator, *args, **kwargs)
        self._handle.get().makedirs(self.base, exist_ok=True)  # connects every rank before anyone writes

    def prepare_local_plan(self, plan):
        # DCP's own prepare_local_plan checks for an existing .metadata at self.path: the new version dir
        # is chosen only by the coordinator (below), so check the base, where none ever lives.
        self.path = self.base
        return super().prepare_local_plan(plan)

    def prepare_global_plan(self, plans):
        # The coordinator alone picks the next version and hands it to every rank inside its plan, so all
        # ranks agree even if some process's view of LATEST is stale.
        latest = read_latest(self._handle.get(), self.base)
        version = _version_name((0 if latest is None else _version_number(latest)) + 1)
        plans = super().prepare_global_plan(plans)
        return [dataclasses.replace(p, storage_data=_VersionedPrefix(p.storage_data.prefix, version))
                for p in plans]

    def write_data(self, plan, planner):
        self.version = plan.storage_data.version
        self.path = join(self.base, self.version)
        self.fs.mkdir(self.path)
        return super().write_data(plan, planner)

    def finish(self, metadata, results) -> None:
        super().finish(metadata, results)  # .metadata lands in the version dir (tmp file + rename)
        fs = self._handle.get()
        tmp = join(self.base, f"{LATEST}.tmp-{secrets.token_hex(4)}")
        fs.write_bytes(tmp, self.version.encode())
        fs.rename(tmp, join(self.base, LATEST))  # the commit point
        committed = _version_number(self.version)
        for name in fs.listdir(self.base):
            n = _version_number(name)
            stale_tmp = name.startswith(f"{LATEST}.tmp-")
            if (n is not None and n <= committed - self.keep_last) or stale_tmp:
                try:
                    fs.remove(join(self.base, name), recursive=True)
                except FileNotFoundError:
                    pass


class DeepstackStorageReader(FileSystemReader):
    """DCP StorageReader loading the last committed version of the checkpoint at `path` on `fs`.

    version: load that version ("v00000002") instead of LATEST. A plain DCP directory (with .metadata and no
    LATEST) at `path` also loads."""

    def __init__(self, fs: storage.FileSystem | str, path: str, *, version: str | None = None,
                 secret: str | bytes | None = None, read_buffer: int = 8 << 20):
        super().__init__(path)
        self._handle = FSHandle(fs, secret=secret)
        self.fs = DeepstackDCPFileSystem(self._handle, read_buffer)
        self.base = join(str(path))
        self.version = version
        self.path = self.base
        self._private: storage.FileSystem | None = None
        self._close_private: weakref.finalize | None = None

    def close(self) -> None:
        """Close the private client a load of an embedded file system opened. read_data (a load's last call on
        the reader) does so itself; calling it again is harmless."""
        if self._private is not None:
            self._private = None
            self.fs.handle = self._handle
            self._close_private()  # a finalize: closes the client once, then is dead

    def read_data(self, plan, planner):
        # DCP never calls close(), so each load would leak its private client (fds, threads): this is the last
        # call a load makes on the reader (the read is synchronous), so close it here.
        try:
            return super().read_data(plan, planner)
        finally:
            self.close()

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id:
            self.base = join(str(checkpoint_id))
        super().reset(None)
        self.path = self.base

    def _resolve(self) -> None:
        if self._handle.uri.startswith("file://") or "://" not in self._handle.uri:
            # Embedded storage caches chunk metadata per client: other ranks' files written after this
            # process connected are invisible to its shared client, so loading uses a client of its own.
            self.close()
            self._private = storage.connect(self._handle.uri, secret=self._handle.secret, create=False)
            # A load that fails before read_data leaves the client to this, when the reader is collected.
            self._close_private = weakref.finalize(self, self._private.close)
            self.fs.handle = _Fixed(self._private)
        fs = self.fs.handle.get()
        name = self.version or read_latest(fs, self.base)
        if name is not None:
            self.path = join(self.base, name)
            if not fs.exists(join(self.path, ".metadata")):
                raise FileNotFoundError(f"checkpoint version {self.path} on {fs.uri} has no .metadata")
        elif fs.exists(join(self.base, ".metadata")):
            self.path = self.base
        else:
            raise FileNotFoundError(f"no committed checkpoint at {self.base} on {fs.uri} (no {LATEST})")

    def read_metadata(self, *args: Any, **kwargs: Any):
        try:
            self._resolve()
        except FileNotFoundError as e:
            # torch 2.10's dcp.load swallows read_metadata errors and reports only "metadata is None": say why here.
            logger.error("%s", e)
            raise
        return super().read_metadata(*args, **kwargs)
