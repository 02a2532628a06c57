"""Packing: many small samples -> a few large shard files plus an index (format in format.py).

    with PackWriter(fs, "/datasets/train") as w:
        for x in samples:
            w.add(x)                 # bytes-like, numpy array or CPU tensor
    pack(fs, "/datasets/train", "/local/images")      # a directory of files, an array, or any iterable

The index is written last and renamed into place, so a pack is either complete or absent: a crash while
packing leaves the previous pack (if any) readable. Re-packing writes shards under a new pack id and removes
the old shards only after the new index is committed.
"""
from __future__ import annotations

import datetime
import os
import secrets
from typing import Any, Iterable

import numpy as np
import torch

from torch_deepstack import storage
from torch_deepstack.data._fs import FSHandle, join
from torch_deepstack.data.format import (DTYPES, ENTRY_DTYPE, INDEX_NAME, SHARD_SUFFIX, VERSION, PackIndex, dtype_name,
                                         shard_name)
from torch_deepstack.storage.crc import crc32c

ALIGN = 4096
DEFAULT_SHARD_BYTES = 256 << 20


def _as_bytes(sample: Any) -> tuple[str, memoryview, str | None, tuple[int, ...] | None]:
    """(sample_type, flat byte view, dtype name, shape) of one sample, without copying where possible."""
    if isinstance(sample, torch.Tensor):
        if sample.device.type != "cpu":
            sample = sample.cpu()
        t = sample.detach().contiguous()
        flat = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        return "tensor", memoryview(flat.numpy()), dtype_name(t.dtype), tuple(t.shape)
    if isinstance(sample, np.ndarray):
        if sample.dtype == object:
            raise TypeError("numpy object arrays cannot be packed; pass bytes or numeric arrays")
        a = np.ascontiguousarray(sample)
        try:
            dt = torch.from_numpy(np.empty(0, dtype=a.dtype)).dtype
        except TypeError:
            raise TypeError(f"numpy dtype {a.dtype} cannot be packed; supported: {sorted(DTYPES)}") from None
        return "tensor", memoryview(a.reshape(-1).view(np.uint8)), dtype_name(dt), tuple(a.shape)
    if isinstance(sample, str):
        raise TypeError("pack samples must be bytes-like, numpy arrays or tensors, got str (encode it first)")
    try:
        mv = memoryview(sample)
    except TypeError:
        raise TypeError(f"pack samples must be bytes-like, numpy arrays or tensors, got "
                        f"{type(sample).__name__}") from None
    return "bytes", mv.cast("B") if mv.ndim != 1 or mv.format != "B" else mv, None, None


class PackWriter:
    """Append samples to a packed dataset at `path` on the file system `fs` (a FileSystem or URI).

    shard_bytes: start a new shard file past this size. align: "auto" starts a sample of >= 4 KiB at a 4 KiB
    boundary when its size is a multiple of 4 KiB or the padding is under 1/8 of it (so page-multiple samples
    need exactly one aligned direct read each), an int aligns every sample to that many bytes, 1 packs tightly.
    overwrite: replace an existing pack at `path` (atomically, when close() commits).
    names: record a name per sample (add(x, name=...)). metadata: JSON-able user dict stored in the index.
    """

    def __init__(self, fs: storage.FileSystem | str, path: str, *, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 align: int | str = "auto", overwrite: bool = False, metadata: dict | None = None,
                 secret: str | bytes | None = None):
        if not isinstance(shard_bytes, int) or shard_bytes <= 0:
            raise ValueError(f"shard_bytes must be a positive int, got {shard_bytes!r}")
        if align != "auto" and (not isinstance(align, int) or align <= 0):
            raise ValueError(f"align must be 'auto' or a positive int, got {align!r}")
        self._handle = FSHandle(fs, secret=secret)
        self.fs = self._handle.get()
        self.path = join(path)
        self.shard_bytes = shard_bytes
        self.align = align
        self.user_meta = dict(metadata or {})
        self.fs.makedirs(self.path)
        self.index_path = join(self.path, INDEX_NAME)
        if self.fs.exists(self.index_path) and not overwrite:
            raise FileExistsError(f"a packed dataset already exists at {self.path}; pass overwrite=True "
                                  f"(--overwrite) to replace it")
        self.pack_id = secrets.token_hex(4)
        self._entries: list[tuple[int, int, int, int]] = []
        self._shapes: list[tuple[int, ...]] = []
        self._names: list[str] = []
        self._sample_type: str | None = None
        self._dtype: str | None = None
        self._shards: list[dict] = []
        self._file = None
        self._pos = 0
        self._shard_crc = 0
        self._closed = False

    # ------------------------------------------------------------------ writing
    def _pad_for(self, n: int) -> int:
        if self.align == "auto":
            pad = (-self._pos) % ALIGN
            return pad if n >= ALIGN and (n % ALIGN == 0 or pad * 8 < n) else 0
        return (-self._pos) % self.align

    def _open_shard(self) -> None:
        self._finish_shard()
        name = shard_name(self.pack_id, len(self._shards))
        self._file = self.fs.open(join(self.path, name), "wb")
        self._shards.append({"name": name, "size": 0, "crc32c": 0})
        self._pos, self._shard_crc = 0, 0

    def _finish_shard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._shards[-1].update(size=self._pos, crc32c=self._shard_crc)
            self._file = None

    def _write(self, data) -> None:
        self._file.write(data)
        self._shard_crc = crc32c(data, self._shard_crc)
        self._pos += len(data)

    def add(self, sample: Any, *, name: str | None = None) -> int:
        """Append one sample; returns its index."""
        if self._closed:
            raise ValueError("PackWriter is closed")
        kind, data, dtype, shape = _as_bytes(sample)
        if self._sample_type is None:
            self._sample_type, self._dtype = kind, dtype
        elif kind != self._sample_type or dtype != self._dtype:
            first = self._sample_type if self._dtype is None else f"{self._sample_type} of {self._dtype}"
            this = kind if dtype is None else f"{kind} of {dtype}"
            raise TypeError(f"sample {len(self._entries)} is {this} but the pack holds {first}; a pack holds "
                            f"one kind of sample")
        if name is not None:
            if len(self._names) != len(self._entries):
                raise ValueError("give a name to every sample or to none")
            self._names.append(name)
        elif self._names:
            raise ValueError("give a name to every sample or to none")
        n = len(data)
        if self._file is None or (self._pos > 0 and self._pos + n > self.shard_bytes):
            self._open_shard()
        pad = self._pad_for(n)
        if pad:
            self._write(bytes(pad))
        crc = crc32c(data)
        self._entries.append((len(self._shards) - 1, crc, self._pos, n))
        if n:
            self._file.write(data)
            self._shard_crc = crc32c(data, self._shard_crc)
            self._pos += n
        if kind == "tensor":
            self._shapes.append(shape)
        return len(self._entries) - 1

    def add_many(self, samples: Iterable[Any], *, progress: bool = False, total: int | None = None) -> int:
        """Append every sample of an iterable (with a tqdm bar when progress=True); returns how many."""
        it = samples
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(samples, total=total if total is not None else _len_or_none(samples), unit="sample",
                      desc=f"packing {self.path}")
        count = 0
        for s in it:
            self.add(s)
            count += 1
        return count

    # ------------------------------------------------------------------ commit
    def build_index(self) -> PackIndex:
        entries = np.array(self._entries, dtype=ENTRY_DTYPE) if self._entries else np.zeros(0, ENTRY_DTYPE)
        shape, shapes, ndim = None, None, 0
        if self._sample_type == "tensor":
            ndims = {len(s) for s in self._shapes}
            if len(set(self._shapes)) == 1:
                shape, ndim = list(self._shapes[0]), len(self._shapes[0])
            elif len(ndims) == 1:
                ndim = ndims.pop()
                shapes = np.array(self._shapes, dtype=np.int64).reshape(len(self._shapes), ndim)
            else:
                raise ValueError(f"tensor samples must all have the same number of dimensions, got {sorted(ndims)}")
            if ndim == 0:  # scalars: a SHAPES section cannot hold zero columns
                shape, shapes = [], None
        meta = {
            "format": "deepstack-pack", "version": VERSION, "sample_type": self._sample_type or "bytes",
            "dtype": self._dtype, "shape": shape, "ndim": ndim, "shards": self._shards, "pack_id": self.pack_id,
            "align": self.align, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "user": self.user_meta,
        }
        return PackIndex(entries, meta, shapes, self._names or None, source=self.index_path,
                         shard_sizes=[s["size"] for s in self._shards])

    def close(self) -> PackIndex:
        """Finish the last shard, commit the index (atomic rename), remove shards of a replaced pack."""
        if self._closed:
            raise ValueError("PackWriter is already closed")
        self._finish_shard()
        self._closed = True
        index = self.build_index()
        tmp = self.index_path + f".tmp-{self.pack_id}"
        self.fs.write_bytes(tmp, index.to_bytes())
        self.fs.rename(tmp, self.index_path)
        keep = {s["name"] for s in self._shards}
        for name in self.fs.listdir(self.path):
            if name.endswith(SHARD_SUFFIX) and name.startswith("data-") and name not in keep:
                self.fs.remove(join(self.path, name))
        return index

    def abort(self) -> None:
        """Drop what was written (the previous pack, if any, stays)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for s in self._shards:
            try:
                self.fs.remove(join(self.path, s["name"]))
            except FileNotFoundError:
                pass
        self._closed = True

    def __enter__(self) -> "PackWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._closed:
            return
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __len__(self) -> int:
        return len(self._entries)


def _len_or_none(x) -> int | None:
    try:
        return len(x)
    except TypeError:
        return None


def iter_directory(root: str | os.PathLike, *, pattern: str | None = None) -> tuple[list[str], list[str]]:
    """(relative names, absolute paths) of the regular files under a local directory, sorted by relative path."""
    import fnmatch

    root = os.fspath(root)
    if not os.path.isdir(root):
        raise NotADirectoryError(f"{root} is not a directory")
    rel, full = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            p = os.path.join(dirpath, fn)
            r = os.path.relpath(p, root)
            if pattern and not fnmatch.fnmatch(r, pattern):
                continue
            if os.path.isfile(p):
                rel.append(r)
                full.append(p)
    order = sorted(range(len(rel)), key=rel.__getitem__)
    return [rel[i] for i in order], [full[i] for i in order]


def pack(fs: storage.FileSystem | str, path: str, source: Any, *, progress: bool = False,
         pattern: str | None = None, **writer_options) -> PackIndex:
    """Pack `source` into a packed dataset at `path` and return its index.

    source: a local directory (each file is one bytes sample, named by its relative path, in sorted order), a
    numpy array or tensor (each row along dim 0 is one sample), or any iterable of bytes-like/array/tensor
    samples. writer_options go to PackWriter (shard_bytes, align, overwrite, metadata, secret)."""
    with PackWriter(fs, path, **writer_options) as w:
        if isinstance(source, (str, os.PathLike)):
            names, files = iter_directory(source, pattern=pattern)
            it = zip(names, files)
            if progress:
                from tqdm.auto import tqdm

                it = tqdm(it, total=len(files), unit="file", desc=f"packing {os.fspath(source)}")
            for name, p in it:
                with open(p, "rb") as f:
                    w.add(f.read(), name=name)
        elif isinstance(source, (np.ndarray, torch.Tensor)):
            if source.ndim == 0:
                raise ValueError("an array source needs a leading sample dimension, got a 0-d array")
            w.add_many((source[i] for i in range(source.shape[0])), progress=progress, total=source.shape[0])
        else:
            w.add_many(source, progress=progress)
        return w.close()
