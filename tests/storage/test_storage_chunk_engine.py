"""Chunk engine: direct I/O, CRC32C, copy-on-write crash safety, input validation."""
from __future__ import annotations

import os

import numpy as np
import pytest

from torch_deepstack.storage.chunk_engine import FIRST_VERSION, ChunkEngine
from torch_deepstack.storage.crc import _py_crc32c, crc32c
from torch_deepstack.storage.errors import ChunkCorrupt, InvalidArgument, InvalidPath, NoSpace, NotFound

CS = 64 << 10


def test_crc32c_known_value_and_fallback_agree():
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    data = os.urandom(10000)
    assert _py_crc32c(data) == crc32c(data)
    assert crc32c(data[5000:], crc32c(data[:5000])) == crc32c(data)


@pytest.mark.parametrize("direct_io", [True, False])
def test_write_read_roundtrip(tmp_path, direct_io):
    eng = ChunkEngine(str(tmp_path / "t"), "t0", direct_io=direct_io)
    if direct_io:
        assert eng.direct_io, eng.fallback_reason  # ext4/xfs/tmpfs here all accept O_DIRECT
    data = os.urandom(CS - 100)
    eng.update("0000000000000001-00000000", 0, data, CS)
    n, got = eng.read("0000000000000001-00000000", 0, CS)
    assert n == len(data) and got == data
    n, got = eng.read("0000000000000001-00000000", 5000, 3)
    assert got == data[5000:5003]
    # Unaligned read into an unaligned caller buffer, and an aligned one that takes the zero-copy path.
    out = bytearray(7000)
    n, _ = eng.read("0000000000000001-00000000", 123, 7000, memoryview(out))
    assert out == data[123:7123]
    aligned = np.zeros(8192 + 4096, np.uint8)
    off = (-aligned.ctypes.data) % 4096
    view = memoryview(aligned[off:off + 8192])
    n, _ = eng.read("0000000000000001-00000000", 4096, 8192, view)
    assert bytes(view) == data[4096:12288]
    # Partial update: read-modify-write into a new version; the old file is retired.
    eng.update("0000000000000001-00000000", 10, b"XYZ", CS)
    _, got = eng.read("0000000000000001-00000000", 0, CS)
    assert got == data[:10] + b"XYZ" + data[13:]
    assert eng.meta("0000000000000001-00000000").committed.ver == 2
    files = os.listdir(tmp_path / "t" / "data" / "00")
    assert files == ["0000000000000001-00000000.v2"]
    # A write past the end zero-fills the gap; an absent chunk reads as a hole.
    eng.update("0000000000000002-00000000", 100, b"ab", CS)
    assert eng.read("0000000000000002-00000000", 0, 102)[1] == bytes(100) + b"ab"
    assert eng.read("0000000000000003-00000000", 0, 10)[0] == 0
    eng.close()


def test_remove_version_removes_only_that_version(tmp_path):
    """A failed write's cleanup removes the version it created; one written since (by another engine on the
    target too, whose commit this engine has not seen) stays."""
    eng, other = ChunkEngine(str(tmp_path / "t"), "t0"), ChunkEngine(str(tmp_path / "t"), "t0")
    cid = "0000000000000001-00000000"
    created = eng.update(cid, 0, b"a" * 100, CS)
    assert created.ver == FIRST_VERSION
    assert eng.update(cid, 200, b"b", CS).ver == FIRST_VERSION + 1  # merges into a new version
    assert not eng.remove_version(cid, created.ver)
    assert eng.read(cid, 0, CS)[1] == b"a" * 100 + bytes(100) + b"b"
    assert eng.remove_version(cid, FIRST_VERSION + 1)
    assert eng.read(cid, 0, CS)[0] == 0 and os.listdir(tmp_path / "t" / "data" / "00") == []
    created = eng.update(cid, 0, b"c", CS)
    assert created.ver == FIRST_VERSION
    other.update(cid, 1, b"d", CS)
    assert not eng.remove_version(cid, created.ver)  # checked in the same transaction as the removal
    assert eng.read(cid, 0, CS)[1] == b"cd"
    eng.close()
    other.close()


def test_flipped_byte_is_detected(tmp_path):
    eng = ChunkEngine(str(tmp_path / "t"), "t0")
    data = os.urandom(3 * 4096)
    eng.update("0000000000000001-00000000", 0, data, CS)
    path = tmp_path / "t" / "data" / "00" / "0000000000000001-00000000.v1"
    raw = bytearray(path.read_bytes())
    raw[5000] ^= 0xFF
    path.write_bytes(raw)
    assert eng.read("0000000000000001-00000000", 0, 100)[1] == data[:100]  # block 0 is intact
    with pytest.raises(ChunkCorrupt):
        eng.read("0000000000000001-00000000", 4096, 100)
    assert not eng.verify("0000000000000001-00000000")
    eng.close()


def test_crash_before_commit_keeps_last_committed_version(tmp_path):
    root = str(tmp_path / "t")
    eng = ChunkEngine(root, "t0")
    old = os.urandom(5000)
    eng.update("0000000000000001-00000000", 0, old, CS)
    # A CRAQ update that crashed after writing its pending version (never committed) ...
    eng.write_pending("0000000000000001-00000000", 2, os.urandom(6000))
    # ... and one that crashed before recording its new file at all.
    stray = os.path.join(root, "data", "00", "0000000000000001-00000000.v3")
    with open(stray, "wb") as f:
        f.write(b"half-written")
    eng.close()  # the "crash": nothing else runs
    eng = ChunkEngine(root, "t0")
    assert eng.read("0000000000000001-00000000", 0, CS)[1] == old
    assert not os.path.exists(stray), "unreferenced files of unfinished updates are removed on open"
    eng.commit("0000000000000001-00000000", 2)  # the pending version can still be committed (by its chain)
    assert eng.read("0000000000000001-00000000", 0, CS)[0] == 6000
    eng.close()


def test_capacity_and_enospc_lose_nothing(tmp_path):
    eng = ChunkEngine(str(tmp_path / "t"), "t0", capacity_bytes=3 * 4096)
    eng.update("0000000000000001-00000000", 0, b"a" * 4096, CS)
    eng.update("0000000000000001-00000001", 0, b"b" * 4096, CS)
    with pytest.raises(NoSpace):
        eng.update("0000000000000001-00000002", 0, b"c" * 8192, CS)
    assert eng.read("0000000000000001-00000000", 0, 4096)[1] == b"a" * 4096
    assert eng.read("0000000000000001-00000002", 0, 10)[0] == 0
    eng.close()


def test_bad_inputs(tmp_path):
    eng = ChunkEngine(str(tmp_path / "t"), "t0")
    for bad in ["../../etc/passwd", "x", "0001/0002", "", "00-00-00"]:
        with pytest.raises(InvalidPath):
            eng.update(bad, 0, b"x", CS)
    with pytest.raises(InvalidArgument):
        eng.update("0000000000000001-00000000", CS - 1, b"xy", CS)
    with pytest.raises(InvalidArgument):
        eng.read("0000000000000001-00000000", -1, 5)
    eng.close()
    with pytest.raises(NotFound):
        ChunkEngine(str(tmp_path / "nothing"), create=False)
    with pytest.raises(InvalidArgument):
        ChunkEngine(str(tmp_path / "t"), "another-id")


@pytest.mark.parametrize("path", ["io_uring", "aio", "python"])
def test_read_many_matches_single_reads_and_detects_corruption(tmp_path, monkeypatch, path):
    from torch_deepstack.storage import fastio
    from torch_deepstack.storage.client import ChunkRead

    if path != "python":
        if fastio.load() is None:
            pytest.skip(f"C helper unavailable: {fastio.reason}")
        if path == "aio":  # this thread forgets its ring and may not make another
            monkeypatch.setattr(fastio, "_uring_ok", False)
            monkeypatch.setattr(fastio._tls, "ring", None, raising=False)
        elif not fastio.uring():
            pytest.skip("io_uring not available here")
    else:
        monkeypatch.setattr(fastio, "_lib", None)
        monkeypatch.setattr(fastio, "_tried", True)
    eng = ChunkEngine(str(tmp_path / "t"), "t0")
    chunks = {f"00000000000000{i:02x}-00000000": os.urandom(CS - 777 * i) for i in range(1, 5)}
    for cid, data in chunks.items():
        eng.update(cid, 0, data, CS)
    rng = np.random.default_rng(0)
    backing = np.zeros(40 * 8192 + 4096, np.uint8)
    base = (-backing.ctypes.data) % 4096
    reads, expect = [], []
    for i in range(40):  # a mix of aligned (zero-copy) and unaligned (bounce) reads, some past the end
        cid = list(chunks)[i % 4]
        off = int(rng.integers(0, CS // 4096)) * 4096 + (0 if i % 3 else int(rng.integers(1, 4000)))
        ln = 4096 if i % 2 else int(rng.integers(1, 8192))
        dest = memoryview(backing[base + i * 8192:base + i * 8192 + ln])
        reads.append(ChunkRead("c0", cid, off, ln, dest))
        expect.append(chunks[cid][off:off + ln])
    reads.append(ChunkRead("c0", "00000000000000ff-00000000", 0, 10, memoryview(bytearray(10))))  # absent: hole
    eng.read_many(reads)
    for r, e in zip(reads, expect):
        assert r.error is None and r.n == len(e) and bytes(r.dest[:r.n]) == e
    assert reads[-1].n == 0 and reads[-1].error is None
    # Corrupt one chunk: exactly the reads of that chunk's damaged block fail.
    victim = list(chunks)[0]
    path = eng._data_path(victim, 1)
    raw = bytearray(open(path, "rb").read())
    raw[4096 * 3 + 7] ^= 0x55
    open(path, "wb").write(raw)
    eng._fds.forget(path)
    rs = [ChunkRead("c0", victim, 4096 * 3, 4096, memoryview(bytearray(4096))),
          ChunkRead("c0", victim, 0, 4096, memoryview(bytearray(4096))),
          ChunkRead("c0", list(chunks)[1], 4096 * 3, 4096, memoryview(bytearray(4096)))]
    eng.read_many(rs)
    assert isinstance(rs[0].error, ChunkCorrupt)
    assert rs[1].error is None and bytes(rs[1].dest) == chunks[victim][:4096]
    assert rs[2].error is None
    eng.close()


def test_empty_and_zero_length_batches(tmp_path):
    from torch_deepstack.storage.client import ChunkRead

    eng = ChunkEngine(str(tmp_path / "t"), "t0")
    eng.update("0000000000000001-00000000", 0, b"abc", CS)
    eng.read_many([])
    r = ChunkRead("c0", "0000000000000001-00000000", 0, 0, memoryview(bytearray(0)))
    eng.read_many([r])
    assert r.n == 0 and r.error is None
    eng.close()
