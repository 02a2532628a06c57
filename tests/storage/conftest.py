"""Fixtures for the storage tests: KV engines (SQLite always, etcd when the binary exists) and real clusters
of processes on loopback."""
from __future__ import annotations

import os
import shutil
import time

import pytest

from torch_deepstack.testing.local_cluster import LocalCluster as Cluster
from torch_deepstack.testing.local_cluster import start_etcd, stop_process


# ---------------------------------------------------------------------------------------------- etcd
@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory):
    if shutil.which("etcd") is None:
        pytest.skip("etcd binary not found (install Debian's etcd-server to run the etcd engine tests)")
    try:
        import pyetcd  # noqa: F401
    except ImportError as e:  # etcd is installed, so the client must be too (it is in the test extra)
        pytest.fail(f"etcd is installed but its Python client is not ({e}): pip install etcd-sdk-python protobuf")
    try:
        proc, cport = start_etcd(str(tmp_path_factory.mktemp("etcd")))
    except RuntimeError as e:
        pytest.fail(str(e))
    yield ("127.0.0.1", cport)
    stop_process(proc)


_counter = [0]


@pytest.fixture(params=["sqlite", "etcd"])
def kv_uri(request, tmp_path):
    """A fresh, empty KV namespace on each engine."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/kv.db"
    host, port = request.getfixturevalue("etcd_server")
    _counter[0] += 1
    return f"etcd://{host}:{port}/t{os.getpid()}-{_counter[0]}-{time.monotonic_ns()}"


@pytest.fixture
def kv(kv_uri):
    from torch_deepstack.storage.kv import open_kv

    engine = open_kv(kv_uri)
    yield engine
    engine.close()


# ---------------------------------------------------------------------------------------------- clusters
@pytest.fixture
def cluster_factory(tmp_path):
    made = []

    def make(**kw):
        c = Cluster(tmp_path / f"cluster{len(made)}", **kw)
        made.append(c)
        return c
    yield make
    for c in made:
        c.stop()
