"""Run a function on a gloo world of N spawned processes, with a hard deadline (no test can hang)."""
from __future__ import annotations

import datetime
import os
import time
import traceback

import torch.multiprocessing as mp

from torch_deepstack.testing.local_cluster import free_port


def _entry(rank, world_size, port, fn, args, errq, backend, pg_timeout_s):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        fn(rank, world_size, *args)
        errq.put((rank, None))
    except BaseException:  # noqa: BLE001 - ship every failure to the parent
        errq.put((rank, traceback.format_exc()))
        os._exit(1)
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


def run_world(fn, world_size: int, *args, timeout_s: float = 120, backend: str = "gloo",
              pg_timeout_s: float = 60, allow_exit: tuple = ()) -> None:
    """Run fn(rank, world_size, *args) on `world_size` processes; re-raise the first failure with its traceback.

    `allow_exit` lists ranks that may end without reporting (a test that kills a peer on purpose)."""
    ctx = mp.get_context("spawn")
    errq = ctx.SimpleQueue()
    pc = mp.start_processes(_entry, args=(world_size, free_port(), fn, args, errq, backend, pg_timeout_s),
                            nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    reports: dict[int, str | None] = {}
    try:
        while len(reports) < world_size - len(allow_exit):
            while not errq.empty():
                rank, err = errq.get()
                reports[rank] = err
                if err is not None:
                    raise AssertionError(f"rank {rank} of {world_size} failed:\n{err}")
            if all(not p.is_alive() for p in pc.processes):
                while not errq.empty():
                    rank, err = errq.get()
                    reports[rank] = err
                    if err is not None:
                        raise AssertionError(f"rank {rank} of {world_size} failed:\n{err}")
                missing = set(range(world_size)) - set(reports) - set(allow_exit)
                if missing:
                    raise AssertionError(f"ranks {sorted(missing)} exited without reporting")
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"world of {world_size} did not finish within {timeout_s} s "
                                     f"(reported: {sorted(reports)})")
            time.sleep(0.05)
    finally:
        for p in pc.processes:
            if p.is_alive():
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
