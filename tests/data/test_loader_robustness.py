"""Robustness of the loading path: end-of-epoch PrefetchLoader checkpoints, set_epoch reaching persistent
DataLoader workers, and DeepstackDataset's index argument checks."""
import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler

from torch_deepstack.data import DeepstackDataset, DeepstackIterableDataset, PrefetchLoader

from datahelpers import sample_bytes


# ---------------------------------------------------------------- PrefetchLoader: a checkpoint at the end of an epoch
def _ids(batch):
    return batch.reshape(len(batch), -1)[:, 0].tolist()


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("stop", ["exhausted", "last_batch_taken"])
@pytest.mark.parametrize("replacement", [False, True])
def test_prefetch_state_after_epoch_resumes_next_epoch(fs, tensor_pack, depth, stop, replacement):
    ds = DeepstackDataset(fs, "/ds/tensors", batched=True)

    def make():
        g = torch.Generator().manual_seed(7)
        # with replacement RandomSampler draws in chunks of 32 as it goes: the state must be taken after them all
        sampler = RandomSampler(ds, replacement=replacement, num_samples=100 if replacement else None, generator=g)
        return PrefetchLoader(ds, 16, sampler=sampler, generator=g, depth=depth)

    ref = make()
    if stop == "exhausted":
        ep0 = [_ids(b) for b in ref]
    else:  # the consumer takes exactly len(loader) batches and never asks for another
        ep0 = [_ids(b) for b in itertools.islice(ref, len(ref))]
    assert len(ep0) == len(ref)
    state = ref.state_dict()
    ep1, ep2 = [_ids(b) for b in ref], [_ids(b) for b in ref]
    assert ep1 != ep0 and len(ep1) == len(ref)

    resumed = make()
    resumed.load_state_dict(state)
    assert [_ids(b) for b in resumed] == ep1
    assert [_ids(b) for b in resumed] == ep2
    assert state["yielded"] == 0


def test_prefetch_state_mid_and_end_of_resumed_epoch(fs, tensor_pack):
    ds = DeepstackDataset(fs, "/ds/tensors", batched=True)
    ref = PrefetchLoader(ds, 32, shuffle=True, generator=torch.Generator().manual_seed(3), depth=2)
    list(ref)
    it = iter(ref)
    first = [_ids(next(it)) for _ in range(3)]
    mid = ref.state_dict()
    rest = [_ids(b) for b in it]
    end = ref.state_dict()
    nxt = [_ids(b) for b in ref]
    r = PrefetchLoader(ds, 32, shuffle=True, generator=torch.Generator().manual_seed(99), depth=2)
    r.load_state_dict(mid)
    assert r.state_dict()["yielded"] == 3  # a loaded state is given back until iteration starts
    assert [_ids(b) for b in r] == rest and len(first + rest) == len(ref)
    assert r.state_dict()["yielded"] == 0  # the resumed epoch finished: the next one
    assert [_ids(b) for b in r] == nxt
    r2 = PrefetchLoader(ds, 32, shuffle=True, generator=torch.Generator().manual_seed(99), depth=2)
    r2.load_state_dict(end)
    assert [_ids(b) for b in r2] == nxt


# ---------------------------------------------------------------- DeepstackIterableDataset.set_epoch in persistent workers
def _epochs(ds, loader, epochs):
    out = []
    for e in epochs:
        ds.set_epoch(e)
        out.append([sample_bytes(s) for s in loader])
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_iterable_set_epoch_reaches_persistent_workers(fs, bytes_pack, context):
    ds = DeepstackIterableDataset(fs.uri, "/ds/bytes", shuffle=True, seed=3, read_bytes=100_000)

    def loader(persistent):
        return DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=persistent, timeout=60,
                          multiprocessing_context=context)

    persistent = _epochs(ds, loader(True), [0, 1, 2])
    fresh = _epochs(ds, loader(False), [0, 1, 2])
    assert persistent == fresh
    assert persistent[0] != persistent[1] != persistent[2]
    assert all(sorted(p) == sorted(bytes_pack) for p in persistent)


def test_iterable_epoch_in_process_and_bad_epoch(fs, bytes_pack):
    ds = DeepstackIterableDataset(fs, "/ds/bytes", shuffle=True, seed=3, read_bytes=100_000)
    ds.set_epoch(np.int64(4))
    assert ds.epoch == 4
    a = [sample_bytes(s) for s in ds]
    ds.epoch = 5  # the attribute still works, through set_epoch
    assert ds.epoch == 5 and [sample_bytes(s) for s in ds] != a
    for bad in (1.0, "1", None, True):
        with pytest.raises(TypeError, match="epoch: expected an integer"):
            ds.set_epoch(bad)
    with pytest.raises(ValueError, match="epoch"):
        ds.set_epoch(-1)
    assert ds.epoch == 5


# ---------------------------------------------------------------- DeepstackDataset index arguments
def test_non_integer_indices_are_type_errors(fs, tensor_pack):
    ds = DeepstackDataset(fs, "/ds/tensors")
    for bad in (1.9, "3", None, True, torch.tensor(1.0), np.float64(2.0)):
        with pytest.raises(TypeError, match=r"index: expected an integer"):
            ds[bad]
    for bad in ([2.5, 3.7], ["3"], [1, None], np.array([1.5]), torch.tensor([1.0]), torch.tensor([True])):
        with pytest.raises(TypeError, match=r"indices: expected integers"):
            ds.__getitems__(bad)
    with pytest.raises(TypeError, match="indices"):
        ds.__getitems__([[1, 2], [3]])


def test_huge_indices_are_index_errors(fs, tensor_pack):
    ds = DeepstackDataset(fs, "/ds/tensors")
    n = len(tensor_pack)
    for bad in (2**64, -2**63 - 1, 2**63):
        with pytest.raises(IndexError, match=f"out of range for a dataset of {n} samples"):
            ds[bad]
    for bad in ([2**64], [-1, 2**63], np.array([2**63], np.uint64), [0, -2**70]):
        with pytest.raises(IndexError, match=f"out of range for a dataset of {n} samples"):
            ds.__getitems__(bad)


def test_integer_index_types_still_work(fs, tensor_pack):
    ds = DeepstackDataset(fs, "/ds/tensors")
    for i in (3, np.int64(3), np.uint8(3), torch.tensor(3), torch.tensor([3], dtype=torch.int32), -253):
        assert torch.equal(ds[i], tensor_pack[3])
    want = [tensor_pack[1], tensor_pack[254]]
    for idx in ([1, -2], np.array([1, 254], np.uint64), np.array([1, -2], np.int32), torch.tensor([1, -2]),
                [np.int64(1), torch.tensor(-2)], (1, 254)):
        assert all(torch.equal(a, b) for a, b in zip(ds.__getitems__(idx), want))
    assert ds.__getitems__([]) == []


def test_batched_getitem_applies_transform_like_getitems(fs, tensor_pack):
    ds = DeepstackDataset(fs, "/ds/tensors", batched=True, transform=lambda b: b * 2 - 1)
    assert torch.equal(ds[5], tensor_pack[5] * 2 - 1)
    assert torch.equal(ds[5], ds.__getitems__([5])[0])
    assert torch.equal(DeepstackDataset(fs, "/ds/tensors", batched=True)[5], tensor_pack[5])
