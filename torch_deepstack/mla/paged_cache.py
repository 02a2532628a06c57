"""PagedKVCache: block allocation, block tables and seqlens for a batch of decoding requests (host-side
bookkeeping; the cache tensor and the tables live on the device)."""
from __future__ import annotations

import operator

import torch

from torch_deepstack._library import mark_static
from torch_deepstack.mla.api import get_mla_metadata, mla_append_kv, mla_decode_with_kvcache
from torch_deepstack.mla.checks import CHECKED, FP8_TOKEN_BYTES, PAGE_SIZE, check_append_inputs


class CacheFullError(RuntimeError):
    """No free block is left in the cache."""


class PagedKVCache:
    """One layer's (or a shared layout of) MLA KV cache of `num_blocks` pages of 64 tokens.

    Requests are slots 0..max_batch-1. `append(req_ids, kv)` writes one new token per listed request (allocating
    pages as needed); `free(req)` returns a request's pages. `block_table` (int32 [max_batch, max_blocks]) and
    `seqlens` (int32 [max_batch]) are device tensors updated in place, so a captured decode graph sees new values.
    The three device tensors are marked as static addresses for torch.compile, so a decode step compiled with
    mode="reduce-overhead" replays as CUDA graphs that use them in place. For such a step, keep the host-side
    bookkeeping (`reserve`, `free`) outside the compiled function and pass its slot ids in.
    """

    def __init__(self, num_blocks: int, max_batch: int, max_seq_len: int, num_heads_k: int = 1, head_dim: int = 576,
                 dtype: torch.dtype = torch.bfloat16, device="cpu", fp8: bool = False):
        if num_blocks < 1 or max_batch < 1 or max_seq_len < 1:
            raise ValueError("PagedKVCache: num_blocks, max_batch and max_seq_len must be >= 1")
        if fp8 and head_dim != 576:
            raise ValueError("PagedKVCache: the FP8 cache format stores 576-dim keys")
        self.fp8 = fp8
        self.dtype = dtype
        self.head_dim = head_dim
        self.num_heads_k = num_heads_k
        self.max_blocks = (max_seq_len + PAGE_SIZE - 1) // PAGE_SIZE
        last = FP8_TOKEN_BYTES if fp8 else head_dim
        self.k_cache = torch.zeros(num_blocks, PAGE_SIZE, num_heads_k, last, dtype=torch.uint8 if fp8 else dtype,
                                   device=device)
        self.block_table = torch.zeros(max_batch, self.max_blocks, dtype=torch.int32, device=device)
        self.seqlens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        mark_static(self.k_cache, self.block_table, self.seqlens)   # (torch.compile's CUDA graphs use them in place)
        self._free = list(range(num_blocks - 1, -1, -1))
        self._blocks: list[list[int]] = [[] for _ in range(max_batch)]
        self._lens = [0] * max_batch
        self._note_tables()

    def _note_tables(self) -> None:
        # Every entry of block_table is a valid block (zeros, or blocks handed out) and every length fits the table:
        # the ops' data checks (a host sync each on the GPU) need not read them again until something else writes them.
        CHECKED.note((self.block_table, self.seqlens), (self.k_cache.shape[0],), whole=True)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def seqlen(self, req: int) -> int:
        return self._lens[req]

    def blocks_of(self, req: int) -> list[int]:
        return list(self._blocks[req])

    def _check_req(self, req) -> int:
        try:
            r = operator.index(req)   # (Python, NumPy or 0-d torch integers)
        except TypeError:
            r = None
        if isinstance(req, bool) or r is None or not 0 <= r < len(self._lens):
            raise ValueError(f"PagedKVCache: req must be a request slot in 0..{len(self._lens) - 1}, got {req!r}")
        return r

    def _blocks_needed(self, growth: dict) -> int:
        """Checks that each request of {req: more tokens} fits its table; the pages they need in all."""
        need = 0
        for req, n in growth.items():
            req = self._check_req(req)
            try:
                n_ok = not isinstance(n, bool) and operator.index(n) >= 0
            except TypeError:
                n_ok = False
            if not n_ok:
                raise ValueError(f"PagedKVCache: num_tokens must be an integer >= 0, got {n!r}")
            end = self._lens[req] + n
            if end > self.max_blocks * PAGE_SIZE:
                raise ValueError(f"PagedKVCache: request {req} would hold {end} tokens, max is "
                                 f"{self.max_blocks * PAGE_SIZE}")
            need += (end + PAGE_SIZE - 1) // PAGE_SIZE - len(self._blocks[req])
        if need > len(self._free):
            raise CacheFullError(f"PagedKVCache: request(s) {sorted(growth)} need {need} more blocks, "
                                 f"{len(self._free)} free")
        return need

    def reserve(self, req: int, num_tokens: int) -> torch.Tensor:
        """Make room for `num_tokens` more tokens of request `req`; returns their slot ids (int64, on device).
        Raises (ValueError, or CacheFullError) before changing anything."""
        need = self._blocks_needed({req: num_tokens})
        req, num_tokens = self._check_req(req), operator.index(num_tokens)
        start = self._lens[req]
        end = start + num_tokens
        new = [self._free.pop() for _ in range(need)]
        if new:
            first = len(self._blocks[req])
            self._blocks[req].extend(new)
            self.block_table[req, first:first + len(new)] = torch.tensor(new, dtype=torch.int32)
        self._lens[req] = end
        self.seqlens[req] = end
        self._note_tables()
        blocks = torch.tensor(self._blocks[req], dtype=torch.int64)
        pos = torch.arange(start, end)
        return self._noted_slots((blocks[pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE).to(self.k_cache.device))

    def _noted_slots(self, slots: torch.Tensor) -> torch.Tensor:
        CHECKED.note((slots,), (self.k_cache.shape[0] * PAGE_SIZE,))
        return slots

    def append(self, req_ids, kv: torch.Tensor) -> None:
        """Append kv [len(req_ids), h_kv, d] (one token per listed request) or, for one request, [n, h_kv, d].
        kv and the room for every listed request are checked before anything changes: a refused append leaves the
        cache as it was."""
        req_ids = [req_ids] if isinstance(req_ids, int) else list(req_ids)
        kv = kv.to(self.k_cache.device)
        op = "PagedKVCache.append"
        check_append_inputs(self.k_cache, kv, torch.empty(kv.shape[0] if kv.dim() else 0, dtype=torch.int64,
                                                          device=self.k_cache.device), self.fp8, op)
        if len(req_ids) != 1 and kv.shape[0] != len(req_ids):
            raise ValueError(f"{op}: {len(req_ids)} requests but kv has {kv.shape[0]} rows")
        growth: dict = {}
        for r in req_ids:
            growth[r] = growth.get(r, 0) + (kv.shape[0] if len(req_ids) == 1 else 1)
        self._blocks_needed(growth)
        if len(req_ids) == 1:
            slots = self.reserve(req_ids[0], kv.shape[0])
        else:
            slots = self._noted_slots(torch.cat([self.reserve(r, 1) for r in req_ids]))
        mla_append_kv(self.k_cache, kv, slots, self.fp8)

    def free(self, req: int) -> None:
        req = self._check_req(req)
        self._free.extend(reversed(self._blocks[req]))
        self._blocks[req] = []
        self._lens[req] = 0
        self.seqlens[req] = 0
        self._note_tables()

    def metadata(self, s_q: int, h_q: int, batch: int | None = None):
        seq = self.seqlens if batch is None else self.seqlens[:batch]
        return get_mla_metadata(seq, s_q * h_q // self.num_heads_k, self.num_heads_k)

    def decode(self, q: torch.Tensor, metadata=None, softmax_scale=None, causal: bool = False):
        """Attention of q [b, s_q, h_q, d] over requests 0..b-1."""
        b, s_q, h_q, _ = q.shape
        sched, splits = metadata if metadata is not None else self.metadata(s_q, h_q, b)
        return mla_decode_with_kvcache(q, self.k_cache, self.block_table[:b], self.seqlens[:b], 512, sched, splits,
                                       softmax_scale, causal, self.fp8)
