"""Several processes on one embedded directory: no process deletes another's in-flight copy-on-write
version, a process opened earlier sees what others committed later, and updates of one chunk from several
processes at once keep every acknowledged byte (docs/storage.md)."""
from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import torch_deepstack.storage as st
from tests.storage import mp_writers
from torch_deepstack.storage import chunk_engine
from torch_deepstack.storage.chunk_engine import FIRST_VERSION, ChunkEngine
from torch_deepstack.storage.errors import Conflict

CS = 64 << 10
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A child that writes through the normal client, but stops right before its commit (the chunks.db swap) of
# `pause_at` (the n-th commit, 1-based) until `go` exists: its new version file is then in flight.
CHILD = textwrap.dedent("""
    import os, sys, time
    import torch_deepstack.storage as st
    d, sig, go, pause_at, what = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    fs = st.connect(d, sync=False)
    eng = fs.backend.engine
    orig, calls = eng._swap, [0]
    def paused(m, **kw):
        calls[0] += 1
        if calls[0] == pause_at:
            open(sig, "w").close()
            t = time.time()
            while not os.path.exists(go):
                if time.time() - t > 60:
                    sys.exit(3)
                time.sleep(0.01)
        return orig(m, **kw)
    eng._swap = paused
    exec(what)
    fs.close()
""")


def pattern(seed: int, n: int) -> bytes:
    return bytes((i * 7 + seed) & 255 for i in range(256)) * (n // 256)


def spawn(d, tmp_path, what: str, pause_at: int = 0) -> tuple[subprocess.Popen, str, str]:
    sig, go = str(tmp_path / "paused"), str(tmp_path / "go")
    for p in (sig, go):
        if os.path.exists(p):
            os.unlink(p)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, d, sig, go, str(pause_at), what], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return proc, sig, go


def wait_path(path: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    t = time.time()
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"child exited {proc.returncode}: {proc.stdout.read().decode()}")
        if time.time() - t > timeout:
            proc.kill()
            raise AssertionError(f"child did not reach {path} in {timeout} s")
        time.sleep(0.01)


def finish(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, out.decode()


def data_files(d) -> set[str]:
    root = os.path.join(d, "target", "data")
    return {f for sub in os.listdir(root) if os.path.isdir(os.path.join(root, sub))
            for f in os.listdir(os.path.join(root, sub))}


@pytest.mark.timeout(120)
def test_open_during_inflight_write_keeps_it(tmp_path):
    d = str(tmp_path / "fs")
    st.connect(d, chunk_size=CS).close()
    data = pattern(1, 3 * CS + 4096)
    a, sig, go = spawn(d, tmp_path, f"fs.write_bytes('/a', bytes(range(256)) * {len(data) // 256})", pause_at=1)
    try:
        wait_path(sig, a)
        inflight = data_files(d)
        assert len(inflight) >= 1  # A's first version file, written but not yet in chunks.db
        b = st.connect(d)  # used to garbage-collect A's file here
        assert data_files(d) >= inflight
        open(go, "w").close()
        finish(a)
        want = bytes(range(256)) * (len(data) // 256)
        assert b.read_bytes("/a") == want  # opened before A's commits, reads them after re-open
        b.close()
    finally:
        a.kill()
        a.wait()
    with st.connect(d) as c:  # alone now: GC runs, and every file it keeps is referenced
        assert c.read_bytes("/a") == want
        assert len(data_files(d)) == 4


@pytest.mark.timeout(120)
def test_reader_opened_earlier_sees_later_commits(tmp_path):
    d = str(tmp_path / "fs")
    old_x = pattern(2, 2 * CS + 512)
    with st.connect(d, chunk_size=CS, sync=False) as fs:
        fs.write_bytes("/x", old_x)
        fs.write_bytes("/y", pattern(3, CS))
    b = st.connect(d, sync=False)
    try:
        assert b.read_bytes("/x") == old_x  # caches /x's chunk rows and open version files
        with b.open("/y") as early:
            early.pread(0, 10)
        new_x, new_y, fresh = pattern(4, 3 * CS), pattern(5, CS), pattern(6, 2 * CS + 100)
        # A truncates and rewrites /x (its chunks restart at version 1: the names B has open are reused),
        # updates /y in place (a new version; the one B has open is unlinked), and creates /new.
        a, _, _ = spawn(d, tmp_path, textwrap.dedent(f"""
            fs.write_bytes('/x', bytes({list(new_x[:256])}) * {len(new_x) // 256})
            with fs.open('/y', 'r+b') as f:
                f.write(bytes({list(new_y[:256])}) * {len(new_y) // 256})
            fs.write_bytes('/new', bytes({list(fresh[:256])}) * {len(fresh) // 256} + bytes(100))
        """))
        finish(a)
        fresh = fresh + bytes(100)
        assert b.read_bytes("/new") == fresh
        assert b.read_bytes("/x") == new_x
        assert b.read_bytes("/y") == new_y
        # Path-based batched reads look the file up, so they see the new bytes as well (C and Python paths).
        res = b.batch_read([("/x", i * 4096, 4096) for i in range(40)])
        assert all(r.ok for r in res)
        assert b"".join(bytes(r.data) for r in res) == new_x[:40 * 4096]
    finally:
        b.close()


@pytest.mark.timeout(120)
def test_writers_in_two_processes_each_keep_their_files(tmp_path):
    d = str(tmp_path / "fs")
    st.connect(d, chunk_size=CS).close()
    body = "for i in range(12):\n    fs.write_bytes(f'/{tag}-{i}', bytes([i]) * (CS + 1000 * i))\n"
    procs = [spawn(d, tmp_path / "..", f"CS = {CS}\ntag = 'r{r}'\n" + body)[0] for r in range(2)]
    for p in procs:
        finish(p)
    with st.connect(d) as fs:
        for r in range(2):
            for i in range(12):
                assert fs.read_bytes(f"/r{r}-{i}") == bytes([i]) * (CS + 1000 * i)
        assert len(data_files(d)) == 2 * sum(-(-(CS + 1000 * i) // CS) for i in range(12))


@pytest.mark.timeout(120)
def test_kill_mid_write_then_reopen_alone_recovers(tmp_path):
    d = str(tmp_path / "fs")
    old = pattern(7, 2 * CS)
    with st.connect(d, chunk_size=CS) as fs:
        fs.write_bytes("/f", old)
    before = data_files(d)
    a, sig, _ = spawn(d, tmp_path, f"with fs.open('/f', 'r+b') as f:\n    f.write(bytes(range(256)) * {CS // 256})",
                      pause_at=1)
    try:
        wait_path(sig, a)
        garbage = data_files(d) - before
        assert len(garbage) == 1  # the new version of chunk 0, never committed
        os.kill(a.pid, signal.SIGKILL)
        a.wait(timeout=30)
    finally:
        a.kill()
        a.wait()
    with st.connect(d) as fs:
        assert data_files(d) == before
        assert fs.read_bytes("/f") == old


def test_two_engines_in_one_process_exclude_gc(tmp_path):
    root = str(tmp_path / "t")
    e1 = ChunkEngine(root, "t0", sync=False)
    e1.update("0000000000000001-00000000", 0, b"a" * 100, CS)
    stray = os.path.join(root, "data", "00", "0000000000000002-00000000.v1")
    os.makedirs(os.path.dirname(stray), exist_ok=True)
    open(stray, "wb").close()  # an in-flight version of e1 (not yet recorded)
    e2 = ChunkEngine(root, "t0", sync=False)
    assert os.path.exists(stray)
    e1.update("0000000000000001-00000000", 0, b"b" * 100, CS)
    assert e2.read("0000000000000001-00000000", 0, 100)[1] == b"b" * 100  # retired version: re-read the row
    e1.close()
    e2.close()
    time.sleep(0.01)
    ChunkEngine(root, "t0", sync=False).close()
    assert not os.path.exists(stray)


def test_read_only_refuses_writes(tmp_path):
    d = str(tmp_path / "fs")
    with pytest.raises(st.NotFound):
        st.connect(d, read_only=True)
    with st.connect(d, chunk_size=CS) as fs:
        fs.write_bytes("/a", b"hello")
    with st.connect(d, read_only=True) as ro:
        assert ro.read_bytes("/a") == b"hello"
        for call in (lambda: ro.write_bytes("/b", b"x"), lambda: ro.open("/a", "r+b"), lambda: ro.mkdir("/d"),
                     lambda: ro.remove("/a"), lambda: ro.rename("/a", "/c")):
            with pytest.raises(st.ReadOnly, match="read_only"):
                call()
        with pytest.raises(st.ReadOnly):
            ro.backend.engine.update("0000000000000009-00000000", 0, b"x", CS)
        assert ro.listdir("/") == ["a"]


# ---------------------------------------------------------------------------------------------- concurrent updates
# Two engines on one target directory stand for two processes: each has its own chunk cache, per-chunk locks and
# SQLite connection, and sees the other's commits only through chunks.db. The interleavings are driven by hooks.
CID = "0000000000000001-00000000"


def two_engines(tmp_path) -> tuple[ChunkEngine, ChunkEngine]:
    root = str(tmp_path / "t")
    return ChunkEngine(root, "t0", sync=False), ChunkEngine(root, "t0", sync=False)


def before_calls(monkeypatch, eng: ChunkEngine, name: str, action, times: int = 1) -> list:
    """Run action() at the first `times` calls of eng.<name>, before the call itself. Returns a list that counts
    every call. Seams of an update: _write_file (the chunk is read and patched, the new version file not yet
    created) and _swap (the new version file is written, the commit transaction not yet begun)."""
    real, calls = getattr(eng, name), []

    def hooked(*args, **kw):
        calls.append(name)
        if len(calls) <= times:
            action()
        return real(*args, **kw)
    monkeypatch.setattr(eng, name, hooked)
    return calls


def version_files(tmp_path) -> list[str]:
    return sorted(os.listdir(tmp_path / "t" / "data" / "00"))


@pytest.mark.parametrize("seam", ["_write_file", "_swap"])
@pytest.mark.parametrize("exists", [True, False], ids=["chunk-exists", "both-create"])
def test_update_keeps_a_commit_another_process_made_after_its_read(tmp_path, monkeypatch, seam, exists):
    """A reads the chunk; B commits an update of other bytes of it; then A commits. Both acknowledged updates
    must be in the chunk (A re-reads B's version and patches its bytes into that)."""
    a, b = two_engines(tmp_path)
    base = bytes(range(256)) * 64 if exists else b""
    if exists:
        a.update(CID, 0, base, CS)
    b_ver = []
    before_calls(monkeypatch, a, seam, lambda: b_ver.append(b.update(CID, 1000, b"B" * 100, CS).ver))
    got = a.update(CID, 9000, b"A" * 100, CS)
    want = bytearray(max(len(base), 9100))
    want[:len(base)] = base
    want[1000:1100] = b"B" * 100
    want[9000:9100] = b"A" * 100
    assert a.read(CID, 0, CS)[1] == want
    assert b.read(CID, 0, CS)[1] == want  # B's cached version was retired: it re-reads the row
    assert got == a.meta(CID).committed and got.ver > b_ver[0]  # versions only count up
    if not exists:
        assert got.ver != FIRST_VERSION  # merged into B's chunk: a failed write's cleanup must not remove it
    assert version_files(tmp_path) == [f"{CID}.v{got.ver}"]  # A's losing version file is gone
    a.close()
    b.close()


def test_whole_chunk_overwrite_over_another_commit_needs_no_rewrite(tmp_path, monkeypatch):
    """An overwrite of all of the chunk's bytes depends on nothing it replaces: when B's commit lands between A's
    read and A's commit and A's bytes cover all of B's chunk, A commits as written (B's update ordered first)."""
    a, b = two_engines(tmp_path)
    a.update(CID, 0, b"x" * 8192, CS)
    before_calls(monkeypatch, a, "_write_file", lambda: b.update(CID, 100, b"B" * 100, CS))
    commits = before_calls(monkeypatch, a, "_swap", lambda: None, times=0)
    got = a.update(CID, 0, b"A" * 8192, CS)
    assert len(commits) == 1  # the first commit went through: no retry, no second version file
    assert a.read(CID, 0, CS)[1] == b.read(CID, 0, CS)[1] == b"A" * 8192
    assert version_files(tmp_path) == [f"{CID}.v{got.ver}"]
    a.close()
    b.close()


def test_overwrite_from_offset_0_keeps_bytes_another_process_appended(tmp_path, monkeypatch):
    """A rewrites [0, 100) of a 100-byte chunk (all of it, as A read it); B meanwhile extends the chunk. A's
    commit must not cut B's bytes off."""
    a, b = two_engines(tmp_path)
    a.update(CID, 0, b"x" * 100, CS)
    before_calls(monkeypatch, a, "_write_file", lambda: b.update(CID, 5000, b"B" * 100, CS))
    a.update(CID, 0, b"A" * 100, CS)
    assert a.read(CID, 0, CS)[1] == b"A" * 100 + bytes(4900) + b"B" * 100
    a.close()
    b.close()


def test_update_that_keeps_losing_gives_up_with_conflict_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(chunk_engine, "UPDATE_ATTEMPTS", 3)
    a, b = two_engines(tmp_path)
    a.update(CID, 0, b"x" * 100, CS)
    n = [0]

    def b_commits():
        n[0] += 1
        b.update(CID, 200, bytes([n[0]]) * 10, CS)
    swaps = before_calls(monkeypatch, a, "_swap", b_commits, times=10**9)
    with pytest.raises(Conflict, match="3 times"):
        a.update(CID, 50, b"A" * 10, CS)
    assert len(swaps) == 3
    assert b.read(CID, 0, CS)[1] == b"x" * 100 + bytes(100) + bytes([3]) * 10  # B's last update; none of A's
    assert version_files(tmp_path) == [f"{CID}.v{b.meta(CID).committed.ver}"]
    a.close()
    b.close()


@pytest.mark.timeout(120)
def test_two_processes_updating_disjoint_bytes_of_the_same_chunks_lose_nothing(tmp_path):
    """Two real processes (spawn) each update their own 256-byte slots of the same four chunks, many times at
    once; afterwards every slot holds the value its owner wrote last and no version file is left over."""
    root = str(tmp_path / "t")
    ChunkEngine(root, "t0").close()
    chunks = [f"00000000000000{i:02x}-00000000" for i in range(1, 5)]
    nranks, slots, rounds = 2, 32, 400
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(nranks), ctx.Queue()
    procs = [ctx.Process(target=mp_writers.slot_writer,
                         args=(root, r, nranks, chunks, slots, rounds, CS, start, results)) for r in range(nranks)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=100) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    for r in range(nranks):
        assert isinstance(got[r], dict), got[r]
    last = {k: v for r in range(nranks) for k, v in got[r].items()}
    data = os.path.join(root, "data")
    files = {f for sub in os.listdir(data) for f in os.listdir(os.path.join(data, sub))}
    eng = ChunkEngine(root, "t0", sync=False)
    try:
        assert files == {f"{c}.v{eng.meta(c).committed.ver}" for c in chunks}  # no losing version left behind
        for c in chunks:
            want = bytearray(slots * mp_writers.SLOT)
            for (cid, slot), v in last.items():
                if cid == c:
                    want[slot * mp_writers.SLOT:(slot + 1) * mp_writers.SLOT] = bytes([v]) * mp_writers.SLOT
            assert eng.read(c, 0, CS)[1] == want, f"chunk {c}: lost updates"
    finally:
        eng.close()
