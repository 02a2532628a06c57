"""The Dataset, the checkpoint backend and KV offload on a real deepstack cluster (manager + 3 storage services
as processes on loopback, 3 replicas): a storage service killed mid-epoch fails over to the other replicas with
every sample still exact; with every service down, reads fail with a clear error within the retry budget."""
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from torch_deepstack.data import DeepstackDataset, KVCacheStore, SampleReadError, pack, prefix_block_keys
from torch_deepstack.testing.local_cluster import LocalCluster

from datahelpers import as_list, random_bytes_samples, sample_bytes


@pytest.fixture
def cluster(tmp_path):
    c = LocalCluster(tmp_path / "cluster", chunk_size=256 << 10)
    try:
        c.start()
        yield c, c.secret
    finally:
        c.stop()


@pytest.mark.timeout(240)
def test_dataset_fails_over_when_a_storage_service_dies(cluster):
    c, secret = cluster
    fs = c.connect()
    samples = random_bytes_samples(300, max_len=20_000, seed=11)
    pack(fs, "/ds/train", samples, shard_bytes=1 << 20, align=1)
    opts = {"retry_for": 30.0, "timeout": 5.0}
    ds = DeepstackDataset(c.uri, "/ds/train", secret=secret, storage_options=opts)
    order = np.random.default_rng(0).permutation(len(samples))
    first = ds.__getitems__(order[:100].tolist())
    assert [sample_bytes(s) for s in first] == [samples[i] for i in order[:100]]
    c.kill("s2")  # SIGKILL one replica holder in the middle of the epoch
    rest = ds.__getitems__(order[100:].tolist())
    assert [sample_bytes(s) for s in rest] == [samples[i] for i in order[100:]]
    loader = DataLoader(ds, batch_size=32, shuffle=True, num_workers=2, collate_fn=as_list, timeout=120,
                        multiprocessing_context="spawn", generator=torch.Generator().manual_seed(1))
    assert sorted(sample_bytes(s) for b in loader for s in b) == sorted(samples)
    fs.close()


@pytest.mark.timeout(240)
def test_checkpoint_and_kv_offload_on_a_cluster_and_total_outage(cluster):
    import torch.distributed.checkpoint as dcp

    from torch_deepstack.data import DeepstackStorageReader, DeepstackStorageWriter

    c, secret = cluster
    fs = c.connect(retry_for=3.0, timeout=2.0)
    state = {"w": torch.randn(300_000), "step": torch.tensor(7)}
    dcp.save(state, storage_writer=DeepstackStorageWriter(fs, "/ckpt"))
    got = {"w": torch.zeros(300_000), "step": torch.tensor(0)}
    dcp.load(got, storage_reader=DeepstackStorageReader(fs, "/ckpt"))
    assert torch.equal(got["w"], state["w"]) and int(got["step"]) == 7

    store = KVCacheStore(fs, "/kv")
    keys = prefix_block_keys(range(64 * 4))
    blocks = torch.randn(4, 64, 1, 576).to(torch.bfloat16)
    store.save(keys, blocks)
    out = torch.zeros_like(blocks)
    assert store.load(keys, out).all() and torch.equal(out, blocks)

    samples = random_bytes_samples(50, seed=3)
    pack(fs, "/ds/small", samples)
    ds = DeepstackDataset(fs, "/ds/small")
    for sid in list(c.services):
        c.kill(sid)
    t0 = time.monotonic()
    with pytest.raises(SampleReadError, match="(?i)unavailable|replica|connect|refused|timed out"):
        ds.__getitems__(list(range(50)))
    assert time.monotonic() - t0 < 60, "a dead cluster must fail fast, not hang"
    fs.close()
