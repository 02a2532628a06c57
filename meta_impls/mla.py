"""Fakes of the MLA decode ops."""
import torch

from torch_deepstack._library import fake
from torch_deepstack.mla.checks import (HEAD_DIM_V, SCHED_INTS, check_append_inputs, check_decode_inputs,
                                        check_metadata_inputs, num_sm_parts_for)
from torch_deepstack.mla.schedule import DEFAULT_CPU_SMS


@fake("get_mla_metadata")
def get_mla_metadata_fake(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_sm_parts=0):
    check_metadata_inputs(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_sm_parts)
    parts = num_sm_parts if num_sm_parts > 0 else _default_parts(cache_seqlens.device, num_q_tokens_per_head_k,
                                                                 num_heads_k)
    sched = cache_seqlens.new_empty(parts, SCHED_INTS)
    return sched, cache_seqlens.new_empty(cache_seqlens.shape[0] + 1)


def _default_parts(device: torch.device, num_q_tokens_per_head_k: int, num_heads_k: int):
    """The row count num_sm_parts=0 gives: what the CPU reference plans for, or what the CUDA face computes from the
    GPU (a static size keeps the op inside torch.compile's CUDA graphs); symbolic where the GPU cannot be asked
    (meta tensors, or tracing for a GPU this machine does not have)."""
    if device.type == "cpu":
        return num_sm_parts_for(DEFAULT_CPU_SMS, num_q_tokens_per_head_k, num_heads_k)
    if device.type == "cuda" and torch.cuda.is_available():
        from torch_deepstack.mla.kernels import default_num_sm_parts
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index < torch.cuda.device_count():
            return default_num_sm_parts(index, num_q_tokens_per_head_k, num_heads_k)
    return torch.library.get_ctx().new_dynamic_size()


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
