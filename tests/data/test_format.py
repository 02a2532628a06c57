"""The packed format: index round trip, versioning and every corruption giving a clear PackFormatError."""
import numpy as np
import pytest
import torch

from torch_deepstack.data import PackFormatError, PackIndex, PackWriter, load_index, pack
from torch_deepstack.data.format import INDEX_NAME, MAGIC, VERSION

from datahelpers import random_bytes_samples


def test_index_round_trip(fs, bytes_pack):
    ix = load_index(fs, "/ds/bytes")
    assert len(ix) == len(bytes_pack)
    assert ix.sample_type == "bytes" and ix.meta["version"] == VERSION
    assert len(ix.shard_names) > 2  # shard_bytes forced several shards
    assert list(ix.entries["length"]) == [len(s) for s in bytes_pack]
    again = PackIndex.from_bytes(ix.to_bytes())
    assert np.array_equal(again.entries, ix.entries) and again.meta == ix.meta


def test_shards_hold_exactly_the_samples(fs, bytes_pack):
    ix = load_index(fs, "/ds/bytes")
    shards = [fs.read_bytes(f"/ds/bytes/{n}") for n in ix.shard_names]
    assert [len(s) for s in shards] == ix.shard_sizes
    for i, e in enumerate(ix.entries):
        assert shards[e["shard"]][e["offset"]:e["offset"] + e["length"]] == bytes_pack[i]


def test_auto_align_puts_page_sized_samples_on_pages(fs):
    pack(fs, "/ds/al", [b"x" * 100] + [bytes([i]) * 4096 for i in range(10)])
    ix = load_index(fs, "/ds/al")
    assert all(int(o) % 4096 == 0 for o in ix.entries["offset"][1:])


def test_variable_shapes_and_names(fs, tmp_path):
    xs = [torch.arange(n * 3, dtype=torch.int32).reshape(n, 3) for n in (1, 5, 2)]
    with PackWriter(fs, "/ds/var") as w:
        for k, x in enumerate(xs):
            w.add(x, name=f"item{k}")
    ix = load_index(fs, "/ds/var")
    assert ix.shapes is not None and [ix.shape_of(i) for i in range(3)] == [(1, 3), (5, 3), (2, 3)]
    assert ix.names == ["item0", "item1", "item2"]


def test_mixed_sample_kinds_refused(fs):
    with pytest.raises(TypeError, match="one kind of sample"):
        with PackWriter(fs, "/ds/mixed") as w:
            w.add(b"abc")
            w.add(torch.zeros(3))
    assert not fs.exists(f"/ds/mixed/{INDEX_NAME}")  # aborted pack commits nothing


def test_existing_pack_needs_overwrite_and_overwrite_is_atomic(fs, bytes_pack):
    with pytest.raises(FileExistsError, match="overwrite"):
        PackWriter(fs, "/ds/bytes")
    old = load_index(fs, "/ds/bytes")
    pack(fs, "/ds/bytes", [b"new"] * 3, overwrite=True)
    new = load_index(fs, "/ds/bytes")
    assert len(new) == 3 and new.meta["pack_id"] != old.meta["pack_id"]
    assert sorted(n for n in fs.listdir("/ds/bytes") if n.endswith(".dsd")) == new.shard_names


def _corrupt(fs, fn):
    data = bytearray(fs.read_bytes(f"/ds/bytes/{INDEX_NAME}"))
    fs.write_bytes(f"/ds/bytes/{INDEX_NAME}", bytes(fn(data)))


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:20], "truncated"),
    (lambda d: b"NOTAPACK" + d[8:], "not a deepstack pack index"),
    (lambda d: d[:8] + (VERSION + 1).to_bytes(2, "little") + d[10:], "newer than this reader"),
    (lambda d: d[:17] + bytes([d[17] ^ 1]) + d[18:], "header CRC32C mismatch"),
    (lambda d: d[:-40] + bytes([d[-40] ^ 0xFF]) + d[-39:], "CRC32C mismatch"),
    (lambda d: d[:-10], "past the end"),
])
def test_corrupt_index_is_a_clear_error(fs, bytes_pack, damage, message):
    _corrupt(fs, damage)
    with pytest.raises(PackFormatError, match=message):
        load_index(fs, "/ds/bytes")


def test_missing_index_is_a_clear_error(fs, bytes_pack):
    fs.remove(f"/ds/bytes/{INDEX_NAME}")
    with pytest.raises(FileNotFoundError, match="deepstack pack"):
        load_index(fs, "/ds/bytes")


def test_pack_directory_and_arrays(fs, tmp_path):
    src = tmp_path / "files"
    (src / "sub").mkdir(parents=True)
    contents = {"a.bin": b"A" * 10, "sub/b.bin": b"", "z.txt": random_bytes_samples(1, 50_000)[0]}
    for k, v in contents.items():
        (src / k).write_bytes(v)
    ix = pack(fs, "/ds/dir", str(src), progress=True)
    assert ix.names == sorted(contents)
    arr = np.arange(60, dtype=np.float64).reshape(20, 3)
    ix = pack(fs, "/ds/np", arr)
    assert ix.meta["dtype"] == "float64" and ix.meta["shape"] == [3] and len(ix) == 20
    assert MAGIC == fs.read_bytes(f"/ds/np/{INDEX_NAME}")[:8]
