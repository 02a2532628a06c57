"""Real storage clusters on loopback for tests and benchmarks: a manager and storage services as processes, and a
single-node etcd. Shared by tests/storage, tests/data and benchmarks/bench_storage.py."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

TEST_SECRET = b"test-secret-0123456789"

# Service processes skip `torch_deepstack/__init__` (which imports torch, ~1.5 s per process on the 2-core CI
# machine): the storage package needs no torch, so a bare parent package is enough to run its CLI.
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BOOT = ("import sys, types; pkg = types.ModuleType('torch_deepstack'); pkg.__path__ = [%r]; "
         "sys.modules['torch_deepstack'] = pkg; from torch_deepstack.storage.cli import main; "
         "sys.exit(main(sys.argv[1:]))" % _PKG_DIR)
FS_CLI = [sys.executable, "-c", _BOOT]


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


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def start_etcd(data_dir: str, timeout: float = 20.0) -> tuple[subprocess.Popen, int]:
    """A single-node etcd on loopback, answering: -> (process, client port). FileNotFoundError without the etcd
    binary (Debian: etcd-server), RuntimeError with its log's tail when it does not come up."""
    exe = shutil.which("etcd")
    if exe is None:
        raise FileNotFoundError("etcd binary not found (install Debian's etcd-server)")
    from torch_deepstack.storage.kv import EtcdKV

    os.makedirs(data_dir, exist_ok=True)
    cport, pport = free_port(), free_port()
    log_path = os.path.join(data_dir, "etcd.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [exe, "--name", "local", "--data-dir", os.path.join(data_dir, "data"),
             "--listen-client-urls", f"http://127.0.0.1:{cport}", "--advertise-client-urls", f"http://127.0.0.1:{cport}",
             "--listen-peer-urls", f"http://127.0.0.1:{pport}", "--initial-advertise-peer-urls",
             f"http://127.0.0.1:{pport}", "--initial-cluster", f"local=http://127.0.0.1:{pport}"],
            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while True:
        try:
            kv = EtcdKV("127.0.0.1", cport, prefix=b"/probe/", timeout=2)
            kv.get(b"x")
            kv.close()
            return proc, cport
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                with open(log_path) as f:
                    raise RuntimeError(f"etcd did not start: {f.read()[-2000:]}") from None
            time.sleep(0.2)


class LocalCluster:
    """A manager and storage services as real processes (`deepstack fs serve`), on loopback.

    chunk_size / stripe / lease of None keep `deepstack fs`'s defaults; sync=False runs the services with
    --no-sync (no fdatasync: fast tests; a benchmark of replicated writes wants sync=True)."""

    def __init__(self, root, services=("s1", "s2", "s3"), targets_per_service=1, replicas=3, lease=1.5,
                 chunk_size=256 << 10, stripe=4, kv_uri=None, service_args=(), secret=TEST_SECRET, sync=False):
        self.root = str(root)
        self.secret = secret
        self.services = list(services)
        self.tps = targets_per_service
        self.lease = lease
        os.makedirs(self.root, exist_ok=True)
        self.secret_file = os.path.join(self.root, "secret")
        with open(self.secret_file, "wb") as f:
            f.write(secret)
        self.kv_uri = kv_uri or f"sqlite://{self.root}/meta.db"
        self.service_args = ([] if sync else ["--no-sync"]) + list(service_args)
        self.env = dict(os.environ, DEEPSTACK_FS_SECRET_FILE=self.secret_file, PYTHONUNBUFFERED="1")
        self.env.pop("DEEPSTACK_FS_SECRET", None)
        self.procs: dict[str, subprocess.Popen] = {}
        self.manager_port = free_port()
        layout = (["--chunk-size", str(chunk_size)] if chunk_size is not None else []) + \
            (["--stripe", str(stripe)] if stripe is not None else [])
        self.cli("mkfs", "--kv", self.kv_uri, "--services", ",".join(self.services), "--replicas", str(replicas),
                 "--targets-per-service", str(targets_per_service), *layout, check=True)

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
        with open(log, "a") as out:
            proc = subprocess.Popen([*FS_CLI, "serve", *args, "--port-file", port_file], env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc, port_file, log

    def start_manager(self):
        lease = ["--lease", str(self.lease)] if self.lease is not None else []
        proc, pf, log = self._spawn("manager", ["manager", "--kv", self.kv_uri, "--port", str(self.manager_port),
                                                *lease])
        wait_for_file(pf, 30, proc, log)

    def start_service(self, sid, wait=True):
        targets = []
        for j in range(self.tps):
            targets += ["--target", os.path.join(self.root, sid, f"t{j}")]
        proc, pf, log = self._spawn(sid, ["storage", "--id", sid, "--manager", f"127.0.0.1:{self.manager_port}",
                                          *targets, *self.service_args])
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

        c = RpcClient("127.0.0.1", self.manager_port, self.secret, timeout=5)
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
            except Exception as e:  # noqa: BLE001 - manager restarting
                last = repr(e)
            time.sleep(0.1)
        raise TimeoutError(f"timed out waiting for {what}; last: {last}")

    def wait_all_serving(self, timeout=30.0):
        return self.wait_states(lambda s: all(v == "serving" for v in s.values()), timeout, "all targets serving")

    def connect(self, **kw):
        from torch_deepstack.storage import connect

        return connect(self.uri, secret=self.secret, **kw)

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
