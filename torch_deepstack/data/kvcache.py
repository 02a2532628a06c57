"""KV-cache offload (3FS's KVCache job): MLA paged-KV-cache blocks saved to and loaded from deepstack storage by
content key, so a decode server can trade prefill recompute for reads.

A block is one page of the MLA paged cache: [64, h_kv, 576] bf16/fp16 (FlashMLA's dense layout) or
[64, h_kv, 656] bytes (the FP8 layout: 512 e4m3 NoPE + 4 fp32 scales + 64 bf16 RoPE per token). Keys are
content hashes of the token prefix ending at that block (`prefix_block_keys`), so equal prefixes share blocks
across requests and servers.

Storage layout: one file per block, `<root>/<key[:2]>/<key>.kvb`, holding the block's bytes followed by a
64-byte trailer (magic, version, dtype, shape, CRC32C, key digest). A block file is written under a temporary
name and renamed into place, so readers see whole blocks or none. `load` reads a whole batch of blocks with one
batched storage read straight into the caller's (pinned) tensor.
"""
from __future__ import annotations

import hashlib
import secrets
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

import numpy as np
import torch

from torch_deepstack import storage
from torch_deepstack.data._fs import FSHandle, join
from torch_deepstack.storage.client import ReadRequest
from torch_deepstack.storage.crc import crc32c

PAGE_TOKENS = 64
BF16_DIM = 576
FP8_TOKEN_BYTES = 656

_TRAILER = struct.Struct("<8sHHIIIQI16s12x")  # 64 bytes
_MAGIC = b"DSKVBLK1"
_VERSION = 1
_DTYPE_CODES = {torch.bfloat16: 1, torch.float16: 2, torch.uint8: 3, torch.int8: 4}
if hasattr(torch, "float8_e4m3fn"):
    _DTYPE_CODES[torch.float8_e4m3fn] = 5
assert _TRAILER.size == 64


class KVBlockCorrupt(OSError):
    """A stored block does not match its trailer (wrong layout, CRC mismatch, or a different key)."""


def prefix_block_keys(token_ids: Sequence[int] | torch.Tensor, *, namespace: str = "",
                      page: int = PAGE_TOKENS) -> list[str]:
    """Content keys of every FULL page of a token sequence: key k hashes the namespace and tokens [0, 64(k+1)),
    chained (sha256 of the previous key and this page's tokens), as prefix caches do. Put the model, the layer
    and anything else that changes the KV values into `namespace`."""
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.reshape(-1).tolist()
    toks = np.asarray(token_ids, dtype="<i8")
    h = hashlib.sha256(b"deepstack-kv\0" + namespace.encode()).digest()
    keys = []
    for k in range(len(toks) // page):
        h = hashlib.sha256(h + toks[k * page:(k + 1) * page].tobytes()).digest()
        keys.append(h.hex())
    return keys


def _check_blocks(blocks: torch.Tensor, name: str) -> None:
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 4:
        raise ValueError(f"{name}: expected a tensor [n, {PAGE_TOKENS}, h_kv, {BF16_DIM}] (bf16/fp16) or "
                         f"[n, {PAGE_TOKENS}, h_kv, {FP8_TOKEN_BYTES}] (uint8/int8/float8_e4m3fn), got "
                         f"{getattr(blocks, 'shape', type(blocks).__name__)}")
    _, page, _, last = blocks.shape
    ok = page == PAGE_TOKENS and (
        (last == BF16_DIM and blocks.dtype in (torch.bfloat16, torch.float16))
        or (last == FP8_TOKEN_BYTES and blocks.element_size() == 1 and blocks.dtype in _DTYPE_CODES))
    if not ok:
        raise ValueError(f"{name}: expected [n, {PAGE_TOKENS}, h_kv, {BF16_DIM}] bf16/fp16 or "
                         f"[n, {PAGE_TOKENS}, h_kv, {FP8_TOKEN_BYTES}] 1-byte dtype, got {tuple(blocks.shape)} "
                         f"{blocks.dtype}")


def _check_key(key: str) -> str:
    # Even length: the trailer stores bytes.fromhex(key), which refuses an odd number of hex digits.
    if not isinstance(key, str) or len(key) < 8 or len(key) > 128 or len(key) % 2 \
            or not all(c in "0123456789abcdef" for c in key):
        raise ValueError(f"KV block keys are lowercase hex strings of an even number of characters, 8..128 (see "
                         f"prefix_block_keys), got key {key!r}")
    return key


class KVCacheStore:
    """Blocks of an MLA paged KV cache on deepstack storage (`fs`: a FileSystem or URI), under `root`.

    save(keys, blocks) / load(keys, out) / contains(keys) / remove(keys); `offload(cache, req, tokens)` and
    `restore(cache, req, tokens)` work on a torch_deepstack.mla.PagedKVCache (or anything with its `k_cache`,
    `blocks_of(req)` and `reserve(req, n)`)."""

    def __init__(self, fs: storage.FileSystem | str, root: str = "/kvcache", *, verify: bool = True,
                 io_threads: int = 8, timeout: float = 60.0, secret: str | bytes | None = None):
        self._handle = FSHandle(fs, secret=secret)
        self.root = join(root)
        self.verify = verify
        self.timeout = timeout
        self.io_threads = io_threads
        self._dirs: set[str] = set()
        self._handle.get().makedirs(self.root, exist_ok=True)

    def __getstate__(self):
        state = self.__dict__.copy()  # the FSHandle reconnects per process
        state["_dirs"] = set()
        return state

    def path_of(self, key: str) -> str:
        key = _check_key(key)
        return join(self.root, key[:2], f"{key}.kvb")

    # ------------------------------------------------------------------ save
    def save(self, keys: Sequence[str], blocks: torch.Tensor, *, overwrite: bool = False) -> int:
        """Store blocks[i] under keys[i]; returns how many were written (existing keys are skipped unless
        overwrite=True: equal keys mean equal content)."""
        keys = list(keys)
        _check_blocks(blocks, "blocks")
        if len(keys) != blocks.shape[0]:
            raise ValueError(f"save: {len(keys)} keys for {blocks.shape[0]} blocks")
        fs = self._handle.get()
        todo = [i for i, k in enumerate(keys) if overwrite or not fs.exists(self.path_of(k))]
        if not todo:
            return 0
        host = blocks[todo].detach().to("cpu").contiguous()
        flat = host.view(len(todo), -1).view(torch.uint8)
        shape = tuple(host.shape[1:])
        code = _DTYPE_CODES[host.dtype]

        def write_one(j: int) -> None:
            key = keys[todo[j]]
            data = memoryview(flat[j].numpy())
            trailer = _TRAILER.pack(_MAGIC, _VERSION, code, shape[0], shape[1], shape[2], len(data), crc32c(data),
                                    bytes.fromhex(key)[:16].ljust(16, b"\0"))
            path = self.path_of(key)
            parent = path.rsplit("/", 1)[0]
            if parent not in self._dirs:  # one metadata transaction per prefix directory, not per block
                fs.makedirs(parent, exist_ok=True)
                self._dirs.add(parent)
            tmp = f"{path}.tmp-{secrets.token_hex(4)}"
            try:
                with fs.open(tmp, "wb") as f:
                    f.write(data)
                    f.write(trailer)
                fs.rename(tmp, path)
            except BaseException:
                # A failed write (NoSpace, ...) must not leave its temporary file (and chunks) behind for good.
                try:
                    fs.remove(tmp)
                except Exception:  # noqa: BLE001 - never created, or already renamed: the write's error matters
                    pass
                raise

        if len(todo) == 1 or self.io_threads <= 1:
            for j in range(len(todo)):
                write_one(j)
        else:
            with ThreadPoolExecutor(min(self.io_threads, len(todo))) as pool:
                list(pool.map(write_one, range(len(todo))))
        return len(todo)

    # ------------------------------------------------------------------ load
    def contains(self, keys: Iterable[str]) -> list[bool]:
        fs = self._handle.get()
        return [fs.exists(self.path_of(k)) for k in keys]

    def load(self, keys: Sequence[str], out: torch.Tensor) -> torch.Tensor:
        """Read the blocks of `keys` into out[i] (one batched storage read); returns a bool tensor `found`.
        Missing keys leave their out[i] untouched (a missing file is found before any byte moves). `out` may live on the GPU (staged through pinned memory)."""
        keys = list(keys)
        _check_blocks(out, "out")
        if len(keys) != out.shape[0]:
            raise ValueError(f"load: {len(keys)} keys for out with {out.shape[0]} blocks")
        if not out.is_contiguous():
            raise ValueError("load: out must be contiguous")
        found = torch.zeros(len(keys), dtype=torch.bool)
        if not keys:
            return found
        on_host = out.device.type == "cpu"
        stage = out if on_host else torch.empty(out.shape, dtype=out.dtype,
                                                pin_memory=torch.cuda.is_available())
        flat = stage.view(len(keys), -1).view(torch.uint8)
        nbytes = flat.shape[1]
        # One byte past the trailer: a file of another layout (longer) shows up as 65 bytes read.
        trailers = np.zeros((len(keys), _TRAILER.size + 1), dtype=np.uint8)
        reqs = []
        for i, k in enumerate(keys):
            p = self.path_of(k)
            reqs.append(ReadRequest(p, 0, nbytes, memoryview(flat[i].numpy()), (i, "data")))
            reqs.append(ReadRequest(p, nbytes, _TRAILER.size + 1, memoryview(trailers[i]), (i, "trailer")))
        results = self._handle.get().batch_read(reqs, timeout=self.timeout)
        ok = np.ones(len(keys), dtype=bool)
        for r in results:
            i, _ = r.userdata
            if r.error is not None:
                if isinstance(r.error, FileNotFoundError):
                    ok[i] = False
                    continue
                raise OSError(f"reading KV block {keys[i]} failed: {type(r.error).__name__}: {r.error}") \
                    from r.error
            kind = r.userdata[1]
            if kind == "trailer" and r.nbytes != _TRAILER.size:
                raise KVBlockCorrupt(f"KV block {keys[i]} is stored with another layout than the request's "
                                     f"{tuple(stage.shape[1:])} {stage.dtype} (or truncated)")
            if kind == "data" and r.nbytes != r.request.length:
                raise KVBlockCorrupt(f"KV block {keys[i]} is truncated ({r.nbytes} of {r.request.length} bytes "
                                     f"at offset {r.request.offset})")
        shape = tuple(stage.shape[1:])
        code = _DTYPE_CODES[stage.dtype]
        for i in np.nonzero(ok)[0]:
            magic, ver, dcode, s0, s1, s2, n, crc, digest = _TRAILER.unpack(trailers[i, :_TRAILER.size].tobytes())
            key = keys[i]
            if magic != _MAGIC or ver > _VERSION:
                raise KVBlockCorrupt(f"KV block {key}: bad trailer (magic {magic!r}, version {ver})")
            if (dcode, (s0, s1, s2), n) != (code, shape, nbytes):
                raise KVBlockCorrupt(f"KV block {key} holds layout {(s0, s1, s2)} dtype code {dcode}, the request "
                                     f"wants {shape} code {code}")
            if digest != bytes.fromhex(key)[:16].ljust(16, b"\0"):
                raise KVBlockCorrupt(f"KV block file {self.path_of(key)} belongs to another key")
            if self.verify and crc32c(memoryview(flat[i].numpy())) != crc:
                raise KVBlockCorrupt(f"KV block {key}: CRC32C mismatch (corrupt on storage)")
        found[torch.from_numpy(np.nonzero(ok)[0])] = True
        if not on_host:
            out.copy_(stage, non_blocking=True)
        return found

    def remove(self, keys: Iterable[str]) -> int:
        fs, n = self._handle.get(), 0
        for k in keys:
            try:
                fs.remove(self.path_of(k))
                n += 1
            except FileNotFoundError:
                pass
        return n

    # ------------------------------------------------------------------ paged-cache integration
    def offload(self, cache, req: int, token_ids, *, namespace: str = "") -> int:
        """Save every full page of request `req` of a paged cache under its prefix keys; returns pages written."""
        keys = prefix_block_keys(token_ids, namespace=namespace)
        blocks = cache.blocks_of(req)[:len(keys)]
        n = min(len(keys), len(blocks), cache.seqlen(req) // PAGE_TOKENS)
        if n == 0:
            return 0
        idx = torch.tensor(blocks[:n], dtype=torch.long, device=cache.k_cache.device)
        return self.save(keys[:n], cache.k_cache.index_select(0, idx))

    def restore(self, cache, req: int, token_ids, *, namespace: str = "") -> int:
        """Load the longest stored prefix of `token_ids` into an empty request `req` of a paged cache; returns
        how many tokens it now holds (a multiple of 64): prefill only the rest."""
        if cache.seqlen(req) != 0:
            raise ValueError(f"restore: request {req} already holds {cache.seqlen(req)} tokens; free it first")
        keys = prefix_block_keys(token_ids, namespace=namespace)
        present = self.contains(keys)
        n = next((i for i, p in enumerate(present) if not p), len(keys))
        if n == 0:
            return 0
        kc = cache.k_cache
        stage = torch.empty((n, *kc.shape[1:]), dtype=kc.dtype)
        found = self.load(keys[:n], stage)
        n = int(found.long().cumprod(0).sum())  # a block removed since contains(): stop before it
        if n == 0:
            return 0
        cache.reserve(req, n * PAGE_TOKENS)
        idx = torch.tensor(cache.blocks_of(req)[:n], dtype=torch.long, device=kc.device)
        kc.index_copy_(0, idx, stage[:n].to(kc.device))
        return n * PAGE_TOKENS
