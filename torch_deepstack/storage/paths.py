"""Path and name validation shared by the client, the metadata layer and the services."""
from __future__ import annotations

import re

from torch_deepstack.storage.errors import InvalidPath, NameTooLong

MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096


def split_path(path: str) -> list[str]:
    """'/a/b/c' -> ['a', 'b', 'c']; '/' -> []. Relative paths are taken from the root.

    Rejects what a POSIX file system would (empty/'.'/'..' components are refused rather than resolved, so
    that a path names exactly one place), NUL bytes, names over 255 bytes and paths over 4096 bytes."""
    if not isinstance(path, str):
        raise InvalidPath(f"path must be a str, got {type(path).__name__}")
    encoded = path.encode("utf-8", "surrogateescape")
    if len(encoded) > MAX_PATH_BYTES:
        raise NameTooLong(f"path is {len(encoded)} bytes, the limit is {MAX_PATH_BYTES}")
    if "\0" in path:
        raise InvalidPath(f"path contains a NUL byte: {path!r}")
    parts = [p for p in path.split("/") if p != ""]
    for p in parts:
        if p in (".", ".."):
            raise InvalidPath(f"'.' and '..' are not allowed in storage paths: {path!r}")
        validate_name(p)
    return parts


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidPath(f"a file name must be a non-empty str, got {name!r}")
    if "/" in name or "\0" in name:
        raise InvalidPath(f"a file name cannot contain '/' or NUL: {name!r}")
    n = len(name.encode("utf-8", "surrogateescape"))
    if n > MAX_NAME_BYTES:
        raise NameTooLong(f"name is {n} bytes, the limit is {MAX_NAME_BYTES}: {name[:40]!r}...")
    return name


def normalize(path: str) -> str:
    return "/" + "/".join(split_path(path))


_CHUNK_ID = re.compile(r"[0-9a-f]{1,32}-[0-9a-f]{1,31}")


def validate_chunk_id(chunk_id: str) -> str:
    """Chunk ids name files on the storage targets, so only '<hex>-<hex>' is accepted (no path tricks)."""
    if not isinstance(chunk_id, str) or _CHUNK_ID.fullmatch(chunk_id) is None:
        raise InvalidPath(f"bad chunk id {chunk_id!r} (expected '<inode hex>-<index hex>')")
    return chunk_id


def chunk_id(inode: int, index: int) -> str:
    return f"{inode:016x}-{index:08x}"
