"""`deepstack fs`: create, serve, use and check deepstack file systems.

The file system comes from --fs (a directory, file:///dir or deepstack://host:port) or $DEEPSTACK_FS; the
cluster secret from --secret-file, $DEEPSTACK_FS_SECRET or $DEEPSTACK_FS_SECRET_FILE.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time

from torch_deepstack.cli_args import int_at_least, int_in_range

UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    t = text.strip().lower().rstrip("ib").rstrip("b") if text else ""
    try:
        if t and t[-1] in UNITS:
            return int(float(t[:-1]) * UNITS[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (examples: 4096, 128K, 1M)") from None


def positive_size(text: str) -> int:
    n = parse_size(text)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive size, got {text!r}")
    return n


positive_int = int_at_least(1)


# Checked here so an out-of-range port is a usage error, not an OverflowError from bind()/connect().
_port = int_in_range(0, 65535, " (a port)")
_peer_port = int_in_range(1, 65535, " (a port; a peer cannot listen on 0)")


def _secret(args) -> bytes | None:
    from torch_deepstack.storage import read_secret

    if getattr(args, "secret_file", None):
        with open(args.secret_file, "rb") as f:
            return f.read().strip()
    return read_secret()


def _fs(args):
    from torch_deepstack.storage import connect

    return connect(args.fs, secret=_secret(args), create=False)


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, _peer_port(port)


def _wait_forever(stop) -> int:
    ev = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: ev.set())
    while not ev.wait(0.5):
        pass
    stop()
    return 0


def _announce(address: str, port_file: str | None) -> None:
    print(f"listening on {address}", flush=True)
    if port_file:
        tmp = port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(address)
        os.replace(tmp, port_file)


# ---------------------------------------------------------------------------------------------- commands
def cmd_mkfs(args) -> int:
    from torch_deepstack.storage.kv import open_kv
    from torch_deepstack.storage.local import mkfs_embedded
    from torch_deepstack.storage.manager import mkfs_cluster

    if args.kv:
        if not args.services:
            print("mkfs --kv needs --services s1,s2,...", file=sys.stderr)
            return 2
        kv = open_kv(args.kv)
        try:
            cfg = mkfs_cluster(kv, args.services.split(","), targets_per_service=args.targets_per_service,
                               replicas=args.replicas, chunk_size=args.chunk_size, stripe=args.stripe)
        finally:
            kv.close()
        print(f"cluster created: {len(cfg['chains'])} chains of {cfg['replicas']} replicas over "
              f"{len(cfg['services'])} services")
        return 0
    if not args.path:
        print("mkfs needs a PATH (embedded) or --kv URI --services ... (cluster)", file=sys.stderr)
        return 2
    mkfs_embedded(args.path, chunk_size=args.chunk_size)
    print(f"embedded file system created in {os.path.abspath(args.path)}")
    return 0


def cmd_serve(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("torch_deepstack.storage").warning(
            "binding %s: reachable beyond this machine. Every RPC is HMAC-authenticated, but payloads are "
            "neither encrypted nor MAC'd (CRC32C only); use a trusted network or a tunnel", args.host)
    secret = _secret(args)
    if not secret:
        print("serve needs a shared secret: --secret-file or $DEEPSTACK_FS_SECRET", file=sys.stderr)
        return 2
    if args.role == "manager":
        from torch_deepstack.storage.manager import Manager

        if not args.kv:
            print("serve manager needs --kv URI (sqlite:///path or etcd://host:port)", file=sys.stderr)
            return 2
        m = Manager(args.kv, secret, args.host, args.port, lease=args.lease).start()
        _announce(m.address, args.port_file)
        return _wait_forever(m.stop)
    from torch_deepstack.storage.service import StorageService

    if not args.id or not args.manager or not args.target:
        print("serve storage needs --id, --manager HOST:PORT and at least one --target DIR", file=sys.stderr)
        return 2
    targets = {f"{args.id}-t{i}": path for i, path in enumerate(args.target)}
    s = StorageService(args.id, targets, args.manager, secret, host=args.host, port=args.port,
                       sync=not args.no_sync, capacity_bytes=args.capacity,
                       short_circuit=not args.no_short_circuit)
    s.start()
    _announce(s.address, args.port_file)
    return _wait_forever(s.stop)


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=total < (8 << 20) or not sys.stderr.isatty() and not os.environ.get("DEEPSTACK_PROGRESS"))


def cmd_put(args) -> int:
    with _fs(args) as fs:
        size = os.path.getsize(args.local)
        block = 8 << 20
        with open(args.local, "rb") as src, fs.open(args.remote, "wb") as dst, _progress(size, "put") as bar:
            while True:
                data = src.read(block)
                if not data:
                    break
                dst.write(data)
                bar.update(len(data))
        print(f"{args.local} -> {args.remote} ({size} bytes)")
        return 0


def cmd_get(args) -> int:
    local = args.local
    if os.path.isdir(local):  # like cp: into the directory, under the remote file's name
        local = os.path.join(local, args.remote.rstrip("/").rsplit("/", 1)[-1])
    with _fs(args) as fs:
        with fs.open(args.remote, "rb") as src:
            size = src.size
            block = 8 << 20
            buf = bytearray(block)
            tmp = local + ".part"
            dst = open(tmp, "wb")
            try:
                with dst, _progress(size, "get") as bar:
                    while True:
                        n = src.readinto(buf)
                        if not n:
                            break
                        dst.write(memoryview(buf)[:n])
                        bar.update(n)
                os.replace(tmp, local)
            except BaseException:
                # A failed or interrupted get leaves no partial file behind (only ours: tmp opened above).
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
        print(f"{args.remote} -> {local} ({size} bytes)")
        return 0


def cmd_ls(args) -> int:
    with _fs(args) as fs:
        for name, kind in fs.scandir(args.path):
            if args.long:
                st = fs.stat(args.path.rstrip("/") + "/" + name)
                print(f"{kind:4} {st.size:>14} {time.strftime('%Y-%m-%d %H:%M', time.localtime(st.mtime))} "
                      f"{name}{'/' if kind == 'dir' else ''}")
            else:
                print(name + ("/" if kind == "dir" else ""))
        return 0


def cmd_stat(args) -> int:
    with _fs(args) as fs:
        st = fs.stat(args.path)
        for k, v in vars(st).items():
            print(f"{k:11} {v}")
        return 0


def cmd_rm(args) -> int:
    with _fs(args) as fs:
        fs.remove(args.path, recursive=args.recursive)
        return 0


def cmd_mkdir(args) -> int:
    with _fs(args) as fs:
        fs.mkdir(args.path, parents=args.parents, exist_ok=args.parents, chunk_size=args.chunk_size)
        return 0


def cmd_fsck(args) -> int:
    from torch_deepstack.storage.fsck import fsck

    with _fs(args) as fs:
        rep = fsck(fs, repair=not args.no_repair, gc=args.gc)
        for tid, cid in rep.corrupt:
            state = "repaired" if (tid, cid) in rep.repaired else "NOT repaired"
            print(f"corrupt: target {tid} chunk {cid} ({state})")
        print(rep.summary())
        return 0 if rep.clean else 1


def cmd_bench(args) -> int:
    import random

    import numpy as np

    # Every read is one whole block at a random block offset, so the file must hold at least one block.
    if args.block_size > args.size:
        print(f"deepstack fs bench: error: --block-size ({args.block_size}) must not exceed --size ({args.size})",
              file=sys.stderr)
        return 2
    with _fs(args) as fs:
        path = args.path
        size = args.size
        if not fs.exists(path) or fs.stat(path).size < size:
            block = 8 << 20
            with fs.open(path, "wb") as f, _progress(size, "write") as bar:
                t0 = time.perf_counter()
                for off in range(0, size, block):
                    n = min(block, size - off)
                    f.write(np.random.randint(0, 256, n, dtype=np.uint8).tobytes())
                    bar.update(n)
            dt = time.perf_counter() - t0
            print(f"write: {size / dt / 2**20:.1f} MiB/s")
        f = fs.open(path, "rb")
        bs, qd = args.block_size, args.iodepth
        buf = np.empty((qd, bs), dtype=np.uint8)
        rng = random.Random(0)
        nblocks = size // bs
        t0 = time.perf_counter()
        ios = 0
        while time.perf_counter() - t0 < args.seconds:
            reqs = [(f, rng.randrange(nblocks) * bs, bs, buf[i]) for i in range(qd)]
            for r in fs.batch_read(reqs):
                if r.error:
                    raise r.error
            ios += qd
        dt = time.perf_counter() - t0
        print(f"random read bs={bs} qd={qd}: {ios / dt:.0f} IOPS, {ios * bs / dt / 2**20:.1f} MiB/s")
        return 0


# ---------------------------------------------------------------------------------------------- parser
def add_parser(subparsers) -> None:
    p = subparsers.add_parser("fs", help="deepstack file system (3FS-style storage)", description=__doc__)
    sub = p.add_subparsers(dest="fs_command", metavar="SUBCOMMAND")
    sub.required = True

    def common(sp, fs=True):
        if fs:
            sp.add_argument("--fs", default=os.environ.get("DEEPSTACK_FS"),
                            help="directory, file:///dir or deepstack://host:port (default $DEEPSTACK_FS)")
        sp.add_argument("--secret-file", help="file holding the cluster's shared secret")

    s = sub.add_parser("mkfs", help="create an embedded file system (PATH) or a cluster (--kv, --services)")
    s.add_argument("path", nargs="?")
    s.add_argument("--kv", help="cluster metadata store: sqlite:///path.db or etcd://host:port")
    s.add_argument("--services", help="comma-separated storage service ids, e.g. s1,s2,s3")
    s.add_argument("--targets-per-service", type=int, default=1)
    s.add_argument("--replicas", type=int, default=3)
    s.add_argument("--chunk-size", type=parse_size, default=1 << 20)
    s.add_argument("--stripe", type=int, default=4)
    s.set_defaults(func=_guarded(cmd_mkfs))

    s = sub.add_parser("serve", help="run a cluster manager or a storage service")
    s.add_argument("role", choices=["manager", "storage"])
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: loopback only)")
    s.add_argument("--port", type=_port, default=0, help="port (0: pick a free one, see --port-file)")
    s.add_argument("--port-file", help="write HOST:PORT here once listening")
    s.add_argument("--kv", help="manager: metadata store URI")
    s.add_argument("--lease", type=float, default=3.0, help="manager: heartbeat lease in seconds")
    s.add_argument("--id", help="storage: service id (as given to mkfs --services)")
    s.add_argument("--manager", type=_hostport, help="storage: manager HOST:PORT")
    s.add_argument("--target", action="append", help="storage: a target directory (repeat; ids <id>-t0, -t1..)")
    s.add_argument("--no-sync", action="store_true", help="storage: skip fdatasync (tests/benchmarks only)")
    s.add_argument("--no-short-circuit", action="store_true",
                   help="storage: do not hand same-host clients chunk fds (every read goes through RPC)")
    s.add_argument("--capacity", type=parse_size, help="storage: bytes each target may hold (a quota)")
    common(s, fs=False)
    s.set_defaults(func=_guarded(cmd_serve))

    s = sub.add_parser("put", help="copy a local file into the file system")
    s.add_argument("local")
    s.add_argument("remote")
    common(s)
    s.set_defaults(func=_guarded(cmd_put))

    s = sub.add_parser("get", help="copy a file out of the file system")
    s.add_argument("remote")
    s.add_argument("local")
    common(s)
    s.set_defaults(func=_guarded(cmd_get))

    s = sub.add_parser("ls", help="list a directory")
    s.add_argument("path", nargs="?", default="/")
    s.add_argument("-l", "--long", action="store_true")
    common(s)
    s.set_defaults(func=_guarded(cmd_ls))

    s = sub.add_parser("stat", help="show a file's or directory's metadata")
    s.add_argument("path")
    common(s)
    s.set_defaults(func=_guarded(cmd_stat))

    s = sub.add_parser("rm", help="remove a file or (with -r) a directory tree")
    s.add_argument("path")
    s.add_argument("-r", "--recursive", action="store_true")
    common(s)
    s.set_defaults(func=_guarded(cmd_rm))

    s = sub.add_parser("mkdir", help="create a directory")
    s.add_argument("path")
    s.add_argument("-p", "--parents", action="store_true")
    s.add_argument("--chunk-size", type=parse_size)
    common(s)
    s.set_defaults(func=_guarded(cmd_mkdir))

    s = sub.add_parser("fsck", help="verify every chunk's CRC32C and repair corrupt replicas")
    s.add_argument("--no-repair", action="store_true")
    s.add_argument("--gc", action="store_true", help="also remove orphan chunks of deleted files")
    common(s)
    s.set_defaults(func=_guarded(cmd_fsck))

    s = sub.add_parser("bench", help="quick random-read benchmark on one file")
    s.add_argument("--path", default="/bench.bin")
    s.add_argument("--size", type=positive_size, default=256 << 20)
    s.add_argument("--block-size", type=positive_size, default=4096)
    s.add_argument("--iodepth", type=positive_int, default=16)
    s.add_argument("--seconds", type=float, default=5.0)
    common(s)
    s.set_defaults(func=_guarded(cmd_bench))


def _guarded(func):
    """Storage errors become one clear line and exit status 1 instead of a traceback."""
    def run(args) -> int:
        from torch_deepstack.storage.errors import StorageError

        try:
            return func(args)
        except (StorageError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return run


def main(argv: list[str] | None = None) -> int:
    """`python -m torch_deepstack.storage.cli ...` == `deepstack fs ...` (no other areas imported)."""
    parser = argparse.ArgumentParser(prog="deepstack")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["fs"] + list(sys.argv[1:] if argv is None else argv))
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
