"""Reliability tests on real clusters: a manager and three storage services (r = 3) as processes on loopback."""
from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

import torch_deepstack.storage as st
from tests.storage.cleanup_race import cleanup_between_chunk_writes_and_publish
from tests.storage.torn_reads import torn_chunk_reads
from torch_deepstack.storage.rpc import RpcClient

pytestmark = pytest.mark.timeout(150)
CS = 256 << 10


def replica_dumps(cluster):
    """chain -> {target: {chunk: committed version}} straight from every storage service."""
    r = cluster.routing()
    out = {}
    for cid, chain in r["chains"].items():
        out[cid] = {}
        for t in chain["targets"]:
            host, port = r["addresses"][t["id"]].rsplit(":", 1)
            c = RpcClient(host, int(port), cluster.secret, timeout=10)
            try:
                dump = c.call("dump_meta", {"target": t["id"]})[0]
            finally:
                c.close()
            out[cid][t["id"]] = {k: (v["committed"], v["crc"]) for k, v in dump.items()}
    return out


def test_cluster_cli_roundtrip_and_auth(cluster_factory, tmp_path):
    c = cluster_factory().start()
    local = tmp_path / "in.bin"
    payload = os.urandom(3 * CS + 777)
    local.write_bytes(payload)
    fs_arg = ["--fs", c.uri]
    assert c.cli("mkdir", "/data", *fs_arg, check=True).returncode == 0
    c.cli("put", str(local), "/data/in.bin", *fs_arg, check=True)
    ls = c.cli("ls", "-l", "/data", *fs_arg, check=True).stdout
    assert "in.bin" in ls and str(len(payload)) in ls
    assert f"size        {len(payload)}" in c.cli("stat", "/data/in.bin", *fs_arg, check=True).stdout
    c.cli("get", "/data/in.bin", str(tmp_path / "out.bin"), *fs_arg, check=True)
    assert (tmp_path / "out.bin").read_bytes() == payload
    fsck = c.cli("fsck", *fs_arg, check=True)
    assert "0 corrupt" in fsck.stdout
    # Every replica holds the same committed versions.
    for chain, reps in replica_dumps(c).items():
        assert len({tuple(sorted(v.items())) for v in reps.values()}) == 1, (chain, reps)
    # Chain-version checks: a write routed with an old chain version is rejected, not applied.
    routing = c.routing()
    chain_id, chain = next(iter(routing["chains"].items()))
    head = chain["targets"][0]["id"]
    host, port = routing["addresses"][head].rsplit(":", 1)
    svc = RpcClient(host, int(port), c.secret, timeout=10)
    with pytest.raises(st.StorageError) as err:
        svc.call("write", {"chain": chain_id, "chain_ver": chain["version"] - 1, "target": head,
                           "chunk": "00000000000000aa-00000000", "offset": 0, "chunk_size": CS}, b"x")
    assert err.value.code == "stale_routing"
    with pytest.raises(st.InvalidPath):
        svc.call("write", {"chain": chain_id, "chain_ver": chain["version"], "target": head,
                           "chunk": "../../etc", "offset": 0, "chunk_size": CS}, b"x")
    assert svc.call("dump_meta", {"target": head})[0].get("00000000000000aa-00000000") is None
    svc.close()
    r = c.cli("get", "/data/missing", str(tmp_path / "x"), *fs_arg)
    assert r.returncode == 1 and "no such file" in r.stderr
    r = c.cli("ls", "--fs", "deepstack://nohostport")
    assert r.returncode == 1 and "bad cluster URI" in r.stderr
    # Wrong secret: refused, and nothing changes.
    bad = c.env.copy()
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"not-the-secret")
    with pytest.raises(st.AuthError):
        st.connect(c.uri, secret=b"not-the-secret").listdir("/")
    r = c.cli("rm", "-r", "/data", "--fs", c.uri, "--secret-file", str(wrong))
    assert r.returncode == 1 and "auth" in r.stderr.lower()
    del bad
    with c.connect() as fs:
        assert fs.read_bytes("/data/in.bin") == payload
        fs.remove("/data", recursive=True)
        assert fs.listdir("/") == []


@pytest.mark.parametrize("role", [0, 1, 2], ids=["head", "middle", "tail"])
def test_kill9_storage_service_during_replicated_writes(cluster_factory, role):
    c = cluster_factory().start()
    victim = c.routing()["chains"]["c0"]["targets"][role]["id"].split("-")[0]
    fs = c.connect(retry_for=40)
    fs.mkdir("/w")
    acked: dict[str, str] = {}
    errors: list[BaseException] = []
    read_ok = [0]
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            data = os.urandom(CS + 1000 * (i % 7))
            try:
                fs.write_bytes(f"/w/f{i}", data)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                return
            acked[f"/w/f{i}"] = hashlib.sha256(data).hexdigest()
            i += 1

    def reader():
        while not stop.is_set():
            for path, digest in list(acked.items())[-5:]:
                try:
                    got = fs.read_bytes(path)
                except BaseException as e:  # noqa: BLE001
                    errors.append(e)
                    return
                if hashlib.sha256(got).hexdigest() != digest:
                    errors.append(AssertionError(f"{path}: wrong bytes"))
                    return
                read_ok[0] += 1
            time.sleep(0.01)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    before = len(acked)
    c.kill(victim)  # SIGKILL in the middle of the write stream
    reads_at_kill = read_ok[0]
    c.wait_states(lambda s: s[f"{victim}-t0"] == "offline", 20, f"{victim} marked offline")
    time.sleep(1.5)
    reads_during_outage = read_ok[0] - reads_at_kill
    c.start_service(victim)
    c.wait_all_serving(40)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(40)
    assert not errors, errors[:3]
    assert len(acked) > before + 3, "writes kept going through the failure"
    assert reads_during_outage > 0
    # No acknowledged write is lost, and the returned replica caught up with every chunk.
    for path, digest in acked.items():
        assert hashlib.sha256(fs.read_bytes(path)).hexdigest() == digest, path
    for chain, reps in replica_dumps(c).items():
        views = {tid: tuple(sorted(v.items())) for tid, v in reps.items()}
        assert len(set(views.values())) == 1, f"{chain}: replicas differ after resync"
    fs.close()


def test_corrupt_replica_is_bypassed_and_repaired_by_fsck(cluster_factory):
    c = cluster_factory().start()
    data = os.urandom(6 * CS)
    with c.connect() as fs:
        fs.write_bytes("/f", data)
    # Flip a byte in every chunk file of s1: any read that lands there fails its CRC32C check.
    files = [os.path.join(d, f) for d, _, fs_ in os.walk(os.path.join(c.root, "s1")) for f in fs_ if ".v" in f]
    assert len(files) >= 2
    for p in files:
        with open(p, "r+b") as f:
            f.seek(10)
            b = f.read(1)
            f.seek(10)
            f.write(bytes([b[0] ^ 0xFF]))
    with c.connect() as fs:
        for _ in range(3):
            assert fs.read_bytes("/f") == data
        res = fs.batch_read([("/f", i * CS, 100) for i in range(6)], timeout=20)
        assert all(r.ok and bytes(r.data) == data[i * CS:i * CS + 100] for i, r in enumerate(res))
    r = c.cli("fsck", "--fs", c.uri, check=True)
    assert f"{len(files)} corrupt, {len(files)} repaired" in r.stdout, r.stdout
    r = c.cli("fsck", "--fs", c.uri, check=True)
    assert " 0 corrupt" in r.stdout
    # A replica that lost a chunk outright: reads never see zeros, and fsck restores the chunk.
    routing = c.routing()
    s1 = routing["addresses"]["s1-t0"].rsplit(":", 1)
    svc = RpcClient(s1[0], int(s1[1]), c.secret, timeout=10)
    lost = sorted(svc.call("dump_meta", {"target": "s1-t0"})[0])
    svc.call("sync_remove", {"target": "s1-t0", "chunks": lost})
    with c.connect() as fs:
        for _ in range(3):
            assert fs.read_bytes("/f") == data
    r = c.cli("fsck", "--fs", c.uri, check=True)
    assert f"{len(lost)} corrupt, {len(lost)} repaired" in r.stdout, r.stdout
    assert sorted(svc.call("dump_meta", {"target": "s1-t0"})[0]) == lost
    svc.close()


def test_manager_restart_recovers_state(cluster_factory):
    c = cluster_factory().start()
    fs = c.connect(retry_for=40)
    fs.write_bytes("/before", b"b" * (2 * CS))
    versions = {cid: ch["version"] for cid, ch in c.routing()["chains"].items()}
    f = fs.open("/before")
    c.kill("manager")
    # Data keeps flowing from the storage services while the manager (and the metadata it serves) is down.
    assert f.pread(0, 2 * CS) == b"b" * (2 * CS)
    # With every storage service gone too, a bounded read gives up in time instead of hanging.
    for s in ("s1", "s2", "s3"):
        c.kill(s)
    t0 = time.monotonic()
    res = fs.batch_read([(f, 0, 100)], timeout=1.0)
    assert not res[0].ok and time.monotonic() - t0 < 10
    for s in ("s1", "s2", "s3"):
        c.start_service(s)
    c.start_manager()
    c.wait_all_serving(30)
    after = {cid: ch["version"] for cid, ch in c.routing()["chains"].items()}
    assert all(after[k] >= versions[k] for k in versions), (versions, after)
    fs.write_bytes("/after", b"a" * CS)
    assert sorted(fs.listdir("/")) == ["after", "before"]
    assert fs.read_bytes("/after") == b"a" * CS
    fs.close()


def test_cluster_concurrent_writers_readers_consistent(cluster_factory):
    c = cluster_factory().start()
    fs = c.connect()
    n = 3

    def read_all(f):
        return [bytes(r.data) if r.ok else r.error for r in fs.batch_read([(f, j * CS, CS) for j in range(n)])]
    problems = torn_chunk_reads(fs, "/s", CS, n, n_writers=2, rounds=12, n_readers=1, read_chunks=read_all,
                                join_s=60)
    assert not problems, problems[:3]
    fs.close()


def test_cluster_on_etcd(cluster_factory, etcd_server):
    host, port = etcd_server
    c = cluster_factory(kv_uri=f"etcd://{host}:{port}/cluster-{time.monotonic_ns()}").start()
    with c.connect() as fs:
        fs.makedirs("/a/b")
        fs.write_bytes("/a/b/x", b"xyz" * 1000)
        fs.rename("/a", "/z")
        assert fs.read_bytes("/z/b/x") == b"xyz" * 1000
    c.kill("manager")
    c.start_manager()  # recovers chains and namespace from etcd
    c.wait_all_serving(30)
    with c.connect() as fs:
        assert fs.listdir("/z/b") == ["x"]


def test_cluster_full_disk_refuses_writes_and_loses_nothing(cluster_factory):
    c = cluster_factory(service_args=["--capacity", str(3 * CS)]).start()
    with c.connect(retry_for=10) as fs:
        kept = os.urandom(2 * CS)
        fs.write_bytes("/kept", kept)
        with pytest.raises(st.NoSpace):
            fs.write_bytes("/big", os.urandom(4 * CS))
        assert fs.read_bytes("/kept") == kept
        fs.remove("/big")
        fs.write_bytes("/small", b"s" * 100)  # space is still usable after the refusal
        assert fs.read_bytes("/small") == b"s" * 100
    for chain, reps in replica_dumps(c).items():
        assert len({tuple(sorted(v.items())) for v in reps.values()}) == 1, (chain, reps)


@pytest.mark.parametrize("first", ["A", "B"])
def test_cluster_failed_write_cleanup_keeps_a_chunk_another_handle_is_publishing(cluster_factory, monkeypatch,
                                                                                 first):
    """As in the embedded test: the cleanup's removal is version-checked on every replica of the chain."""
    c = cluster_factory().start()
    with c.connect(retry_for=10) as fs:
        real_write_one = fs.backend._write_one

        def install(hook):
            monkeypatch.setattr(fs.backend, "_write_one", lambda w: hook(w[1], w[3], lambda: real_write_one(w)))
        got = cleanup_between_chunk_writes_and_publish(fs, CS, first, install, st.Unavailable("injected"))
        assert got == b"B" * 100
    for chain, reps in replica_dumps(c).items():
        assert len({tuple(sorted(v.items())) for v in reps.values()}) == 1, (chain, reps)


def test_cluster_failed_write_of_a_new_chunk_leaves_no_replica_holding_it(cluster_factory):
    """The head runs out of space for a chunk its successors have already committed: the head removes that
    version from the chain before answering (the client cannot: it never learns the version of a failed write)."""
    c = cluster_factory(service_args=["--capacity", str(2 * CS)]).start()
    with c.connect(retry_for=10) as fs:
        fs.write_bytes("/f", b"")
        ino = fs.stat("/f")
        routing = c.routing()
        head = routing["chains"][ino.chains[0]]["targets"][0]["id"]
        host, port = routing["addresses"][head].rsplit(":", 1)
        svc = RpcClient(host, int(port), c.secret, timeout=10)
        try:  # fill the head alone
            svc.call("sync_write", {"target": head, "chunk": "00000000000000ff-00000000", "ver": 1}, b"j" * 2 * CS)
        finally:
            svc.close()
        with pytest.raises(st.NoSpace):
            with fs.open("/f", "r+b") as f:
                f.write(b"x" * 100)
    chunk = f"{ino.inode:016x}-00000000"
    held = {t: v[chunk] for t, v in replica_dumps(c)[ino.chains[0]].items() if chunk in v}
    assert held == {}
