"""The packed sample format (version 1): many small samples in a few large shard files plus one index.

A packed dataset is a directory on deepstack storage (embedded or cluster):

    <dir>/index.dsi                 the index (below); written last, by rename, so its presence commits the pack
    <dir>/data-<packid>-<nnnnn>.dsd shard files: sample bytes back to back (optionally padded to 4 KiB)

Index layout, all integers little-endian:

    header (32 bytes)
      0  magic        8s   b"DSPACK\\r\\n"
      8  version      u16  1
      10 nsections    u16
      12 flags        u32  0 (reserved)
      16 num_samples  u64
      24 table_crc    u32  CRC32C of header bytes [0, 24) followed by the section table
      28 reserved     u32  0
    section table: nsections x (id u32, crc32c u32, offset u64, length u64), 24 bytes each
    sections, each starting at an 8-byte aligned offset:
      1 ENTRIES  num_samples x (shard u32, crc32c u32, offset u64, length u64): where sample i lives and the
                 CRC32C of its bytes
      2 SHAPES   optional: num_samples x ndim int64, when tensor samples differ in shape
      3 NAMES    optional: UTF-8 sample names joined by NUL (e.g. the source file paths)
      4 META     UTF-8 JSON: format, version, sample_type ("bytes" | "tensor"), dtype, shape (common shape or
                 null), ndim, shards [{name, size, crc32c}], pack_id, align, created, user

Readers refuse an unknown magic, a newer version, a CRC mismatch in the header or any section, and entries
that point outside their shard, each with an error that names the index file.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import numpy as np
import torch

from torch_deepstack.storage.crc import crc32c

MAGIC = b"DSPACK\r\n"
VERSION = 1
INDEX_NAME = "index.dsi"
SHARD_SUFFIX = ".dsd"

SEC_ENTRIES, SEC_SHAPES, SEC_NAMES, SEC_META = 1, 2, 3, 4
_SECTION_NAMES = {SEC_ENTRIES: "ENTRIES", SEC_SHAPES: "SHAPES", SEC_NAMES: "NAMES", SEC_META: "META"}

_HEADER = struct.Struct("<8sHHIQII")  # 32 bytes
_SECTION = struct.Struct("<IIQQ")  # 24 bytes
ENTRY_DTYPE = np.dtype([("shard", "<u4"), ("crc", "<u4"), ("offset", "<u8"), ("length", "<u8")])

# Tensor dtypes a pack may hold, by the name stored in META (torch's own names).
DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)
}
for _name in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"):
    if hasattr(torch, _name):
        DTYPES[_name] = getattr(torch, _name)


class PackFormatError(ValueError):
    """The index or a shard is not a valid deepstack pack (corrupt, truncated, or from a newer version)."""


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise TypeError(f"tensor dtype {dtype} cannot be packed; supported: {sorted(DTYPES)}")
    return name


def shard_name(pack_id: str, i: int) -> str:
    return f"data-{pack_id}-{i:05d}{SHARD_SUFFIX}"


@dataclass
class PackIndex:
    """The parsed index: vectorised entry arrays plus the JSON metadata."""

    entries: np.ndarray  # ENTRY_DTYPE, one row per sample
    meta: dict
    shapes: np.ndarray | None = None  # [num_samples, ndim] int64 when shapes vary
    names: list[str] | None = None
    source: str = "<memory>"
    shard_sizes: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def sample_type(self) -> str:
        return self.meta["sample_type"]

    @property
    def dtype(self) -> torch.dtype | None:
        name = self.meta.get("dtype")
        return None if name is None else DTYPES[name]

    @property
    def shard_names(self) -> list[str]:
        return [s["name"] for s in self.meta["shards"]]

    def shape_of(self, i: int) -> tuple[int, ...]:
        if self.shapes is not None:
            return tuple(int(x) for x in self.shapes[i])
        return tuple(self.meta["shape"])

    @property
    def total_bytes(self) -> int:
        return int(self.entries["length"].sum())

    # ------------------------------------------------------------------ encode / decode
    def to_bytes(self) -> bytes:
        sections = [(SEC_ENTRIES, np.ascontiguousarray(self.entries, dtype=ENTRY_DTYPE).tobytes())]
        if self.shapes is not None:
            sections.append((SEC_SHAPES, np.ascontiguousarray(self.shapes, dtype="<i8").tobytes()))
        if self.names is not None:
            for n in self.names:
                if "\0" in n:
                    raise ValueError(f"sample name contains NUL: {n!r}")
            sections.append((SEC_NAMES, "\0".join(self.names).encode("utf-8", "surrogateescape")))
        sections.append((SEC_META, json.dumps(self.meta, sort_keys=True).encode()))
        pos = _HEADER.size + _SECTION.size * len(sections)
        table, body = [], []
        for sid, data in sections:
            pad = (-pos) % 8
            body.append(b"\0" * pad)
            pos += pad
            table.append(_SECTION.pack(sid, crc32c(data), pos, len(data)))
            body.append(data)
            pos += len(data)
        head = _HEADER.pack(MAGIC, VERSION, len(sections), 0, len(self.entries), 0, 0)
        table_bytes = b"".join(table)
        table_crc = crc32c(table_bytes, crc32c(head[:24]))
        head = _HEADER.pack(MAGIC, VERSION, len(sections), 0, len(self.entries), table_crc, 0)
        return head + table_bytes + b"".join(body)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<memory>") -> "PackIndex":
        def bad(msg: str) -> PackFormatError:
            return PackFormatError(f"{source}: {msg}")

        if len(data) < _HEADER.size:
            raise bad(f"index truncated ({len(data)} bytes, the header alone is {_HEADER.size})")
        magic, version, nsec, _flags, n, table_crc, _ = _HEADER.unpack_from(data, 0)
        if magic != MAGIC:
            raise bad(f"not a deepstack pack index (magic {magic!r}, expected {MAGIC!r})")
        if version > VERSION:
            raise bad(f"pack format version {version} is newer than this reader (max {VERSION}); "
                      f"upgrade torch_deepstack")
        tend = _HEADER.size + nsec * _SECTION.size
        if len(data) < tend:
            raise bad("index truncated inside the section table")
        if crc32c(data[_HEADER.size:tend], crc32c(data[:24])) != table_crc:
            raise bad("index header CRC32C mismatch (corrupt index)")
        sections: dict[int, memoryview] = {}
        mv = memoryview(data)
        for k in range(nsec):
            sid, crc, off, ln = _SECTION.unpack_from(data, _HEADER.size + k * _SECTION.size)
            if off + ln > len(data):
                raise bad(f"section {_SECTION_NAMES.get(sid, sid)} runs past the end of the index (truncated)")
            body = mv[off:off + ln]
            if crc32c(body) != crc:
                raise bad(f"section {_SECTION_NAMES.get(sid, sid)} CRC32C mismatch (corrupt index)")
            sections[sid] = body
        for need in (SEC_ENTRIES, SEC_META):
            if need not in sections:
                raise bad(f"index lacks its {_SECTION_NAMES[need]} section")
        try:
            meta = json.loads(bytes(sections[SEC_META]).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"META section is not valid JSON: {e}") from None
        entries = np.frombuffer(bytes(sections[SEC_ENTRIES]), dtype=ENTRY_DTYPE)
        if len(entries) != n:
            raise bad(f"ENTRIES holds {len(entries)} rows, header says {n}")
        shapes = None
        if SEC_SHAPES in sections:
            ndim = int(meta.get("ndim", 0))
            shapes = np.frombuffer(bytes(sections[SEC_SHAPES]), dtype="<i8")
            if ndim <= 0 or shapes.size != n * ndim:
                raise bad(f"SHAPES holds {shapes.size} values, expected {n} x ndim {ndim}")
            shapes = shapes.reshape(n, ndim)
        names = None
        if SEC_NAMES in sections:
            names = bytes(sections[SEC_NAMES]).decode("utf-8", "surrogateescape").split("\0") if n else []
            if len(names) != n:
                raise bad(f"NAMES holds {len(names)} names for {n} samples")
        idx = cls(entries, meta, shapes, names, source)
        idx._validate(bad)
        return idx

    def _validate(self, bad) -> None:
        meta = self.meta
        if meta.get("sample_type") not in ("bytes", "tensor"):
            raise bad(f"unknown sample_type {meta.get('sample_type')!r}")
        if meta["sample_type"] == "tensor":
            if meta.get("dtype") not in DTYPES:
                raise bad(f"unknown tensor dtype {meta.get('dtype')!r}")
            if meta.get("shape") is None and self.shapes is None:
                raise bad("tensor samples need a common shape or a SHAPES section")
        shards = meta.get("shards")
        if not isinstance(shards, list):
            raise bad("META lacks the shard list")
        self.shard_sizes = [int(s["size"]) for s in shards]
        if len(self.entries):
            if int(self.entries["shard"].max()) >= len(shards):
                raise bad("an entry points at a shard the index does not list")
            sizes = np.asarray(self.shard_sizes, dtype=np.uint64)
            ends = self.entries["offset"] + self.entries["length"]
            if np.any(ends > sizes[self.entries["shard"]]):
                i = int(np.nonzero(ends > sizes[self.entries["shard"]])[0][0])
                raise bad(f"entry {i} ends past the end of its shard")
