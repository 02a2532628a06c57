"""Dispatch and combine as local torch work around a transport's three moves (see transport.py).

Rows travel as bytes. Normal mode moves each token's data straight from x and, as a second small move, one packed
metadata row (fp8 scales, global top-k ids and weights, index on the source rank). Low-latency mode packs data and
metadata into one row per token, since every rank sends every token slot anyway.

Normal mode has two exchange shapes:
- exact (num_worst_tokens == 0): per-rank counts are exchanged and read on the host, rows move with a variable
  all-to-all and the output has exactly the received rows (DeepEP's CPU sync);
- worst case (num_worst_tokens > 0): every rank sends a fixed block of num_worst_tokens // R rows to every rank,
  positions are computed on the device, and the output is padded to num_worst_tokens rows (no host sync).
Summation in combine runs over destination ranks in rank order, in fp32: results are bitwise repeatable.
"""
from __future__ import annotations

import torch

from torch_deepstack.ep import intranode
from torch_deepstack.ep.checks import (BAD_EXPERT_IDS, TOO_MANY_TOKENS, RankChecks, check_expert_range,
                                       check_max_tokens, read_codes)
from torch_deepstack.ep.layout import (align_expert_counts, fixed_bincount, inclusive_rank_positions,
                                      to_local_experts, token_rank_mask)
from torch_deepstack.quant.scale_layout import mn_major_tma_aligned_empty


# --- byte rows ----------------------------------------------------------------------------------------------

def _bytes(t: torch.Tensor) -> torch.Tensor:
    width = 1
    for d in t.shape[1:]:
        width *= d
    if t.numel() == 0:   # (no rows: .contiguous() keeps odd strides, e.g. a stride-0 gradient's, that view refuses)
        return torch.empty(t.shape[0], width * t.element_size(), dtype=torch.uint8, device=t.device)
    t = t.reshape(t.shape[0], width).contiguous()     # explicit width: -1 is ambiguous for zero-width rows
    return t.view(torch.uint8) if t.dtype != torch.uint8 else t


def pack_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([_bytes(p) for p in parts], dim=1)


def unpack_rows(rows: torch.Tensor, specs: list[tuple[torch.dtype, int]]) -> list[torch.Tensor]:
    out, off = [], 0
    for dtype, width in specs:
        nbytes = width * dtype.itemsize
        out.append(from_byte_rows(rows[:, off:off + nbytes], dtype))
        off += nbytes
    return out


def row_specs(hidden: int, x_dtype, num_scales: int, num_topk: int, with_weights: bool):
    specs = [(x_dtype, hidden)]
    if num_scales:
        specs.append((torch.float32, num_scales))   # (low-latency rows: our own quantiser's fp32 scales)
    specs.append((torch.int64, num_topk))
    if with_weights:
        specs.append((torch.float32, num_topk))
    specs.append((torch.int32, 1))
    return specs


# --- normal mode: moving rows --------------------------------------------------------------------------------
# Token data moves as its own byte rows, straight from x (no packing copy); the small per-row metadata (fp8 scales,
# top-k ids and weights, token index) is packed into one second byte tensor. Two moves per exchange.

def as_byte_rows(t: torch.Tensor) -> torch.Tensor:
    return _bytes(t)


def from_byte_rows(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if b.shape[1] == 0:                      # zero-width rows cannot be re-viewed
        return torch.empty(b.shape[0], 0, dtype=dtype, device=b.device)
    c = b.contiguous()
    # A field sliced out of 0 or 1 packed rows stays a view (contiguous already) with the row's byte stride and the
    # field's byte offset, which a wider dtype cannot view: copy it to a fresh, aligned tensor.
    if c.shape[0] <= 1 and (c.storage_offset() % dtype.itemsize or c.stride(0) % dtype.itemsize):
        c = torch.empty(c.shape, dtype=torch.uint8, device=c.device).copy_(c)
    return c.view(dtype)


def move_exact(transport, tensors, tok, send_splits, recv_splits):
    """Rows `tok` (sorted by destination) of each tensor go out with the given host splits."""
    return [transport.all_to_all_v(as_byte_rows(t).index_select(0, tok), send_splits, recv_splits) for t in tensors]


def scatter_to_blocks(tensors, flat_dst, R: int, cap: int):
    """Fixed-capacity send buffers [R, cap, bytes]: row i of each tensor goes to flat_dst[i, c] for each column c
    (R * cap is a dump slot). The destinations in one column are distinct."""
    out = []
    for t in tensors:
        rows = as_byte_rows(t)
        send = torch.zeros(R * cap + 1, rows.shape[1], dtype=torch.uint8, device=rows.device)
        for c in range(flat_dst.shape[1]):
            send.index_copy_(0, flat_dst[:, c], rows)
        out.append(send[:R * cap].view(R, cap, -1))
    return out


def worst_capacity(num_worst_tokens: int, num_ranks: int, num_tokens: int, op: str) -> int:
    cap = num_worst_tokens // num_ranks
    if num_tokens > cap:
        raise ValueError(f"{op}: num_worst_tokens={num_worst_tokens} gives each source rank {cap} receive slots "
                         f"per destination (num_worst_tokens // num_ranks), fewer than this rank's "
                         f"{num_tokens} tokens; use num_worst_tokens >= num_tokens * num_ranks")
    return cap


def source_of_rows(recv_counts: torch.Tensor, total_rows: int):
    """For output rows 0..total_rows-1 laid out source by source: (source rank, slot within its block, valid)."""
    ends = torch.cumsum(recv_counts.to(torch.int64), 0)
    p = torch.arange(total_rows, device=recv_counts.device, dtype=torch.int64)
    src = torch.searchsorted(ends, p, right=True)
    valid = src < recv_counts.shape[0]
    src_c = src.clamp(max=recv_counts.shape[0] - 1)
    slot = p - (ends[src_c] - recv_counts.to(torch.int64)[src_c])
    return src_c, slot, valid


def _dispatch_rows(transport, mask, rank_counts, tensors, num_worst_tokens: int, num_recv: int | None,
                   host_counts=None):
    """Move each tensor's rows to the ranks in `mask`; returns received byte rows (and the validity of each output
    row in worst-case mode, else None). host_counts: rank_counts already read on the host, if it was."""
    R, rank = transport.world_size, transport.rank
    n = mask.shape[0]
    if num_worst_tokens == 0:
        tok = mask.t().nonzero()[:, 1]                                 # sorted by destination, then token
        rc = rank_counts.cpu() if host_counts is None else host_counts  # one host read of the count matrix
        return move_exact(transport, tensors, tok, rc[rank].tolist(), rc[:, rank].tolist()), None
    cap = worst_capacity(num_worst_tokens, R, n, "dispatch")
    pos = slot_positions(mask)                                         # [n, R]
    flat = torch.where(pos >= 0, torch.arange(R, device=mask.device) * cap + pos, R * cap).to(torch.int64)
    blocks = scatter_to_blocks(tensors, flat, R, cap)
    src, slot, valid = source_of_rows(rank_counts[:, rank], num_recv if num_recv is not None else num_worst_tokens)
    pick = src * cap + slot.clamp(max=cap - 1)
    got = [transport.all_to_all_fixed(b).view(R * cap, -1).index_select(0, pick) for b in blocks]
    return got, valid


def slot_positions(mask: torch.Tensor) -> torch.Tensor:
    """pos[t, j] = how many earlier tokens also go to rank j (the row's slot in block j); -1 where not sent."""
    pos = inclusive_rank_positions(mask) - 1
    return torch.where(mask, pos, torch.full_like(pos, -1))


# --- normal dispatch ----------------------------------------------------------------------------------------

def source_expert_counts(topk_idx, num_tokens_per_expert, num_experts: int, device) -> torch.Tensor:
    """What this rank tells every destination about its tokens per expert (int32 [E]): the caller's
    num_tokens_per_expert when given (DeepEP's notify step sends those, with or without top-k), else the (token,
    slot) pairs of topk_idx per expert, else zeros. A destination's received tokens per local expert are the sum
    over sources of its [L] slice."""
    if num_tokens_per_expert is not None:
        return num_tokens_per_expert.to(device=device, dtype=torch.int32)
    if topk_idx is None:
        return torch.zeros(num_experts, dtype=torch.int32, device=device)
    flat = topk_idx.reshape(-1)
    flat = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)   # (bad ids: counted nowhere)
    return fixed_bincount(flat, num_experts + 1)[:num_experts].to(torch.int32)


def dispatch(transport, x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_experts: int,
             expert_alignment: int, num_worst_tokens: int, num_tokens_per_expert=None):
    """Returns (recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert,
    is_token_in_rank, rank_counts [R, R], recv_src_idx). In worst-case mode the rows past the received ones have
    recv_topk_idx = recv_src_idx = -1, zero weights and scales, and unspecified data. x_scales ([N, S] float32 or
    int32) travel with their rows as an opaque payload and come back as [num_recv, S] in their dtype.
    num_recv_tokens_per_expert [L]: the sum over source ranks of their num_tokens_per_expert for this rank's
    experts (see source_expert_counts), rounded up to expert_alignment."""
    R, rank = transport.world_size, transport.rank
    L = num_experts // R
    n, hidden = x.shape
    dev = x.device
    fused = intranode.usable(transport, hidden * x.element_size())
    checks = RankChecks("ep_dispatch")
    # Expert ids are checked here (a host sync on GPU), except where the fused exact-size dispatch checks them in
    # its count exchange.
    if topk_idx is not None and not (fused and num_worst_tokens == 0 and is_token_in_rank is not None):
        checks.run(BAD_EXPERT_IDS, f"topk_idx holds expert ids outside [-1, num_experts={num_experts})",
                   lambda: check_expert_range("ep_dispatch", topk_idx, num_experts))
    if num_worst_tokens:
        checks.run(TOO_MANY_TOKENS, f"more tokens than num_worst_tokens // num_ranks = {num_worst_tokens // R}",
                   lambda: worst_capacity(num_worst_tokens, R, n, "dispatch"))
    if checks.failed:   # it sends no tokens and its code in the count exchange below, then raises its own error
        if fused:
            checks.raise_own()      # (the fused kernels' count exchange carries no codes)
        mask = torch.zeros(n, R, dtype=torch.bool, device=dev)
    else:
        mask = is_token_in_rank if is_token_in_rank is not None else token_rank_mask(topk_idx, num_experts, R)
    if fused:
        out = intranode.intranode_for(transport).dispatch(x, x_scales, topk_idx, topk_weights, mask, num_experts,
                                                          expert_alignment, num_worst_tokens, num_tokens_per_expert)
        if out is not None:
            recv = list(out)
            if is_token_in_rank is not None:
                recv[5] = mask.clone()
            return tuple(recv)
    k = topk_idx.shape[1] if topk_idx is not None else 0
    num_scales = x_scales.shape[1] if x_scales is not None else 0
    meta_parts = ([x_scales] if x_scales is not None else []) + \
        [topk_idx if topk_idx is not None else torch.empty(n, 0, dtype=torch.int64, device=dev)] + \
        ([topk_weights] if topk_weights is not None else []) + [torch.arange(n, dtype=torch.int32, device=dev)]
    specs = ([(x_scales.dtype, num_scales)] if x_scales is not None else []) + [(torch.int64, k)] + \
        ([(torch.float32, k)] if topk_weights is not None else []) + [(torch.int32, 1)]
    # The count exchange carries, per rank: its tokens per destination rank [R], its check code (a rank whose
    # input failed a check raises its own error after the exchange, and the others an EPPeerInputError, rather
    # than wait for it) and its tokens per expert [E] (each destination sums its experts' columns).
    counts = mask.sum(0, dtype=torch.int32)
    per_expert_sent = (torch.zeros(num_experts, dtype=torch.int32, device=dev) if checks.failed else
                       source_expert_counts(topk_idx, num_tokens_per_expert, num_experts, dev))
    gathered = transport.exchange_counts(torch.cat([counts, counts.new_full((1,), checks.code),
                                                    per_expert_sent]))               # [R, R + 1 + E]
    host = gathered.cpu() if num_worst_tokens == 0 else None     # the exact form reads the counts anyway
    checks.raise_failures(host[:, R].tolist() if host is not None else read_codes(gathered[:, R]))
    rank_counts = gathered[:, :R].contiguous()                   # [R, R]: rank i sends [i, j] rows to rank j
    per_expert = align_expert_counts(gathered[:, R + 1 + rank * L:R + 1 + (rank + 1) * L].sum(0), expert_alignment)
    (recv_bytes, recv_meta), valid = _dispatch_rows(transport, mask, rank_counts, [x, pack_rows(meta_parts)],
                                                    num_worst_tokens, None,
                                                    host[:, :R] if host is not None else None)
    if valid is not None:
        recv_meta = torch.where(valid.unsqueeze(1), recv_meta, torch.zeros_like(recv_meta))
    recv_x = from_byte_rows(recv_bytes, x.dtype)
    fields = unpack_rows(recv_meta, specs)
    recv_scales = fields.pop(0) if x_scales is not None else torch.empty(0, dtype=torch.float32, device=dev)
    recv_topk_global = fields.pop(0)
    recv_w = fields.pop(0) if topk_weights is not None else None
    recv_src_idx = fields.pop(0).reshape(-1)
    if valid is not None:
        recv_topk_global = torch.where(valid.unsqueeze(1), recv_topk_global, -1)
        recv_src_idx = torch.where(valid, recv_src_idx, -1)
    recv_topk_idx = to_local_experts(recv_topk_global, rank, L)
    if recv_w is None:
        recv_w = torch.empty(recv_topk_idx.shape[0], 0, dtype=torch.float32, device=dev)
    else:
        recv_w = torch.where(recv_topk_idx >= 0, recv_w, torch.zeros_like(recv_w))
    return (recv_x, recv_scales, recv_topk_idx, recv_w, per_expert,
            mask.clone() if is_token_in_rank is not None else mask, rank_counts, recv_src_idx)


def cached_dispatch(transport, x, x_scales, is_token_in_rank, rank_counts, num_recv: int, num_worst_tokens: int):
    """Dispatch with a known layout (a handle): only the data moves. Returns (recv_x, recv_x_scales)."""
    dev = x.device
    if intranode.usable(transport, x.shape[1] * x.element_size()):
        out = intranode.intranode_for(transport).cached_dispatch(x, x_scales, is_token_in_rank, rank_counts,
                                                                 num_recv, num_worst_tokens)
        if out is not None:
            return out
    tensors = [x] + ([x_scales] if x_scales is not None else [])
    got, _ = _dispatch_rows(transport, is_token_in_rank, rank_counts, tensors, num_worst_tokens, num_recv)
    recv_x = from_byte_rows(got[0], x.dtype)
    recv_scales = from_byte_rows(got[1], x_scales.dtype) if x_scales is not None else \
        torch.empty(0, dtype=torch.float32, device=dev)
    return recv_x, recv_scales


# --- normal combine -----------------------------------------------------------------------------------------

def combine(transport, x, topk_weights, is_token_in_rank, rank_counts, num_worst_tokens: int):
    """Sum each token's rows back on its source rank. x: [num_recv, hidden] laid out as dispatch produced it.
    Returns (combined_x [N, hidden], combined_topk_weights [N, k] or [N, 0])."""
    R, rank = transport.world_size, transport.rank
    n = is_token_in_rank.shape[0]
    hidden = x.shape[1]
    dev = x.device
    if x.dtype in intranode.REDUCE_DTYPES and intranode.usable(transport, hidden * x.element_size()):
        out = intranode.intranode_for(transport).combine(x, topk_weights, is_token_in_rank, rank_counts,
                                                         num_worst_tokens)
        if out is not None:
            return out
    k = topk_weights.shape[1] if topk_weights is not None else 0
    w = topk_weights if topk_weights is not None else torch.empty(x.shape[0], 0, dtype=torch.float32, device=dev)
    mask = is_token_in_rank
    acc_x = torch.zeros(n, hidden, dtype=torch.float32 if x.dtype != torch.float64 else x.dtype, device=dev)
    acc_w = torch.zeros(n, k, dtype=torch.float32, device=dev)
    if num_worst_tokens == 0:
        # received rows are already grouped by source rank: they go back as they are
        rc = rank_counts.cpu()                                         # one host read of the count matrix
        back = [transport.all_to_all_v(as_byte_rows(t), rc[:, rank].tolist(), rc[rank].tolist()) for t in (x, w)]
        bx, bw = from_byte_rows(back[0], x.dtype), from_byte_rows(back[1], torch.float32)
        tok = mask.t().nonzero()[:, 1]
        starts = [0] + torch.cumsum(rc[rank], 0).tolist()
        for j in range(R):                       # fixed order over destinations: repeatable sums
            s, e = starts[j], starts[j + 1]
            if e > s:
                acc_x.index_add_(0, tok[s:e], bx[s:e].to(acc_x.dtype))
                acc_w.index_add_(0, tok[s:e], bw[s:e])
    else:
        cap = worst_capacity(num_worst_tokens, R, n, "combine")
        src, slot, valid = source_of_rows(rank_counts[:, rank], x.shape[0])
        flat = torch.where(valid, src * cap + slot, R * cap).unsqueeze(1)
        blocks = scatter_to_blocks([x, w], flat, R, cap)
        bx, bw = [transport.all_to_all_fixed(b).view(R * cap, -1) for b in blocks]
        bx, bw = from_byte_rows(bx, x.dtype), from_byte_rows(bw, torch.float32)
        pos = slot_positions(mask)
        for j in range(R):
            sel = (pos[:, j] >= 0).unsqueeze(1)
            idx = (j * cap + pos[:, j].clamp(min=0)).to(torch.int64)
            acc_x += torch.where(sel, bx.index_select(0, idx).to(acc_x.dtype), 0)
            acc_w += torch.where(sel, bw.index_select(0, idx), 0)
    return acc_x.to(x.dtype), acc_w


# --- low-latency mode ---------------------------------------------------------------------------------------
# Every rank sends one fixed block of M = num_max_dispatch_tokens_per_rank rows to every rank (row t = token t,
# padded rows carry top-k ids of -1), so shapes never depend on routing: no host sync, CUDA-graph capturable.

class _Done:
    """A move that has already completed."""

    def __init__(self, result):
        self.result = result

    def wait(self):
        return self.result


def start_fixed(transport, send):
    """Start a fixed all-to-all; `.wait()` returns the received blocks. Transports that can leave a move in
    flight (torch.distributed) provide start_all_to_all_fixed; the others complete it here."""
    start = getattr(transport, "start_all_to_all_fixed", None)
    return start(send) if start is not None else _Done(transport.all_to_all_fixed(send))


class LowLatencyDispatch:
    """A low-latency dispatch in two halves: start() sends and allocates the outputs, finish() receives into them
    (what a receive hook runs). `outputs` are valid once finish() has run. Each row's last int32 carries the
    sender's check code (see RankChecks); a rank whose checks failed sends no tokens."""

    def __init__(self, transport, x, x_scales, topk_idx, num_max: int, num_experts: int, checks: RankChecks):
        self.checks = checks
        if checks.failed:
            x, topk_idx = x[:0], topk_idx[:0]
            x_scales = x_scales[:0] if x_scales is not None else None
        R = self.R = transport.world_size
        self.rank = transport.rank
        L = self.L = num_experts // R
        n, hidden = x.shape
        k = self.k = topk_idx.shape[1]
        dev = self.dev = x.device
        self.num_max = num_max
        self.num_scales = x_scales.shape[1] if x_scales is not None else 0
        self.specs = row_specs(hidden, x.dtype, self.num_scales, k, False)
        padded_idx = torch.full((num_max, k), -1, dtype=torch.int64, device=dev)
        padded_idx[:n] = topk_idx
        parts = [torch.zeros(num_max, hidden, dtype=x.dtype, device=dev)]
        parts[0][:n] = x
        if x_scales is not None:
            sc = torch.zeros(num_max, self.num_scales, dtype=torch.float32, device=dev)
            sc[:n] = x_scales
            parts.append(sc)
        parts += [padded_idx, torch.full((num_max, 1), checks.code, dtype=torch.int32, device=dev)]
        payload = pack_rows(parts)                                    # [M, B]
        self.pending = start_fixed(transport, payload.unsqueeze(0).expand(R, -1, -1).contiguous())
        if checks.failed:         # its peers learn of it from this exchange (in finish()); it raises now
            self.pending.wait()
            checks.raise_own()
        cap = self.cap = num_max * R
        dump = self.dump = L * cap
        self.out = torch.zeros(dump + 1, hidden * x.element_size(), dtype=torch.uint8, device=dev)
        self.out_s = (torch.zeros(dump + 1, self.num_scales, dtype=torch.float32, device=dev)
                      if self.num_scales else None)
        self.src_info = torch.full((dump + 1,), -1, dtype=torch.int32, device=dev)
        self.recv_count = torch.empty(L, dtype=torch.int32, device=dev)
        self.layout_range = torch.empty(L, R, dtype=torch.int64, device=dev)
        # fp8 scales leave in the layout the masked grouped FP8 GEMM reads (MN-major, TMA-aligned per expert)
        self.scales = (mn_major_tma_aligned_empty((L, cap, self.num_scales), device=dev) if self.num_scales
                       else torch.empty(0, dtype=torch.float32, device=dev))
        self.outputs = (self.out[:dump].view(x.dtype).view(L, cap, hidden), self.scales, self.recv_count,
                        self.src_info[:dump].view(L, cap), self.layout_range)

    def finish(self):
        R, L, k, num_max, cap, dump, dev = self.R, self.L, self.k, self.num_max, self.cap, self.dump, self.dev
        got = self.pending.wait()
        fields = unpack_rows(got.view(R * num_max, -1), self.specs)
        self.checks.raise_failures(read_codes(fields[-1].view(R, num_max)[:, 0]))
        data = fields[0].view(torch.uint8)                            # move bytes: fp8 has few index kernels
        scales = fields[1] if self.num_scales else None
        local = to_local_experts(fields[-2], self.rank, L)            # [R*M, k] local expert of each slot
        hit = torch.zeros(R * num_max, L + 1, dtype=torch.bool, device=dev)
        hit.scatter_(1, torch.where(local >= 0, local, torch.full_like(local, L)), True)
        hit = hit[:, :L]                                              # [R*M, L]: row q goes to local expert l
        pos = slot_positions(hit)                                     # position in expert l's block
        self.recv_count.copy_(hit.sum(0, dtype=torch.int32))
        per_src = hit.view(R, num_max, L).sum(1, dtype=torch.int64).t()   # [L, R]
        self.layout_range.copy_(((torch.cumsum(per_src, 1) - per_src) << 32) | per_src)
        # every (received row, top-k slot) pair at once: its destination row, or the dump row
        lc = local.clamp(min=0)
        dst = torch.where(local >= 0, lc * cap + pos.gather(1, lc), dump).reshape(-1)
        src = torch.arange(R * num_max, device=dev).unsqueeze(1).expand(-1, k).reshape(-1)
        self.src_info.index_put_((dst,), (src % num_max).to(torch.int32))
        self.out.index_put_((dst,), data.index_select(0, src))       # valid destinations are distinct
        if scales is not None:
            self.out_s.index_put_((dst,), scales.index_select(0, src))
            self.scales.copy_(self.out_s[:dump].view(L, cap, -1))
        return self.outputs


def ll_rank_checks(op: str, tokens_name: str, topk_idx, num_max: int, num_experts: int) -> RankChecks:
    """The checks of a low-latency call that may fail on one rank only."""
    checks = RankChecks(op)
    checks.run(TOO_MANY_TOKENS, f"more tokens than num_max_dispatch_tokens_per_rank={num_max}",
               lambda: check_max_tokens(op, tokens_name, topk_idx.shape[0], num_max))
    checks.run(BAD_EXPERT_IDS, f"topk_idx holds expert ids outside [-1, num_experts={num_experts})",
               lambda: check_expert_range(op, topk_idx, num_experts))
    return checks


def ll_dispatch_state(transport, x, x_scales, topk_idx, num_max: int, num_experts: int):
    """A started low-latency dispatch: the fused NVLink kernels where they apply, else the torch-op path."""
    checks = ll_rank_checks("ep_low_latency_dispatch", "x", topk_idx, num_max, num_experts)
    G = x_scales.shape[1] if x_scales is not None else 0
    if intranode.ll_fits(transport, num_experts // transport.world_size, num_max, x.shape[1] * x.element_size(), G):
        checks.raise_own()          # (the fused kernels exchange no codes)
        return intranode.FusedLowLatencyDispatch(transport, x, x_scales, topk_idx, num_max, num_experts)
    return LowLatencyDispatch(transport, x, x_scales, topk_idx, num_max, num_experts, checks)


def ll_dispatch(transport, x, x_scales, topk_idx, num_max: int, num_experts: int):
    """Returns (recv_x [L, M*R, H], recv_scales (MN-major [L, M*R, G] or empty),
    recv_count [L] int32, src_info [L, M*R] int32, layout_range [L, R] int64)."""
    return ll_dispatch_state(transport, x, x_scales, topk_idx, num_max, num_experts).finish()


def ll_row_sources(layout_range: torch.Tensor, cap: int):
    """For each (local expert, row): the source rank, and whether the row is valid."""
    begin = layout_range >> 32
    count = layout_range & 0xFFFFFFFF
    p = torch.arange(cap, device=layout_range.device)
    inside = (p.view(1, 1, -1) >= begin.unsqueeze(2)) & (p.view(1, 1, -1) < (begin + count).unsqueeze(2))
    valid = inside.any(1)                                             # [L, cap]
    src = inside.to(torch.int64).argmax(1)                            # [L, cap]
    return src, valid


class LowLatencyCombine:
    """A low-latency combine in two halves: start() exchanges routing, computes this rank's weighted partial sums
    and sends them home; finish() adds what came back (what a receive hook runs)."""

    def __init__(self, transport, x, topk_idx, topk_weights, src_info, layout_range, num_max: int,
                 checks: RankChecks, out=None):
        R, rank = transport.world_size, transport.rank
        L, cap, hidden = x.shape
        n, k = topk_idx.shape
        dev = x.device
        # 1. every source rank tells every expert rank its routing and weights (small: M x k per peer), and its
        # check code (a rank whose checks failed sends no tokens, and raises after this exchange).
        if checks.failed:
            n = 0
        pidx = torch.full((num_max, k), -1, dtype=torch.int64, device=dev)
        pidx[:n] = topk_idx[:n]
        pw = torch.zeros(num_max, k, dtype=torch.float32, device=dev)
        pw[:n] = topk_weights[:n]
        code = torch.full((num_max, 1), checks.code, dtype=torch.int32, device=dev)
        got = transport.all_to_all_fixed(pack_rows([pidx, pw, code]).unsqueeze(0).expand(R, -1, -1).contiguous())
        gidx, gw, codes = unpack_rows(got.view(R * num_max, -1), [(torch.int64, k), (torch.float32, k),
                                                                   (torch.int32, 1)])
        checks.raise_failures(read_codes(codes.view(R, num_max)[:, 0]))
        local = to_local_experts(gidx, rank, L)                       # [R*M, k]
        # 2. the row each (source row, slot) landed in: invert src_info.
        src, valid = ll_row_sources(layout_range, cap)
        q_of_row = torch.where(valid, src * num_max + src_info.to(torch.int64), torch.full_like(src, R * num_max))
        inv = torch.zeros(L, R * num_max + 1, dtype=torch.int64, device=dev)
        inv.scatter_(1, q_of_row, torch.arange(cap, device=dev).expand(L, -1).contiguous())
        # 3. weighted partial sums per source row over this rank's experts, in slot order (fp32, repeatable).
        q = torch.arange(R * num_max, device=dev).unsqueeze(1)
        lc = local.clamp(min=0)
        rows = x.reshape(L * cap, hidden).index_select(0, (lc * cap + inv[lc, q]).reshape(-1))
        # slots with no local expert read some row anyway (clamped); zero those rows rather than weight them by 0,
        # since rows past recv_count are unspecified (0 x NaN would spread into every token)
        rows = rows.view(R * num_max, k, hidden).masked_fill((local < 0).unsqueeze(-1), 0)
        w = torch.where(local >= 0, gw, 0.0)
        acc = torch.zeros(R * num_max, hidden, dtype=torch.float32, device=dev)
        for slot in range(k):
            acc.addcmul_(rows[:, slot].float(), w[:, slot:slot + 1])
        # 4. partial sums go home (finish() adds them in rank order).
        self.pending = start_fixed(transport, acc.to(x.dtype).view(R, num_max, hidden))
        self.n = n
        self.out = out if out is not None else torch.empty(n, hidden, dtype=x.dtype, device=dev)

    def finish(self):
        back = self.pending.wait()
        self.out.copy_(back.float().sum(0)[:self.n])
        return self.out


def ll_combine_state(transport, x, topk_idx, topk_weights, src_info, layout_range, num_max: int, out=None):
    """A started low-latency combine: the fused NVLink kernels where they apply, else the torch-op path."""
    L = x.shape[0]
    # (no second host sync when the dispatch already checked this topk_idx: the id check runs once per version)
    checks = ll_rank_checks("ep_low_latency_combine", "topk_idx", topk_idx, num_max, L * transport.world_size)
    if x.dtype in intranode.REDUCE_DTYPES and intranode.ll_combine_fits(transport, L * transport.world_size,
                                                                         num_max, x.shape[2] * x.element_size()):
        checks.raise_own()          # (the fused kernels exchange no codes)
        return intranode.FusedLowLatencyCombine(transport, x, topk_idx, topk_weights, src_info, layout_range,
                                                num_max, out=out)
    return LowLatencyCombine(transport, x, topk_idx, topk_weights, src_info, layout_range, num_max, checks,
                             out=out)


def ll_combine(transport, x, topk_idx, topk_weights, src_info, layout_range, num_max: int):
    """Weighted sum of each token's expert outputs on its source rank. x: [L, M*R, H] -> [N, H]."""
    return ll_combine_state(transport, x, topk_idx, topk_weights, src_info, layout_range, num_max).finish()
