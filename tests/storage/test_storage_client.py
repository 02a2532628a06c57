"""The client API on the embedded stack: POSIX-like calls, batched reads into caller buffers, bad input."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

import torch_deepstack.storage as st
from tests.helpers import use_storage_read_path
from tests.storage.torn_reads import torn_chunk_reads
from torch_deepstack.storage import (AlreadyExists, BadURI, ChunkCorrupt, DirectoryNotEmpty, InvalidArgument,
                                     IsADirectory, NameTooLong, NoSpace, NotFound, ReadRequest)

CS = 64 << 10


@pytest.fixture(params=["c-helper", "pure-python"])
def fs(tmp_path, request, monkeypatch):
    """Every client test runs on the C read path and on the pure-Python fallback."""
    use_storage_read_path(request.param, monkeypatch)
    f = st.connect(str(tmp_path / "fs"), chunk_size=CS, sync=False)
    yield f
    f.close()


def test_connect_forms_and_persistence(tmp_path):
    path = tmp_path / "p"
    with st.connect(f"file://{path}", chunk_size=CS) as fs:
        fs.write_bytes("/x", b"hello")
    with st.connect(str(path), create=False) as fs:  # reopen: everything is still there
        assert fs.read_bytes("/x") == b"hello"
        assert fs.uri == f"file://{path}"
    with pytest.raises(NotFound):
        st.connect(str(tmp_path / "absent"), create=False)
    (tmp_path / "notfs").mkdir()
    (tmp_path / "notfs" / "keep.txt").write_text("mine")
    with pytest.raises(st.StorageError):
        st.connect(str(tmp_path / "notfs"))  # refuses to take over a non-empty foreign directory
    assert (tmp_path / "notfs" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("uri", ["deepstack://", "deepstack://host", "deepstack://h:1/path", "s3://bucket/x",
                                 "file://relative", ""])
def test_bad_uris(uri):
    with pytest.raises(BadURI):
        st.connect(uri)


def test_cluster_uri_needs_secret(monkeypatch):
    monkeypatch.delenv("DEEPSTACK_FS_SECRET", raising=False)
    monkeypatch.delenv("DEEPSTACK_FS_SECRET_FILE", raising=False)
    with pytest.raises(st.AuthError):
        st.connect("deepstack://127.0.0.1:1")


def test_file_api(fs):
    data = os.urandom(5 * CS + 123)
    with fs.open("/f.bin", "wb") as f:
        for i in range(0, len(data), 10000):  # many small writes, buffered into chunk updates
            f.write(data[i:i + 10000])
    st_ = fs.stat("/f.bin")
    assert st_.size == len(data) and st_.type == "file" and st_.chunk_size == CS
    with fs.open("/f.bin") as f:
        assert f.read(10) == data[:10]
        f.seek(CS - 5)
        assert f.read(10) == data[CS - 5:CS + 5]
        f.seek(-3, os.SEEK_END)
        assert f.read() == data[-3:]
        assert f.read() == b""
        assert f.pread(2 * CS, 7) == data[2 * CS:2 * CS + 7]
    with fs.open("/f.bin", "r+b") as f:  # overwrite in the middle across a chunk boundary
        f.pwrite(b"Z" * 20, CS - 10)
    expect = data[:CS - 10] + b"Z" * 20 + data[CS + 10:]
    assert fs.read_bytes("/f.bin") == expect
    with fs.open("/f.bin", "ab") as f:
        f.write(b"tail")
    assert fs.read_bytes("/f.bin") == expect + b"tail"
    fs.write_bytes("/f.bin", b"short")  # truncating open
    assert fs.read_bytes("/f.bin") == b"short"
    with pytest.raises(AlreadyExists):
        fs.open("/f.bin", "xb")
    with pytest.raises(InvalidArgument):
        fs.open("/f.bin", "rt")
    with fs.open("/f.bin") as f, pytest.raises(OSError):
        f.write(b"no")


def test_namespace_calls(fs):
    fs.mkdir("/a/b", parents=True)
    fs.write_bytes("/a/b/1", b"1")
    fs.write_bytes("/a/2", b"22")
    assert fs.listdir("/a") == ["2", "b"]
    assert fs.scandir("/a") == [("2", "file"), ("b", "dir")]
    assert fs.exists("/a/b/1") and not fs.exists("/a/b/9")
    fs.rename("/a", "/c")
    assert fs.read_bytes("/c/b/1") == b"1"
    with pytest.raises(DirectoryNotEmpty):
        fs.remove("/c")
    with pytest.raises(IsADirectory):
        fs.open("/c")
    fs.remove("/c", recursive=True)
    assert fs.listdir("/") == []
    # Chunks of removed files are reclaimed.
    eng = fs.backend.engine
    assert eng.list_chunks() == {}


def test_batch_read_into_caller_buffers(fs):
    data = os.urandom(4 * CS)
    fs.write_bytes("/d", data)
    f = fs.open("/d")
    pinned = torch.empty(3, 4096, dtype=torch.uint8)
    if torch.cuda.is_available():
        pinned = pinned.pin_memory()
    arr = np.zeros(5000, np.uint8)
    ba = bytearray(300)
    f32 = torch.zeros(1024, dtype=torch.float32)  # any dtype: viewed as bytes
    reqs = [ReadRequest(f, 0, 4096, pinned[0], "t0"), (f, CS - 2048, 4096, pinned[1], "t1"),
            ("/d", 4096 * 7, 4096, pinned[2]), ("/d", 100, 5000, arr), (f, 4 * CS - 100, 300, ba),
            (f, 8192, 4096, f32), (f, 10, 20)]
    res = fs.batch_read(reqs)
    assert all(r.ok for r in res), [r.error for r in res]
    assert bytes(pinned[0].numpy()) == data[:4096] and res[0].userdata == "t0"
    assert bytes(pinned[1].numpy()) == data[CS - 2048:CS + 2048]
    assert bytes(pinned[2].numpy()) == data[4096 * 7:4096 * 8]
    assert bytes(arr) == data[100:5100]
    assert res[4].nbytes == 100 and bytes(ba[:100]) == data[-100:]  # short read at end of file
    assert f32.numpy().tobytes() == data[8192:12288]
    assert bytes(res[6].data) == data[10:30]
    # The data views point into the caller's memory (no copy).
    assert np.shares_memory(np.frombuffer(res[3].data, np.uint8), arr)


def test_batch_read_errors_are_per_request(fs):
    fs.write_bytes("/d", b"x" * 100)
    fs.mkdir("/dir")
    res = fs.batch_read([("/d", 0, 10), ("/missing", 0, 10), ("/dir", 0, 1), ("/d", -1, 5),
                         ("/d", 0, 50, bytearray(10)), ("/d", 0, 5, b"readonly"), ("/d", 90, 10)])
    assert res[0].ok and bytes(res[0].data) == b"x" * 10
    assert isinstance(res[1].error, NotFound)
    assert isinstance(res[2].error, IsADirectory)
    assert isinstance(res[3].error, InvalidArgument)
    assert isinstance(res[4].error, InvalidArgument)
    assert isinstance(res[5].error, InvalidArgument)
    assert res[6].ok and res[6].nbytes == 10
    with pytest.raises(InvalidArgument):
        st.writable_bytes(torch.zeros(4, 4)[:, 0])  # non-contiguous


def test_async_reads_callback_and_ring(fs):
    data = os.urandom(2 * CS)
    fs.write_bytes("/d", data)
    seen = []
    batch = fs.submit_reads([("/d", i * 1000, 1000, None, i) for i in range(50)], callback=seen.append)
    res = batch.wait(timeout=30)
    assert batch.done() and len(res) == 50 and len(seen) == 50
    assert all(bytes(r.data) == data[r.userdata * 1000:(r.userdata + 1) * 1000] for r in res)
    ring = fs.read_ring(entries=64)
    bufs = np.zeros((40, 512), np.uint8)
    for i in range(40):
        ring.prepare("/d", i * 512, 512, bufs[i], userdata=i)
    ring.submit()
    done = ring.wait(min_results=40, timeout=30)
    assert sorted(r.userdata for r in done) == list(range(40))
    assert bufs.tobytes() == data[:40 * 512]
    for i in range(64):
        ring.prepare("/d", 0, 1)
    with pytest.raises(st.StorageError):
        ring.prepare("/d", 0, 1)  # ring full


def test_holes_read_as_zeros(fs):
    with fs.open("/sparse", "wb") as f:
        f.seek(3 * CS + 5)
        f.write(b"end")
    assert fs.stat("/sparse").size == 3 * CS + 8
    assert fs.read_bytes("/sparse") == bytes(3 * CS + 5) + b"end"


def test_corruption_surfaces_in_embedded_mode_and_fsck_reports_it(fs, tmp_path):
    from torch_deepstack.storage.fsck import fsck

    fs.write_bytes("/d", os.urandom(CS))
    root = tmp_path / "fs" / "target" / "data"
    victim = next(p for p in root.rglob("*.v*"))
    raw = bytearray(victim.read_bytes())
    raw[100] ^= 1
    victim.write_bytes(raw)
    res = fs.batch_read([("/d", 0, 200)])
    assert isinstance(res[0].error, ChunkCorrupt)
    rep = fsck(fs)
    assert len(rep.corrupt) == 1 and not rep.clean  # one replica: detected, nothing to repair from


def test_fsck_gc_removes_orphan_chunks(fs):
    from torch_deepstack.storage.fsck import fsck

    fs.write_bytes("/keep", b"k" * (2 * CS))
    fs.write_bytes("/lost", b"l" * (3 * CS))
    fs.meta.remove("/lost")  # metadata gone, chunks left behind (as after a client crash mid-remove)
    assert len(fs.backend.engine.list_chunks()) == 5
    rep = fsck(fs, gc=True)
    assert rep.orphans_removed == 3 and rep.clean
    assert len(fs.backend.engine.list_chunks()) == 2
    assert fs.read_bytes("/keep") == b"k" * (2 * CS)


def test_bad_names_and_full_disk(tmp_path):
    with st.connect(str(tmp_path / "fs"), chunk_size=CS, capacity_bytes=2 * CS, sync=False) as fs:
        with pytest.raises(NameTooLong):
            fs.write_bytes("/" + "n" * 300, b"x")
        with pytest.raises(NotFound):
            fs.write_bytes("/no/such/dir/f", b"x")
        fs.write_bytes("/keep", b"k" * CS)
        with pytest.raises(NoSpace):
            fs.write_bytes("/big", b"b" * (3 * CS))
        assert fs.read_bytes("/keep") == b"k" * CS  # nothing lost
        assert fs.listdir("/") == ["big", "keep"]
        fs.remove("/big")
        fs.write_bytes("/next", b"n" * CS)  # the failed write's chunks were reclaimed
        assert fs.read_bytes("/next") == b"n" * CS


def test_failed_write_reclaims_chunks_that_finish_after_the_failure(tmp_path, monkeypatch):
    """A multi-chunk write whose first chunk fails at once while the third is still being written: the client must
    reclaim the third chunk too, so write_chunks may raise only after every chunk write has finished."""
    import threading
    with st.connect(str(tmp_path / "fs"), chunk_size=CS, sync=False) as fs:
        engine = fs.backend.engine
        real_update, failed, late_done = engine.update, threading.Event(), threading.Event()

        def update(cid, off, data, cs):
            idx = int(cid.split("-")[1], 16)
            if idx == 0:
                failed.set()
                raise NoSpace("injected")
            if idx == 2:
                assert failed.wait(10)
                time.sleep(0.2)          # still writing when the failure is already known
            version = real_update(cid, off, data, cs)
            if idx == 2:
                late_done.set()
            return version  # the cleanup removes only the chunk versions the write created

        monkeypatch.setattr(engine, "update", update)
        with pytest.raises(NoSpace):
            fs.write_bytes("/f", b"x" * (3 * CS))
        assert late_done.wait(10)            # (without the fix it lands after the reclaim: then it leaks)
        monkeypatch.setattr(engine, "update", real_update)
        assert len(engine.list_chunks()) == 0   # chunk 2 (written after the failure) and chunk 1 both reclaimed


@pytest.mark.timeout(120)
def test_concurrent_writers_and_readers_never_see_torn_chunks(fs):
    """Writers overwrite whole chunks with uniform bytes; readers must always see one writer's bytes."""
    n_chunks = 4
    problems = torn_chunk_reads(fs, "/shared", CS, n_chunks, n_writers=3, rounds=30, n_readers=2,
                                read_chunks=lambda f: [f.pread(c * CS, CS) for c in range(n_chunks)], join_s=100)
    assert not problems, problems[:3]


def test_cli_embedded_roundtrip(tmp_path, capsys):
    from torch_deepstack import cli as top
    from torch_deepstack.storage.cli import main

    assert top.COMMANDS["fs"] == "torch_deepstack.storage.cli"
    fsdir = str(tmp_path / "fs")
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(200_000))
    assert main(["mkfs", fsdir, "--chunk-size", "64K"]) == 0
    assert main(["mkdir", "-p", "/a/b", "--fs", fsdir]) == 0
    assert main(["put", str(src), "/a/b/src.bin", "--fs", fsdir]) == 0
    assert main(["get", "/a/b/src.bin", str(tmp_path / "dst.bin"), "--fs", fsdir]) == 0
    assert (tmp_path / "dst.bin").read_bytes() == src.read_bytes()
    capsys.readouterr()
    assert main(["ls", "-l", "/a/b", "--fs", fsdir]) == 0
    assert "src.bin" in capsys.readouterr().out
    assert main(["fsck", "--fs", fsdir]) == 0
    assert main(["bench", "--fs", fsdir, "--size", "1M", "--seconds", "0.2", "--iodepth", "4"]) == 0
    assert main(["rm", "-r", "/a", "--fs", fsdir]) == 0
    assert main(["stat", "/a", "--fs", fsdir]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["ls", "--fs", str(tmp_path / "nothing-here")]) == 1


def test_reads_after_fork_use_their_own_io_context(fs):
    """DataLoader workers fork: a child must read correctly without touching the parent's io_uring, and without
    the parent's I/O threads (which do not survive fork: with the parent's pool at its full thread count, the
    child's pure-Python reads used to wait forever on it)."""
    import multiprocessing as mp
    import threading

    data = os.urandom(4 * CS)
    fs.write_bytes("/d", data)
    fs.batch_read([("/d", i * 4096, 4096) for i in range(20)])  # the parent's ring exists now
    # Bring every I/O pool of the parent to its full thread count (all workers busy at once).
    pools = [getattr(fs.backend, "pool", None), fs._async_pool]
    for pool in [p for p in pools if p is not None]:
        n = pool._max_workers
        gate = threading.Barrier(n + 1)
        futs = [pool.submit(gate.wait, 10) for _ in range(n)]
        gate.wait(10)
        for f in futs:
            f.result()
    ctx = mp.get_context("fork")
    q = ctx.Queue()

    def child():
        res = fs.batch_read([("/d", i * 4096, 4096) for i in range(20)])
        ok = all(bytes(r.data) == data[i * 4096:(i + 1) * 4096] for i, r in enumerate(res))
        ok = ok and bytes(fs.submit_reads([("/d", 0, 4096)]).wait(30)[0].data) == data[:4096]
        q.put(ok)
    p = ctx.Process(target=child)
    p.start()
    try:
        ok = q.get(timeout=60)
        p.join(30)
    finally:
        if p.is_alive():  # never leave a hung child: interpreter exit would wait for it
            p.kill()
            p.join(10)
    assert ok and p.exitcode == 0
    res = fs.batch_read([("/d", i * 4096, 4096) for i in range(20)])
    assert all(bytes(r.data) == data[i * 4096:(i + 1) * 4096] for i, r in enumerate(res))
