"""Datasets over packed samples on deepstack storage.

`DeepstackDataset` is map-style: `__getitems__` turns a whole batch of indices into ONE batched read on the
storage client (aligned direct I/O underneath; unaligned sample offsets are the storage read path's job), with
every sample landing in one buffer: shared memory inside a DataLoader worker (so handing the batch to the main
process copies nothing), pinned memory in the main process when asked. Samples are views into that buffer.

`DeepstackIterableDataset` streams: each (rank, worker) takes a contiguous share of the samples and reads them
with large sequential requests.
"""
from __future__ import annotations

import operator
import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.utils.data

from torch_deepstack import storage
from torch_deepstack.data import shm_pool
from torch_deepstack.data._fs import FSHandle, join
from torch_deepstack.data.format import INDEX_NAME, PackIndex
from torch_deepstack.storage.client import ArrayReadResult
from torch_deepstack.storage.crc import crc32c
from torch_deepstack.storage.fastio import crc_many

PAGE = 4096
_INTEGERS = {"index": "an integer", "indices": "integers"}


class SampleReadError(OSError):
    """A sample could not be read back intact (storage failure, truncated shard, checksum mismatch)."""


def load_index(fs: storage.FileSystem, path: str) -> PackIndex:
    ipath = join(path, INDEX_NAME)
    try:
        data = fs.read_bytes(ipath)
    except FileNotFoundError:
        raise FileNotFoundError(f"no packed dataset at {path!r} on {fs.uri}: {INDEX_NAME} is missing (create one "
                                f"with `deepstack pack` or torch_deepstack.data.pack)") from None
    return PackIndex.from_bytes(data, source=f"{fs.uri}{ipath}")


def _slots(lengths: np.ndarray) -> np.ndarray:
    """Start of each sample in a batch buffer: samples of >= 4 KiB in 4 KiB-aligned slots (so aligned reads
    land in place), placed first; the smaller ones after them at 64-byte boundaries."""
    big = lengths >= PAGE
    size = np.where(big, -(-lengths // PAGE) * PAGE, -(-lengths // 64) * 64)
    starts = np.empty(len(lengths), np.int64)
    nbig = int(big.sum())
    if nbig == len(lengths) or nbig == 0:
        np.cumsum(size, out=starts)
        return starts - size
    sb, ss = size[big], size[~big]
    starts[big] = np.cumsum(sb) - sb
    starts[~big] = int(sb.sum()) + np.cumsum(ss) - ss
    return starts


def _adjacent_runs(shards, offsets, lengths, starts, files, which):
    """Runs of batch positions whose samples follow each other both in one shard and in the batch buffer, within
    one storage chunk (a read across chunks leaves the native path): (first position of every run, bytes of
    every run), or None when no two samples are adjacent (a shuffled batch, the common case). Sequential
    readers (a SequentialSampler, DeepstackIterableDataset's groups) then read a chunk in one request instead of
    one per sample."""
    n = len(offsets)
    if n < 2:
        return None
    ends = offsets + lengths
    adj = (offsets[1:] == ends[:-1]) & (starts[1:] == starts[:-1] + lengths[:-1]) & (lengths[1:] > 0) & \
        (lengths[:-1] > 0)
    if len(files) > 1:
        adj &= shards[1:] == shards[:-1]
    if not adj.any():
        return None
    chunk = np.array([f.chunk_size for f in files], np.int64)
    cs = chunk[0] if which is None else chunk[which]
    if (chunk <= 0).any():
        return None
    cs_next = cs if which is None else cs[1:]
    cs_prev = cs if which is None else cs[:-1]
    adj &= (ends[1:] - 1) // cs_next == offsets[:-1] // cs_prev  # the next sample ends in this one's chunk
    if not adj.any():
        return None
    first = np.flatnonzero(np.concatenate(([True], ~adj)))
    return first, np.add.reduceat(lengths, first)


def _in_worker() -> bool:
    return torch.utils.data.get_worker_info() is not None


def alloc_batch_buffer(nbytes: int, *, shared: bool, pin: bool, reuse: int = 0) -> tuple[torch.Tensor, int]:
    """(uint8 buffer, offset of its first 4 KiB-aligned byte). Shared memory in DataLoader workers (the batch
    then crosses to the main process without a copy): with reuse > 0 a free slab of this worker's pool of up to
    `reuse` recycled buffers (see shm_pool.py), else a fresh one. Pinned memory for direct H2D when asked and
    possible."""
    if shared and reuse > 0:
        pool = shm_pool.worker_pool(reuse)
        buf = pool.acquire(nbytes) if pool is not None else None
        if buf is not None:
            return buf, 0  # slab data is page-aligned
    size = nbytes + PAGE
    if shared:
        buf = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(size))
    elif pin and torch.cuda.is_available():
        buf = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    else:
        buf = torch.empty(size, dtype=torch.uint8)
    return buf, (-buf.data_ptr()) % PAGE


class DeepstackDataset(torch.utils.data.Dataset):
    """Map-style dataset over a packed dataset at `path` on `fs` (a FileSystem or URI such as a directory path
    or deepstack://host:port).

    transform: optional fn(sample) -> anything, run per sample after decoding (in the worker).
    batched: `__getitems__` returns one stacked tensor [B, *shape] for fixed-shape tensor samples (use
             `collate_fn=dataset.collate_fn`, which passes batches through): no per-sample copies at all.
    pin_memory: read straight into pinned memory when loading in the main process (num_workers=0); in
             workers leave pinning to DataLoader(pin_memory=True).
    verify: check every sample's CRC32C from the index (end to end, on top of storage's page CRCs).
    timeout: seconds one batched read may take before SampleReadError (never hang on a dead cluster).
    worker_buffers: shared-memory batch buffers each DataLoader worker keeps and reuses once the main process
             has released the batch in them (its tensors and every view of them are gone); a kept batch is never
             overwritten, and with none free a worker allocates a fresh buffer. 0: a fresh buffer per batch.
    secret, storage_options: for the clients this dataset opens (in each worker): the cluster secret and
             connect() options such as io_threads, or timeout / retry_for for a cluster.

    Samples: tensors of the packed dtype/shape for tensor packs, 1-D uint8 tensors for bytes packs (use
    `bytes(sample.numpy())` or a transform to decode). Picklable; each process connects on first use.
    """

    def __init__(self, fs: storage.FileSystem | str, path: str, *, transform: Callable[[Any], Any] | None = None,
                 batched: bool = False, pin_memory: bool = False, verify: bool = True, timeout: float = 60.0,
                 secret: str | bytes | None = None, storage_options: dict | None = None,
                 worker_buffers: int = 6):
        self._handle = FSHandle(fs, secret=secret, options=storage_options)
        self.path = join(path)
        if not isinstance(worker_buffers, int) or worker_buffers < 0:
            raise ValueError(f"worker_buffers: expected an int >= 0, got {worker_buffers!r}")
        self.worker_buffers = worker_buffers
        self.transform = transform
        self.batched = batched
        self.pin_memory = pin_memory
        self.verify = verify
        self.timeout = timeout
        self.index = load_index(self._handle.get(), self.path)
        if batched and (self.index.sample_type != "tensor" or self.index.shapes is not None):
            raise ValueError("batched=True needs fixed-shape tensor samples; this pack holds "
                             + ("variable-shape tensors" if self.index.sample_type == "tensor" else "bytes"))
        e = self.index.entries
        self._shard = e["shard"].astype(np.int64)
        self._offset = e["offset"].astype(np.int64)
        self._length = e["length"].astype(np.int64)
        self._crc = e["crc"]
        self._single_shard = len(self.index.shard_names) == 1
        self._files: dict[int, Any] = {}
        self._files_pid = os.getpid()

    # ------------------------------------------------------------------ pickling / processes
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"] = {}  # live File handles belong to the process that opened them
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._files_pid = -1

    def _file(self, shard: int):
        if self._files_pid != os.getpid():
            self._files, self._files_pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            name = self.index.shard_names[shard]
            p = join(self.path, name)
            try:
                f = self._handle.get().open(p, "rb")
            except FileNotFoundError:
                raise SampleReadError(f"shard {name} of {self.path} is missing on {self._handle.uri} (the index "
                                      f"lists it); re-pack the dataset") from None
            want = self.index.shard_sizes[shard]
            if f.size < want:
                raise SampleReadError(f"shard {name} of {self.path} is {f.size} bytes but the index says {want} "
                                      f"(truncated or replaced); re-pack the dataset")
            self._files[shard] = f
        return f

    # ------------------------------------------------------------------ Dataset protocol
    def __len__(self) -> int:
        return len(self.index)

    @property
    def collate_fn(self) -> Callable[[Any], Any]:
        """The collate_fn to pass to DataLoader: passes pre-batched results through, else default_collate."""
        return _passthrough if self.batched else torch.utils.data.default_collate

    def __getitem__(self, i: int):
        # ds[i] is always __getitems__([i])[0], so `transform` applies the same way (per batch with batched=True)
        return self.__getitems__([self._check_index(i)])[0]

    def __getitems__(self, indices: Sequence[int]):
        return self._submit(indices, contiguous=self.batched, wait=True).value()

    def read_batch(self, indices: Sequence[int]) -> torch.Tensor:
        """Fixed-shape tensor packs: the samples as one [len(indices), *shape] tensor, read in one batch."""
        if self.index.sample_type != "tensor" or self.index.shapes is not None:
            raise ValueError("read_batch needs fixed-shape tensor samples")
        return self._read(indices, contiguous=True)[0]

    # ------------------------------------------------------------------ the read path
    def _out_of_range(self, i: int) -> IndexError:
        return IndexError(f"sample index {i} out of range for a dataset of {len(self)} samples ({self.path})")

    def _check_index(self, i, what: str = "index") -> int:
        """One index as a Python int in range: integers only (numpy and one-element torch integers too), never a
        silently truncated float or a parsed string."""
        if isinstance(i, (bool, np.bool_)) or (isinstance(i, torch.Tensor) and
                                                (i.dtype == torch.bool or i.is_floating_point() or i.is_complex())):
            raise TypeError(f"{what}: expected {_INTEGERS[what]}, got {i!r}")
        try:
            v = operator.index(i)
        except TypeError:
            raise TypeError(f"{what}: expected {_INTEGERS[what]}, got {type(i).__name__} {i!r:.60}") from None
        n = len(self)
        if not -n <= v < n:  # Python ints: a huge index is out of range, not an OverflowError
            raise self._out_of_range(v)
        return v

    def _normalize(self, indices: Sequence[int]) -> np.ndarray:
        if isinstance(indices, torch.Tensor):
            if indices.dtype == torch.bool or indices.is_floating_point() or indices.is_complex():
                raise TypeError(f"indices: expected integers, got a {indices.dtype} tensor")
            indices = indices.tolist()
        try:
            idx = np.asarray(indices).reshape(-1)
        except ValueError:  # ragged nesting
            raise TypeError(f"indices: expected a sequence of integers, got {indices!r:.60}") from None
        n = len(self)
        if idx.size == 0:
            return np.zeros(0, np.int64)
        if idx.dtype.kind not in "iu":
            # Floats, strings, objects, and lists of Python ints numpy could not hold in int64 (it makes those
            # float64 or object): check each element, so nothing is truncated and huge ints are IndexErrors.
            elems = np.asarray(indices, dtype=object).reshape(-1).tolist()  # the original objects, unconverted
            idx = np.array([self._check_index(v, "indices") for v in elems], np.int64)
        else:
            if idx.dtype == np.uint64 and (idx >= n).any():  # would wrap negative in int64
                raise self._out_of_range(int(idx[idx >= n][0]))
            idx = idx.astype(np.int64, copy=False)
        bad = (idx < -n) | (idx >= n)
        if bad.any():
            raise self._out_of_range(int(idx[bad][0]))
        return np.where(idx < 0, idx + n, idx)

    def _read(self, indices: Sequence[int], *, contiguous: bool):
        return self._submit(indices, contiguous=contiguous, wait=True).result()

    def submit(self, indices: Sequence[int]) -> "PendingBatch":
        """Start reading a batch without waiting (storage's asynchronous batched read); `.result()` returns what
        `__getitems__` would. Several batches can be in flight at once: see `PrefetchLoader`."""
        return self._submit(indices, contiguous=self.batched, wait=False)

    def _submit(self, indices: Sequence[int], *, contiguous: bool, wait: bool) -> "PendingBatch":
        idx = self._normalize(indices)
        lengths = self._length[idx]
        if contiguous:  # samples back to back, so the buffer is already the stacked batch
            starts = np.arange(len(idx), dtype=np.int64) * (int(lengths[0]) if len(idx) else 0)
        else:
            starts = _slots(lengths)
        total = int((starts + lengths).max()) if len(idx) else 0
        worker = _in_worker()
        buf, base = alloc_batch_buffer(total, shared=worker, pin=self.pin_memory and not worker,
                                       reuse=getattr(self, "worker_buffers", 0))
        data = buf[base:base + total]
        pending = PendingBatch(self, idx, lengths, starts, data, contiguous)
        if not len(idx):
            pending._result = ArrayReadResult(np.zeros(0, np.int64))
            return pending
        shards = self._shard[idx]
        if self._single_shard:
            files, which = [self._file(0)], None
        else:
            used, which = np.unique(shards, return_inverse=True)
            files = [self._file(int(s)) for s in used.tolist()]
        offsets = self._offset[idx]
        runs = _adjacent_runs(shards, offsets, lengths, starts, files, which)
        if runs is not None:  # adjacent samples (in the shard and in the buffer) go as one larger read
            pending.runs, pending.run_lengths = runs
            offsets, lengths, starts = offsets[runs[0]], runs[1], starts[runs[0]]
            which = None if which is None else which[runs[0]]
        fs = self._handle.get()
        args = (files, offsets, lengths, buf, starts + base)
        # checksums: the read's own block checks give page-aligned samples' CRC32Cs without a second pass
        if wait:
            pending._result = fs.read_array(*args, which=which, timeout=self.timeout, checksums=self.verify)
        else:
            pending._future = fs.submit_read_array(*args, which=which, timeout=self.timeout,
                                                   checksums=self.verify)
        return pending

    def _finish(self, p: "PendingBatch"):
        fs = self._handle.get()
        idx, lengths = p.idx, p.lengths
        res = p._result
        if res is None:
            try:
                res = p._future.result(self.timeout)
            except TimeoutError:
                raise SampleReadError(f"batched read of {len(idx)} samples from {self.path} on {fs.uri} did not "
                                      f"finish within {self.timeout:.0f} s") from None
            except Exception as e:  # noqa: BLE001 - the whole batch failed
                raise SampleReadError(f"batched read of {len(idx)} samples from {self.path} on {fs.uri} failed: "
                                      f"{type(e).__name__}: {e}") from e
        first = p.runs if p.runs is not None else np.arange(len(idx))  # each request's first sample
        want = p.run_lengths if p.runs is not None else lengths
        if res.errors:
            k = min(res.errors)
            err = res.errors[k]
            what = (f"sample {int(idx[first[k]])}" if p.runs is None else
                    f"samples {int(idx[first[k]])}.. (one read of {int(want[k])} bytes)")
            raise SampleReadError(f"reading {what} of {self.path} on {fs.uri} failed: "
                                  f"{type(err).__name__}: {err}") from err
        short = np.flatnonzero(res.nbytes != want)
        if short.size:
            k = int(short[0])
            raise SampleReadError(f"sample {int(idx[first[k]])} of {self.path}: got {int(res.nbytes[k])} of "
                                  f"{int(want[k])} bytes (shard truncated)")
        data = p.data
        if self.verify and len(idx):
            known = res.crc32c  # from storage's block checks (page-aligned samples), -1 where not given
            if known is not None and p.runs is not None:  # a request's CRC is a sample's only for runs of one
                per = np.full(len(idx), -1, np.int64)
                single = np.flatnonzero(np.diff(np.append(first, len(idx))) == 1)
                per[first[single]] = known[single]
                known = per
            todo = np.arange(len(idx)) if known is None else np.flatnonzero(known < 0)
            got = np.empty(len(idx), np.int64)
            if known is not None:
                got[:] = known
            if todo.size:
                part = crc_many(data.data_ptr(), p.starts[todo], lengths[todo]) if data.numel() else None
                if part is None:  # no C helper (or an empty buffer): one call per sample
                    flat = data.numpy()
                    part = [crc32c(flat[st:st + n]) for st, n in zip(p.starts[todo].tolist(),
                                                                      lengths[todo].tolist())]
                got[todo] = part
            bad = np.flatnonzero(got != self._crc[idx])
            if bad.size:
                k = int(bad[0])
                raise SampleReadError(f"sample {int(idx[k])} of {self.path}: CRC32C mismatch (data corrupt "
                                      f"on {fs.uri}, or the shard was rewritten under this index)")
        if p.contiguous:
            dtype = self.index.dtype
            shape = tuple(self.index.meta["shape"])
            batch = data.view(dtype).view(len(idx), *shape) if len(idx) else torch.empty(0, *shape, dtype=dtype)
            return batch, None
        return None, self._decode_all(data, idx, p.starts, lengths)

    def _decode_all(self, data: torch.Tensor, idx: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> list:
        """The samples as views of the batch buffer, made by a few tensor ops rather than one Python slice per
        sample (which cost ~4 us each)."""
        b = len(idx)
        if b == 0:
            return []
        ix = self.index
        n0 = int(lengths[0])
        if ix.sample_type == "tensor" and ix.shapes is None and n0 > 0 and (lengths == n0).all():
            slot = int(starts[1] - starts[0]) if b > 1 else n0
            if (starts == np.arange(b, dtype=np.int64) * slot).all():  # uniform slots: one strided view
                rows = data.as_strided((b, n0), (slot, 1))
                return list(rows.view(ix.dtype).view(b, *ix.meta["shape"]).unbind(0))
        # Variable sizes: one split over the buffer (sample, gap, sample, gap, ...) in buffer order.
        order = np.argsort(starts, kind="stable")
        st, ln = starts[order], lengths[order]
        sizes = np.empty(2 * b, np.int64)
        sizes[0::2] = ln
        sizes[1:-1:2] = st[1:] - (st[:-1] + ln[:-1])
        sizes[-1] = data.numel() - int(st[-1] + ln[-1])
        pieces = torch.split(data[int(st[0]):], sizes.tolist())[0::2]
        inv = np.empty(b, np.int64)
        inv[order] = np.arange(b)
        raw = [pieces[j] for j in inv.tolist()]
        if ix.sample_type == "bytes":
            return raw
        dtype = ix.dtype
        return [r.view(dtype).view(ix.shape_of(int(i))) for r, i in zip(raw, idx.tolist())]

    def name(self, i: int) -> str | None:
        """The recorded name of sample i (e.g. its source file), if the pack has names."""
        names = self.index.names
        return None if names is None else names[self._check_index(i) % len(self)]

    def __repr__(self) -> str:
        ix = self.index
        kind = ix.sample_type if ix.dtype is None else f"{ix.dtype} tensors"
        return f"DeepstackDataset({self._handle.uri}{self.path}: {len(ix)} {kind}, {ix.total_bytes} bytes)"


class PendingBatch:
    """A batch whose reads are in flight (from `DeepstackDataset.submit`)."""

    def __init__(self, ds: DeepstackDataset, idx, lengths, starts, data, contiguous: bool):
        self.ds, self.idx, self.lengths, self.starts = ds, idx, lengths, starts
        self.data, self.contiguous = data, contiguous
        self.runs = self.run_lengths = None  # coalesced reads: each request's first sample and byte count
        self._result = None
        self._future = None

    def done(self) -> bool:
        return self._result is not None or self._future.done()

    def result(self):
        """(stacked batch, None) for contiguous reads, else (None, samples); raises SampleReadError."""
        return self.ds._finish(self)

    def value(self):
        """What `__getitems__` returns for these indices (transform applied)."""
        batch, samples = self.result()
        t = self.ds.transform
        if batch is not None:
            return batch if t is None else t(batch)
        return samples if t is None else [t(x) for x in samples]


def _passthrough(batch):
    return batch


class DeepstackIterableDataset(torch.utils.data.IterableDataset):
    """Streams every sample of a pack once per epoch, sharded over ranks and DataLoader workers.

    Each of the rank*num_workers shards takes a contiguous range of samples and reads it in groups of
    consecutive samples of about `read_bytes`, one batched read per group (in shard order, so adjacent samples
    coalesce into chunk-sized reads). shuffle=True shuffles the order of the groups and of the samples yielded
    from each, from `seed` + epoch; call `set_epoch(e)` every epoch. Yields what DeepstackDataset would."""

    def __init__(self, fs: storage.FileSystem | str, path: str, *, shuffle: bool = False, seed: int = 0,
                 read_bytes: int = 8 << 20, transform: Callable[[Any], Any] | None = None, verify: bool = True,
                 timeout: float = 60.0, secret: str | bytes | None = None, storage_options: dict | None = None):
        self.dataset = DeepstackDataset(fs, path, verify=verify, timeout=timeout, secret=secret,
                                        storage_options=storage_options)
        self.shuffle, self.seed = shuffle, seed
        # The epoch lives in shared memory (survives fork, and spawn's pickling through torch.multiprocessing) so
        # set_epoch in the main process reaches persistent DataLoader workers, which keep their dataset copy.
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.read_bytes = read_bytes
        self.transform = transform

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Set the shuffle epoch; takes effect at the next iteration, in every worker (persistent ones too)."""
        if isinstance(epoch, (bool, np.bool_)):
            raise TypeError(f"epoch: expected an integer, got {epoch!r}")
        try:
            e = operator.index(epoch)
        except TypeError:
            raise TypeError(f"epoch: expected an integer, got {type(epoch).__name__} {epoch!r:.60}") from None
        if not 0 <= e < 2**63:
            raise ValueError(f"epoch: expected an integer in [0, 2**63), got {e}")
        self._epoch[0] = e

    def __len__(self) -> int:
        return len(self.dataset)

    def _my_range(self) -> tuple[int, int]:
        import torch.distributed as dist

        rank, world = 0, 1
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        shard, nshards = rank * nw + wid, world * nw
        n = len(self.dataset)
        return n * shard // nshards, n * (shard + 1) // nshards

    def __iter__(self) -> Iterator[Any]:
        lo, hi = self._my_range()
        ds = self.dataset
        lengths = ds._length
        groups, start, acc = [], lo, 0
        for i in range(lo, hi):
            acc += int(lengths[i])
            if acc >= self.read_bytes:
                groups.append((start, i + 1))
                start, acc = i + 1, 0
        if start < hi:
            groups.append((start, hi))
        rng = np.random.default_rng([self.seed, self.epoch]) if self.shuffle else None
        if rng is not None:
            rng.shuffle(groups)
        for a, b in groups:
            order = np.arange(a, b)
            if rng is not None:
                rng.shuffle(order)
            # read the group in shard order (adjacent samples coalesce into chunk-sized reads), yield it shuffled
            samples = ds.__getitems__(list(range(a, b)))
            for j in (order - a).tolist():
                s = samples[j]
                yield s if self.transform is None else self.transform(s)
