"""Adjacent samples of a batch (next to each other in one shard and in the batch buffer, inside one storage chunk)
are read as one request: the data must be the same as per-sample reads, per-sample CRC32C checks must still
run, and no request may cross a chunk or a shard."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import torch_deepstack.storage as st
from torch_deepstack.data import DeepstackDataset, DeepstackIterableDataset, SampleReadError, pack

from datahelpers import random_bytes_samples, sample_bytes

pytestmark = pytest.mark.timeout(120)


class RequestLog:
    """Wraps one FileSystem's read_array / submit_read_array and records every request (file, offset, length)."""

    def __init__(self, fs):
        self.requests: list[tuple[str, int, int]] = []
        self.calls = 0
        real_read, real_submit = fs.read_array, fs.submit_read_array

        def log(files, offsets, lengths, *args, which=None, **kwargs):
            files = [files] if not isinstance(files, (list, tuple)) else files
            w = np.zeros(len(offsets), np.int64) if which is None else np.asarray(which)
            self.calls += 1
            self.requests += [(files[int(k)].path, int(o), int(n)) for k, o, n in zip(w, offsets, lengths)]

        def read_array(*args, **kwargs):
            log(*args, **kwargs)
            return real_read(*args, **kwargs)

        def submit_read_array(*args, **kwargs):
            log(*args, **kwargs)
            return real_submit(*args, **kwargs)

        fs.read_array, fs.submit_read_array = read_array, submit_read_array


def logged(ds) -> RequestLog:
    return RequestLog(ds._handle.get())


def assert_inside_chunks(log: RequestLog, chunk: int, sample: int):
    """Coalesced requests (longer than one sample) stay inside a chunk (a lone sample may straddle one)."""
    merged = [(p, o, n) for p, o, n in log.requests if n > sample]
    for path, off, n in merged:
        assert off // chunk == (off + n - 1) // chunk, f"request {path}@{off}+{n} crosses a chunk"
    return len(merged)


@pytest.fixture
def small_chunk_fs(tmp_path):
    f = st.connect(str(tmp_path / "fs16k"), chunk_size=16384)
    yield f
    f.close()


def test_sequential_batch_is_one_request_per_chunk(small_chunk_fs):
    x = torch.randint(0, 1 << 30, (64, 1024), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    pack(small_chunk_fs, "/seq", x)  # 4 KiB samples, page-aligned: four per 16 KiB chunk
    ds = DeepstackDataset(small_chunk_fs, "/seq", batched=True)
    log = logged(ds)
    got = ds.read_batch(list(range(3, 40)))
    assert torch.equal(got, x[3:40])
    # samples 3..39 span chunks 0 (sample 3) .. 9 (samples 36..39): one request per chunk, none across
    assert len(log.requests) == 10
    assert assert_inside_chunks(log, 16384, 4096) == 9
    assert sum(n for _, _, n in log.requests) == 37 * 4096


def test_shuffled_and_mixed_batches(small_chunk_fs):
    x = torch.randn(200, 1000, generator=torch.Generator().manual_seed(2))  # 4000 B, packed tightly: unaligned
    pack(small_chunk_fs, "/mixed", x)
    ds = DeepstackDataset(small_chunk_fs, "/mixed", batched=True)
    log = logged(ds)
    rng = np.random.default_rng(0)
    order = rng.permutation(200)
    for b in range(0, 200, 50):
        idx = order[b:b + 50].tolist()
        assert torch.equal(ds.read_batch(idx), x[idx])
    # runs inside a shuffled batch, then a batch of runs in and out of order, repeats and negative indices
    idx = list(range(10, 30)) + [5, 6, 7, 199, 198] + list(range(100, 120)) + [-1, 0, 1, 1, 2]
    assert torch.equal(ds.read_batch(idx), x[idx])
    assert assert_inside_chunks(log, 16384, 4000) > 0


def test_bytes_samples_non_batched_and_loader(fs):
    samples = random_bytes_samples(300, max_len=3 * 4096, seed=3) + [b"\x07" * 4096] * 40  # page-multiple tail
    pack(fs, "/b", samples, shard_bytes=400_000)  # several shards
    ds = DeepstackDataset(fs, "/b")
    log = logged(ds)
    idx = list(range(280, 340))
    got = ds.__getitems__(idx)
    assert [sample_bytes(s) for s in got] == [samples[i] for i in idx]
    assert len(log.requests) < len(idx)  # the 4 KiB tail coalesced
    loader = DataLoader(ds, batch_size=32, shuffle=False, collate_fn=list)
    seen = [sample_bytes(s) for batch in loader for s in batch]
    assert seen == samples


def test_runs_stop_at_shard_boundaries(fs):
    x = torch.arange(300 * 1024, dtype=torch.int32).view(300, 1024)  # 4 KiB samples
    pack(fs, "/shards", x, shard_bytes=100 * 4096)  # 100 samples per shard
    ds = DeepstackDataset(fs, "/shards", batched=True)
    log = logged(ds)
    assert torch.equal(ds.read_batch(list(range(50, 250))), x[50:250])
    assert len({p for p, _, _ in log.requests}) == 3
    assert len(log.requests) == 3  # one run per shard (each shard is one 1 MiB chunk here: 400 KiB)


def test_crc_mismatch_inside_a_run_names_the_sample(fs):
    x = torch.randn(32, 1024, generator=torch.Generator().manual_seed(4))
    pack(fs, "/crc", x)
    ds = DeepstackDataset(fs, "/crc", batched=True)
    ds._crc = ds._crc.copy()
    ds._crc[17] ^= 1  # as if sample 17's bytes differed from what the index promises
    with pytest.raises(SampleReadError, match="sample 17 of /crc: CRC32C mismatch"):
        ds.read_batch(list(range(8, 24)))
    assert torch.equal(ds.read_batch(list(range(0, 17))), x[:17])  # a run not holding it reads fine


def test_truncated_shard_inside_a_run(fs):
    x = torch.randn(16, 1024, generator=torch.Generator().manual_seed(5))
    pack(fs, "/trunc", x)
    ds = DeepstackDataset(fs, "/trunc", batched=True)
    ds._length = ds._length.copy()
    ds._offset = ds._offset.copy()
    ds._offset[15] = ds.index.shard_sizes[0] - 100  # sample 15 now reads past the shard's end
    ds._offset[14] = ds._offset[15] - ds._length[14]  # keep 14 and 15 adjacent: one run
    with pytest.raises(SampleReadError, match="shard truncated"):
        ds.read_batch([14, 15])


def test_iterable_dataset_coalesces_and_keeps_its_order(fs):
    x = torch.randint(0, 255, (500, 4096), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    pack(fs, "/stream", x)
    it = DeepstackIterableDataset(fs, "/stream", shuffle=True, seed=7, read_bytes=64 * 4096)
    log = logged(it.dataset)
    got = list(it)
    ids = [int(np.flatnonzero((x == s).all(1).numpy())[0]) for s in got]
    assert sorted(ids) == list(range(500))
    assert ids != list(range(500))  # shuffled
    # each group of 64 consecutive samples lies in one or two 1 MiB chunks: at most two requests per group
    assert len(log.requests) <= 2 * 8
    # the same seed and epoch yield the same order; another epoch another one
    again = DeepstackIterableDataset(fs, "/stream", shuffle=True, seed=7, read_bytes=64 * 4096)
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    again.set_epoch(1)
    assert not all(torch.equal(a, b) for a, b in zip(got, again))
