"""Typed Python entry points of the MLA decode ops. Eager CUDA calls go straight to the op's kernel when nothing
could observe the dispatcher's hop (`_library.kernel_for`; 12-18 us per call on the GPU machine's host, three calls
per layer and step), otherwise through `torch.ops.deepstack.*`."""
from __future__ import annotations

import torch

from torch_deepstack._library import kernel_for


def get_mla_metadata(cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int,
                     num_sm_parts: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV plan for one decode step, computed on cache_seqlens' device (no host sync, capturable).

    num_q_tokens_per_head_k = s_q * h_q // h_kv. Returns (tile_scheduler_metadata int32 [num_sm_parts, 8],
    num_splits int32 [b + 1]). Compute it once per step and pass it to every layer's decode call.
    num_sm_parts=0 picks one part per SM-sized slot of the current GPU (132 on the CPU reference).
    """
    return kernel_for("get_mla_metadata", cache_seqlens)(cache_seqlens, num_q_tokens_per_head_k, num_heads_k,
                                                          num_sm_parts)


def mla_decode_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                            cache_seqlens: torch.Tensor, head_dim_v: int, tile_scheduler_metadata: torch.Tensor,
                            num_splits: torch.Tensor, softmax_scale: float | None = None, causal: bool = False,
                            is_fp8_kvcache: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA attention of q [b, s_q, h_q, d] (d = 576 or 512) over a paged cache [num_blocks, 64, h_kv, d].

    V is the first head_dim_v = 512 channels of K. causal (s_q > 1): query i sees the first s_k - s_q + i + 1
    keys. Returns out [b, s_q, h_q, 512] (q's dtype) and lse fp32 [b, h_q, s_q] (natural log); a row with no
    keys gets out = 0 and lse = +inf. FP8 cache: uint8 [num_blocks, 64, h_kv, 656] (see mla.fp8_format).
    """
    face = kernel_for("mla_decode_with_kvcache", q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata,
                      num_splits)
    return face(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale,
                causal, is_fp8_kvcache)


def mla_append_kv(k_cache: torch.Tensor, kv: torch.Tensor, slot_mapping: torch.Tensor,
                  is_fp8_kvcache: bool = False) -> None:
    """Write kv [n, h_kv, d] into cache slots (slot = block * 64 + offset; -1 skips), quantising for FP8 caches."""
    kernel_for("mla_append_kv", k_cache, kv, slot_mapping)(k_cache, kv, slot_mapping, is_fp8_kvcache)
