"""DeepstackDataset / DeepstackIterableDataset: every sample read back equals what was written, under random
access, DataLoader workers (fork and spawn), DistributedSampler and StatefulDataLoader resume; failures are
clear errors, never hangs."""
import glob
import os
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from torch_deepstack.data import DeepstackDataset, DeepstackIterableDataset, SampleReadError
from torch_deepstack.data.format import INDEX_NAME

from datahelpers import as_list, sample_bytes


def test_random_access_single_and_batched(fs, bytes_pack):
    ds = DeepstackDataset(fs, "/ds/bytes")
    assert len(ds) == len(bytes_pack)
    order = np.random.default_rng(3).permutation(len(ds))
    for start in range(0, len(order), 37):
        idx = order[start:start + 37].tolist()
        got = ds.__getitems__(idx)
        assert [sample_bytes(g) for g in got] == [bytes_pack[i] for i in idx]
    assert sample_bytes(ds[-1]) == bytes_pack[-1]
    assert sample_bytes(ds[7]) == bytes_pack[7]
    dup = ds.__getitems__([5, 5, 0])
    assert [sample_bytes(g) for g in dup] == [bytes_pack[5], bytes_pack[5], bytes_pack[0]]


def test_tensor_samples_and_batched_mode(fs, tensor_pack):
    ds = DeepstackDataset(fs, "/ds/tensors")
    assert torch.equal(ds[3], tensor_pack[3]) and ds[3].dtype == torch.float32
    b = DeepstackDataset(fs, "/ds/tensors", batched=True)
    idx = [9, 0, 255, 9]
    assert torch.equal(b.__getitems__(idx), tensor_pack[idx])
    loader = DataLoader(b, batch_size=32, collate_fn=b.collate_fn)
    assert torch.equal(torch.cat(list(loader)), tensor_pack)


def test_transform_hook(fs, bytes_pack):
    ds = DeepstackDataset(fs, "/ds/bytes", transform=sample_bytes)
    assert ds.__getitems__([1, 2]) == bytes_pack[1:3]


def test_pickle_drops_live_handles(fs, bytes_pack):
    ds = DeepstackDataset(fs, "/ds/bytes")
    ds[0]  # opens a shard handle
    state = pickle.dumps(ds)
    assert b"FileSystem" not in state
    clone = pickle.loads(state)
    assert sample_bytes(clone[10]) == bytes_pack[10]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_read_everything(fs, bytes_pack, context):
    ds = DeepstackDataset(fs.uri, "/ds/bytes")  # a URI: each worker connects on its own
    loader = DataLoader(ds, batch_size=25, shuffle=True, num_workers=2, collate_fn=as_list,
                        multiprocessing_context=context, timeout=60, generator=torch.Generator().manual_seed(4))
    got = [sample_bytes(s) for batch in loader for s in batch]
    assert sorted(got) == sorted(bytes_pack)


@pytest.mark.timeout(120)
def test_distributed_sampler_partitions(fs, bytes_pack):
    ds = DeepstackDataset(fs, "/ds/bytes")
    seen = []
    for rank in range(3):
        sampler = DistributedSampler(ds, num_replicas=3, rank=rank, shuffle=True, seed=1, drop_last=True)
        sampler.set_epoch(2)
        loader = DataLoader(ds, batch_size=16, sampler=sampler, collate_fn=as_list)
        seen += [sample_bytes(s) for b in loader for s in b]
        idx = list(iter(sampler))
        assert [sample_bytes(s) for b in loader for s in b] == [bytes_pack[i] for i in idx]
    assert len(seen) == len(bytes_pack) // 3 * 3 and len(set(seen)) >= len(set(bytes_pack)) - 3


def remaining_after_resume(make_loader, consumed: int):
    """Take `consumed` batches from one loader, checkpoint it, and return (the batches it goes on to yield, the
    batches a fresh loader restored from that checkpoint yields), each as lists of sample bytes."""
    ref = make_loader()
    it = iter(ref)
    for _ in range(consumed):
        next(it)
    state = ref.state_dict()
    expected = [[sample_bytes(s) for s in b] for b in it]
    resumed = make_loader()
    resumed.load_state_dict(state)
    return expected, [[sample_bytes(s) for s in b] for b in resumed]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_dataloader_resume_gives_same_remaining_batches(fs, bytes_pack, workers):
    sdl = pytest.importorskip("torchdata.stateful_dataloader")
    ds = DeepstackDataset(fs.uri, "/ds/bytes")

    def make():
        return sdl.StatefulDataLoader(ds, batch_size=16, shuffle=True, num_workers=workers, collate_fn=as_list,
                                      generator=torch.Generator().manual_seed(7), timeout=60 if workers else 0,
                                      multiprocessing_context="fork" if workers else None)

    expected, got = remaining_after_resume(make, 7)
    assert len(got) == len(expected) == (len(bytes_pack) + 15) // 16 - 7
    assert got == expected


@pytest.mark.timeout(180)
def test_stateful_dataloader_resume_with_distributed_sampler(fs, bytes_pack):
    sdl = pytest.importorskip("torchdata.stateful_dataloader")
    ds = DeepstackDataset(fs.uri, "/ds/bytes")

    def make():
        sampler = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=3)
        sampler.set_epoch(5)
        return sdl.StatefulDataLoader(ds, batch_size=10, sampler=sampler, num_workers=2, collate_fn=as_list,
                                      timeout=60, multiprocessing_context="fork")

    expected, got = remaining_after_resume(make, 4)
    assert got == expected and len(expected) == 20 - 4


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
def test_iterable_dataset_yields_each_sample_once(fs, bytes_pack, workers):
    ds = DeepstackIterableDataset(fs.uri, "/ds/bytes", shuffle=True, seed=5, read_bytes=100_000)
    ds.set_epoch(1)
    loader = DataLoader(ds, batch_size=None, num_workers=workers, timeout=60 if workers else 0,
                        multiprocessing_context="fork" if workers else None)
    got = [sample_bytes(s) for s in loader]
    assert sorted(got) == sorted(bytes_pack)


def test_index_out_of_range(fs, bytes_pack):
    ds = DeepstackDataset(fs, "/ds/bytes")
    with pytest.raises(IndexError, match="out of range"):
        ds[len(bytes_pack)]
    with pytest.raises(IndexError, match="out of range"):
        ds.__getitems__([0, -len(bytes_pack) - 1])


def test_missing_dataset_and_shard(fs, bytes_pack):
    with pytest.raises(FileNotFoundError, match="no packed dataset"):
        DeepstackDataset(fs, "/ds/nothing")
    ds = DeepstackDataset(fs, "/ds/bytes")
    fs.remove(f"/ds/bytes/{ds.index.shard_names[0]}")
    with pytest.raises(SampleReadError, match="missing"):
        ds[0]


def test_truncated_shard(fs, bytes_pack):
    ds = DeepstackDataset(fs, "/ds/bytes")
    name = ds.index.shard_names[1]
    data = fs.read_bytes(f"/ds/bytes/{name}")
    fs.write_bytes(f"/ds/bytes/{name}", data[:len(data) // 2])
    first = int(np.nonzero(ds.index.entries["shard"] == 1)[0][0])
    with pytest.raises(SampleReadError, match="truncated"):
        ds[first]


def test_rewritten_shard_fails_the_sample_crc(fs, bytes_pack):
    ds = DeepstackDataset(fs, "/ds/bytes")
    name = ds.index.shard_names[0]
    data = bytearray(fs.read_bytes(f"/ds/bytes/{name}"))
    e = ds.index.entries[3]
    data[int(e["offset"])] ^= 0xFF
    fs.write_bytes(f"/ds/bytes/{name}", bytes(data))
    with pytest.raises(SampleReadError, match="CRC32C mismatch"):
        ds[3]


def test_damaged_chunk_file_is_a_clear_error(fs_dir, fs, tensor_pack):
    ds = DeepstackDataset(fs, "/ds/tensors")
    ds[0]
    files = [p for p in glob.glob(os.path.join(fs_dir, "target", "data", "*", "*.v*"))]
    assert files
    for p in files:  # flip one byte in every chunk version on disk, behind the storage layer's back
        with open(p, "r+b") as f:
            f.seek(100)
            b = f.read(1)
            f.seek(100)
            f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(SampleReadError, match="(?i)crc|corrupt"):
        ds[0]


def test_bad_arguments(fs, bytes_pack):
    with pytest.raises(TypeError, match="FileSystem or a URI"):
        DeepstackDataset(42, "/ds/bytes")
    with pytest.raises(ValueError, match="batched=True needs fixed-shape tensor"):
        DeepstackDataset(fs, "/ds/bytes", batched=True)
    assert not fs.exists(f"/ds/none/{INDEX_NAME}")


@pytest.mark.cuda
def test_pinned_batches_in_the_main_process(fs, tensor_pack):
    ds = DeepstackDataset(fs, "/ds/tensors", batched=True, pin_memory=True)
    batch = ds.__getitems__([3, 1, 2])
    assert batch.is_pinned() and torch.equal(batch, tensor_pack[[3, 1, 2]])
    on_gpu = batch.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.cpu(), tensor_pack[[3, 1, 2]])
