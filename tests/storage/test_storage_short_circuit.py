"""Short-circuit local reads on real loopback clusters (r = 3): results equal the RPC path's, and no read ever
returns stale or uncommitted data when chunks change, a service dies or stops, or a chunk file is corrupt."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import time

import numpy as np
import pytest

from torch_deepstack.storage import array_read
from torch_deepstack.storage.chunk_engine import ChunkEngine
from torch_deepstack.storage.crc import crc32c
from torch_deepstack.storage.errors import AuthError, InvalidArgument, StorageError
from torch_deepstack.storage.short_circuit import Session

pytestmark = [pytest.mark.timeout(150),
              pytest.mark.skipif(not array_read.supported(), reason="short-circuit reads need the C helper")]
CS = 256 << 10


def _data(n, seed):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _stats(fs):
    return fs.backend.short_circuit_stats


def _requests(size, n, seed):
    """Aligned and unaligned ranges, some crossing chunks, some past the end of the file."""
    rng = np.random.default_rng(seed)
    offs = rng.integers(0, size, n)
    offs[::3] = offs[::3] // 4096 * 4096
    lens = rng.integers(1, 3 * 4096, n)
    lens[::3] = 4096
    offs[-1], lens[-1] = size - 100, 4096  # runs past the end
    return offs.astype(np.int64), lens.astype(np.int64)


def _check_reads(fs, path, data, seed=0, n=48):
    f = fs.open(path)
    offs, lens = _requests(len(data), n, seed)
    res = fs.batch_read([(f, int(o), int(ln)) for o, ln in zip(offs, lens)])
    for r, o, ln in zip(res, offs, lens):
        assert r.ok, r.error
        assert bytes(r.data) == data[o:o + ln]
    out = bytearray(int(lens.sum()))
    got = fs.read_array(f, offs, lens, out, checksums=True)
    got.raise_first()
    pos = 0
    for o, ln, nb, c in zip(offs, lens, got.nbytes, got.crc32c):
        assert bytes(out[pos:pos + nb]) == data[o:o + ln]
        assert c == -1 or c == crc32c(data[o:o + ln])
        pos += ln
    return f


def test_engine_change_hooks_cover_every_committed_change(tmp_path):
    eng = ChunkEngine(str(tmp_path / "t"), "t0", sync=False)
    seen = []
    eng.change_hooks.append(seen.append)
    cid = "0000000000000001-00000000"
    eng.update(cid, 0, b"a" * 100, CS)
    eng.write_pending(cid, 9, b"b" * 10)
    n_before_commit = len(seen)
    eng.commit(cid, 9)
    eng.put_committed(cid, 10, b"c")
    eng.remove(cid)
    eng.close()
    assert seen[:1] == [cid] and n_before_commit == 1, seen  # a pending version changes nothing readable
    assert seen[1:] == [cid, cid, cid], seen


def test_short_circuit_reads_equal_written_bytes_and_the_switch(cluster_factory, monkeypatch):
    c = cluster_factory(chunk_size=CS).start()
    data = _data(5 * CS + 1234, 1)
    with c.connect() as fs:
        fs.write_bytes("/f", data)
        _check_reads(fs, "/f", data)
        st = _stats(fs)
        assert st["served"] > 0 and st["sessions"] == 3, st
    with c.connect(short_circuit=False) as fs:
        assert _stats(fs) is None and not fs.backend.array_reads()
        _check_reads(fs, "/f", data)
    with c.connect(spin_us=0) as fs:  # sleep for completions (what DataLoader workers' clients do)
        assert fs.backend._sc.spin_us == 0
        _check_reads(fs, "/f", data, seed=3)
        assert _stats(fs)["served"] > 0
    with pytest.raises(InvalidArgument, match="spin_us"):
        c.connect(spin_us=-1)
    monkeypatch.setenv("DEEPSTACK_SHORT_CIRCUIT", "0")
    with c.connect() as fs:
        assert _stats(fs) is None
        assert fs.read_bytes("/f") == data


def test_services_with_short_circuit_off_serve_everything_by_rpc(cluster_factory):
    c = cluster_factory(service_args=["--no-short-circuit"]).start()
    data = _data(3 * CS, 2)
    with c.connect() as fs:
        fs.write_bytes("/f", data)
        _check_reads(fs, "/f", data)
        st = _stats(fs)
        assert st["served"] == 0 and st["sessions"] == 0 and st["passed"] > 0, st


def test_short_circuit_sees_every_acknowledged_overwrite(cluster_factory):
    c = cluster_factory().start()
    old = _data(4 * CS, 3)
    with c.connect() as reader, c.connect() as writer:
        writer.write_bytes("/f", old)
        f = _check_reads(reader, "/f", old)  # fds of every chunk are held now
        for k in range(4):
            new = _data(4 * CS, 10 + k)
            with writer.open("/f", "r+b") as w:  # same length: the reader's File stays valid
                w.write(new)
            assert f.pread(0, len(new)) == new  # acknowledged: the next read sees it, never the old version
            part = k * CS + 5000
            with writer.open("/f", "r+b") as w:  # a small update inside one chunk
                w.seek(part)
                w.write(b"x" * 10)
            new = new[:part] + b"x" * 10 + new[part + 10:]
            assert f.pread(part - 10, 30) == new[part - 10:part + 20]
        served = _stats(reader)["served"]
        assert reader.read_bytes("/f") == new and _stats(reader)["served"] > served
        writer.remove("/f")
        writer.write_bytes("/f", b"y" * 100)
        assert reader.read_bytes("/f") == b"y" * 100


def test_corrupt_chunk_under_short_circuit_reads_other_replicas(cluster_factory):
    c = cluster_factory().start()
    data = _data(6 * CS, 4)
    with c.connect() as fs:
        fs.write_bytes("/f", data)
        files = [os.path.join(d, n) for d, _, ns in os.walk(os.path.join(c.root, "s2")) for n in ns if ".v" in n]
        assert len(files) >= 6
        for p in files:  # every chunk file of one replica gets a flipped byte
            with open(p, "r+b") as fh:
                fh.seek(4096 + 7)
                b = fh.read(1)
                fh.seek(4096 + 7)
                fh.write(bytes([b[0] ^ 0x5A]))
        for seed in range(3):
            _check_reads(fs, "/f", data, seed)
        assert fs.read_bytes("/f") == data


def _hold_fds_of(fs, path, service):
    """Read until the client's short-circuit tables hold fds from `service` (replicas are chosen by hash)."""
    f = fs.open(path)
    fs.read_bytes(path)
    sc = fs.backend._sc
    return f, any(s is sess for t in sc.tables.values() for s in t.sessions
                  for sess in [sc.sessions.get(fs.backend.routing["addresses"][f"{service}-t0"])])


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_service_that_dies_or_stops_never_serves_stale_chunks(cluster_factory, how):
    """kill -9: the session's socket hangs up. SIGSTOP: the socket stays open, but the service's serving time
    runs out before the manager can drop it from its chains, so writes acknowledged without it are never
    answered from its stale chunk files."""
    c = cluster_factory().start()
    old = _data(6 * CS, 5)
    fs = c.connect(retry_for=40, timeout=3)  # a stopped service answers nothing: do not wait long on it
    writer = c.connect(retry_for=40, short_circuit=False)
    try:
        writer.write_bytes("/f", old)
        f, held = _hold_fds_of(fs, "/f", "s1")
        assert held, "no chunk was served from s1's replica"
        proc = c.procs["s1"]
        if how == "kill":
            c.kill("s1")
        else:
            os.kill(proc.pid, signal.SIGSTOP)
        try:
            c.wait_states(lambda s: s["s1-t0"] == "offline", 20, "s1 marked offline")
            if how == "stop":  # its socket is open, but its serving time ran out before the manager acted
                sess = fs.backend._sc.sessions[fs.backend.routing["addresses"]["s1-t0"]]
                assert sess.alive() and sess.until.max() < time.monotonic()
            new = _data(6 * CS, 6)
            writer.backend.refresh()  # a stopped head would hold this write for its full RPC timeout
            with writer.open("/f", "r+b") as w:
                w.write(new)  # acknowledged by s2 and s3 only
            assert f.pread(0, len(new)) == new
            assert fs.read_bytes("/f") == new
            _check_reads(fs, "/f", new, seed=7)
        finally:
            if how == "stop":
                os.kill(proc.pid, signal.SIGCONT)
        if how == "kill":
            c.start_service("s1")
        c.wait_all_serving(40)
        assert fs.read_bytes("/f") == new  # s1 resynced (or is syncing): still the new bytes
        _check_reads(fs, "/f", new, seed=8)
    finally:
        fs.close()
        writer.close()


def _child_read(uri, secret, q):
    import torch_deepstack.storage as st

    with st.connect(uri, secret=secret) as fs:
        q.put(fs.read_bytes("/f"))


def test_short_circuit_in_a_forked_child_and_wrong_secret(cluster_factory):
    c = cluster_factory().start()
    data = _data(2 * CS, 9)
    with c.connect() as fs:
        fs.write_bytes("/f", data)
        assert fs.read_bytes("/f") == data
        # A forked child (a DataLoader worker) with its own client, while the parent holds sessions.
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_child_read, args=(c.uri, c.secret, q))
        p.start()
        assert q.get(timeout=60) == data
        p.join(30)
        assert p.exitcode == 0
        assert fs.read_bytes("/f") == data  # the parent's sessions still work
        name = fs.backend._clients.get(fs.backend.routing["addresses"]["s1-t0"]).call("short_circuit")[0]["socket"]
    with pytest.raises((AuthError, StorageError, OSError)):
        Session(name, b"not-the-secret", timeout=5)
    s = Session(name, c.secret, timeout=5)  # the service survived the bad client
    assert s.alive()
    s.close()
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # garbage instead of a sealed message
    raw.settimeout(5)
    raw.connect("\0" + name)
    raw.recv(64)
    raw.send(b"garbage" * 10)
    assert raw.recv(64) == b""  # refused and closed
    raw.close()
