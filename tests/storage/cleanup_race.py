"""Shared check: a failed write's cleanup must not remove chunks another handle is about to publish."""
import threading

import pytest

from torch_deepstack.storage import StorageError


def cleanup_between_chunk_writes_and_publish(fs, chunk_size, first, install_chunk_hook, failure):
    """Handle A writes [chunk_size / 2, 2 * chunk_size) of an empty file; its chunk 1 fails with `failure`, so A
    cleans up the chunks it wrote past the end. Handle B writes [0, 100) - the same chunk 0 - and A's cleanup runs
    between B's chunk write and B's length update. `first` says whose chunk 0 write comes first ("A": B's merges
    into A's version, "B": A's merges into B's). install_chunk_hook(hook) must route every chunk write through
    hook(chunk id, data, write), where write() does the real one and returns its result.

    Returns what reads back after B's flush (acknowledged): B's 100 bytes unless the cleanup removed them."""
    fs.write_bytes("/race", b"")
    a, b = fs.open("/race", "r+b"), fs.open("/race", "r+b")
    a_wrote_chunk0, b_wrote_chunks = threading.Event(), threading.Event()
    a_failed = []

    def hook(cid, data, write):
        by_a, index = bytes(data[:1]) == b"A", int(cid.split("-")[1], 16)
        if by_a and index == 1:
            assert b_wrote_chunks.wait(10)
            raise failure
        result = write()
        if by_a and index == 0:
            a_wrote_chunk0.set()
        return result

    def write_a():
        a.pwrite(b"A" * (chunk_size + chunk_size // 2), chunk_size // 2)
        try:
            a.flush()
        except StorageError as e:
            a_failed.append(e)

    thread_a = threading.Thread(target=write_a)
    real_set_length = fs.meta.set_length

    def set_length(ino, length, **kw):  # only B gets here (A fails before): its chunk is written, not published
        if first == "B":
            thread_a.start()
        b_wrote_chunks.set()
        thread_a.join(20)  # A's failed write, cleanup included
        return real_set_length(ino, length, **kw)

    install_chunk_hook(hook)
    fs.meta.set_length = set_length
    try:
        if first == "A":
            thread_a.start()
            assert a_wrote_chunk0.wait(10)
        b.write(b"B" * 100)
        b.close()
    finally:
        del fs.meta.set_length
    assert not thread_a.is_alive() and a_failed == [failure]
    got = fs.read_bytes("/race")
    with pytest.raises(type(failure)):  # A's bytes stayed buffered: closing retries them, and fails again
        a.close()
    return got
