"""FlashMLA's Python call forms over deepstack's MLA decode: change `import flash_mla` to
`from torch_deepstack.compat import flash_mla` and keep the code.

Both generations of the dense-decode API work:

    # original (v1) form: metadata tensors computed once per step, shared by every layer
    tile_md, num_splits = flash_mla.get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    out, lse = flash_mla.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, tile_md, num_splits,
                                                causal=True)

    # newer scheduler-object form: an empty object, filled by the first call and reused while the config holds
    sched, _ = flash_mla.get_mla_metadata()
    out, lse = flash_mla.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, sched, None)

Unlike upstream's dense decode, `is_fp8_kvcache=True` works here (the 656-byte V3.2 row format, dense).
Sparse attention (`indices`), `attn_sink` and `extra_k_cache` are not implemented and raise.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import torch_deepstack  # noqa: F401  (registers the ops)
from torch_deepstack.mla.api import get_mla_metadata as _plan
from torch_deepstack.mla.api import mla_decode_with_kvcache as _decode

__all__ = ["FlashMLASchedMeta", "get_mla_metadata", "flash_mla_with_kvcache"]


@dataclass
class FlashMLASchedMeta:
    """Upstream's lazy scheduler object: filled on the first decode call, then checked against each later call.

    Reuse it across layers of one decode step only while batch, s_q, heads, causal, FP8 and the values of
    cache_seqlens stay the same (as upstream requires); call `reset()` (or make a new one) for the next step."""
    tile_scheduler_metadata: torch.Tensor | None = None
    num_splits: torch.Tensor | None = None
    config: tuple | None = field(default=None)

    def reset(self) -> None:
        self.tile_scheduler_metadata = self.num_splits = self.config = None


def get_mla_metadata(cache_seqlens: torch.Tensor | None = None, num_q_tokens_per_head_k: int | None = None,
                     num_heads_k: int | None = None, num_heads_q: int | None = None, is_fp8_kvcache: bool = False,
                     topk: int | None = None, *, num_heads_per_head_k: int | None = None):
    """With cache_seqlens and the head counts: (tile_scheduler_metadata, num_splits) tensors (v1 form; the first
    count is also accepted under v1's keyword name `num_heads_per_head_k`). With no arguments: (FlashMLASchedMeta(),
    None) (the newer form); the decode call plans on first use."""
    if num_heads_per_head_k is not None:
        if num_q_tokens_per_head_k is not None:
            raise TypeError("flash_mla.get_mla_metadata: give num_q_tokens_per_head_k or its v1 name "
                            "num_heads_per_head_k, not both")
        num_q_tokens_per_head_k = num_heads_per_head_k
    if topk is not None:
        raise NotImplementedError("flash_mla.get_mla_metadata: sparse decode (topk) is not implemented in "
                                  "torch_deepstack; only dense decode")
    if cache_seqlens is None:
        return FlashMLASchedMeta(), None
    if num_q_tokens_per_head_k is None or num_heads_k is None:
        raise TypeError("flash_mla.get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k): "
                        "both counts are required when cache_seqlens is given")
    return _plan(cache_seqlens, int(num_q_tokens_per_head_k), int(num_heads_k))


def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                           num_splits=None, softmax_scale=None, causal=False, is_fp8_kvcache=False, indices=None,
                           attn_sink=None, extra_k_cache=None, extra_indices_in_kvcache=None, topk_length=None,
                           extra_topk_length=None):
    """Dense MLA decode: (out [b, s_q, h_q, head_dim_v], lse fp32 [b, h_q, s_q]), FlashMLA's semantics."""
    unsupported = {"indices": indices, "attn_sink": attn_sink, "extra_k_cache": extra_k_cache,
                   "extra_indices_in_kvcache": extra_indices_in_kvcache, "topk_length": topk_length,
                   "extra_topk_length": extra_topk_length}
    given = [k for k, v in unsupported.items() if v is not None]
    if given:
        raise NotImplementedError(f"flash_mla_with_kvcache: {', '.join(given)} (sparse / sink / extra-cache "
                                  f"attention) is not implemented in torch_deepstack; only dense decode")
    if isinstance(tile_scheduler_metadata, FlashMLASchedMeta):
        meta = tile_scheduler_metadata
        b, s_q, h_q, _ = q.shape
        h_kv = k_cache.shape[2]
        # As upstream: shapes and flags only. The seqlens' values cannot be compared without a host sync, and a
        # new tensor with the same values (e.g. `lens.to(torch.int32)` per layer) is how callers reuse the plan.
        config = (b, s_q, h_q, h_kv, k_cache.shape[1], bool(causal), bool(is_fp8_kvcache))
        if meta.config is None:
            meta.tile_scheduler_metadata, meta.num_splits = _plan(cache_seqlens, s_q * h_q // h_kv, h_kv)
            meta.config = config
        elif meta.config != config:
            raise ValueError(f"flash_mla_with_kvcache: this FlashMLASchedMeta was planned for {meta.config} "
                             f"(batch, s_q, h_q, h_kv, page, causal, fp8) but is used with {config}; "
                             f"use a new one per decode step or configuration")
        tile_scheduler_metadata, num_splits = meta.tile_scheduler_metadata, meta.num_splits
    elif num_splits is None:
        raise TypeError("flash_mla_with_kvcache: pass num_splits from get_mla_metadata (or a FlashMLASchedMeta)")
    return _decode(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
                   softmax_scale, causal, is_fp8_kvcache)
