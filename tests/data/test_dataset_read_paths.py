"""DeepstackDataset's batch read (one vectorised storage read per batch, slot layout, batched CRC check) on the
C helper and on the pure-Python fallback: fresh random samples, compared with what was packed."""
import numpy as np
import pytest
import torch

import torch_deepstack.storage as st
from torch_deepstack.data import DeepstackDataset, PrefetchLoader, SampleReadError, pack
from torch_deepstack.data.dataset import _slots

from datahelpers import sample_bytes
from tests.helpers import use_storage_read_path


@pytest.fixture(params=["c-helper", "pure-python"])
def fs(tmp_path, request, monkeypatch):
    use_storage_read_path(request.param, monkeypatch)
    f = st.connect(str(tmp_path / "fs"), chunk_size=256 << 10, sync=False)
    yield f
    f.close()


def _fresh_samples(rng, n):
    # a mix around the 4 KiB slot threshold, empties included
    sizes = rng.choice([0, 1, 63, 100, 4095, 4096, 4097, 9000, 70_000], size=n)
    return [rng.integers(0, 256, int(k), dtype=np.uint8).tobytes() for k in sizes]


@pytest.mark.parametrize("align", ["auto", 1])
def test_getitems_equals_packed_bytes(fs, align):
    rng = np.random.default_rng()
    samples = _fresh_samples(rng, 300)
    pack(fs, "/d", samples, shard_bytes=1_500_000, align=align)  # several shards, chunks of 256 KiB
    ds = DeepstackDataset(fs, "/d")
    assert len(ds.index.shard_names) > 1
    for _ in range(6):
        idx = rng.integers(-len(ds), len(ds), int(rng.integers(1, 80))).tolist()
        got = ds.__getitems__(idx)
        assert [sample_bytes(g) for g in got] == [samples[i] for i in idx]
    assert ds.__getitems__([]) == []


def test_batched_tensors_and_prefetch_loader(fs):
    rng = np.random.default_rng()
    x = torch.from_numpy(rng.standard_normal((500, 3, 100)).astype(np.float32))
    pack(fs, "/t", x, shard_bytes=200_000)
    ds = DeepstackDataset(fs, "/t", batched=True)
    idx = rng.permutation(500)[:123].tolist()
    assert torch.equal(ds.__getitems__(idx), x[idx])
    assert torch.equal(torch.cat(list(PrefetchLoader(ds, 64, depth=3))), x)
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    got = torch.cat(list(PrefetchLoader(ds, 64, shuffle=True, generator=g, depth=3)))
    key = lambda t: t[:, 0, 0].argsort()  # noqa: E731 - each sample exactly once, in some order
    assert not torch.equal(got, x) and torch.equal(got[key(got)], x[key(x)])


def test_corrupt_sample_is_reported_on_both_paths(fs):
    rng = np.random.default_rng()
    samples = _fresh_samples(rng, 50)
    pack(fs, "/c", samples)
    ds = DeepstackDataset(fs, "/c")
    k = next(i for i, s in enumerate(samples) if len(s) > 100)
    name = ds.index.shard_names[int(ds.index.entries["shard"][k])]
    data = bytearray(fs.read_bytes(f"/c/{name}"))
    data[int(ds.index.entries["offset"][k]) + 50] ^= 0x01
    fs.write_bytes(f"/c/{name}", bytes(data))  # storage CRCs are fine; only the index's sample CRC differs
    with pytest.raises(SampleReadError, match="CRC32C mismatch"):
        ds.__getitems__([0, k])
    unverified = DeepstackDataset(fs, "/c", verify=False)
    assert sample_bytes(unverified[k]) == bytes(data[int(ds.index.entries["offset"][k]):][:len(samples[k])])


def test_slots_are_aligned_and_disjoint():
    rng = np.random.default_rng()
    lengths = rng.choice([0, 5, 64, 4095, 4096, 5000, 12288], size=200).astype(np.int64)
    starts = _slots(lengths)
    big = lengths >= 4096
    assert (starts[big] % 4096 == 0).all() and (starts[~big] % 64 == 0).all()
    order = np.argsort(starts, kind="stable")
    ends = starts[order] + lengths[order]
    assert (starts[order][1:] >= ends[:-1]).all()


class _SpinProbe(torch.utils.data.Dataset):
    """Reports the completion-polling window of the client its process uses."""

    def __init__(self, uri):
        from torch_deepstack.data._fs import FSHandle

        self.handle = FSHandle(uri)

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return self.handle.get().backend._arrays.spin_us


@pytest.mark.timeout(120)
def test_dataloader_workers_do_not_poll_for_completions(tmp_path):
    """Worker processes read at once: their clients sleep for completions instead of polling (spin_us=0)."""
    uri = str(tmp_path / "fs")
    st.connect(uri).close()
    probe = _SpinProbe(uri)
    assert probe[0] is None  # the main process keeps the default
    got = list(torch.utils.data.DataLoader(probe, num_workers=1, multiprocessing_context="fork",
                                           collate_fn=lambda b: b))
    assert got == [[0]]
    with pytest.raises(st.InvalidArgument, match="spin_us"):
        st.connect(uri, spin_us=-1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int16, torch.uint8, torch.bfloat16])
def test_list_path_fixed_shape_tensors(fs, dtype):
    """Non-batched fixed-shape samples come back as views made by one strided view of the batch buffer."""
    rng = np.random.default_rng()
    shape = tuple(int(k) for k in rng.integers(1, 40, 2))
    x = torch.from_numpy(rng.standard_normal((300, *shape)) * 100).to(dtype)
    pack(fs, "/f", x, shard_bytes=int(rng.integers(20_000, 80_000)))
    ds = DeepstackDataset(fs, "/f")
    for b in (1, 2, 77):
        idx = rng.integers(-300, 300, b).tolist()
        got = ds.__getitems__(idx)
        assert len(got) == b
        for g, i in zip(got, idx):
            assert g.dtype == dtype and g.shape == shape and torch.equal(g, x[i])


def test_list_path_variable_shape_tensors(fs):
    rng = np.random.default_rng()
    xs = [torch.from_numpy(rng.standard_normal((int(rng.integers(0, 50)), 3)).astype(np.float32)) for _ in range(120)]
    pack(fs, "/v", xs)
    ds = DeepstackDataset(fs, "/v")
    idx = rng.integers(0, 120, 64).tolist()
    got = ds.__getitems__(idx)
    assert all(g.shape == xs[i].shape and torch.equal(g, xs[i]) for g, i in zip(got, idx))


def test_page_aligned_samples_are_verified_from_the_storage_block_checks(fs):
    """Whole-page samples take their CRC32C from the read's own block checks (no second pass): a sample whose
    bytes no longer match the index is still caught, on a batch that also holds good samples."""
    rng = np.random.default_rng(5)
    samples = [torch.from_numpy(rng.integers(0, 256, (2, 4096), dtype=np.uint8)) for _ in range(24)]
    pack(fs, "/pages", samples)
    ds = DeepstackDataset(fs, "/pages", batched=True)
    f = ds._file(0)
    e = ds.index.entries
    res = fs.read_array(f, e["offset"].astype(np.int64), e["length"].astype(np.int64),
                        bytearray(int(e["length"].sum())), checksums=True)
    res.raise_first()
    if fs.backend.array_reads():
        assert (res.crc32c >= 0).all() and (res.crc32c == e["crc"]).all()
    else:
        assert (res.crc32c == -1).all()
    assert torch.equal(ds.read_batch(list(range(24))), torch.stack(samples))
    k = 7
    name = ds.index.shard_names[int(e["shard"][k])]
    data = bytearray(fs.read_bytes(f"/pages/{name}"))
    data[int(e["offset"][k]) + 4096 + 9] ^= 0x10
    fs.write_bytes(f"/pages/{name}", bytes(data))  # storage CRCs are fine; only the index's sample CRC differs
    ds = DeepstackDataset(fs, "/pages", batched=True)
    with pytest.raises(SampleReadError, match=f"sample {k} .*CRC32C mismatch"):
        ds.read_batch([3, k, 11])
    assert torch.equal(ds.read_batch([3, 11]), torch.stack([samples[3], samples[11]]))
