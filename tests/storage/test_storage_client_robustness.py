"""The client under failures and stale handles: failed writes never cost acknowledged data, a failed flush keeps
its bytes for a retry, handles of removed files fail instead of reading zeros, out-of-range offsets are refused."""
from __future__ import annotations

import gc

import numpy as np
import pytest

import torch_deepstack.storage as st
from tests.helpers import use_storage_read_path
from tests.storage.cleanup_race import cleanup_between_chunk_writes_and_publish
from torch_deepstack.storage import InvalidArgument, NoSpace, NotFound

CS = 64 << 10


@pytest.fixture(params=["c-helper", "pure-python"])
def read_path(request, monkeypatch):
    use_storage_read_path(request.param, monkeypatch)
    return request.param


def test_failed_write_keeps_chunks_another_handle_acknowledged(tmp_path):
    """Handle A's cached length is 0; handle B then writes chunk 0 and closes (acknowledged). A's overwrite of
    chunk 0 fails (no space for the new version): its cleanup must not remove B's chunk."""
    with st.connect(str(tmp_path / "fs"), chunk_size=CS, capacity_bytes=3 * CS // 2, sync=False) as fs:
        fs.write_bytes("/f", b"")
        a = fs.open("/f", "r+b")
        with fs.open("/f", "r+b") as b:
            b.write(b"B" * CS)
        a.write(b"A" * CS)
        with pytest.raises(NoSpace):
            a.close()
        assert fs.read_bytes("/f") == b"B" * CS


@pytest.mark.parametrize("first", ["A", "B"])
def test_failed_write_cleanup_keeps_a_chunk_another_handle_is_publishing(tmp_path, monkeypatch, first):
    """A's write past the end fails; its cleanup runs after B wrote the same chunk but before B published its
    length. It must remove only a chunk version A's write created, never B's acknowledged bytes."""
    with st.connect(str(tmp_path / "fs"), chunk_size=CS, sync=False) as fs:
        engine = fs.backend.engine
        real_update = engine.update

        def install(hook):
            monkeypatch.setattr(engine, "update", lambda cid, off, data, cs: hook(
                cid, data, lambda: real_update(cid, off, data, cs)))
        got = cleanup_between_chunk_writes_and_publish(fs, CS, first, install, NoSpace("injected"))
        assert got == b"B" * 100


def test_failed_write_still_reclaims_chunks_past_the_current_end(tmp_path):
    """The reclaim keeps working for chunks no published length covers (re-read from metadata)."""
    with st.connect(str(tmp_path / "fs"), chunk_size=CS, capacity_bytes=3 * CS, sync=False) as fs:
        fs.write_bytes("/f", b"k" * CS)
        with pytest.raises(NoSpace):
            with fs.open("/f", "r+b") as f:
                f.seek(CS)
                f.write(b"x" * (3 * CS))
        assert fs.read_bytes("/f") == b"k" * CS
        assert sorted(fs.backend.engine.list_chunks()) == [f"{fs.stat('/f').inode:016x}-00000000"]


def test_flush_retry_after_failure_writes_the_buffered_bytes(tmp_path):
    with st.connect(str(tmp_path / "fs"), chunk_size=CS, capacity_bytes=2 * CS, sync=False) as fs:
        fs.write_bytes("/filler", b"F" * (2 * CS))
        f = fs.open("/data", "wb")
        f.write(b"D" * CS)
        with pytest.raises(NoSpace):
            f.flush()
        fs.remove("/filler")  # space is back: the retry must write what the failed flush held
        f.flush()
        f.close()
        assert fs.read_bytes("/data") == b"D" * CS


def test_close_after_failed_flush_reports_the_failure(tmp_path):
    with st.connect(str(tmp_path / "fs"), chunk_size=CS, capacity_bytes=CS, sync=False) as fs:
        fs.write_bytes("/filler", b"F" * CS)
        f = fs.open("/data", "wb")
        f.write(b"D" * CS)
        with pytest.raises(NoSpace):
            f.flush()
        with pytest.raises(NoSpace):  # the bytes are still unwritten: close must not pretend otherwise
            f.close()
        assert not f.closed  # still holding the bytes: a retried close writes them
        fs.remove("/filler")
        f.close()
        assert f.closed and fs.read_bytes("/data") == b"D" * CS


def test_failed_close_tries_the_write_once_and_keeps_the_bytes(tmp_path, monkeypatch):
    """close() used to flush, then io.RawIOBase.close() flushed again: a failing close wrote (and cleaned up)
    twice. It tries once, raises that error, and keeps the handle open with its bytes for a retried close();
    a handle dropped after a failed close does not try again behind the caller's back."""
    with st.connect(str(tmp_path / "fs"), chunk_size=CS, sync=False) as fs:
        real, attempts = fs.backend.write_chunks, []

        def failing(writes, created=None):
            attempts.append([w[1] for w in writes])
            raise NoSpace("injected")
        monkeypatch.setattr(fs.backend, "write_chunks", failing)
        f = fs.open("/data", "wb")
        f.write(b"D" * (CS + 100))
        with pytest.raises(NoSpace, match="injected"):
            f.close()
        assert len(attempts) == 1 and not f.closed
        monkeypatch.setattr(fs.backend, "write_chunks", real)
        f.close()
        assert f.closed and fs.read_bytes("/data") == b"D" * (CS + 100)
        f.close()  # closed: nothing more to do

        monkeypatch.setattr(fs.backend, "write_chunks", failing)
        g = fs.open("/dropped", "wb")
        g.write(b"x" * 10)
        with pytest.raises(NoSpace):
            g.close()
        del g
        gc.collect()
        assert len(attempts) == 2  # g's close only, not again when g was collected
        monkeypatch.setattr(fs.backend, "write_chunks", real)
        assert fs.read_bytes("/dropped") == b""


@pytest.mark.parametrize("how", ["remove", "rename-over", "truncate"])
def test_read_through_handle_of_removed_file_raises_not_found(tmp_path, read_path, how):
    # (the C read path hands chunks without a committed version to the general path, which checks the inode)
    with st.connect(str(tmp_path / "fs"), chunk_size=CS, sync=False) as fs:
        fs.write_bytes("/a", b"A" * (2 * CS))
        fs.write_bytes("/other", b"o")
        f = fs.open("/a")
        if how == "remove":
            fs.remove("/a")
        elif how == "rename-over":
            fs.write_bytes("/c", b"C" * CS)
            fs.rename("/c", "/a")
        else:
            fs.write_bytes("/a", b"T" * 10)
        with pytest.raises(NotFound, match="removed or replaced while open"):
            f.read()
        with pytest.raises(NotFound):
            f.pread(CS, 8)
        res = fs.batch_read([(f, 0, 8), ("/other", 0, 1)])
        assert isinstance(res[0].error, NotFound) and res[1].error is None  # per request


def test_holes_of_a_live_sparse_file_still_read_as_zeros(tmp_path, read_path):
    with st.connect(str(tmp_path / "fs"), chunk_size=CS, sync=False) as fs:
        with fs.open("/s", "wb") as w:
            w.write(b"a")
            w.seek(2 * CS + 1)
            w.write(b"z")
        f = fs.open("/s")
        assert f.read() == b"a" + bytes(2 * CS) + b"z"
        assert [r.nbytes for r in fs.batch_read([(f, CS, 4), (f, 1, 4)])] == [4, 4]


def test_writer_of_removed_file_fails_and_reclaims_its_chunks(tmp_path):
    with st.connect(str(tmp_path / "fs"), chunk_size=CS, sync=False) as fs:
        fs.write_bytes("/keep", b"k" * CS)
        w = fs.open("/w", "wb")
        w.write(b"W" * (3 * CS))
        fs.remove("/w")
        with pytest.raises(NotFound):
            w.close()
        assert w.closed  # no retry could write the bytes: the handle is closed anyway
        assert sorted(fs.backend.engine.list_chunks()) == [f"{fs.stat('/keep').inode:016x}-00000000"]
        assert fs.read_bytes("/keep") == b"k" * CS


def test_batch_read_reports_int64_overflow_and_huge_lengths_per_request(tmp_path, read_path):
    with st.connect(str(tmp_path / "fs"), chunk_size=CS, sync=False) as fs:
        fs.write_bytes("/f", b"x" * 100000)
        f = fs.open("/f")
        cases = [[(f, 2**63, 10)], [(f, 2**63, 10)] * 4, [(f, 2**63 - 5, 10, bytearray(10))],
                 [(f, 2**63 - 5, 10, bytearray(10))] * 4, [(f, 0, 10), (f, 2**64, 1), (f, 5, 10), (f, 1, 2)]]
        for reqs in cases:
            got = [(r.nbytes, r.error) for r in fs.batch_read(reqs)]
            assert all(e is None for _, e in got)
            assert [n for n, _ in got] == [10 if r[1] < 2**63 - 10 and r[2] == 10 else
                                          (2 if r[2] == 2 else 0) for r in reqs]
        for reqs in ([(f, 0, 2**62)], [(f, 0, 2**62)] * 4, [(f, 0, 10), (f, 0, 2**62)]):
            res = fs.batch_read(reqs)  # no buffer that large: a MemoryError for that request, not raised
            assert all(isinstance(r.error, MemoryError) for r in res if r.request.length == 2**62)
            assert all(r.nbytes == 10 for r in res if r.request.length == 10)
        got = fs.read_array(f, np.array([2**63 - 1]), np.array([10]), bytearray(10))
        assert got.ok and got.nbytes.tolist() == [0]


def test_writes_past_int64_offset_raise_invalid_argument(tmp_path):
    with st.connect(str(tmp_path / "fs"), chunk_size=CS, sync=False) as fs:
        with fs.open("/big", "wb") as f:
            with pytest.raises(InvalidArgument, match="offset"):
                f.pwrite(b"hello", 2**64)
            with pytest.raises(InvalidArgument, match="offset"):
                f.seek(2**63)
            f.seek(2**63 - 3)
            with pytest.raises(InvalidArgument, match="offset"):
                f.write(b"hello")
            f.seek(0)
            f.write(b"ok")
        assert fs.stat("/big").size == 2
        assert fs.read_bytes("/big") == b"ok"


def test_write_whose_buffer_flush_fails_wrote_nothing_and_a_retry_lands_once(tmp_path, monkeypatch):
    with st.connect(str(tmp_path / "fs"), chunk_size=CS, capacity_bytes=2 * CS, sync=False) as fs:
        monkeypatch.setattr(fs, "write_buffer_bytes", 2 * CS)  # the second write fills the buffer: it flushes
        fs.write_bytes("/filler", b"F" * (2 * CS))
        f = fs.open("/data", "wb")
        f.write(b"a" * CS)
        with pytest.raises(NoSpace):
            f.write(b"b" * CS)
        assert f.tell() == CS
        fs.remove("/filler")
        f.write(b"b" * CS)  # the caller's retry
        f.close()
        assert fs.read_bytes("/data") == b"a" * CS + b"b" * CS
