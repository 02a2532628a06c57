"""MLA decode over a paged KV cache (FlashMLA's dense decode): split-KV planning, decode, cache appends.

    sched, splits = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)      # once per decode step
    out, lse = mla_decode_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, sched, splits, causal=True)

bf16/fp16 caches [num_blocks, 64, h_kv, 576 or 512]; FP8 caches [num_blocks, 64, h_kv, 656] uint8 (see
fp8_format). `PagedKVCache` does the block bookkeeping.
"""
from torch_deepstack.mla import reference, kernels  # noqa: F401  (register the CPU and CUDA faces)
from torch_deepstack.mla.api import get_mla_metadata, mla_append_kv, mla_decode_with_kvcache  # noqa: F401
from torch_deepstack.mla.paged_cache import CacheFullError, PagedKVCache  # noqa: F401
from torch_deepstack.mla import fp8_format  # noqa: F401
