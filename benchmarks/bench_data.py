"""Data loading and checkpoint throughput: DeepstackDataset against the alternatives, in the same run.

Loader rows (per sample size, per DataLoader num_workers): samples/s and GB/s in uniformly shuffled order over
the same samples stored as
- deepstack: one packed dataset on embedded deepstack storage (DeepstackDataset, batched=True, CRC verified)
  through DataLoader, and through PrefetchLoader (one process, 4 batched reads in flight);
- file-per-sample: each sample its own local file, read with plain open().read() (wrapped, not copied),
  default_collate; the same generator seed as deepstack's DataLoader in each round, so both read the same
  samples in the same shuffled order (checked on every round's first batch);
- litdata: LitData's optimize() chunks read by StreamingDataset(shuffle=True) + StreamingDataLoader (optional);
- fio: random reads of the sample size at size-aligned offsets over deepstack's own chunk files (the same
  bytes, block size and O_DIRECT; io_uring, the interface deepstack reads with, QD32, one job: the device
  ceiling; optional: Debian `fio`).
Equal statistics: --repeat rounds; a round is, per worker count, one fio run and then every reader once, the
readers' order rotating between rounds. Every row, fio included, reports the MEDIAN of its runs (best in the
note); the summary compares medians with medians, and each deepstack run is also divided by the fio run that
opened its round (median of those ratios). This disk's rate moves 2-5x within a minute, so a best-of ceiling
measures a burst, not the device (until 2026-11-29 20:07 UTC this benchmark compared best deepstack runs with
fio's best of 6, libaio QD32).
Page cache is dropped (posix_fadvise DONTNEED on every file) before every measurement; deepstack and fio read
with O_DIRECT anyway. Each run lasts --seconds after the first batch (worker start-up excluded; DataLoader
workers persist across the epochs of one window): every reader runs further epochs (each a new shuffle) until
the window is over, like fio's --runtime; before each further epoch of file-per-sample its files are dropped
from the page cache again, off the clock, or that epoch would come from memory; LitData, which serves later
epochs from chunks it keeps (4.4 GB/s in a test), is timed over its first epoch only (which if anything
favours it); fio draws a new random sequence every run (randrepeat=0). What stays warm for all alike:
metadata (directory entries and inodes of the sample files; deepstack's index and chunk table rows).

Checkpoint rows: dcp.save/dcp.load of a float32 state dict through DeepstackStorageWriter/Reader against
torch.save (+ fsync) / torch.load on a local file.

    python benchmarks/bench_data.py --quick          # a smoke run (~2 min)
    python benchmarks/bench_data.py                  # 200k x 4 KiB, 32k x 64 KiB, 2k x 1 MiB (minutes)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from torch_deepstack import storage
from torch_deepstack.data import (DeepstackDataset, DeepstackStorageReader, DeepstackStorageWriter, PackWriter,
                                  PrefetchLoader)
from torch_deepstack.testing.bench import BenchTable, update_markdown_block

KIB = 1024
DEFAULT_WORKER_BUFFERS = 6  # DeepstackDataset's default
FULL_SAMPLES = {4 * KIB: 200_000, 64 * KIB: 32_000, 1024 * KIB: 2_000}
QUICK_SAMPLES = {4 * KIB: 20_000, 64 * KIB: 3_000, 1024 * KIB: 300}


def sample_bytes(i: int, size: int) -> np.ndarray:
    """Sample i: its index in the first 8 bytes, then a cheap deterministic fill (checkable, not compressible)."""
    a = np.empty(size, dtype=np.uint8)
    a[:] = ((np.arange(size, dtype=np.uint32) * np.uint32(2654435761) + np.uint32(i * 40503 & 0xFFFFFFFF))
            >> np.uint32(13)).astype(np.uint8)
    a[:8] = np.frombuffer(np.int64(i).tobytes(), dtype=np.uint8)
    return a


def drop_cache(root: str, sync: bool = True) -> None:
    if sync:
        os.sync()  # DONTNEED leaves dirty pages alone: write them back first (not needed between epochs)
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# ---------------------------------------------------------------------------------------------- datasets
class FilePerSample(Dataset):
    def __init__(self, root: str, n: int):
        self.root, self.n = root, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        # plain open().read(); the bytes are wrapped, not copied (default_collate copies them into the batch,
        # as it does for any Dataset returning per-sample tensors)
        with open(os.path.join(self.root, f"{i // 1000:04d}", f"{i}.bin"), "rb") as f:
            return torch.frombuffer(f.read(), dtype=torch.uint8)


# torch.frombuffer warns once per process that bytes are read-only; the batch is a copy made by default_collate
warnings.filterwarnings("ignore", message="The given buffer is not writable")


def passthrough(x):
    return x


def prepare(base: str, size: int, n: int, want_litdata: bool) -> dict:
    """Write the three copies of n samples of `size` bytes (skipped when already there from an earlier run)."""
    d = os.path.join(base, f"s{size}")
    paths = {"fs": os.path.join(d, "fs"), "files": os.path.join(d, "files"), "litdata": os.path.join(d, "litdata")}
    stamp = os.path.join(d, "done.json")
    done = json.load(open(stamp)) if os.path.exists(stamp) else {}
    if done.get("n") != n:
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        done = {"n": n}
    if not done.get("t_deepstack"):
        t0 = time.perf_counter()
        fs = storage.connect(paths["fs"])
        with PackWriter(fs, "/ds", overwrite=True) as w:
            for i in range(n):
                w.add(torch.from_numpy(sample_bytes(i, size)))
        fs.close()
        done["t_deepstack"] = time.perf_counter() - t0
        print(f"  packed {n} x {size} B into deepstack in {done['t_deepstack']:.1f} s", flush=True)
    if not done.get("t_files"):
        t0 = time.perf_counter()
        for i in range(n):
            sub = os.path.join(paths["files"], f"{i // 1000:04d}")
            if i % 1000 == 0:
                os.makedirs(sub, exist_ok=True)
            with open(os.path.join(sub, f"{i}.bin"), "wb") as f:
                f.write(sample_bytes(i, size).tobytes())
        done["t_files"] = time.perf_counter() - t0
        print(f"  wrote {n} files in {done['t_files']:.1f} s", flush=True)
    if want_litdata and not done.get("t_litdata"):
        t0 = time.perf_counter()
        try:
            import litdata

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                litdata.optimize(fn=_litdata_sample(size), inputs=list(range(n)), output_dir=paths["litdata"],
                                 chunk_bytes="64MB", num_workers=1, mode="overwrite")
            done["t_litdata"] = time.perf_counter() - t0
            print(f"  litdata.optimize wrote {n} samples in {done['t_litdata']:.1f} s", flush=True)
        except Exception as e:  # noqa: BLE001 - an optional peer: report and go on
            done["t_litdata"] = 0
            done["litdata_error"] = f"{type(e).__name__}: {e}"
            print(f"  litdata unavailable: {done['litdata_error']}", flush=True)
    json.dump(done, open(stamp, "w"))
    return {**paths, **done}


class _litdata_sample:
    def __init__(self, size):
        self.size = size

    def __call__(self, i):
        return {"x": torch.from_numpy(sample_bytes(i, self.size))}


# ---------------------------------------------------------------------------------------------- measuring
def measure(loader, size: int, seconds: float, check, between_epochs=None,
            max_epochs: int | None = None) -> tuple[float, float, int]:
    """(samples/s, GB/s, samples) over `seconds` after the first batch (start-up excluded); further epochs run
    until the window is over, so every reader is timed over the same window as fio (a 2k x 1 MiB epoch takes
    ~1.5 s: timing one epoch against fio's 6 s had compared runs of different lengths, and the best of
    several short runs sits higher than the best of long ones). between_epochs: run before each further epoch,
    off the clock (readers through the page cache drop it there, or their second epoch would come from
    memory). max_epochs=1: a reader whose later epochs come from its own cache whatever the page cache holds
    (LitData keeps chunks) is timed over its first epoch only, a shorter window, which if anything favours it.
    `check(batch)` spot-checks content."""
    it = iter(loader)
    first = next(it)
    check(first)
    n, t0 = 0, time.perf_counter()
    deadline, paused, epochs = t0 + seconds, 0.0, 1
    while True:
        for batch in it:
            n += len(batch["x"] if isinstance(batch, dict) else batch)
            if time.perf_counter() > deadline:
                break
        else:  # epoch over inside the window: the next one (a new shuffle)
            if max_epochs is not None and epochs >= max_epochs:
                break
            epochs += 1
            if between_epochs is not None:
                t = time.perf_counter()
                between_epochs()
                t = time.perf_counter() - t
                paused += t
                deadline += t
            it = iter(loader)
            continue
        break
    dt = time.perf_counter() - t0 - paused
    del it
    kept = getattr(loader, "_iterator", None)  # persistent workers: stop them here, in this process (left to
    if kept is not None:                        # the GC, a forked worker of the next loader could run the
        kept._shutdown_workers()                # iterator's __del__ and fail its is_alive() check)
        loader._iterator = None
    return n / dt, n * size / dt / 1e9, n


FIRST_IDS: list = []  # sample ids of the first batch of the latest measured run (same order across readers)


def check_stacked(batch) -> None:
    x = batch["x"] if isinstance(batch, dict) else batch
    ids = x[:, :8].contiguous().view(torch.int64).reshape(-1)
    FIRST_IDS[:] = ids.tolist()
    for j in (0, len(ids) - 1):
        want = torch.from_numpy(sample_bytes(int(ids[j]), x.shape[1]))
        assert torch.equal(x[j], want), f"sample {int(ids[j])} read back wrong"


def run_fio(directory: str, size: int, seconds: float, engine: str = "io_uring", iodepth: int = 32) -> float | None:
    """IOPS of one fio run: uniform random reads of `size` bytes at size-aligned offsets over every file in
    `directory` (deepstack's own chunk files), O_DIRECT, one job keeping `iodepth` reads in flight, a new
    random sequence every run (randrepeat=0, as every reader run reshuffles)."""
    if shutil.which("fio") is None:
        return None
    out = subprocess.run(["fio", "--name=ceiling", f"--opendir={directory}", "--rw=randread", f"--bs={size}",
                          "--direct=1", f"--ioengine={engine}", f"--iodepth={iodepth}", "--numjobs=1",
                          f"--runtime={max(1, int(seconds))}", "--time_based", "--group_reporting",
                          "--randrepeat=0", "--output-format=json"], capture_output=True, text=True)
    if out.returncode != 0:
        print(f"  fio failed: {out.stderr.strip()[:200]}", flush=True)
        return None
    text = out.stdout[out.stdout.index("{"):]  # fio prints "opendir added N files" before the JSON
    return float(json.loads(text)["jobs"][0]["read"]["iops"])


NAMES = {"deepstack": "deepstack (DeepstackDataset)", "prefetch": "deepstack PrefetchLoader (depth 4)",
         "files": "file-per-sample (open().read())", "litdata": "litdata StreamingDataset(shuffle=True)"}


def _median(v) -> float:
    return float(np.median(v)) if len(v) else 0.0


def loader_rows(args, table: BenchTable, summary: dict) -> None:
    """Per size: --repeat rounds; a round is, per worker count, one fio run and then every reader once (the
    readers' order rotating from round to round, so none always follows fio). Each row reports the median and
    the best of its runs; fio likewise. Ratios compare medians with medians (the best reader configuration by
    median against fio's median), and each deepstack run is also paired with the fio run that opened its round
    (median of those ratios): the disk's rate moves 2-5x within a minute, so a best-of ceiling is a burst."""
    sizes = [int(s) * KIB for s in args.sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    counts = QUICK_SAMPLES if args.quick else FULL_SAMPLES
    for size in sizes:
        n = args.samples or counts[size]
        print(f"== {size // KIB} KiB x {n} samples, load average {os.getloadavg()[0]:.2f}", flush=True)
        p = prepare(args.dir, size, n, not args.no_litdata)
        batch = max(8, min(256, (4 << 20) // size))
        chunk_dir = os.path.join(p["fs"], "target", "data")
        runs: dict[tuple[str, int], list[float]] = {}   # (reader, workers) -> samples/s of every run
        pairs: dict[tuple[str, int], list[float]] = {}  # (reader, workers) -> run / its round's fio run
        fio_runs: list[float] = []
        loads: list[float] = []
        readers = ["prefetch", "deepstack", "files"] + ([] if args.no_litdata or not p.get("t_litdata")
                                                        else ["litdata"])
        for rep in range(args.repeat):
            for w in workers:
                # persistent workers: the epochs after the first inside one timed window reuse them (every reader)
                common = dict(batch_size=batch, num_workers=w, persistent_workers=w > 0,
                              multiprocessing_context=args.mp_context if w else None)
                fio_now = 0.0
                if not args.no_fio:
                    fio_now = run_fio(chunk_dir, size, args.seconds, args.fio_engine, args.fio_iodepth) or 0.0
                    if fio_now:
                        fio_runs.append(fio_now)
                loads.append(os.getloadavg()[0])
                k = (rep * len(workers) + workers.index(w)) % len(readers)
                first_ids: dict[str, list] = {}
                for name in readers[k:] + readers[:k]:
                    if name == "prefetch" and w != workers[0]:
                        continue  # in-process: no workers; one run per round
                    key = (name, 0 if name == "prefetch" else w)
                    # Same order for every reader in a round: each gets its own generator with the round's seed
                    # (one shared generator would hand each reader the state the previous one left).
                    g = torch.Generator().manual_seed(rep)
                    r = _run_reader(name, p, n, size, batch, g, common, args)
                    runs.setdefault(key, []).append(r)
                    first_ids[name] = list(FIRST_IDS)
                    print(f"  round {rep}, {key[1]} workers: {name} {r:.0f} samples/s (fio {fio_now:.0f}), load "
                          f"{os.getloadavg()[0]:.2f}", flush=True)
                    if fio_now and name in ("prefetch", "deepstack"):
                        pairs.setdefault(key, []).append(r / fio_now)
                # both DataLoaders of a round read the same samples in the same shuffled order
                assert first_ids["deepstack"] == first_ids["files"], "deepstack and file-per-sample orders differ"
        order = ["deepstack", "files", "litdata", "prefetch"]
        for (name, w), v in sorted(runs.items(), key=lambda kv: (kv[0][0] == "prefetch", kv[0][1],
                                                                 order.index(kv[0][0]))):
            pr = pairs.get((name, w))
            note = f"median of {len(v)}, best {max(v):.0f}"
            if pr:
                note += f"; / its round's fio: median {_median(pr):.2f}"
            table.add(f"{size // KIB} KiB", n, NAMES[name], w if name != "prefetch" else 0, _median(v),
                      _median(v) * size / 1e9, note)
        fio = _median(fio_runs) or None
        if fio:
            table.add(f"{size // KIB} KiB", n, f"fio randread ({args.fio_engine}, O_DIRECT, QD{args.fio_iodepth})",
                      "-", fio, fio * size / 1e9, f"ceiling: median of {len(fio_runs)}, best {max(fio_runs):.0f}")

        def best_of(reader_names):
            cands = [(_median(v), key) for key, v in runs.items() if key[0] in reader_names]
            return max(cands, default=(0.0, None))

        best, best_key = best_of(("deepstack", "prefetch"))
        files, _ = best_of(("files",))
        lit, _ = best_of(("litdata",))
        ratio = {"best": best_key, "vs_fio": best / fio if fio else None,
                 "paired": _median(pairs.get(best_key, [])) or None, "pairs": len(pairs.get(best_key, [])),
                 "vs_files": best / files if files else None, "vs_litdata": best / lit if lit else None,
                 "fio_median": fio, "fio_best": max(fio_runs, default=None), "load": (min(loads), max(loads))}
        summary[f"{size // KIB} KiB"] = ratio
        print(f"  best deepstack (by median): {best:.0f} samples/s {best_key}; ratios {ratio}", flush=True)


def _run_reader(name: str, p: dict, n: int, size: int, batch: int, g, common: dict, args) -> float:
    """samples/s of one timed run of one reader (the page cache dropped first)."""
    if name == "prefetch":
        drop_cache(p["fs"])
        loader = PrefetchLoader(DeepstackDataset(p["fs"], "/ds", batched=True), batch, shuffle=True,
                                generator=g, depth=4)
        return measure(loader, size, args.seconds, check_stacked)[0]
    if name == "deepstack":
        ds = DeepstackDataset(p["fs"], "/ds", batched=True)
        drop_cache(p["fs"])
        return measure(DataLoader(ds, shuffle=True, generator=g, collate_fn=ds.collate_fn, **common),
                       size, args.seconds, check_stacked)[0]
    if name == "files":
        drop_cache(p["files"])
        return measure(DataLoader(FilePerSample(p["files"], n), shuffle=True, generator=g, **common), size,
                       args.seconds, check_stacked, between_epochs=lambda: drop_cache(p["files"], sync=False))[0]
    from litdata import StreamingDataLoader, StreamingDataset

    drop_cache(p["litdata"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lds = StreamingDataset(input_dir=p["litdata"], shuffle=True, seed=int(g.initial_seed()))
        return measure(StreamingDataLoader(lds, batch_size=batch, num_workers=common["num_workers"],
                                           persistent_workers=common["persistent_workers"]), size, args.seconds,
                       check_stacked, max_epochs=1)[0]


def ab_worker_buffers(args) -> None:
    """Paired A/B of DataLoader workers' batch buffers: per size and worker count, rounds of two runs over the
    same window, `worker_buffers=0` (a fresh shared-memory buffer per batch) and the default (recycled slabs),
    their order alternating between rounds. Reports samples/s and the CPU time per sample of the main process
    and its workers together (workers are joined at the end of each run, so their time is in RUSAGE_CHILDREN;
    worker start-up is included, the same for both)."""
    import resource

    sizes = [int(s) * KIB for s in args.sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",") if int(w) > 0]
    counts = QUICK_SAMPLES if args.quick else FULL_SAMPLES
    print(f"A/B worker_buffers, {args.ab_buffers} rounds of {args.seconds} s, load average {os.getloadavg()}",
          flush=True)
    for size in sizes:
        n = args.samples or counts[size]
        p = prepare(args.dir, size, n, False)
        batch = max(8, min(256, (4 << 20) // size))
        for w in workers:
            runs: dict[str, list] = {"fresh": [], "reused": []}
            for rnd in range(args.ab_buffers):
                order = ["fresh", "reused"] if rnd % 2 == 0 else ["reused", "fresh"]
                for name in order:
                    ds = DeepstackDataset(p["fs"], "/ds", batched=True,
                                          worker_buffers=0 if name == "fresh" else DEFAULT_WORKER_BUFFERS)
                    drop_cache(p["fs"])
                    r0, c0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
                    sps, _, got = measure(DataLoader(ds, shuffle=True, generator=torch.Generator().manual_seed(rnd),
                                                     collate_fn=ds.collate_fn, batch_size=batch, num_workers=w,
                                                     persistent_workers=True, multiprocessing_context=args.mp_context),
                                          size, args.seconds, check_stacked)
                    r1, c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
                    usr = (r1.ru_utime - r0.ru_utime + c1.ru_utime - c0.ru_utime) / got * 1e6
                    sys_ = (r1.ru_stime - r0.ru_stime + c1.ru_stime - c0.ru_stime) / got * 1e6
                    runs[name].append((sps, usr, sys_))
                f, r = runs["fresh"][-1], runs["reused"][-1]
                print(f"{size // KIB} KiB, {w} workers, round {rnd}: fresh {f[0]:.0f} samples/s "
                      f"(user {f[1]:.0f} + sys {f[2]:.0f} us/sample), reused {r[0]:.0f} samples/s (user {r[1]:.0f} "
                      f"+ sys {r[2]:.0f} us/sample), first: {order[0]}, load {os.getloadavg()[0]:.2f}", flush=True)
            med = {k: np.median(np.array(v), axis=0) for k, v in runs.items()}
            ratio = float(np.median([r[0] / f[0] for f, r in zip(runs["fresh"], runs["reused"])]))
            print(f"{size // KIB} KiB, {w} workers, medians of {args.ab_buffers}: fresh {med['fresh'][0]:.0f} "
                  f"samples/s, {med['fresh'][1]:.0f} + {med['fresh'][2]:.0f} us/sample; reused "
                  f"{med['reused'][0]:.0f} samples/s, {med['reused'][1]:.0f} + {med['reused'][2]:.0f} us/sample; "
                  f"paired throughput ratio {ratio:.2f}", flush=True)


def checkpoint_rows(args, table: BenchTable) -> None:
    mb = 128 if args.quick else 1024
    g = torch.Generator().manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(mb * (1 << 20) // 4 // 16, generator=g) for i in range(16)}
    nbytes = sum(t.numel() * 4 for t in state.values())
    import torch.distributed.checkpoint as dcp

    d = os.path.join(args.dir, "ckpt")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    fs = storage.connect(os.path.join(d, "fs"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        dcp.save(state, storage_writer=DeepstackStorageWriter(fs, "/ckpt", thread_count=4))
        save_s = time.perf_counter() - t0
        target = {k: torch.empty_like(v) for k, v in state.items()}
        t0 = time.perf_counter()
        reader = DeepstackStorageReader(fs, "/ckpt")
        dcp.load(target, storage_reader=reader)
        load_s = time.perf_counter() - t0
        reader.close()
    assert all(torch.equal(target[k], state[k]) for k in state)
    fs.close()
    local = os.path.join(d, "state.pt")
    t0 = time.perf_counter()
    with open(local, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    tsave = time.perf_counter() - t0
    drop_cache(d)
    t0 = time.perf_counter()
    back = torch.load(local, weights_only=True)
    tload = time.perf_counter() - t0
    assert all(torch.equal(back[k], state[k]) for k in state)
    gb = nbytes / 1e9
    table.add(f"checkpoint {mb} MiB", 16, "deepstack DCP save", "-", gb / save_s, gb / save_s, "")
    table.add(f"checkpoint {mb} MiB", 16, "torch.save + fsync (local file)", "-", gb / tsave, gb / tsave, "")
    table.add(f"checkpoint {mb} MiB", 16, "deepstack DCP load", "-", gb / load_s, gb / load_s, "")
    table.add(f"checkpoint {mb} MiB", 16, "torch.load (cold page cache)", "-", gb / tload, gb / tload, "")
    shutil.rmtree(d, ignore_errors=True)


def kv_rows(args) -> BenchTable:
    """KV-cache offload: MLA pages (bf16 [64, 1, 576] = 72 KiB, FP8 [64, 1, 656] = 41 KiB) saved, then loaded
    back in random batches of 64 keys (one batched read per batch)."""
    from torch_deepstack.data import KVCacheStore, prefix_block_keys

    t = BenchTable("data", "kvcache", "KV-cache block offload (embedded storage)",
                   ["layout", "blocks", "op", "blocks/s", "GB/s"])
    n = 256 if args.quick else 2048
    d = os.path.join(args.dir, "kv")
    shutil.rmtree(d, ignore_errors=True)
    fs = storage.connect(os.path.join(d, "fs"))
    for name, blocks in (("bf16 [64,1,576]", torch.randn(n, 64, 1, 576).to(torch.bfloat16)),
                         ("fp8 [64,1,656]", torch.randint(0, 256, (n, 64, 1, 656), dtype=torch.uint8))):
        store = KVCacheStore(fs, f"/kv/{name[:4]}")
        keys = prefix_block_keys(range(64 * n), namespace=name)
        per = blocks[0].numel() * blocks.element_size()
        t0 = time.perf_counter()
        store.save(keys, blocks)
        dt = time.perf_counter() - t0
        t.add(name, n, "save", n / dt, n * per / dt / 1e9)
        drop_cache(d)
        order = np.random.default_rng(0).permutation(n)
        out = torch.empty((64, *blocks.shape[1:]), dtype=blocks.dtype)
        t0 = time.perf_counter()
        for k in range(0, n, 64):
            idx = order[k:k + 64]
            found = store.load([keys[i] for i in idx], out[:len(idx)])
            assert found.all()
        dt = time.perf_counter() - t0
        assert torch.equal(out[:len(idx)].view(torch.uint8), blocks[idx].view(torch.uint8))
        t.add(name, n, "load (random batches of 64)", n / dt, n * per / dt / 1e9)
    fs.close()
    shutil.rmtree(d, ignore_errors=True)
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small data, short runs (smoke test)")
    ap.add_argument("--dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "deepstack-bench-data"),
                    help="where the data copies live (reused across runs)")
    ap.add_argument("--sizes", default="4,64,1024", help="sample sizes in KiB")
    ap.add_argument("--workers", default="0,2,8", help="DataLoader num_workers values")
    ap.add_argument("--samples", type=int, default=0, help="samples per size (default: per mode)")
    ap.add_argument("--seconds", type=float, default=0, help="seconds per measurement (default 3 quick, 4 full)")
    ap.add_argument("--mp-context", default="fork", choices=["fork", "spawn", "forkserver"],
                    help="DataLoader worker start method")
    ap.add_argument("--repeat", type=int, default=0, help="rounds (runs per row, medians reported; 1 quick, 4 full)")
    ap.add_argument("--fio-engine", default="io_uring", help="fio ioengine for the ceiling (deepstack reads with "
                    "io_uring)")
    ap.add_argument("--fio-iodepth", type=int, default=32, help="fio queue depth for the ceiling")
    ap.add_argument("--no-litdata", action="store_true")
    ap.add_argument("--no-fio", action="store_true")
    ap.add_argument("--no-checkpoint", action="store_true")
    ap.add_argument("--no-loader", action="store_true", help="skip the DataLoader rows")
    ap.add_argument("--no-kv", action="store_true", help="skip the KV-cache offload rows")
    ap.add_argument("--save", action="store_true", help="record the table in docs/benchmarks.md (## Data)")
    ap.add_argument("--ab-buffers", type=int, default=0, metavar="ROUNDS",
                    help="only a paired A/B of the workers' batch buffers (fresh per batch vs recycled), ROUNDS "
                         "rounds per size and worker count (--sizes, --workers)")
    args = ap.parse_args()
    args.seconds = args.seconds or (3.0 if args.quick else 4.0)
    args.repeat = args.repeat or (1 if args.quick else 4)
    os.makedirs(args.dir, exist_ok=True)
    if args.ab_buffers:
        ab_worker_buffers(args)
        return 0
    table = BenchTable("data", "loader", "DataLoader throughput, shuffled, and checkpoint save/load",
                       ["data", "samples", "reader", "workers", "samples/s", "GB/s", "note"])
    table.notes.append(f"machine: {os.cpu_count()} CPU cores; data under {args.dir} "
                       f"({_disk_of(args.dir)}); page cache dropped before each row")
    summary: dict = {}
    if not args.no_loader:
        loader_rows(args, table, summary)
    if not args.no_checkpoint:
        checkpoint_rows(args, table)
    for k, r in summary.items():
        table.notes.append(
            f"{k}: best deepstack row by median ({NAMES[r['best'][0]]}, {r['best'][1]} workers) / fio median = "
            f"{_pct(r.get('vs_fio'))} (median of its {r.get('pairs')} runs / the fio run opening their round: "
            f"{_pct(r.get('paired'))}; fio median {r.get('fio_median') or 0:.0f}, best {r.get('fio_best') or 0:.0f} "
            f"IOPS), / best file-per-sample median = {_x(r.get('vs_files'))}, / best litdata median = "
            f"{_x(r.get('vs_litdata'))}; load average {r['load'][0]:.1f}-{r['load'][1]:.1f}")
    tables = [table] if table.rows else []
    if not args.no_kv:
        tables.append(kv_rows(args))
    command = "python " + " ".join(sys.argv)
    for t in tables:
        print("\n" + t.markdown(command))
    if args.save:
        docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "benchmarks.md")
        for t in tables:
            key = f"{t.area}:{t.name}"
            text = open(docs).read() if os.path.exists(docs) else "# Benchmarks\n"
            if f"<!-- bench:{key} start -->" not in text:  # new blocks go at the end of the Data section
                block = f"<!-- bench:{key} start -->\n<!-- bench:{key} end -->\n"
                if "<!-- bench:data:loader end -->" in text:
                    text = text.replace("<!-- bench:data:loader end -->", "<!-- bench:data:loader end -->\n\n"
                                        + block.rstrip("\n"), 1)
                else:
                    text = text.rstrip("\n") + "\n\n## Data\n\n" + block
                open(docs, "w").write(text)
            update_markdown_block(__import__("pathlib").Path(docs), key, t.markdown(command))
    return 0


def _disk_of(path: str) -> str:
    try:
        out = subprocess.run(["df", "--output=source", path], capture_output=True, text=True).stdout.split()
        return out[-1]
    except Exception:  # noqa: BLE001
        return "?"


def _pct(v):
    return "n/a" if v is None else f"{100 * v:.0f}%"


def _x(v):
    return "n/a" if v is None else f"{v:.2f}x"


if __name__ == "__main__":
    sys.exit(main())
