"""Exceptions of the storage stack.

They subclass the matching built-in OSError types where one fits, so callers that already handle
`FileNotFoundError` and friends keep working; `StorageError.code` is the stable name sent over RPC.
"""
from __future__ import annotations

import errno


class StorageError(OSError):
    """Base class; `code` travels over the wire and maps back to the same class on the client."""

    code = "storage_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # OSError's default formatting drops the message for 1-arg construction
        return self.message


class NotFound(StorageError, FileNotFoundError):
    code = "not_found"
    errno = errno.ENOENT


class AlreadyExists(StorageError, FileExistsError):
    code = "exists"
    errno = errno.EEXIST


class NotADirectory(StorageError, NotADirectoryError):
    code = "not_a_directory"
    errno = errno.ENOTDIR


class IsADirectory(StorageError, IsADirectoryError):
    code = "is_a_directory"
    errno = errno.EISDIR


class DirectoryNotEmpty(StorageError):
    code = "not_empty"
    errno = errno.ENOTEMPTY


class InvalidPath(StorageError, ValueError):
    code = "invalid_path"
    errno = errno.EINVAL


class InvalidArgument(StorageError, ValueError):
    code = "invalid_argument"
    errno = errno.EINVAL


class NameTooLong(InvalidPath):
    code = "name_too_long"
    errno = errno.ENAMETOOLONG


class NoSpace(StorageError):
    code = "no_space"
    errno = errno.ENOSPC


class ChunkCorrupt(StorageError):
    """A chunk's bytes do not match its CRC32C: another replica must serve it and fsck must repair it."""

    code = "corrupt"
    errno = errno.EIO


class StaleRouting(StorageError):
    """The request carried an older chain version than the target knows: refresh routing and retry."""

    code = "stale_routing"
    errno = errno.ESTALE


class NotServing(StorageError):
    """The target is not in a state that serves this request (syncing, offline, not head for writes)."""

    code = "not_serving"
    errno = errno.EAGAIN


class Unavailable(StorageError, ConnectionError):
    code = "unavailable"
    errno = errno.EHOSTUNREACH


class AuthError(StorageError, PermissionError):
    code = "auth"
    errno = errno.EACCES


class Conflict(StorageError):
    """Optimistic transaction lost a race; the KV layer retries these itself. Also raised by an embedded chunk
    update that kept losing its commit to other processes' (chunk_engine.UPDATE_ATTEMPTS times)."""

    code = "conflict"
    errno = errno.EAGAIN


class ReadOnly(StorageError, PermissionError):
    """A write to a file system or target opened with read_only=True."""

    code = "read_only"
    errno = errno.EROFS


class BadURI(StorageError, ValueError):
    code = "bad_uri"
    errno = errno.EINVAL


ERRORS_BY_CODE = {
    cls.code: cls
    for cls in (
        StorageError, NotFound, AlreadyExists, NotADirectory, IsADirectory, DirectoryNotEmpty, InvalidPath,
        InvalidArgument, NameTooLong, NoSpace, ChunkCorrupt, StaleRouting, NotServing, Unavailable, AuthError,
        Conflict, BadURI, ReadOnly,
    )
}


def error_from_code(code: str, message: str) -> StorageError:
    return ERRORS_BY_CODE.get(code, StorageError)(message)
