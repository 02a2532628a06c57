"""Input validation shared by the MLA ops' reference, CUDA and fake faces: clear Python errors, no data access
(except `check_block_table_values`, which reads the block table and is only run where a host sync is allowed)."""
from __future__ import annotations

import torch

from torch_deepstack.checks import CheckedData

PAGE_SIZE = 64
HEAD_DIM_V = 512
HEAD_DIMS_QK = (576, 512)
FP8_TOKEN_BYTES = 656            # 512 e4m3 + 4 fp32 scales + 64 bf16 rope
FP8_HEAD_DIM = 576
SCHED_INTS = 8
Q_DTYPES = (torch.bfloat16, torch.float16)
FP8_CACHE_DTYPES = (torch.uint8, torch.int8, torch.float8_e4m3fn)


def check_decode_inputs(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
                        is_fp8_kvcache: bool, op: str = "mla_decode_with_kvcache") -> None:
    torch._check(q.dim() == 4, lambda: f"{op}: q must be [batch, s_q, h_q, d], got {q.dim()} dims")
    torch._check(q.dtype in Q_DTYPES, lambda: f"{op}: q must be bfloat16 or float16, got {q.dtype}")
    d = q.shape[-1]
    torch._check(d in HEAD_DIMS_QK, lambda: f"{op}: q head dim must be 576 (512 latent + 64 rope) or 512, got {d}")
    torch._check(q.stride(-1) == 1, lambda: f"{op}: q must be contiguous in its last dim")
    torch._check(head_dim_v == HEAD_DIM_V, lambda: f"{op}: head_dim_v must be {HEAD_DIM_V}, got {head_dim_v}")
    torch._check(k_cache.dim() == 4, lambda: f"{op}: k_cache must be [num_blocks, 64, h_kv, d], got {k_cache.dim()} dims")
    torch._check(k_cache.shape[1] == PAGE_SIZE,
                 lambda: f"{op}: the page size (k_cache.shape[1]) must be {PAGE_SIZE}, got {k_cache.shape[1]}")
    h_kv = k_cache.shape[2]
    torch._check(h_kv >= 1, lambda: f"{op}: k_cache must have at least one KV head")
    torch._check(q.shape[2] % h_kv == 0,
                 lambda: f"{op}: h_q={q.shape[2]} must be divisible by the KV head count h_kv={h_kv}")
    if is_fp8_kvcache:
        torch._check(k_cache.dtype in FP8_CACHE_DTYPES,
                     lambda: f"{op}: an FP8 k_cache must be uint8, int8 or float8_e4m3fn, got {k_cache.dtype}")
        torch._check(k_cache.shape[-1] == FP8_TOKEN_BYTES,
                     lambda: f"{op}: an FP8 k_cache row is {FP8_TOKEN_BYTES} bytes (512 e4m3 + 4 fp32 scales + "
                             f"64 bf16 rope), got last dim {k_cache.shape[-1]}")
        torch._check(d == FP8_HEAD_DIM, lambda: f"{op}: the FP8 cache holds 576-dim keys, but q has d={d}")
        torch._check(q.dtype == torch.bfloat16, lambda: f"{op}: the FP8 cache (bf16 rope) needs bfloat16 q, got {q.dtype}")
    else:
        torch._check(k_cache.dtype == q.dtype,
                     lambda: f"{op}: k_cache dtype {k_cache.dtype} must match q dtype {q.dtype} "
                             f"(pass is_fp8_kvcache=True for an FP8 cache)")
        torch._check(k_cache.shape[-1] == d,
                     lambda: f"{op}: k_cache head dim {k_cache.shape[-1]} must equal q head dim {d}")
    torch._check(k_cache.stride(-1) == 1, lambda: f"{op}: k_cache must be contiguous in its last dim")
    b = q.shape[0]
    torch._check(block_table.dim() == 2 and block_table.dtype == torch.int32,
                 lambda: f"{op}: block_table must be int32 [batch, max_blocks], got {block_table.dtype} "
                         f"with {block_table.dim()} dims")
    torch._check(block_table.shape[0] == b,
                 lambda: f"{op}: block_table has {block_table.shape[0]} rows for a batch of {b}")
    torch._check(cache_seqlens.dim() == 1 and cache_seqlens.dtype == torch.int32 and cache_seqlens.shape[0] == b,
                 lambda: f"{op}: cache_seqlens must be int32 [{b}], got {cache_seqlens.dtype} "
                         f"{tuple(cache_seqlens.shape)}")
    torch._check(tile_scheduler_metadata.dim() == 2 and tile_scheduler_metadata.shape[1] == SCHED_INTS
                 and tile_scheduler_metadata.dtype == torch.int32,
                 lambda: f"{op}: tile_scheduler_metadata must be int32 [num_sm_parts, {SCHED_INTS}] from "
                         f"get_mla_metadata, got {tile_scheduler_metadata.dtype} {tuple(tile_scheduler_metadata.shape)}")
    torch._check(num_splits.dim() == 1 and num_splits.dtype == torch.int32 and num_splits.shape[0] == b + 1,
                 lambda: f"{op}: num_splits must be int32 [{b + 1}] from get_mla_metadata, got {num_splits.dtype} "
                         f"{tuple(num_splits.shape)}")
    for name, t in (("k_cache", k_cache), ("block_table", block_table), ("cache_seqlens", cache_seqlens),
                    ("tile_scheduler_metadata", tile_scheduler_metadata), ("num_splits", num_splits)):
        torch._check(t.device == q.device, lambda name=name, t=t: f"{op}: {name} is on {t.device}, q on {q.device}")


CHECKED = CheckedData()


def check_block_table_values(block_table, cache_seqlens, num_blocks: int, op: str = "mla_decode_with_kvcache") -> None:
    """Every page a request uses must exist; seqlens must fit the table. Reads the data (a host sync on a GPU)."""
    seq = cache_seqlens.long()
    if bool((seq < 0).any()):
        raise ValueError(f"{op}: cache_seqlens must be >= 0, got min {int(seq.min())}")
    max_tokens = block_table.shape[1] * PAGE_SIZE
    if bool((seq > max_tokens).any()):
        raise ValueError(f"{op}: a cache_seqlens entry ({int(seq.max())}) exceeds block_table capacity "
                         f"({block_table.shape[1]} blocks x {PAGE_SIZE} = {max_tokens} tokens)")
    used = torch.arange(block_table.shape[1], device=block_table.device)[None, :] < ((seq + PAGE_SIZE - 1) // PAGE_SIZE)[:, None]
    bad = used & ((block_table < 0) | (block_table >= num_blocks))
    if bool(bad.any()):
        r, c = (int(x) for x in bad.nonzero()[0])
        raise IndexError(f"{op}: block_table[{r}, {c}] = {int(block_table[r, c])} is out of range for a cache of "
                         f"{num_blocks} blocks")


def check_metadata_inputs(cache_seqlens, num_q_tokens_per_head_k: int, num_heads_k: int, num_sm_parts: int,
                          op: str = "get_mla_metadata") -> None:
    torch._check(cache_seqlens.dim() == 1 and cache_seqlens.dtype == torch.int32,
                 lambda: f"{op}: cache_seqlens must be int32 [batch], got {cache_seqlens.dtype} "
                         f"{tuple(cache_seqlens.shape)}")
    torch._check(num_q_tokens_per_head_k >= 1,
                 lambda: f"{op}: num_q_tokens_per_head_k (s_q * h_q // h_kv) must be >= 1, got {num_q_tokens_per_head_k}")
    torch._check(num_heads_k >= 1, lambda: f"{op}: num_heads_k must be >= 1, got {num_heads_k}")
    torch._check(num_sm_parts >= 0, lambda: f"{op}: num_sm_parts must be >= 0 (0 = from the device), got {num_sm_parts}")


def check_append_inputs(k_cache, kv, slot_mapping, is_fp8_kvcache: bool, op: str = "mla_append_kv") -> None:
    torch._check(k_cache.dim() == 4 and k_cache.shape[1] == PAGE_SIZE,
                 lambda: f"{op}: k_cache must be [num_blocks, {PAGE_SIZE}, h_kv, d], got {tuple(k_cache.shape)}")
    torch._check(kv.dim() == 3 and kv.shape[1] == k_cache.shape[2],
                 lambda: f"{op}: kv must be [tokens, h_kv={k_cache.shape[2]}, d], got {tuple(kv.shape)}")
    torch._check(slot_mapping.dim() == 1 and slot_mapping.shape[0] == kv.shape[0]
                 and slot_mapping.dtype in (torch.int32, torch.int64),
                 lambda: f"{op}: slot_mapping must be int32/int64 [{kv.shape[0]}], got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    if is_fp8_kvcache:
        torch._check(k_cache.dtype in FP8_CACHE_DTYPES and k_cache.shape[-1] == FP8_TOKEN_BYTES,
                     lambda: f"{op}: an FP8 k_cache must be uint8/int8/float8_e4m3fn [..., {FP8_TOKEN_BYTES}], "
                             f"got {k_cache.dtype} [..., {k_cache.shape[-1]}]")
        torch._check(kv.shape[-1] == FP8_HEAD_DIM and kv.dtype in (torch.bfloat16, torch.float16, torch.float32),
                     lambda: f"{op}: kv for an FP8 cache must be [tokens, h_kv, {FP8_HEAD_DIM}] floating point, got "
                             f"{kv.dtype} [..., {kv.shape[-1]}]")
    else:
        torch._check(k_cache.dtype == kv.dtype and k_cache.shape[-1] == kv.shape[-1],
                     lambda: f"{op}: kv ({kv.dtype}, d={kv.shape[-1]}) must match k_cache ({k_cache.dtype}, "
                             f"d={k_cache.shape[-1]})")
    torch._check(kv.device == k_cache.device and slot_mapping.device == k_cache.device,
                 lambda: f"{op}: k_cache, kv and slot_mapping must be on one device")


def num_sm_parts_for(num_sms: int, num_q_tokens_per_head_k: int, num_heads_k: int) -> int:
    """FlashMLA's split: one CTA per SM, each handling 64 q rows of one KV head."""
    row_blocks = (num_q_tokens_per_head_k + 63) // 64
    return max(1, num_sms // (num_heads_k * row_blocks))
