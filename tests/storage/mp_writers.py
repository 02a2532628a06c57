"""Worker for the multi-process stress test: a process that updates disjoint slots of shared chunks."""
from torch_deepstack.storage.chunk_engine import ChunkEngine

SLOT = 256


def slot_writer(root, rank, nranks, chunks, slots, rounds, chunk_size, start, results):
    """Through its own chunk engine on `root`, write `rounds` small updates: round i goes to chunk i % len(chunks),
    into one of this rank's slots (slot s of a chunk belongs to rank s % nranks, so no two ranks ever write the same
    byte). Puts (rank, {(chunk, slot): the byte value it wrote last}) on `results`."""
    eng = ChunkEngine(root, "t0", sync=False)
    try:
        last = {}
        start.wait(60)  # every writer starts together, so their updates of each chunk overlap in time
        for i in range(rounds):
            cid = chunks[i % len(chunks)]
            slot = rank + nranks * ((i // len(chunks)) % (slots // nranks))
            value = (i * nranks + rank) % 255 + 1
            eng.update(cid, slot * SLOT, bytes([value]) * SLOT, chunk_size)
            last[(cid, slot)] = value
        results.put((rank, last))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        results.put((rank, repr(e)))
    finally:
        eng.close()
