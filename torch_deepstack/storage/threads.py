"""Thread pools that survive fork().

A forked child (a DataLoader worker under the fork start method) inherits the parent's ThreadPoolExecutor object
but none of its worker threads. Work submitted there waits forever once the inherited bookkeeping says the pool
already has its maximum of threads, which is how a forked worker's reads hung. ForkSafeExecutor makes the child a
pool of its own on first use; the parent's pool is left alone (and a child never shuts it down).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

_create_lock = threading.Lock()


def _fresh_lock_after_fork() -> None:
    global _create_lock
    _create_lock = threading.Lock()  # a parent thread may have held it at the fork


os.register_at_fork(after_in_child=_fresh_lock_after_fork)


class ForkSafeExecutor:
    """The subset of ThreadPoolExecutor the storage clients use (submit, shutdown), valid in forked children."""

    def __init__(self, max_workers: int, thread_name_prefix: str = ""):
        self._max_workers, self._prefix = max_workers, thread_name_prefix
        self._pid = os.getpid()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=thread_name_prefix)

    def _current(self) -> ThreadPoolExecutor:
        if self._pid != os.getpid():
            with _create_lock:
                if self._pid != os.getpid():
                    self._pool = ThreadPoolExecutor(max_workers=self._max_workers,
                                                    thread_name_prefix=self._prefix)
                    self._pid = os.getpid()
        return self._pool

    def submit(self, fn, /, *args, **kwargs) -> Future:
        return self._current().submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True) -> None:
        if self._pid == os.getpid():
            self._pool.shutdown(wait=wait)


def wait_all(futures) -> None:
    """Wait for every future, then raise the first error. Returning at the first failure would let the caller clean
    up while sibling tasks still run: the client reclaims a failed write's chunks, and a chunk write that finished
    after that reclaim held its space until fsck --gc (seen as a flaky full-disk test under load)."""
    first = None
    for f in futures:
        try:
            f.result()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the siblings
            if first is None:
                first = e
    if first is not None:
        raise first


def run_each(pool, fn, items) -> None:
    """fn(item) for every item, on the pool when there are several; returns (or raises the first error) only when
    all have finished (wait_all)."""
    if len(items) == 1:
        fn(items[0])
        return
    wait_all([pool.submit(fn, it) for it in items])
