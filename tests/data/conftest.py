"""Fixtures of the data tests: an embedded deepstack file system and a few packed datasets."""
import pytest
import torch

import torch_deepstack.storage as st
from torch_deepstack.data import pack

from datahelpers import random_bytes_samples


@pytest.fixture
def fs_dir(tmp_path):
    return str(tmp_path / "fs")


@pytest.fixture
def fs(fs_dir):
    f = st.connect(fs_dir)
    yield f
    f.close()


@pytest.fixture
def bytes_pack(fs):
    samples = random_bytes_samples(400)
    # Small shards and tight packing: samples straddle chunk (1 MiB) and shard boundaries, offsets unaligned.
    pack(fs, "/ds/bytes", samples, shard_bytes=600_000, align=1)
    return samples


@pytest.fixture
def tensor_pack(fs):
    x = torch.randn(256, 4, 33, generator=torch.Generator().manual_seed(1))
    pack(fs, "/ds/tensors", x)
    return x
