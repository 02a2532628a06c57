"""Plain-PyTorch references of the MLA ops, registered as their CPU kernels (the spec and the CI oracle)."""
from __future__ import annotations

import math

import torch

from torch_deepstack._library import reference, sample_inputs
from torch_deepstack.mla import fp8_format
from torch_deepstack.mla.checks import (HEAD_DIM_V, PAGE_SIZE, check_append_inputs, check_block_table_values,
                                        check_decode_inputs, check_metadata_inputs, num_sm_parts_for)
from torch_deepstack.mla.schedule import DEFAULT_CPU_SMS, schedule_tensors


@reference("get_mla_metadata")
def get_mla_metadata_ref(cache_seqlens, num_q_tokens_per_head_k: int, num_heads_k: int, num_sm_parts: int = 0):
    check_metadata_inputs(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_sm_parts)
    parts = num_sm_parts or num_sm_parts_for(DEFAULT_CPU_SMS, num_q_tokens_per_head_k, num_heads_k)
    return schedule_tensors(cache_seqlens, parts)


def gather_keys(k_cache, block_table, req: int, sk: int, is_fp8: bool) -> torch.Tensor:
    """The first sk cached keys of request `req` as fp32 [sk, h_kv, 576 or 512]."""
    nblk = (sk + PAGE_SIZE - 1) // PAGE_SIZE
    pages = k_cache[block_table[req, :nblk].long()]                   # [nblk, 64, h_kv, d or 656]
    rows = pages.reshape(nblk * PAGE_SIZE, *pages.shape[2:])[:sk]
    return fp8_format.dequantize_rows(rows) if is_fp8 else rows.float()


def mla_decode_fp32(q, k_cache, block_table, cache_seqlens, softmax_scale, causal, is_fp8):
    """fp32 attention per request: out [b, s_q, h_q, 512] fp32, lse [b, h_q, s_q] (+inf and 0 for no keys)."""
    b, s_q, h_q, d = q.shape
    h_kv = k_cache.shape[2]
    out = torch.zeros(b, s_q, h_q, HEAD_DIM_V, dtype=torch.float32, device=q.device)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float32, device=q.device)
    for i in range(b):
        sk = int(cache_seqlens[i])
        if sk == 0:
            continue
        k = gather_keys(k_cache, block_table, i, sk, is_fp8)           # [sk, h_kv, d]
        k = k.repeat_interleave(h_q // h_kv, dim=1)                   # [sk, h_q, d]
        qi = q[i].float().transpose(0, 1)                             # [h_q, s_q, d]
        scores = qi @ k.permute(1, 2, 0) * softmax_scale              # [h_q, s_q, sk]
        if causal and s_q > 1:
            # query s sees keys [0, sk - s_q + s + 1)
            limit = sk - s_q + torch.arange(s_q, device=q.device) + 1
            mask = torch.arange(sk, device=q.device)[None, :] >= limit[:, None]
            scores = scores.masked_fill(mask[None], -math.inf)
        row_lse = torch.logsumexp(scores, dim=-1)                     # [h_q, s_q]
        empty = torch.isinf(row_lse) & (row_lse < 0)
        p = torch.exp(scores - row_lse.masked_fill(empty, 0)[..., None])
        o = p @ k[..., :HEAD_DIM_V].transpose(0, 1)                   # [h_q, s_q, 512]
        out[i] = o.transpose(0, 1)
        lse[i] = row_lse.masked_fill(empty, math.inf)
    return out, lse


def default_softmax_scale(d: int, softmax_scale) -> float:
    return float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d)


@reference("mla_decode_with_kvcache")
def mla_decode_with_kvcache_ref(q, k_cache, block_table, cache_seqlens, head_dim_v: int, tile_scheduler_metadata,
                                num_splits, softmax_scale=None, causal: bool = False, is_fp8_kvcache: bool = False):
    check_decode_inputs(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
                        is_fp8_kvcache)
    check_block_table_values(block_table, cache_seqlens, k_cache.shape[0])
    scale = default_softmax_scale(q.shape[-1], softmax_scale)
    out, lse = mla_decode_fp32(q, k_cache, block_table, cache_seqlens, scale, causal, is_fp8_kvcache)
    return out.to(q.dtype), lse


def append_rows(kv: torch.Tensor, is_fp8: bool, cache_dtype: torch.dtype) -> torch.Tensor:
    if is_fp8:
        rows = fp8_format.quantize_rows(kv)
        return rows if cache_dtype == torch.uint8 else rows.view(cache_dtype)
    return kv


@reference("mla_append_kv")
def mla_append_kv_ref(k_cache, kv, slot_mapping, is_fp8_kvcache: bool = False) -> None:
    check_append_inputs(k_cache, kv, slot_mapping, is_fp8_kvcache)
    slots = slot_mapping.long()
    keep = slots >= 0
    if bool((slots >= k_cache.shape[0] * PAGE_SIZE).any()):
        raise IndexError(f"mla_append_kv: slot {int(slots.max())} is out of range for a cache of "
                         f"{k_cache.shape[0]} blocks x {PAGE_SIZE} slots")
    flat = k_cache.view(k_cache.shape[0] * PAGE_SIZE, *k_cache.shape[2:])
    flat[slots[keep]] = append_rows(kv[keep], is_fp8_kvcache, k_cache.dtype)


# ------------------------------------------------------------ opcheck samples ------------------------------------
def _sample_cache(device, b, s_q, h_q, h_kv, d, dtype, seqlens, fp8=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(1, max((s + PAGE_SIZE - 1) // PAGE_SIZE for s in seqlens))
    num_blocks = b * max_blocks + 1
    perm = torch.randperm(num_blocks, generator=g)[: b * max_blocks].reshape(b, max_blocks).to(torch.int32)
    k = torch.randn(num_blocks, PAGE_SIZE, h_kv, 576 if fp8 else d, generator=g) / 4
    cache = fp8_format.quantize_rows(k) if fp8 else k.to(dtype)
    q = (torch.randn(b, s_q, h_q, d, generator=g) / 4).to(dtype)
    seq = torch.tensor(seqlens, dtype=torch.int32)
    return q.to(device), cache.to(device), perm.to(device), seq.to(device)


@sample_inputs("get_mla_metadata")
def _metadata_samples(device):
    out = []
    for seqlens, qpk, hk, parts in (([100, 0, 300], 16, 1, 4), ([64, 65], 128, 2, 0), ([1], 1, 1, 3)):
        out.append(((torch.tensor(seqlens, dtype=torch.int32, device=device), qpk, hk), {"num_sm_parts": parts}))
    return out


@sample_inputs("mla_decode_with_kvcache")
def _decode_samples(device):
    out = []
    for b, s_q, h_q, h_kv, d, dtype, seqlens, causal, fp8 in (
            (2, 1, 4, 1, 576, torch.bfloat16, [70, 0], False, False),
            (1, 2, 3, 1, 512, torch.float16, [65], True, False),
            (2, 1, 2, 2, 576, torch.bfloat16, [5, 130], False, True)):
        q, cache, bt, seq = _sample_cache(device, b, s_q, h_q, h_kv, d, dtype, seqlens, fp8)
        sched, splits = torch.ops.deepstack.get_mla_metadata(seq, s_q * h_q // h_kv, h_kv, num_sm_parts=3)
        out.append(((q, cache, bt, seq, 512, sched, splits),
                    {"softmax_scale": None if d == 576 else 0.05, "causal": causal, "is_fp8_kvcache": fp8}))
    return out


@sample_inputs("mla_append_kv")
def _append_samples(device):
    out = []
    for fp8, dtype in ((False, torch.bfloat16), (True, torch.bfloat16)):
        g = torch.Generator().manual_seed(1)
        cache = (torch.zeros(3, PAGE_SIZE, 1, 656, dtype=torch.uint8) if fp8
                 else torch.zeros(3, PAGE_SIZE, 1, 576, dtype=dtype))
        kv = torch.randn(5, 1, 576, generator=g).to(dtype)
        slots = torch.tensor([0, 63, 64, -1, 191], dtype=torch.int64)
        out.append(((cache.to(device), kv.to(device), slots.to(device)), {"is_fp8_kvcache": fp8}))
    return out
