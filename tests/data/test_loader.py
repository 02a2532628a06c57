"""PrefetchLoader: several batched reads in flight in one process give the sampler's batches in order,
resume mid-epoch exactly, and surface read errors."""
import pytest
import torch
from torch.utils.data import BatchSampler, RandomSampler

from torch_deepstack.data import DeepstackDataset, PrefetchLoader, SampleReadError

from datahelpers import sample_bytes


def _expected(ds, seed, batch_size):
    order = BatchSampler(RandomSampler(ds, generator=torch.Generator().manual_seed(seed)), batch_size, False)
    return [list(b) for b in order]


@pytest.mark.parametrize("depth", [1, 3, 8])
def test_batches_in_sampler_order(fs, bytes_pack, depth):
    ds = DeepstackDataset(fs, "/ds/bytes")
    loader = PrefetchLoader(ds, 24, shuffle=True, generator=torch.Generator().manual_seed(5), depth=depth)
    got = [[sample_bytes(s) for s in b] for b in loader]
    assert got == [[bytes_pack[i] for i in b] for b in _expected(ds, 5, 24)]
    assert len(loader) == len(got)


def test_stacked_batches_and_collate(fs, tensor_pack):
    ds = DeepstackDataset(fs, "/ds/tensors", batched=True)
    loader = PrefetchLoader(ds, 50, depth=2, collate_fn=lambda b: b * 2)
    assert torch.equal(torch.cat(list(loader)), tensor_pack * 2)


def test_resume_mid_epoch(fs, bytes_pack):
    ds = DeepstackDataset(fs, "/ds/bytes")
    ref = PrefetchLoader(ds, 16, shuffle=True, generator=torch.Generator().manual_seed(9), depth=4)
    it = iter(ref)
    for _ in range(6):
        next(it)
    state = ref.state_dict()
    expected = [[sample_bytes(s) for s in b] for b in it]
    resumed = PrefetchLoader(ds, 16, shuffle=True, generator=torch.Generator().manual_seed(1234), depth=4)
    resumed.load_state_dict(state)
    assert [[sample_bytes(s) for s in b] for b in resumed] == expected and len(expected) == 25 - 6


def test_read_errors_surface(fs, bytes_pack):
    ds = DeepstackDataset(fs, "/ds/bytes")
    name = ds.index.shard_names[0]
    data = bytearray(fs.read_bytes(f"/ds/bytes/{name}"))
    data[int(ds.index.entries[0]["offset"])] ^= 1
    fs.write_bytes(f"/ds/bytes/{name}", bytes(data))
    with pytest.raises(SampleReadError, match="CRC32C"):
        list(PrefetchLoader(ds, 10, depth=3))


def test_bad_arguments(fs, bytes_pack):
    ds = DeepstackDataset(fs, "/ds/bytes")
    with pytest.raises(TypeError, match="DeepstackDataset"):
        PrefetchLoader([1, 2, 3], 2)
    with pytest.raises(ValueError, match="depth"):
        PrefetchLoader(ds, 2, depth=0)
    with pytest.raises(ValueError, match="exclusive"):
        PrefetchLoader(ds, None, batch_sampler=BatchSampler(range(3), 2, False), shuffle=True)
