"""Cluster manager state machine (in-process; no services): leases, chain order, lastsrv, recovery."""
from __future__ import annotations

import time

import pytest

from torch_deepstack.storage.errors import InvalidArgument
from torch_deepstack.storage.kv import SQLiteKV
from torch_deepstack.storage.manager import Manager, make_chain_table, mkfs_cluster


def test_chain_table_layout():
    chains = make_chain_table(["a", "b", "c"], 2, 3)
    assert len(chains) == 2
    assert chains["c0"] == ["a-t0", "b-t0", "c-t0"]
    assert chains["c1"] == ["b-t1", "c-t1", "a-t1"]  # heads rotate
    with pytest.raises(InvalidArgument):
        make_chain_table(["a", "b"], 1, 3)
    with pytest.raises(InvalidArgument):
        make_chain_table(["a", "a", "b"], 1, 3)


def states(m, chain="c0"):
    return [(t["id"], t["state"]) for t in m.routing()["chains"][chain]["targets"]]


def test_state_transitions_and_restart(tmp_path):
    kv = SQLiteKV(str(tmp_path / "m.db"))
    mkfs_cluster(kv, ["a", "b", "c"], replicas=3)
    with pytest.raises(InvalidArgument):
        mkfs_cluster(kv, ["a", "b", "c"], replicas=3)  # never re-formats a live cluster
    m = Manager(kv, b"secret", lease=0.3)
    for s in "abc":
        m.heartbeat(s, f"127.0.0.1:{ord(s)}", {f"{s}-t0": "online"}, boot="1")
    # First target of a fresh chain serves at once; the others sync from it first.
    assert states(m) == [("a-t0", "serving"), ("b-t0", "syncing"), ("c-t0", "syncing")]
    for s in "bc":
        m.heartbeat(s, "x:1", {f"{s}-t0": "uptodate"}, boot="1")
    assert all(st == "serving" for _, st in states(m))
    v0 = m.routing()["chains"]["c0"]["version"]
    # b stops heartbeating: it leaves the serving set and goes to the tail.
    deadline = time.monotonic() + 5
    while dict(states(m))["b-t0"] != "offline" and time.monotonic() < deadline:
        for s in "ac":
            m.heartbeat(s, "x:1", {f"{s}-t0": "uptodate"}, boot="1")
        time.sleep(0.05)
        m.check_leases()
    assert states(m) == [("a-t0", "serving"), ("c-t0", "serving"), ("b-t0", "offline")]
    assert m.routing()["chains"]["c0"]["version"] > v0
    # b returns: waiting -> syncing (behind the serving targets) -> serving once it reports up-to-date.
    m.heartbeat("b", "x:2", {"b-t0": "online"}, boot="2")
    assert dict(states(m))["b-t0"] == "syncing"
    m.heartbeat("b", "x:2", {"b-t0": "uptodate"}, boot="2")
    assert dict(states(m))["b-t0"] == "serving"
    # A quick restart (within the lease) while still listed as serving: resync before serving again.
    m.heartbeat("c", "x:5", {"c-t0": "online"}, boot="2")
    assert dict(states(m))["c-t0"] == "syncing"
    m.heartbeat("c", "x:5", {"c-t0": "uptodate"}, boot="2")
    # Everyone dies: the last serving target becomes lastsrv and must come back first.
    time.sleep(0.4)
    m.check_leases()
    st = dict(states(m))
    assert sorted(st.values()) == ["lastsrv", "offline", "offline"]
    last = next(t for t, s in st.items() if s == "lastsrv")
    other = next(t for t, s in st.items() if s == "offline")
    m.heartbeat(other[0], "x:3", {other: "online"}, boot="3")
    assert dict(states(m))[other] == "waiting"  # cannot serve: it may be missing the newest writes
    m.heartbeat(last[0], "x:4", {last: "online"}, boot="3")
    assert dict(states(m))[last] == "serving"
    m.heartbeat(other[0], "x:3", {other: "online"}, boot="3")
    assert dict(states(m))[other] == "syncing"
    saved = m.routing()["chains"]
    m.server.stop()
    # A restarted manager recovers chains and states from the KV store.
    m2 = Manager(SQLiteKV(str(tmp_path / "m.db")), b"secret", lease=0.3)
    assert {c: [(t["id"], t["state"]) for t in v["targets"]] for c, v in m2.routing()["chains"].items()} == \
        {c: [(t["id"], t["state"]) for t in v["targets"]] for c, v in saved.items()}
    m2.stop()
    kv.close()


def test_heartbeat_validation(tmp_path):
    kv = SQLiteKV(str(tmp_path / "m.db"))
    mkfs_cluster(kv, ["a", "b", "c"], replicas=3)
    m = Manager(kv, b"secret")
    with pytest.raises(InvalidArgument):
        m.heartbeat("a", "x:1", {"zz-t0": "online"})  # unknown target
    with pytest.raises(InvalidArgument):
        m.heartbeat("a", "x:1", {"b-t0": "online"})  # someone else's target
    with pytest.raises(InvalidArgument):
        m.heartbeat("a", "x:1", {"a-t0": "bogus"})
    m.stop()
