"""File-system metadata over the transactional KV interface (the role of 3FS's meta service).

Keys (all in one KV engine, so one transaction can touch any of them):

    b"I" + inode id (8 bytes big-endian)          -> JSON inode
    b"D" + parent id (8 bytes) + name (utf-8)      -> JSON {"id": child, "type": "file" | "dir"}
    b"N"                                           -> next inode id (decimal)
    b"T" + directory id                            -> a removed directory whose subtree is being purged

Inode JSON: every inode has id, type, ctime, mtime. Files add length, chunk_size and chains (the chains their
chunks are striped over: chunk i lives on chains[i % len(chains)]). Directories add parent (for the rename
loop check) and the default layout of new files: chunk_size and stripe.

Every operation is one KV transaction: rename is atomic (one commit moves the entry), recursive delete removes
a whole subtree in one commit and returns the removed files so their chunks can be reclaimed.
"""
from __future__ import annotations

import json
import random
import struct
import time
from typing import Callable

from torch_deepstack.storage.errors import (AlreadyExists, DirectoryNotEmpty, InvalidArgument, InvalidPath,
                                            IsADirectory, NotADirectory, NotFound)
from torch_deepstack.storage.kv import KVEngine, Txn
from torch_deepstack.storage.paths import split_path

ROOT_ID = 1
DEFAULT_CHUNK_SIZE = 1 << 20
DEFAULT_STRIPE = 4
MAX_CHUNK_SIZE = 64 << 20


def _ikey(ino: int) -> bytes:
    return b"I" + struct.pack(">Q", ino)


def _dprefix(parent: int) -> bytes:
    return b"D" + struct.pack(">Q", parent)


def _tkey(ino: int) -> bytes:
    return b"T" + struct.pack(">Q", ino)


def _dkey(parent: int, name: str) -> bytes:
    return _dprefix(parent) + name.encode("utf-8", "surrogateescape")


def _check_layout(chunk_size, stripe):
    if chunk_size is not None:
        if (not isinstance(chunk_size, int) or chunk_size < 4096 or chunk_size > MAX_CHUNK_SIZE
                or chunk_size % 4096):
            raise InvalidArgument(f"chunk_size must be a multiple of 4096 in [4096, {MAX_CHUNK_SIZE}], "
                                  f"got {chunk_size!r}")
    if stripe is not None and (not isinstance(stripe, int) or not 1 <= stripe <= 1024):
        raise InvalidArgument(f"stripe must be an int in [1, 1024], got {stripe!r}")


class MetaStore:
    """Namespace operations. `chain_table()` returns the chain ids new files may be striped over."""

    def __init__(self, kv: KVEngine, chain_table: Callable[[], list[str]] | None = None):
        self.kv = kv
        self.chain_table = chain_table or (lambda: ["c0"])

    # ------------------------------------------------------------------ helpers inside a txn
    @staticmethod
    def _get_inode(t: Txn, ino: int) -> dict:
        raw = t.get(_ikey(ino))
        if raw is None:
            raise NotFound(f"inode {ino} does not exist")
        return json.loads(raw)

    @staticmethod
    def _put_inode(t: Txn, inode: dict) -> None:
        t.put(_ikey(inode["id"]), json.dumps(inode, separators=(",", ":")).encode())

    def _resolve(self, t: Txn, parts: list[str], path: str) -> dict:
        inode = self._get_inode(t, ROOT_ID)
        for i, name in enumerate(parts):
            if inode["type"] != "dir":
                raise NotADirectory(f"{'/' + '/'.join(parts[:i])} is not a directory (in {path!r})")
            raw = t.get(_dkey(inode["id"], name))
            if raw is None:
                raise NotFound(f"no such file or directory: {path!r}")
            inode = self._get_inode(t, json.loads(raw)["id"])
        return inode

    def _parent_of(self, t: Txn, path: str) -> tuple[dict, str]:
        parts = split_path(path)
        if not parts:
            raise InvalidPath("the root directory has no parent and cannot be created, moved or removed")
        parent = self._resolve(t, parts[:-1], path)
        if parent["type"] != "dir":
            raise NotADirectory(f"parent of {path!r} is not a directory")
        return parent, parts[-1]

    @staticmethod
    def _alloc_id(t: Txn) -> int:
        raw = t.get(b"N")
        ino = int(raw) if raw else ROOT_ID + 1
        t.put(b"N", str(ino + 1).encode())
        return ino

    def _new_dir(self, t: Txn, parent: dict, chunk_size, stripe) -> dict:
        now = time.time()
        return {"id": self._alloc_id(t), "type": "dir", "parent": parent["id"], "ctime": now, "mtime": now,
                "chunk_size": chunk_size or parent["chunk_size"], "stripe": stripe or parent["stripe"]}

    # ------------------------------------------------------------------ operations
    def init(self, chunk_size: int = DEFAULT_CHUNK_SIZE, stripe: int = DEFAULT_STRIPE) -> None:
        _check_layout(chunk_size, stripe)

        def fn(t):
            if t.get(_ikey(ROOT_ID)) is None:
                now = time.time()
                self._put_inode(t, {"id": ROOT_ID, "type": "dir", "parent": ROOT_ID, "ctime": now, "mtime": now,
                                    "chunk_size": chunk_size, "stripe": stripe})
                t.put(b"N", str(ROOT_ID + 1).encode())
        self.kv.transaction(fn)

    def stat(self, path: str) -> dict:
        parts = split_path(path)
        return self.kv.transaction(lambda t: self._resolve(t, parts, path), read_only=True)

    def inode(self, ino: int) -> dict:
        return self.kv.transaction(lambda t: self._get_inode(t, ino), read_only=True)

    def listdir(self, path: str) -> list[tuple[str, str]]:
        parts = split_path(path)

        def fn(t):
            d = self._resolve(t, parts, path)
            if d["type"] != "dir":
                raise NotADirectory(f"not a directory: {path!r}")
            n = len(_dprefix(d["id"]))
            return [(k[n:].decode("utf-8", "surrogateescape"), json.loads(v)["type"])
                    for k, v in t.scan(_dprefix(d["id"]))]
        return self.kv.transaction(fn, read_only=True)

    def mkdir(self, path: str, *, parents: bool = False, exist_ok: bool = False, chunk_size: int | None = None,
              stripe: int | None = None) -> dict:
        _check_layout(chunk_size, stripe)
        parts = split_path(path)
        if not parts:
            if exist_ok or parents:
                return self.stat("/")
            raise AlreadyExists("'/' already exists")

        def fn(t):
            cur = self._get_inode(t, ROOT_ID)
            for i, name in enumerate(parts):
                last = i == len(parts) - 1
                raw = t.get(_dkey(cur["id"], name))
                if raw is not None:
                    child = self._get_inode(t, json.loads(raw)["id"])
                    if child["type"] != "dir":
                        raise NotADirectory(f"{'/' + '/'.join(parts[:i + 1])} exists and is not a directory")
                    if last and not exist_ok:
                        raise AlreadyExists(f"directory exists: {path!r}")
                    cur = child
                    continue
                if not last and not parents:
                    raise NotFound(f"parent directory {'/' + '/'.join(parts[:i + 1])!r} does not exist "
                                   f"(use parents=True)")
                child = self._new_dir(t, cur, chunk_size if last else None, stripe if last else None)
                self._put_inode(t, child)
                t.put(_dkey(cur["id"], name), json.dumps({"id": child["id"], "type": "dir"}).encode())
                cur = child
            return cur
        return self.kv.transaction(fn)

    def create(self, path: str, *, exclusive: bool = False, truncate: bool = False,
               chunk_size: int | None = None) -> tuple[dict, dict | None]:
        """Create a file (or open an existing one). Returns (inode, old inode whose chunks to drop or None)."""
        _check_layout(chunk_size, None)
        chains_all = self.chain_table()

        def fn(t):
            parent, name = self._parent_of(t, path)
            raw = t.get(_dkey(parent["id"], name))
            if raw is not None:
                ino = self._get_inode(t, json.loads(raw)["id"])
                if ino["type"] == "dir":
                    raise IsADirectory(f"is a directory: {path!r}")
                if exclusive:
                    raise AlreadyExists(f"file exists: {path!r}")
                if truncate and ino["length"] > 0:
                    # Truncation gives the file a fresh inode: old chunks are dropped, readers of the old
                    # inode never see a half-truncated mix.
                    t.delete(_ikey(ino["id"]))
                    new = dict(ino, id=self._alloc_id(t), length=0, mtime=time.time())
                    self._put_inode(t, new)
                    t.put(_dkey(parent["id"], name), json.dumps({"id": new["id"], "type": "file"}).encode())
                    return new, ino
                return ino, None
            ino_id = self._alloc_id(t)
            stripe = min(parent["stripe"], len(chains_all))
            rng = random.Random(ino_id)
            start = rng.randrange(len(chains_all))
            chains = [chains_all[(start + i) % len(chains_all)] for i in range(stripe)]
            rng.shuffle(chains)
            now = time.time()
            ino = {"id": ino_id, "type": "file", "ctime": now, "mtime": now, "length": 0,
                   "chunk_size": chunk_size or parent["chunk_size"], "chains": chains}
            self._put_inode(t, ino)
            t.put(_dkey(parent["id"], name), json.dumps({"id": ino_id, "type": "file"}).encode())
            return ino, None
        return self.kv.transaction(fn)

    def set_length(self, ino: int, length: int, *, grow_only: bool = True) -> dict:
        if not isinstance(length, int) or length < 0:
            raise InvalidArgument(f"length must be an int >= 0, got {length!r}")

        def fn(t):
            inode = self._get_inode(t, ino)
            if inode["type"] != "file":
                raise IsADirectory(f"inode {ino} is a directory")
            new_len = max(inode["length"], length) if grow_only else length
            if new_len != inode["length"]:
                inode = dict(inode, length=new_len, mtime=time.time())
                self._put_inode(t, inode)
            return inode
        return self.kv.transaction(fn)

    def rename(self, src: str, dst: str) -> dict | None:
        """Atomically move src to dst. Replaces an existing file or empty directory at dst (POSIX rules).
        Returns the replaced file's inode (its chunks are to be dropped) or None."""

        def fn(t):
            sparent, sname = self._parent_of(t, src)
            dparent, dname = self._parent_of(t, dst)
            raw = t.get(_dkey(sparent["id"], sname))
            if raw is None:
                raise NotFound(f"no such file or directory: {src!r}")
            sent = json.loads(raw)
            if sparent["id"] == dparent["id"] and sname == dname:
                return None
            if sent["type"] == "dir":
                # Refuse moving a directory into its own subtree (walk up from the destination parent).
                cur = dparent
                while True:
                    if cur["id"] == sent["id"]:
                        raise InvalidArgument(f"cannot move {src!r} into its own subtree {dst!r}")
                    if cur["id"] == ROOT_ID:
                        break
                    cur = self._get_inode(t, cur["parent"])
            replaced = None
            draw = t.get(_dkey(dparent["id"], dname))
            if draw is not None:
                dent = json.loads(draw)
                if dent["type"] == "dir":
                    if sent["type"] != "dir":
                        raise IsADirectory(f"cannot replace directory {dst!r} with a file")
                    if t.scan(_dprefix(dent["id"]), limit=1):
                        raise DirectoryNotEmpty(f"destination directory not empty: {dst!r}")
                    t.delete(_ikey(dent["id"]))
                else:
                    if sent["type"] == "dir":
                        raise NotADirectory(f"cannot replace file {dst!r} with a directory")
                    replaced = self._get_inode(t, dent["id"])
                    t.delete(_ikey(dent["id"]))
            t.delete(_dkey(sparent["id"], sname))
            t.put(_dkey(dparent["id"], dname), json.dumps(sent).encode())
            if sent["type"] == "dir":
                d = self._get_inode(t, sent["id"])
                self._put_inode(t, dict(d, parent=dparent["id"]))
            return replaced
        return self.kv.transaction(fn)

    def remove(self, path: str, *, recursive: bool = False) -> list[dict]:
        """Remove a file or directory (a non-empty one only with recursive=True). Returns the removed file
        inodes, whose chunks the caller reclaims.

        The namespace change is one transaction: the entry disappears atomically. A non-empty directory is
        moved to the trash (key "T" + id) in that transaction, unreachable from then on, and its subtree is
        then purged in bounded transactions (etcd caps the operations of one transaction); a purge cut short
        by a crash is finished by `purge_trash()`."""

        def fn(t):
            parent, name = self._parent_of(t, path)
            raw = t.get(_dkey(parent["id"], name))
            if raw is None:
                raise NotFound(f"no such file or directory: {path!r}")
            ent = json.loads(raw)
            t.delete(_dkey(parent["id"], name))
            if ent["type"] != "dir":
                ino = self._get_inode(t, ent["id"])
                t.delete(_ikey(ent["id"]))
                return [ino], None
            if t.scan(_dprefix(ent["id"]), limit=1):
                if not recursive:
                    raise DirectoryNotEmpty(f"directory not empty: {path!r} (use recursive=True)")
                t.put(_tkey(ent["id"]), b"1")
                return [], ent["id"]
            t.delete(_ikey(ent["id"]))
            return [], None
        files, trashed = self.kv.transaction(fn)
        if trashed is not None:
            files += self._purge(trashed)
        return files

    PURGE_BATCH = 24  # entries per purge transaction: well inside etcd's default 128 operations

    def _purge(self, root_id: int) -> list[dict]:
        """Delete a trashed directory's subtree, a bounded batch per transaction."""
        files: list[dict] = []

        def step(t, dir_id):
            if t.get(_tkey(dir_id)) is None:
                return [], [], True  # purged already (by a concurrent purge_trash)
            children = t.scan(_dprefix(dir_id), limit=self.PURGE_BATCH)
            out, subdirs = [], []
            for k, v in children:
                c = json.loads(v)
                t.delete(k)
                if c["type"] == "dir":
                    t.put(_tkey(c["id"]), b"1")  # purged in its own turn
                    subdirs.append(c["id"])
                else:
                    raw = t.get(_ikey(c["id"]))
                    if raw is not None:
                        out.append(json.loads(raw))
                        t.delete(_ikey(c["id"]))
            if not children:
                t.delete(_ikey(dir_id))
                t.delete(_tkey(dir_id))
                return out, subdirs, True
            return out, subdirs, False
        pending = [root_id]
        while pending:
            d = pending.pop()
            while True:
                got, subdirs, done = self.kv.transaction(lambda t: step(t, d))
                files += got
                pending += subdirs
                if done:
                    break
        return files

    def _trash_ids(self) -> list[int]:
        return [struct.unpack(">Q", k[1:9])[0] for k, _ in self.kv.scan(b"T")]

    def purge_trash(self) -> list[dict]:
        """Finish purges interrupted by a crash. Returns the removed file inodes."""
        files: list[dict] = []
        for d in self._trash_ids():
            files += self._purge(d)
        return files

    def all_file_inodes(self) -> dict[int, dict]:
        """Every file inode (fsck uses it to find orphan chunks)."""
        def fn(t):
            out = {}
            for _, v in t.scan(b"I"):
                ino = json.loads(v)
                if ino["type"] == "file":
                    out[ino["id"]] = ino
            return out
        return self.kv.transaction(fn, read_only=True)
