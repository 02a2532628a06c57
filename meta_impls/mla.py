"""Fakes of the MLA decode ops."""
import torch

from torch_deepstack._library import fake
from torch_deepstack.mla.checks import (HEAD_DIM_V, SCHED_INTS, check_append_inputs, check_decode_inputs,
                                        check_metadata_inputs)


@fake("get_mla_metadata")
def get_mla_metadata_fake(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_sm_parts=0):
    check_metadata_inputs(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_sm_parts)
    # With num_sm_parts=0 the row count comes from the device's SM count, which a fake may not query.
    parts = num_sm_parts if num_sm_parts > 0 else torch.library.get_ctx().new_dynamic_size()
    sched = cache_seqlens.new_empty(parts, SCHED_INTS)
    return sched, cache_seqlens.new_empty(cache_seqlens.shape[0] + 1)


@fake("mla_decode_with_kvcache")
def mla_decode_with_kvcache_fake(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                                 num_splits, softmax_scale=None, causal=False, is_fp8_kvcache=False):
    check_decode_inputs(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
                        is_fp8_kvcache)
    b, s_q, h_q, _ = q.shape
    out = q.new_empty(b, s_q, h_q, HEAD_DIM_V)
    lse = q.new_empty(b, h_q, s_q, dtype=torch.float32)
    return out, lse


@fake("mla_append_kv")
def mla_append_kv_fake(k_cache, kv, slot_mapping, is_fp8_kvcache=False):
    check_append_inputs(k_cache, kv, slot_mapping, is_fp8_kvcache)
    return None
