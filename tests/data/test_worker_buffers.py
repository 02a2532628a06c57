"""DataLoader workers reuse shared-memory batch buffers (torch_deepstack/data/shm_pool.py): batches are right,
buffers are recycled, and a batch (or any view of it) the main process still holds is never overwritten."""
import gc
import pickle
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from torch_deepstack.data import DeepstackDataset, DeepstackIterableDataset, pack, shm_pool

from datahelpers import as_list, sample_bytes

N, SIZE = 240, 4096


def pattern(i: int) -> torch.Tensor:
    """Sample i: 4 KiB whose first 8 bytes hold i, the rest a pattern of i (any overwrite shows)."""
    a = (np.arange(SIZE, dtype=np.uint32) * 2654435761 + i * 40503).astype(np.uint8)
    a[:8] = np.frombuffer(np.int64(i).tobytes(), np.uint8)
    return torch.from_numpy(a)


@pytest.fixture
def page_pack(fs):
    pack(fs, "/ds/pages", torch.stack([pattern(i) for i in range(N)]))
    return fs


def ids(rows: torch.Tensor) -> list:
    return rows.reshape(-1, SIZE)[:, :8].contiguous().view(torch.int64).view(-1).tolist()


def check_rows(rows: torch.Tensor, want: list | None = None) -> None:
    """Every row is the sample its first 8 bytes name, and (given `want`) still the one received then."""
    rows = rows.reshape(-1, SIZE)
    got = ids(rows)
    if want is not None:
        assert got == want, "a kept batch was overwritten by a later one"
    for i, row in zip(got, rows):
        assert torch.equal(row, pattern(i)), f"sample {i} overwritten or wrong"


def loader(fs, *, buffers, context="fork", batch=8, workers=2, persistent=False, collate=None, batched=True):
    ds = DeepstackDataset(fs.uri, "/ds/pages", batched=batched, worker_buffers=buffers)
    return DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, timeout=60,
                      collate_fn=collate or ds.collate_fn, multiprocessing_context=context,
                      generator=torch.Generator().manual_seed(3), persistent_workers=persistent)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_workers_recycle_buffers_and_every_batch_is_right(page_pack, context):
    mapped, rebuilt = shm_pool.STATS["mapped"], shm_pool.STATS["rebuilt"]
    before = set(shm_pool._MAPPED)
    seen = []
    for b in loader(page_pack, buffers=3, context=context):
        check_rows(b)
        seen += ids(b)
    assert sorted(seen) == list(range(N))
    batches = N // 8
    assert shm_pool.STATS["rebuilt"] - rebuilt == batches  # every batch came through a slab ...
    assert shm_pool.STATS["mapped"] - mapped <= 2 * 3 < batches  # ... of at most 3 per worker: recycled
    shm_pool.prune()  # the workers exited: the main process lets go of their slabs
    assert not set(shm_pool._MAPPED) - before


@pytest.mark.timeout(180)
def test_kept_batches_and_views_are_never_overwritten(page_pack):
    """Two slabs per worker, and the main process keeps every batch (or just a view of it, or a tensor made
    from its storage): workers must fall back to fresh buffers rather than reuse one still referenced."""
    kept, want = [], []
    for k, b in enumerate(loader(page_pack, buffers=2, persistent=True)):
        if k % 3 == 0:
            kept.append(b)
        elif k % 3 == 1:
            kept.append(b[2:5])  # the batch tensor dies, its view lives on
        else:
            kept.append(torch.empty(0, dtype=torch.uint8).set_(b.untyped_storage(), b.storage_offset(), b.shape,
                                                                b.stride()))  # a new tensor, same storage
        want.append(ids(kept[-1]))
        del b
        gc.collect()
    for rows, w in zip(kept, want):
        check_rows(rows, w)


@pytest.mark.timeout(180)
def test_released_batches_make_room_again(page_pack):
    """Dropping the batches the main process held lets the workers reuse their slabs again (two epochs over
    persistent workers: the second epoch needs no new slab)."""
    dl = loader(page_pack, buffers=3, persistent=True)
    for b in dl:
        check_rows(b)
    mapped = shm_pool.STATS["mapped"]
    for b in dl:
        check_rows(b)
    assert shm_pool.STATS["mapped"] == mapped


@pytest.mark.timeout(180)
def test_sample_views_sent_one_by_one_stay_intact(page_pack):
    """Samples (views of one batch buffer) leave a worker separately: a list collate, and an IterableDataset
    yielding one sample per message. The slab is free only when every one of them died in the main process."""
    kept = []
    for k, batch in enumerate(loader(page_pack, buffers=2, collate=as_list, batched=False)):
        kept += [(s, ids(s)) for s in batch[::3]]  # keep some samples of each batch, drop the others
        del batch
        if k % 4 == 0:
            gc.collect()
    for s, w in kept:
        check_rows(s, w)
    ds = DeepstackIterableDataset(page_pack.uri, "/ds/pages", shuffle=True, seed=2, read_bytes=10 * SIZE)
    ds.dataset.worker_buffers = 2
    kept, n = [], 0
    for s in DataLoader(ds, batch_size=None, num_workers=2, timeout=60, multiprocessing_context="fork"):
        n += 1
        if n % 4 == 0:
            kept.append((s, ids(s)))
        del s
    assert n == N
    for s, w in kept:
        check_rows(s, w)


@pytest.mark.timeout(120)
def test_no_reuse_with_zero_buffers(page_pack):
    mapped = shm_pool.STATS["rebuilt"]
    rows = [b for b in loader(page_pack, buffers=0)]
    assert shm_pool.STATS["rebuilt"] == mapped
    for b in rows:
        check_rows(b)


def test_slab_protocol_in_one_process(monkeypatch):
    """The protocol step by step (this process plays both sides): a slab is free again only after the worker's
    tensor is gone AND every tensor rebuilt from it on the other side (views included) died; tensors that are
    not slabs, or need grad, still go through torch's own reducer."""
    # this process plays the worker: its reducer and slab registry go back to what they were afterwards
    monkeypatch.setitem(ForkingPickler._extra_reducers, torch.Tensor, ForkingPickler._extra_reducers[torch.Tensor])
    monkeypatch.setattr(shm_pool, "_INSTALLED_PID", -1)
    monkeypatch.setattr(shm_pool, "_LOCAL", {})
    shm_pool._install_reducer()
    pool = shm_pool.WorkerPool(2)
    t = pool.acquire(10000)
    slab = pool.slabs[0]
    assert t.data_ptr() % 4096 == 0 and not slab.free()
    t[:] = 5
    msg = ForkingPickler.dumps((t[100:200].view(torch.int16), t[0:10]))
    del t
    gc.collect()
    assert not slab.free()  # sent twice, released by nobody yet
    a, b = pickle.loads(msg)
    assert a.dtype == torch.int16 and a.shape == (50,) and int(a[0]) == 0x0505 and int(b.sum()) == 50
    view = a[3:5]
    del a
    gc.collect()
    assert not slab.free()  # b and a view of a still live
    del b
    gc.collect()
    assert not slab.free()
    del view
    gc.collect()
    assert slab.free()
    again = pool.acquire(9000)
    assert pool.reuses == 1 and len(pool.slabs) == 1 and again.data_ptr() == slab.ptr
    plain = torch.arange(6)
    assert torch.equal(pickle.loads(ForkingPickler.dumps(plain)), plain)
    assert pool.acquire(5000) is not None and pool.acquire(5000) is None  # full: the caller allocates fresh
    assert pool.fallbacks == 1
    del again


HELD: list = []


def _drop_held_copy() -> None:  # runs in a forked child: its copy of the parent's batch dies there
    HELD.clear()
    gc.collect()


def _slab_header_of(t: torch.Tensor):
    import ctypes

    for mm, hdr, _ in shm_pool._MAPPED.values():
        if ctypes.addressof(ctypes.c_char.from_buffer(mm, shm_pool.HEADER)) == t.untyped_storage().data_ptr():
            return hdr
    raise AssertionError("batch not in a mapped slab")


@pytest.mark.timeout(120)
def test_a_forked_childs_copy_of_a_batch_does_not_release_it(page_pack):
    """A process forked while the main one holds a batch (a second DataLoader's worker, say) has a copy of it;
    that copy dying in the child must not mark the slab released in the shared header."""
    import multiprocessing

    dl = loader(page_pack, buffers=2, persistent=True, workers=1)
    it = iter(dl)
    HELD.append(next(it))
    hdr = _slab_header_of(HELD[0])
    want = ids(HELD[0])
    sent = int(hdr[shm_pool.W_SENT])
    assert int(hdr[shm_pool.W_RELEASED]) < sent
    child = multiprocessing.get_context("fork").Process(target=_drop_held_copy)
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert int(hdr[shm_pool.W_RELEASED]) < sent  # still held here
    check_rows(HELD[0], want)
    HELD.clear()
    gc.collect()
    assert int(hdr[shm_pool.W_RELEASED]) >= sent
    del it
