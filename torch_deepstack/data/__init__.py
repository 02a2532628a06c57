"""torch_deepstack.data: where deepstack storage meets PyTorch.

* packing: `PackWriter`, `pack()` and `deepstack pack` write many small samples into large shard files plus a
  versioned index (format.py);
* `DeepstackDataset` (map-style, one batched read per `__getitems__`) and `DeepstackIterableDataset`;
* `PrefetchLoader`: several batched reads in flight in one process, no workers;
* `DeepstackStorageWriter` / `DeepstackStorageReader`: a torch.distributed.checkpoint backend with atomic saves;
* `KVCacheStore`: MLA paged-KV-cache blocks saved and loaded by content (prefix hash) key.

See docs/data.md.
"""
from torch_deepstack.data.dataset import (DeepstackDataset, DeepstackIterableDataset, SampleReadError,
                                          load_index)
from torch_deepstack.data.format import PackFormatError, PackIndex
from torch_deepstack.data.kvcache import KVBlockCorrupt, KVCacheStore, prefix_block_keys
from torch_deepstack.data.loader import PrefetchLoader
from torch_deepstack.data.writer import PackWriter, pack

__all__ = ["DeepstackDataset", "DeepstackIterableDataset", "SampleReadError", "PackFormatError", "PackIndex",
           "PackWriter", "pack", "load_index", "KVBlockCorrupt", "KVCacheStore", "prefix_block_keys",
           "PrefetchLoader", "DeepstackStorageReader", "DeepstackStorageWriter"]


def __getattr__(name: str):
    # torch.distributed.checkpoint takes ~1.5 s to import: load the DCP backend only when it is asked for.
    if name in ("DeepstackStorageReader", "DeepstackStorageWriter"):
        from torch_deepstack.data import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'torch_deepstack.data' has no attribute {name!r}")
