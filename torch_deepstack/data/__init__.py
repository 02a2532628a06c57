"""torch_deepstack.data: where deepstack storage meets PyTorch.

* packing: `PackWriter`, `pack()` and `deepstack pack` write many small samples into large shard files plus a
  versioned index (format.py);
* `DeepstackDataset` (map-style, one batched read per `__getitems__`) and `DeepstackIterableDataset`;
* `DeepstackStorageWriter` / `DeepstackStorageReader`: a torch.distributed.checkpoint backend with atomic saves;
* `KVCacheStore`: MLA paged-KV-cache blocks saved and loaded by content (prefix hash) key.

See docs/data.md.
"""
from torch_deepstack.data.dataset import (DeepstackDataset, DeepstackIterableDataset, SampleReadError,
                                          load_index)
from torch_deepstack.data.format import PackFormatError, PackIndex
from torch_deepstack.data.writer import PackWriter, pack

__all__ = ["DeepstackDataset", "DeepstackIterableDataset", "SampleReadError", "PackFormatError", "PackIndex",
           "PackWriter", "pack", "load_index"]
from torch_deepstack.data.checkpoint import DeepstackStorageReader, DeepstackStorageWriter  # noqa: E402

__all__ += ["DeepstackStorageReader", "DeepstackStorageWriter"]
from torch_deepstack.data.kvcache import KVBlockCorrupt, KVCacheStore, prefix_block_keys  # noqa: E402

__all__ += ["KVBlockCorrupt", "KVCacheStore", "prefix_block_keys"]
