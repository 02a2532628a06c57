"""Several processes on one embedded directory: no process deletes another's in-flight copy-on-write
version, and a process opened earlier sees what others committed later (docs/storage.md)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import torch_deepstack.storage as st
from torch_deepstack.storage.chunk_engine import ChunkEngine

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
    def paused(m):
        calls[0] += 1
        if calls[0] == pause_at:
            open(sig, "w").close()
            t = time.time()
            while not os.path.exists(go):
                if time.time() - t > 60:
                    sys.exit(3)
                time.sleep(0.01)
        return orig(m)
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
