"""Before/after A/B of the embedded read path against fio: an earlier commit's storage code and the working tree,
each in its own long-lived process reading one file, in interleaved rounds (fio first, then the four runs of
ours in an order rotating between rounds), ratios against the round's fio run, medians reported.

    python benchmarks/ab_storage.py --before 93be5aa                       # every size and queue depth
    python benchmarks/ab_storage.py --before HEAD~1 --points 4K:16,128K:1 --rounds 6
    python benchmarks/ab_storage.py --before HEAD~1 --points 4K:16 --hogs 2   # under two busy-looping processes
    python benchmarks/ab_storage.py --alternate DEEPSTACK_URING_HEAD=0,1 --points 4K:4,4K:16,4K:64

--alternate NAME=A,B times one process's calls with the environment variable NAME switched between the values call
by call (for switches the C helper reads per batch, such as DEEPSTACK_URING_HEAD): no fio, no rounds; each call's
time, so the disk's drift falls on both sides alike. Reports the median time per call and the IOPS of the mean.

Both sides run the current tree's benchmark functions (bench_storage.bench_reads / bench_reads_array), so only
the library differs. The earlier commit is taken with `git archive` (torch_deepstack, meta_impls, src) into a
temporary directory; its C helper is built on first use like the tree's (cached by content hash).
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))


def worker(tree: str, fsdir: str, size: int) -> int:
    """Serve 'api bs qd seconds' lines on stdin with 'iops cpu' lines, reading with the library of `tree`."""
    sys.path.insert(0, tree)
    import torch_deepstack.storage as st  # the library under test, imported before the benchmark module

    if not st.__file__.startswith(tree):
        raise RuntimeError(f"imported {st.__file__}, not from {tree}")
    sys.path.insert(0, HERE)
    import bench_storage as B

    fs = st.connect(fsdir, read_only=True)
    print("ready", flush=True)
    for line in sys.stdin:
        api, bs, qd, secs = line.split()
        fn = B.bench_reads_array if api == "array" else B.bench_reads
        gc.collect()
        c0 = os.times()
        iops = fn(fs, "/data.bin", size, int(bs), int(qd), float(secs))
        c1 = os.times()
        print(f"{iops} {(c1.user - c0.user + c1.system - c0.system) / (c1.elapsed - c0.elapsed)}", flush=True)
    fs.close()
    return 0


def alternate(B, st, spec: str, points, apis, size: int) -> None:
    """--alternate: calls of each API with NAME switched between the values call by call, in this process
    (B: the bench_storage module, st: torch_deepstack.storage)."""
    name, values = spec.split("=", 1)
    values = values.split(",")
    base = tempfile.mkdtemp(prefix="deepstack-ab-")
    try:
        fs = st.connect(os.path.join(base, "fs"), chunk_size=4 << 20)
        B.write_file(fs, "/data.bin", size, 4 << 20)
        f = fs.open("/data.bin")
        print(f"{name} in {values}, call by call; {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, load "
              f"{os.getloadavg()[0]:.2f}", flush=True)
        print("| block | qd | API | " + " | ".join(f"{name}={v}: median us, IOPS" for v in values) + " |")
        print("| ---: | ---: | --- | " + " | ".join("---:" for _ in values) + " |")
        for bs, qd in points:
            buf = B.aligned(qd * bs)
            rows = [buf[i * bs:(i + 1) * bs] for i in range(qd)]
            lengths, dests = np.full(qd, bs, np.int64), np.arange(qd, dtype=np.int64) * bs
            offs = np.random.default_rng(qd).integers(0, size // bs, (max(400, 100_000 // qd), qd)) * bs
            times = {(a, v): [] for a in apis for v in values}
            gc.collect()
            for i, row in enumerate(offs):
                a, v = apis[i // len(values) % len(apis)], values[i % len(values)]
                os.environ[name] = v
                t = time.perf_counter()
                if a == "array":
                    fs.read_array(f, row, lengths, buf, dests).raise_first()
                else:
                    B.read_batch(fs, f, row, bs, rows)
                times[(a, v)].append(time.perf_counter() - t)
            for a in apis:
                cells = []
                for v in values:
                    x = np.array(times[(a, v)][10:])
                    cells.append(f"{np.median(x) * 1e6:.1f}, {qd / x.mean():.0f}")
                print(f"| {bs >> 10} KiB | {qd} | {a} | " + " | ".join(cells) + " |", flush=True)
        fs.close()
    finally:
        os.environ.pop(name, None)
        shutil.rmtree(base, ignore_errors=True)


def hog(seconds: float) -> None:
    end = time.time() + seconds
    x = 0
    while time.time() < end:
        for i in range(100000):
            x += i


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", help="git revision whose storage code is the 'before' side")
    ap.add_argument("--alternate", metavar="NAME=A,B", help="one process, NAME switched call by call (no fio)")
    ap.add_argument("--points", default="4K:1,4K:4,4K:16,4K:64,128K:1,128K:4,128K:16,128K:64,1M:1,1M:4,1M:16,1M:64")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--apis", default="array,batch", help="array (read_array) and/or batch (batch_read)")
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--size", type=int, default=256 << 20)
    ap.add_argument("--hogs", type=int, default=0, help="busy-looping processes running during the rounds")
    ap.add_argument("--worker", nargs=2, metavar=("TREE", "FSDIR"), help=argparse.SUPPRESS)
    ap.add_argument("--hog", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker[0], args.worker[1], args.size)
    if args.hog:
        hog(args.hog)
        return 0
    if not args.before and not args.alternate:
        ap.error("--before REV (or --alternate NAME=A,B) is required")
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    import bench_storage as B
    import torch_deepstack.storage as st

    points = [(B._size(p.split(":")[0]), int(p.split(":")[1])) for p in args.points.split(",")]
    apis = args.apis.split(",")
    if args.alternate:
        alternate(B, st, args.alternate, points, apis, args.size)
        return 0
    base = tempfile.mkdtemp(prefix="deepstack-ab-")
    procs: dict = {}
    hogs: list = []
    try:
        old = os.path.join(base, "before")
        os.makedirs(old)
        tar = subprocess.run(["git", "-C", ROOT, "archive", args.before, "torch_deepstack", "meta_impls", "src"],
                             capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", old], input=tar, check=True)
        fsdir = os.path.join(base, "fs")
        emb = st.connect(fsdir, chunk_size=4 << 20)
        B.write_file(emb, "/data.bin", args.size, 4 << 20)
        files = B.chunk_files(emb, "/data.bin")
        emb.close()
        me = os.path.abspath(__file__)
        for name, tree in (("before", old), ("after", ROOT)):
            p = subprocess.Popen([sys.executable, me, "--worker", tree, fsdir, "--size", str(args.size)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs[name] = p
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the {name} worker did not start")
        if args.hogs:
            total = len(points) * args.rounds * (2 + len(apis) * 2 * args.seconds) + 60
            hogs = [subprocess.Popen([sys.executable, me, "--hog", str(total)]) for _ in range(args.hogs)]
            time.sleep(1)

        def run(name, api, bs, qd):
            p = procs[name]
            p.stdin.write(f"{api} {bs} {qd} {args.seconds}\n")
            p.stdin.flush()
            iops, cpu = p.stdout.readline().split()
            return float(iops), float(cpu)

        print(f"before = {args.before}, after = working tree; {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} "
              f"UTC, load {os.getloadavg()}, hogs {args.hogs}", flush=True)
        rows = []
        for bs, qd in points:
            ratio = {(n, a): [] for a in apis for n in procs}
            cpu = {(n, a): [] for a in apis for n in procs}
            loads = []
            for k in range(args.rounds):
                fio = B.fio_reads(files, bs, qd, max(1, round(args.seconds)))
                order = [(n, a) for n in procs for a in apis]
                order = order[k % len(order):] + order[:k % len(order)]
                got = []
                for n, a in order:
                    v, c = run(n, a, bs, qd)
                    ratio[(n, a)].append(v / fio)
                    cpu[(n, a)].append(c)
                    got.append(f"{n}/{a} {v / fio:.2f}")
                loads.append(os.getloadavg()[0])
                print(f"{bs >> 10} KiB qd {qd} round {k}: fio {fio:.0f} IOPS, load {loads[-1]:.2f}: "
                      + ", ".join(got), flush=True)
            rows.append(f"| {bs >> 10} KiB | {qd} | " + " | ".join(
                f"{np.median(ratio[(n, a)]):.2f} ({np.median(cpu[(n, a)]):.2f})" for a in apis for n in procs)
                + f" | {min(loads):.1f}-{max(loads):.1f} |")
            print(rows[-1], flush=True)
        print("\nMedians of per-round ratios to fio (median CPU of our process, in cores):")
        print("| block | qd | " + " | ".join(f"{a} {n}" for a in apis for n in procs) + " | load |")
        print("| ---: | ---: | " + " | ".join("---:" for _ in apis for _ in procs) + " | ---: |")
        print("\n".join(rows))
    finally:
        for p in procs.values():
            if p.stdin:
                p.stdin.close()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for h in hogs:
            h.kill()
            h.wait()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
