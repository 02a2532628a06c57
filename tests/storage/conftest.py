"""Fixtures for the storage tests: KV engines (SQLite always, etcd when the binary exists) and real clusters
of processes on loopback."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

SECRET = b"test-secret-0123456789"

# Service processes skip `torch_deepstack/__init__` (which imports torch, ~1.5 s per process on the 2-core CI
# machine): the storage package needs no torch, so a bare parent package is enough to run its CLI.
_PKG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "torch_deepstack")
BOOT = ("import sys, types; pkg = types.ModuleType('torch_deepstack'); pkg.__path__ = [%r]; "
        "sys.modules['torch_deepstack'] = pkg; from torch_deepstack.storage.cli import main; "
        "sys.exit(main(sys.argv[1:]))" % _PKG_DIR)
FS_CLI = [sys.executable, "-c", BOOT]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_file(path: str, timeout: float, proc: subprocess.Popen | None = None, log: str | None = None) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                text = f.read().strip()
            if text:
                return text
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    detail = open(log).read()[-3000:] if log and os.path.exists(log) else ""
    raise TimeoutError(f"{path} did not appear within {timeout}s\n{detail}")


# ---------------------------------------------------------------------------------------------- etcd
@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory):
    exe = shutil.which("etcd")
    if exe is None:
        pytest.skip("etcd binary not found (install Debian's etcd-server to run the etcd engine tests)")
    try:
        import pyetcd  # noqa: F401
    except ImportError as e:  # etcd is installed, so the client must be too (it is in the test extra)
        pytest.fail(f"etcd is installed but its Python client is not ({e}): pip install etcd-sdk-python protobuf")
    d = tmp_path_factory.mktemp("etcd")
    cport, pport = free_port(), free_port()
    log = open(d / "etcd.log", "w")
    proc = subprocess.Popen(
        [exe, "--name", "test", "--data-dir", str(d / "data"),
         "--listen-client-urls", f"http://127.0.0.1:{cport}", "--advertise-client-urls", f"http://127.0.0.1:{cport}",
         "--listen-peer-urls", f"http://127.0.0.1:{pport}", "--initial-advertise-peer-urls",
         f"http://127.0.0.1:{pport}", "--initial-cluster", f"test=http://127.0.0.1:{pport}"],
        stdout=log, stderr=subprocess.STDOUT)
    from torch_deepstack.storage.kv import EtcdKV

    deadline = time.monotonic() + 20
    while True:
        try:
            kv = EtcdKV("127.0.0.1", cport, prefix=b"/probe/", timeout=2)
            kv.get(b"x")
            kv.close()
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"etcd did not start: {(d / 'etcd.log').read_text()[-2000:]}")
            time.sleep(0.2)
    yield ("127.0.0.1", cport)
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


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
class Cluster:
    """A manager and storage services as real processes (`python -m torch_deepstack.storage.cli`)."""

    def __init__(self, root, services=("s1", "s2", "s3"), targets_per_service=1, replicas=3, lease=1.5,
                 chunk_size=256 << 10, kv_uri=None, service_args=()):
        self.root = str(root)
        self.secret = SECRET
        self.services = list(services)
        self.tps = targets_per_service
        self.lease = lease
        os.makedirs(self.root, exist_ok=True)
        self.secret_file = os.path.join(self.root, "secret")
        with open(self.secret_file, "wb") as f:
            f.write(SECRET)
        self.kv_uri = kv_uri or f"sqlite://{self.root}/meta.db"
        self.service_args = list(service_args)
        self.env = dict(os.environ, DEEPSTACK_FS_SECRET_FILE=self.secret_file, PYTHONUNBUFFERED="1")
        self.env.pop("DEEPSTACK_FS_SECRET", None)
        self.procs: dict[str, subprocess.Popen] = {}
        self.manager_port = free_port()
        self.cli("mkfs", "--kv", self.kv_uri, "--services", ",".join(self.services), "--replicas", str(replicas),
                 "--targets-per-service", str(targets_per_service), "--chunk-size", str(chunk_size), "--stripe",
                 "4", check=True)

    @property
    def uri(self) -> str:
        return f"deepstack://127.0.0.1:{self.manager_port}"

    def cli(self, *args, check=False, timeout=60, input=None):
        r = subprocess.run([*FS_CLI, *args], env=self.env,
                           capture_output=True, text=True, timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise RuntimeError(f"deepstack fs {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def _spawn(self, name, args):
        port_file = os.path.join(self.root, f"{name}.addr")
        if os.path.exists(port_file):
            os.unlink(port_file)
        log = os.path.join(self.root, f"{name}.log")
        proc = subprocess.Popen([*FS_CLI, "serve", *args,
                                 "--port-file", port_file], env=self.env, stdout=open(log, "a"),
                                stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc, port_file, log

    def start_manager(self):
        proc, pf, log = self._spawn("manager", ["manager", "--kv", self.kv_uri, "--port", str(self.manager_port),
                                                "--lease", str(self.lease)])
        wait_for_file(pf, 30, proc, log)

    def start_service(self, sid, wait=True):
        targets = []
        for j in range(self.tps):
            targets += ["--target", os.path.join(self.root, sid, f"t{j}")]
        proc, pf, log = self._spawn(sid, ["storage", "--id", sid, "--manager", f"127.0.0.1:{self.manager_port}",
                                          *targets, "--no-sync", *self.service_args])
        if wait:
            wait_for_file(pf, 30, proc, log)
        return pf

    def start(self):
        self.start_manager()
        files = [self.start_service(s, wait=False) for s in self.services]
        for s, pf in zip(self.services, files):
            wait_for_file(pf, 30, self.procs[s], os.path.join(self.root, f"{s}.log"))
        self.wait_all_serving()
        return self

    def kill(self, name, sig=signal.SIGKILL):
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        proc.wait(10)

    def routing(self):
        from torch_deepstack.storage.rpc import RpcClient

        c = RpcClient("127.0.0.1", self.manager_port, SECRET, timeout=5)
        try:
            return c.call("routing")[0]
        finally:
            c.close()

    def states(self) -> dict[str, str]:
        r = self.routing()
        return {t["id"]: t["state"] for c in r["chains"].values() for t in c["targets"]}

    def wait_states(self, pred, timeout=30.0, what="cluster state"):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.states()
                if pred(last):
                    return last
            except Exception as e:  # manager restarting
                last = repr(e)
            time.sleep(0.1)
        raise TimeoutError(f"timed out waiting for {what}; last: {last}")

    def wait_all_serving(self, timeout=30.0):
        return self.wait_states(lambda s: all(v == "serving" for v in s.values()), timeout, "all targets serving")

    def connect(self, **kw):
        from torch_deepstack.storage import connect

        return connect(self.uri, secret=SECRET, **kw)

    def stop(self):
        procs = list(self.procs.values())
        self.procs.clear()
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


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
