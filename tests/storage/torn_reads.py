"""Shared check: concurrent whole-chunk overwrites must never be observed half done."""
import threading


def torn_chunk_reads(fs, path, chunk_size, n_chunks, n_writers, rounds, n_readers, read_chunks, join_s):
    """Writers overwrite whole chunks of `path` with uniform non-zero bytes while readers read every chunk with
    `read_chunks(file) -> list of bytes or exceptions`. Returns what readers saw that was not one writer's
    bytes (an exception, or a sample of the mixed byte values); empty means no torn read."""
    fs.write_bytes(path, bytes(n_chunks * chunk_size))
    stop = threading.Event()
    problems = []

    def writer(k):
        with fs.open(path, "r+b") as f:
            for i in range(rounds):
                f.pwrite(bytes([(k * 50 + i) % 251 + 1]) * chunk_size, (i % n_chunks) * chunk_size)
                f.flush()

    def reader():
        f = fs.open(path)
        while not stop.is_set():
            for got in read_chunks(f):
                if isinstance(got, Exception):
                    problems.append(got)
                elif len(set(got)) != 1:
                    problems.append(sorted(set(got))[:5])

    readers = [threading.Thread(target=reader) for _ in range(n_readers)]
    writers = [threading.Thread(target=writer, args=(k,)) for k in range(n_writers)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join(join_s)
    stop.set()
    for t in readers:
        t.join(join_s / 2)
    return problems
