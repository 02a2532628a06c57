"""KV-cache block offload: bf16 and FP8 layouts round trip bit-exactly by prefix key, misses are reported,
corruption is a clear error, and a paged cache's request can be offloaded and restored."""
import pytest
import torch

from torch_deepstack.data import KVBlockCorrupt, KVCacheStore, prefix_block_keys


def _blocks(n, h_kv=1, fp8=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if fp8:
        return torch.randint(0, 256, (n, 64, h_kv, 656), dtype=torch.uint8, generator=g)
    return torch.randn(n, 64, h_kv, 576, generator=g).to(torch.bfloat16)


def test_prefix_keys_chain_and_namespace():
    toks = list(range(64 * 3 + 10))
    keys = prefix_block_keys(toks)
    assert len(keys) == 3 and len(set(keys)) == 3
    assert prefix_block_keys(toks[:128]) == keys[:2]  # a shared prefix shares keys
    changed = toks.copy()
    changed[5] = -1
    assert all(a != b for a, b in zip(prefix_block_keys(changed), keys))  # any earlier token changes later keys
    assert prefix_block_keys(toks, namespace="layer1") != keys


@pytest.mark.parametrize("fp8, h_kv", [(False, 1), (True, 1), (False, 2)])
def test_save_load_round_trip(fs, fp8, h_kv):
    store = KVCacheStore(fs, "/kv")
    blocks = _blocks(6, h_kv, fp8)
    keys = prefix_block_keys(range(64 * 6), namespace=f"{fp8}{h_kv}")
    assert store.save(keys, blocks) == 6
    assert store.save(keys[:2], blocks[:2]) == 0  # content-addressed: already there
    out = torch.zeros_like(blocks)
    order = [4, 0, 5, 2]
    found = store.load([keys[i] for i in order], out[:4])
    assert found.all() and torch.equal(out[:4].view(torch.uint8), blocks[order].view(torch.uint8))


def test_missing_keys_are_misses_and_leave_out_untouched(fs):
    store = KVCacheStore(fs.uri, "/kv")
    blocks = _blocks(2)
    keys = prefix_block_keys(range(128))
    store.save(keys[:1], blocks[:1])
    out = torch.full_like(blocks, 7.0)
    found = store.load(keys, out)
    assert found.tolist() == [True, False]
    assert torch.equal(out[0], blocks[0]) and bool((out[1] == 7.0).all())
    assert store.contains(keys) == [True, False]
    assert store.remove(keys) == 1 and store.contains(keys) == [False, False]


def test_layout_and_corruption_errors(fs):
    store = KVCacheStore(fs, "/kv")
    keys = prefix_block_keys(range(64))
    with pytest.raises(ValueError, match=r"\[n, 64, h_kv, 576\]"):
        store.save(keys, torch.zeros(1, 64, 1, 100))
    with pytest.raises(ValueError, match="hex"):
        store.save(["../etc"], _blocks(1))
    store.save(keys, _blocks(1))
    with pytest.raises(KVBlockCorrupt, match="layout"):
        store.load(keys, torch.zeros(1, 64, 1, 656, dtype=torch.uint8))
    path = store.path_of(keys[0])
    data = bytearray(fs.read_bytes(path))
    data[10] ^= 0xFF
    fs.write_bytes(path, bytes(data))
    with pytest.raises(KVBlockCorrupt, match="CRC32C"):
        store.load(keys, torch.zeros(1, 64, 1, 576, dtype=torch.bfloat16))


class _FakePagedCache:
    """The slice of torch_deepstack.mla.PagedKVCache's interface the store uses, when that class is absent."""

    def __init__(self, num_blocks, fp8=False):
        self.k_cache = torch.zeros(num_blocks, 64, 1, 656 if fp8 else 576,
                                   dtype=torch.uint8 if fp8 else torch.bfloat16)
        self._free = list(range(num_blocks - 1, -1, -1))
        self._blocks, self._lens = {}, {}

    def seqlen(self, req):
        return self._lens.get(req, 0)

    def blocks_of(self, req):
        return list(self._blocks.get(req, []))

    def reserve(self, req, n):
        end = self.seqlen(req) + n
        need = (end + 63) // 64 - len(self._blocks.get(req, []))
        self._blocks.setdefault(req, []).extend(self._free.pop() for _ in range(need))
        self._lens[req] = end


def _paged_cache(num_blocks):
    try:
        from torch_deepstack.mla.paged_cache import PagedKVCache
    except Exception:  # the MLA area is optional here
        return _FakePagedCache(num_blocks)
    return PagedKVCache(num_blocks, max_batch=4, max_seq_len=64 * 8)


def test_offload_and_restore_a_request(fs):
    store = KVCacheStore(fs, "/kv")
    src = _paged_cache(16)
    toks = torch.arange(64 * 3 + 20)
    src.reserve(0, len(toks))
    for b in src.blocks_of(0):
        src.k_cache[b] = torch.randn(src.k_cache.shape[1:]).to(src.k_cache.dtype)
    assert store.offload(src, 0, toks, namespace="m/l0") == 3  # only full pages
    dst = _paged_cache(16)
    dst.reserve(1, 64)  # occupy some blocks so the restored pages land elsewhere
    got = store.restore(dst, 2, toks, namespace="m/l0")
    assert got == 192 and dst.seqlen(2) == 192
    for a, b in zip(src.blocks_of(0)[:3], dst.blocks_of(2)):
        assert torch.equal(src.k_cache[a], dst.k_cache[b])
    other = toks.clone()
    other[100] = -5  # diverges in page 1: only page 0 is reusable
    assert store.restore(dst, 3, other, namespace="m/l0") == 64


def test_odd_length_hex_key_is_refused_by_name(fs):
    store = KVCacheStore(fs, "/kv")
    for bad in ("abcdef012", "a" * 127):
        with pytest.raises(ValueError, match=f"even number.*key '{bad}'"):
            store.path_of(bad)
        with pytest.raises(ValueError, match=f"key '{bad}'"):
            store.save([bad], _blocks(1))
    assert store.path_of("abcdef0123") == "/kv/ab/abcdef0123.kvb"


def test_failed_save_removes_its_temporary_files(tmp_path):
    import torch_deepstack.storage as st
    from torch_deepstack.storage import NoSpace

    with st.connect(str(tmp_path / "fs"), sync=False, capacity_bytes=200_000) as fs:
        store = KVCacheStore(fs, "/kv", io_threads=1)
        keys = ["%064x" % (i + 1) for i in range(3)]
        with pytest.raises(NoSpace):  # ~73.8 KB per block: the third does not fit
            store.save(keys, _blocks(3))
        left = fs.listdir("/kv/00")
        assert not [n for n in left if ".tmp-" in n], left
        assert store.contains(keys)[:2] == [True, True]
        store.remove(keys[:2])
        assert store.save(keys[2:], _blocks(1)) == 1  # the failed block's chunks were given back too
