"""The transactional KV interface and the metadata layer: one suite, run on SQLite and on etcd."""
from __future__ import annotations

import threading

import pytest

from torch_deepstack.storage.errors import (AlreadyExists, BadURI, DirectoryNotEmpty, InvalidArgument, InvalidPath,
                                            IsADirectory, NameTooLong, NotADirectory, NotFound)
from torch_deepstack.storage.kv import open_kv, prefix_end
from torch_deepstack.storage.meta import MetaStore


def test_prefix_end():
    assert prefix_end(b"ab") == b"ac"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"


def test_kv_basic_ops(kv):
    kv.put(b"k1", b"v1")
    assert kv.get(b"k1") == b"v1"
    assert kv.get(b"missing") is None

    def fn(t):
        t.put(b"p/b", b"2")
        t.put(b"p/a", b"1")
        t.put(b"q", b"x")
        assert t.get(b"p/a") == b"1"  # reads see the transaction's own writes
        t.delete(b"k1")
        return t.scan(b"p/")
    assert kv.transaction(fn) == [(b"p/a", b"1"), (b"p/b", b"2")]
    assert kv.get(b"k1") is None
    assert kv.scan(b"p/") == [(b"p/a", b"1"), (b"p/b", b"2")]


def test_kv_abort_leaves_nothing(kv):
    def fn(t):
        t.put(b"a", b"1")
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        kv.transaction(fn)
    assert kv.get(b"a") is None


@pytest.mark.timeout(60)
def test_kv_concurrent_increments_are_serializable(kv):
    """Read-modify-write from many threads: every increment survives (conflicts are retried)."""
    kv.put(b"counter", b"0")
    n_threads, n_incr = 4, 15

    def incr(t):
        t.put(b"counter", str(int(t.get(b"counter")) + 1).encode())

    def worker():
        for _ in range(n_incr):
            kv.transaction(incr)
    threads = [threading.Thread(target=worker) for _ in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(50)
    assert int(kv.get(b"counter")) == n_threads * n_incr


def test_kv_bad_uris():
    for uri in ["", "sqlite://relative.db", "redis://x", "etcd://"]:
        with pytest.raises(BadURI):
            open_kv(uri)


@pytest.fixture
def meta(kv):
    m = MetaStore(kv, chain_table=lambda: ["c0", "c1", "c2", "c3"])
    m.init(chunk_size=64 << 10, stripe=2)
    return m


def names(meta, path):
    return [n for n, _ in meta.listdir(path)]


def test_meta_tree_ops(meta):
    meta.mkdir("/a")
    meta.mkdir("/a/b/c", parents=True)
    ino, old = meta.create("/a/b/f.bin")
    assert old is None and ino["type"] == "file" and ino["length"] == 0
    assert len(ino["chains"]) == 2 and set(ino["chains"]) <= {"c0", "c1", "c2", "c3"}
    assert ino["chunk_size"] == 64 << 10
    assert names(meta, "/a/b") == ["c", "f.bin"]
    assert meta.stat("/a/b/f.bin")["id"] == ino["id"]
    meta.set_length(ino["id"], 1000)
    meta.set_length(ino["id"], 10)  # grow-only: a smaller report never shrinks the file
    assert meta.stat("/a/b/f.bin")["length"] == 1000
    with pytest.raises(AlreadyExists):
        meta.mkdir("/a")
    meta.mkdir("/a", exist_ok=True)
    with pytest.raises(NotFound):
        meta.mkdir("/x/y")
    with pytest.raises(AlreadyExists):
        meta.create("/a/b/f.bin", exclusive=True)
    with pytest.raises(IsADirectory):
        meta.create("/a/b")
    with pytest.raises(NotADirectory):
        meta.create("/a/b/f.bin/g")
    with pytest.raises(NotFound):
        meta.stat("/nope")


def test_meta_layout_inherited_and_validated(meta):
    d = meta.mkdir("/big", chunk_size=1 << 20, stripe=4)
    assert d["chunk_size"] == 1 << 20
    ino, _ = meta.create("/big/x")
    assert ino["chunk_size"] == 1 << 20 and len(ino["chains"]) == 4
    with pytest.raises(InvalidArgument):
        meta.mkdir("/bad", chunk_size=1000)
    with pytest.raises(InvalidArgument):
        meta.mkdir("/bad", stripe=0)


def test_meta_rename_is_atomic_and_checked(meta):
    meta.mkdir("/src/sub", parents=True)
    f, _ = meta.create("/src/sub/file")
    meta.mkdir("/dst")
    meta.rename("/src", "/dst/moved")
    assert names(meta, "/") == ["dst"]
    assert meta.stat("/dst/moved/sub/file")["id"] == f["id"]
    with pytest.raises(InvalidArgument):  # a directory cannot move into its own subtree
        meta.rename("/dst", "/dst/moved/sub/inside")
    # Replacing a file returns the replaced inode so its chunks can be dropped.
    g, _ = meta.create("/dst/g")
    replaced = meta.rename("/dst/moved/sub/file", "/dst/g")
    assert replaced["id"] == g["id"]
    assert meta.stat("/dst/g")["id"] == f["id"]
    meta.mkdir("/dst/full/x", parents=True)
    meta.mkdir("/dst/empty")
    with pytest.raises(DirectoryNotEmpty):
        meta.rename("/dst/empty", "/dst/full")
    meta.rename("/dst/full", "/dst/empty")  # replaces the empty directory
    assert "x" in names(meta, "/dst/empty")
    with pytest.raises(NotFound):
        meta.rename("/nope", "/dst/z")


def test_meta_recursive_remove(meta):
    meta.mkdir("/t/a/b", parents=True)
    ids = {meta.create(p)[0]["id"] for p in ["/t/1", "/t/a/2", "/t/a/b/3"]}
    with pytest.raises(DirectoryNotEmpty):
        meta.remove("/t")
    removed = meta.remove("/t", recursive=True)
    assert {r["id"] for r in removed} == ids
    assert names(meta, "/") == []
    for ino in ids:
        with pytest.raises(NotFound):
            meta.inode(ino)
    assert meta.all_file_inodes() == {}


def test_meta_recursive_remove_in_batches_and_resume(meta, monkeypatch):
    monkeypatch.setattr(MetaStore, "PURGE_BATCH", 2)  # many small purge transactions
    meta.mkdir("/t/a/b", parents=True)
    ids = {meta.create(p)[0]["id"] for p in [f"/t/{i}" for i in range(5)] + ["/t/a/x", "/t/a/b/y"]}
    assert {r["id"] for r in meta.remove("/t", recursive=True)} == ids
    # A purge cut short (a crash after the namespace change): the tree is already gone from the namespace,
    # and purge_trash() finishes the job.
    meta.mkdir("/u/v", parents=True)
    ids = {meta.create(p)[0]["id"] for p in ["/u/1", "/u/v/2", "/u/v/3"]}
    real = MetaStore._purge
    monkeypatch.setattr(MetaStore, "_purge", lambda self, d: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError):
        meta.remove("/u", recursive=True)
    assert names(meta, "/") == []
    monkeypatch.setattr(MetaStore, "_purge", real)
    assert {r["id"] for r in meta.purge_trash()} == ids
    assert meta.purge_trash() == [] and meta.all_file_inodes() == {}
    assert [k for k, _ in meta.kv.scan(b"")] == [b"I" + (1).to_bytes(8, "big"), b"N"]


def test_meta_big_directory_fits_etcd_transaction_limits(meta):
    meta.mkdir("/big")
    for i in range(140):  # etcd refuses transactions of more than 128 operations by default
        meta.create(f"/big/f{i}")
    assert len(meta.listdir("/big")) == 140
    meta.rename("/big", "/moved")
    assert len(meta.remove("/moved", recursive=True)) == 140


def test_meta_truncate_gives_fresh_inode(meta):
    f, _ = meta.create("/f")
    meta.set_length(f["id"], 500)
    g, old = meta.create("/f", truncate=True)
    assert old["id"] == f["id"] and g["id"] != f["id"] and g["length"] == 0


@pytest.mark.parametrize("bad,exc", [("/a/../b", InvalidPath), ("/a/./b", InvalidPath), ("/a\0b", InvalidPath),
                                     ("/" + "n" * 256, NameTooLong), ("/x" * 2100, NameTooLong)])
def test_meta_rejects_bad_paths(meta, bad, exc):
    with pytest.raises(exc):
        meta.mkdir(bad)
    assert names(meta, "/") == []


def test_meta_unicode_and_long_names(meta):
    name = "ü" * 127  # 254 bytes: fits
    meta.mkdir("/" + name)
    assert names(meta, "/") == [name]


@pytest.mark.timeout(60)
def test_meta_concurrent_creates_get_unique_inodes(meta):
    meta.mkdir("/c")
    got, errs = [], []

    def worker(k):
        try:
            for i in range(8):
                got.append(meta.create(f"/c/f{k}-{i}")[0]["id"])
        except Exception as e:  # noqa: BLE001
            errs.append(e)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(50)
    assert not errs
    assert len(got) == 32 and len(set(got)) == 32
    assert len(names(meta, "/c")) == 32
