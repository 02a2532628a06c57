"""The EP torch ops (`torch.ops.deepstack.ep_*`): reference/CUDA faces, autograd, opcheck samples.

One implementation serves both devices: the ops are torch work around a transport (transport.py), and the
transport is chosen from the group and the tensors' device: gloo for CPU tensors, NCCL or the NVLink IPC
transport (registered by ep.Buffer) for CUDA tensors. The reference *is* the spec; the CUDA face differs only
in which transport moves the bytes.
"""
from __future__ import annotations

import torch

from torch_deepstack._library import autograd, cuda_kernel, reference, sample_inputs
from torch_deepstack.ep import core
from torch_deepstack.ep.checks import (FP8_GROUP, check_expert_range, check_max_tokens, check_same_device,
                                       check_tokens_per_expert, check_topk, check_topology, check_x)
from torch_deepstack.ep.layout import dispatch_layout
from torch_deepstack.ep.transport import transport_for


def _transport(op: str, group_name: str, device, num_ranks: int | None = None):
    t = transport_for(group_name, device)
    if num_ranks is not None and t.world_size != num_ranks:
        raise ValueError(f"{op}: num_ranks={num_ranks} but group {group_name!r} has {t.world_size} ranks")
    return t


# --- layout -------------------------------------------------------------------------------------------------

def get_dispatch_layout_impl(topk_idx, num_experts, num_ranks):
    op = "ep_get_dispatch_layout"
    check_topology(op, num_experts, num_ranks)
    check_topk(op, topk_idx, None, topk_idx.shape[0], num_experts)
    check_expert_range(op, topk_idx, num_experts)
    return dispatch_layout(topk_idx, num_experts, num_ranks)


reference("ep_get_dispatch_layout")(get_dispatch_layout_impl)
cuda_kernel("ep_get_dispatch_layout")(get_dispatch_layout_impl)


# --- normal dispatch / combine ------------------------------------------------------------------------------

def check_rank_mask(op: str, mask, num_tokens, num_ranks):
    torch._check(mask.dtype == torch.bool, lambda: f"{op}: is_token_in_rank must be bool, got {mask.dtype}")
    torch._check(mask.dim() == 2 and mask.shape[0] == num_tokens and mask.shape[1] == num_ranks,
                 lambda: f"{op}: is_token_in_rank must be [num_tokens={num_tokens}, num_ranks={num_ranks}], "
                         f"got {tuple(mask.shape)}")


def check_dispatch_args(op, x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_experts, num_ranks,
                        expert_alignment, num_worst_tokens, num_tokens_per_expert=None):
    check_topology(op, num_experts, num_ranks)
    check_x(op, x, x_scales)
    check_tokens_per_expert(op, num_tokens_per_expert, num_experts)
    torch._check(topk_idx is not None or is_token_in_rank is not None,
                 lambda: f"{op}: pass topk_idx, is_token_in_rank, or both")
    if topk_idx is not None:
        check_topk(op, topk_idx, topk_weights, x.shape[0], num_experts)
    else:
        torch._check(topk_weights is None, lambda: f"{op}: topk_weights needs topk_idx")
    if is_token_in_rank is not None:
        check_rank_mask(op, is_token_in_rank, x.shape[0], num_ranks)
    torch._check(expert_alignment >= 1, lambda: f"{op}: expert_alignment must be >= 1, got {expert_alignment}")
    torch._check(num_worst_tokens >= 0, lambda: f"{op}: num_worst_tokens must be >= 0, got {num_worst_tokens}")


def dispatch_impl(x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_experts, num_ranks, group_name,
                  expert_alignment=1, num_worst_tokens=0, num_tokens_per_expert=None):
    """num_tokens_per_expert (get_dispatch_layout's, [num_experts]): the per-expert counts each source reports in
    the count exchange (DeepEP's notify step); without it they are counted from topk_idx (zeros without either)."""
    op = "ep_dispatch"
    check_dispatch_args(op, x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_experts, num_ranks,
                        expert_alignment, num_worst_tokens, num_tokens_per_expert)
    check_same_device(op, x=x, x_scales=x_scales, topk_idx=topk_idx, topk_weights=topk_weights,
                      is_token_in_rank=is_token_in_rank)     # (num_tokens_per_expert may be anywhere: it is copied)
    t = _transport(op, group_name, x.device, num_ranks)
    return core.dispatch(t, x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_experts, expert_alignment,
                         num_worst_tokens, num_tokens_per_expert)


reference("ep_dispatch")(dispatch_impl)
cuda_kernel("ep_dispatch")(dispatch_impl)


def check_handle_args(op, num_tokens, is_token_in_rank, rank_counts, recv_src_idx, num_worst_tokens):
    torch._check(rank_counts.dim() == 2 and rank_counts.shape[0] == rank_counts.shape[1]
                 and rank_counts.dtype == torch.int32,
                 lambda: f"{op}: rank_counts must be int32 [num_ranks, num_ranks], got {rank_counts.dtype} "
                         f"{tuple(rank_counts.shape)}")
    check_rank_mask(op, is_token_in_rank, num_tokens, rank_counts.shape[0])
    torch._check(recv_src_idx.dim() == 1 and recv_src_idx.dtype == torch.int32,
                 lambda: f"{op}: recv_src_idx must be int32 [num_recv_tokens], got {recv_src_idx.dtype} "
                         f"{tuple(recv_src_idx.shape)}")
    torch._check(num_worst_tokens == 0 or recv_src_idx.shape[0] == num_worst_tokens,
                 lambda: f"{op}: with num_worst_tokens={num_worst_tokens} the handle must have that many rows, "
                         f"got {recv_src_idx.shape[0]}")


def dispatch_cached_impl(x, x_scales, is_token_in_rank, rank_counts, recv_src_idx, group_name, num_worst_tokens=0):
    op = "ep_dispatch_cached"
    check_x(op, x, x_scales)
    check_handle_args(op, x.shape[0], is_token_in_rank, rank_counts, recv_src_idx, num_worst_tokens)
    check_same_device(op, x=x, x_scales=x_scales, is_token_in_rank=is_token_in_rank)
    t = _transport(op, group_name, x.device, rank_counts.shape[0])
    return core.cached_dispatch(t, x, x_scales, is_token_in_rank, rank_counts, recv_src_idx.shape[0],
                                num_worst_tokens)


reference("ep_dispatch_cached")(dispatch_cached_impl)
cuda_kernel("ep_dispatch_cached")(dispatch_cached_impl)


def combine_impl(x, topk_weights, is_token_in_rank, rank_counts, recv_src_idx, group_name, num_worst_tokens=0):
    op = "ep_combine"
    check_x(op, x, None)
    check_handle_args(op, is_token_in_rank.shape[0], is_token_in_rank, rank_counts, recv_src_idx,
                      num_worst_tokens)
    torch._check(x.shape[0] == recv_src_idx.shape[0],
                 lambda: f"{op}: x must have one row per received token ({recv_src_idx.shape[0]}), "
                         f"got {x.shape[0]}")
    if topk_weights is not None:
        torch._check(topk_weights.dtype == torch.float32 and topk_weights.dim() == 2
                     and topk_weights.shape[0] == x.shape[0],
                     lambda: f"{op}: topk_weights must be float32 [{x.shape[0]}, num_topk], got "
                             f"{topk_weights.dtype} {tuple(topk_weights.shape)}")
    check_same_device(op, x=x, topk_weights=topk_weights, is_token_in_rank=is_token_in_rank)
    t = _transport(op, group_name, x.device, rank_counts.shape[0])
    return core.combine(t, x, topk_weights, is_token_in_rank, rank_counts, num_worst_tokens)


reference("ep_combine")(combine_impl)
cuda_kernel("ep_combine")(combine_impl)


# --- autograd: the backward of dispatch is a combine of the gradients, and the reverse ----------------------

def _dispatch_setup(ctx, inputs, output):
    ctx.group_name, ctx.num_worst = inputs[7], inputs[9]
    ctx.has_w = inputs[3] is not None
    ctx.save_for_backward(output[2], output[5], output[6], output[7])


def _dispatch_backward(ctx, g_x, g_scales, g_idx, g_w, g_cnt, g_mask, g_rc, g_src):
    recv_topk_idx, mask, rank_counts, recv_src_idx = ctx.saved_tensors
    if g_w is not None and ctx.has_w:
        g_w = torch.where(recv_topk_idx >= 0, g_w, torch.zeros_like(g_w))   # non-local slots carry no weight
    else:
        g_w = None
    grad_x, grad_w = torch.ops.deepstack.ep_combine(g_x.contiguous(), g_w, mask, rank_counts, recv_src_idx,
                                                    ctx.group_name, ctx.num_worst)
    return grad_x, None, None, (grad_w if ctx.has_w else None), None, None, None, None, None, None, None


autograd("ep_dispatch", _dispatch_backward, _dispatch_setup)


def _combine_setup(ctx, inputs, output):
    ctx.group_name, ctx.num_worst = inputs[5], inputs[6]
    ctx.has_w = inputs[1] is not None
    ctx.save_for_backward(inputs[2], inputs[3], inputs[4])


def _combine_backward(ctx, g_x, g_w):
    mask, rank_counts, recv_src_idx = ctx.saved_tensors
    d = torch.ops.deepstack.ep_dispatch_cached
    grad_x = d(g_x.contiguous(), None, mask, rank_counts, recv_src_idx, ctx.group_name, ctx.num_worst)[0]
    grad_w = None
    if ctx.has_w and g_w is not None:
        grad_w = d(g_w.contiguous(), None, mask, rank_counts, recv_src_idx, ctx.group_name, ctx.num_worst)[0]
    return grad_x, grad_w, None, None, None, None, None


autograd("ep_combine", _combine_backward, _combine_setup)


def _cached_setup(ctx, inputs, output):
    ctx.group_name, ctx.num_worst = inputs[5], inputs[6]
    ctx.save_for_backward(inputs[2], inputs[3], inputs[4])


def _cached_backward(ctx, g_x, g_scales):
    mask, rank_counts, recv_src_idx = ctx.saved_tensors
    grad_x, _ = torch.ops.deepstack.ep_combine(g_x.contiguous(), None, mask, rank_counts, recv_src_idx,
                                               ctx.group_name, ctx.num_worst)
    return grad_x, None, None, None, None, None, None


autograd("ep_dispatch_cached", _cached_backward, _cached_setup)


# --- low-latency mode ---------------------------------------------------------------------------------------

def check_ll_structure(op, x, topk_idx, num_max, num_experts, num_ranks):
    check_topology(op, num_experts, num_ranks)
    check_x(op, x, None)
    check_topk(op, topk_idx, None, x.shape[0], num_experts)
    torch._check(num_max >= 1, lambda: f"{op}: num_max_dispatch_tokens_per_rank must be >= 1, got {num_max}")


def check_ll_args(op, x, topk_idx, num_max, num_experts, num_ranks):
    """Every argument check of a low-latency dispatch but the expert ids' (a data check): what its fake runs."""
    check_ll_structure(op, x, topk_idx, num_max, num_experts, num_ranks)
    check_max_tokens(op, "x", x.shape[0], num_max)


def ll_prepare(x, topk_idx, num_max, num_experts, num_ranks, use_fp8, round_scale):
    """Structural checks, then FP8 quantisation (our per_token_group_quant_fp8 op) when asked: -> (x or q, scales
    or None). The token count and expert ids, which may fail on one rank only, are checked by core.ll_dispatch_state
    (which tells the peers)."""
    op = "ep_low_latency_dispatch"
    check_ll_structure(op, x, topk_idx, num_max, num_experts, num_ranks)
    check_same_device(op, x=x, topk_idx=topk_idx)
    if not use_fp8:
        return x, None
    torch._check(x.shape[1] % FP8_GROUP == 0, lambda: f"{op}: use_fp8 needs hidden % 128 == 0, got {x.shape[1]}")
    q, s = torch.ops.deepstack.per_token_group_quant_fp8(x, FP8_GROUP, 1e-4, round_scale)
    return q, s.contiguous()


def ll_dispatch_impl(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, num_ranks, group_name,
                     use_fp8=True, round_scale=False):
    num_max = num_max_dispatch_tokens_per_rank
    xq, xs = ll_prepare(x, topk_idx, num_max, num_experts, num_ranks, use_fp8, round_scale)
    t = _transport("ep_low_latency_dispatch", group_name, x.device, num_ranks)
    return core.ll_dispatch(t, xq, xs, topk_idx, num_max, num_experts)


reference("ep_low_latency_dispatch")(ll_dispatch_impl)
cuda_kernel("ep_low_latency_dispatch")(ll_dispatch_impl)


def check_ll_combine(x, topk_idx, topk_weights, src_info, layout_range, num_max_dispatch_tokens_per_rank) -> int:
    op = "ep_low_latency_combine"
    torch._check(x.dim() == 3 and x.dtype in (torch.bfloat16, torch.float16, torch.float32),
                 lambda: f"{op}: x must be [num_local_experts, num_max_tokens * num_ranks, hidden] "
                         f"bf16/fp16/fp32, got {x.dtype} {tuple(x.shape)}")
    torch._check(src_info.shape == x.shape[:2] and src_info.dtype == torch.int32,
                 lambda: f"{op}: src_info must be int32 {tuple(x.shape[:2])} (from the dispatch handle), "
                         f"got {src_info.dtype} {tuple(src_info.shape)}")
    torch._check(layout_range.dim() == 2 and layout_range.shape[0] == x.shape[0]
                 and layout_range.dtype == torch.int64,
                 lambda: f"{op}: layout_range must be int64 [num_local_experts={x.shape[0]}, num_ranks], "
                         f"got {layout_range.dtype} {tuple(layout_range.shape)}")
    num_ranks = layout_range.shape[1]
    torch._check(x.shape[1] == num_max_dispatch_tokens_per_rank * num_ranks,
                 lambda: f"{op}: x has {x.shape[1]} rows per expert, expected num_max_dispatch_tokens_per_rank "
                         f"* num_ranks = {num_max_dispatch_tokens_per_rank * num_ranks}")
    check_topk(op, topk_idx, topk_weights, topk_idx.shape[0], x.shape[0] * num_ranks)
    check_same_device(op, x=x, topk_idx=topk_idx, topk_weights=topk_weights, src_info=src_info)
    # (the token count and expert ids, which may fail on one rank only, are checked by core.ll_combine_state)
    return num_ranks


def ll_combine_impl(x, topk_idx, topk_weights, src_info, layout_range, num_max_dispatch_tokens_per_rank,
                    group_name):
    num_ranks = check_ll_combine(x, topk_idx, topk_weights, src_info, layout_range,
                                 num_max_dispatch_tokens_per_rank)
    t = _transport("ep_low_latency_combine", group_name, x.device, num_ranks)
    return core.ll_combine(t, x, topk_idx, topk_weights, src_info, layout_range, num_max_dispatch_tokens_per_rank)


reference("ep_low_latency_combine")(ll_combine_impl)
cuda_kernel("ep_low_latency_combine")(ll_combine_impl)


# --- autograd of the low-latency pair (bf16/fp32 dispatch; fp8 quantisation carries no gradient) -----------
# The receive layout is a pure function of every rank's top-k, so re-dispatching with the same topk_idx puts each
# token's data in exactly the rows the forward used: backward of dispatch is a combine with unit weights, and
# backward of combine is a dispatch of the output gradient, weighted per row.

def _first_occurrence(topk_idx):
    """Valid slots whose expert did not already appear earlier in the row (a row lands once per expert)."""
    k = topk_idx.shape[1]
    earlier = torch.ones(k, k, dtype=torch.bool, device=topk_idx.device).tril(-1)
    dup = ((topk_idx.unsqueeze(2) == topk_idx.unsqueeze(1)) & earlier).any(2)
    return (topk_idx >= 0) & ~dup


def _group_rank(group_name: str) -> int:
    import torch.distributed as dist
    from torch_deepstack.ep.transport import resolve_group
    return dist.get_rank(resolve_group(group_name))


def _ll_dispatch_setup(ctx, inputs, output):
    x, topk_idx, num_max, num_experts, num_ranks, group_name, use_fp8 = inputs[:7]
    ctx.meta = (num_max, num_experts, num_ranks, group_name, use_fp8)
    ctx.save_for_backward(topk_idx, output[3], output[4])


def _ll_dispatch_backward(ctx, g_recv, g_scales, g_count, g_src, g_range):
    num_max, num_experts, num_ranks, group_name, use_fp8 = ctx.meta
    topk_idx, src_info, layout_range = ctx.saved_tensors
    if use_fp8 or g_recv is None:
        return None, None, None, None, None, None, None, None
    ones = _first_occurrence(topk_idx).to(torch.float32)
    gx = torch.ops.deepstack.ep_low_latency_combine(g_recv.contiguous(), topk_idx, ones, src_info, layout_range,
                                                    num_max, group_name)
    return gx, None, None, None, None, None, None, None


autograd("ep_low_latency_dispatch", _ll_dispatch_backward, _ll_dispatch_setup)


def _ll_combine_setup(ctx, inputs, output):
    x, topk_idx, topk_weights, src_info, layout_range, num_max, group_name = inputs
    ctx.meta = (num_max, group_name, x.shape[0] * layout_range.shape[1], layout_range.shape[1], x.dtype)
    ctx.save_for_backward(x, topk_idx, topk_weights, src_info, layout_range)


def _ll_combine_backward(ctx, g_out):
    num_max, group_name, num_experts, num_ranks, x_dtype = ctx.meta
    x, topk_idx, topk_weights, src_info, layout_range = ctx.saved_tensors
    L = x.shape[0]
    k = topk_idx.shape[1]
    # One dispatch carries each token's output gradient, weights and expert ids (fp32) to the rows it used.
    aux = torch.cat([g_out.float(), topk_weights.float(), topk_idx.float()], dim=1)
    recv = torch.ops.deepstack.ep_low_latency_dispatch(aux, topk_idx, num_max, num_experts, num_ranks, group_name,
                                                       False)[0]
    hidden = x.shape[2]
    rg, rw, ridx = recv[..., :hidden], recv[..., hidden:hidden + k], recv[..., hidden + k:]
    expert = (_group_rank(group_name) * L + torch.arange(L, device=x.device)).view(L, 1, 1).float()
    slot_is_mine = (ridx == expert) & (ridx >= 0)                      # [L, rows, k]: slots naming this expert
    row_w = (rw * slot_is_mine).sum(-1, keepdim=True)                 # the row's total weight
    grad_x = (rg * row_w).to(x_dtype) if ctx.needs_input_grad[0] else None
    grad_w = None
    if ctx.needs_input_grad[2]:
        d = (rg * x.float()).sum(-1, keepdim=True)                    # <g_t, y_row> per row
        per_slot = (d * slot_is_mine).contiguous()                    # [L, rows, k]: the value for slot k
        ones = _first_occurrence(topk_idx).to(torch.float32)
        grad_w = torch.ops.deepstack.ep_low_latency_combine(per_slot, topk_idx, ones, src_info, layout_range,
                                                            num_max, group_name)
        grad_w = torch.where(topk_idx >= 0, grad_w, 0.0)
    return grad_x, None, grad_w, None, None, None, None


autograd("ep_low_latency_combine", _ll_combine_backward, _ll_combine_setup)


# --- opcheck samples: a gloo group of one in this process (created if none exists) --------------------------

def single_process_group_name() -> str:
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_world_size() != 1:
        raise RuntimeError("EP op samples run in a single process; this process is in a larger world")
    return dist.group.WORLD.group_name


def _routing(n, k, num_experts, gen, device):
    scores = torch.rand(n, num_experts, generator=gen)
    idx = scores.topk(k, dim=1).indices
    idx[torch.rand(n, k, generator=gen) < 0.25] = -1
    w = torch.rand(n, k, generator=gen)
    return idx.to(device), w.to(device)


@sample_inputs("ep_get_dispatch_layout")
def _layout_samples(device):
    gen = torch.Generator().manual_seed(0)
    return [((_routing(9, 3, 8, gen, device)[0], 8, 2), {}), ((_routing(5, 2, 4, gen, device)[0], 4, 1), {})]


@sample_inputs("ep_dispatch")
def _dispatch_samples(device):
    g = single_process_group_name()
    gen = torch.Generator().manual_seed(1)
    out = []
    for n, h, dtype, worst in [(7, 256, torch.bfloat16, 0), (6, 128, torch.float32, 8)]:
        idx, w = _routing(n, 2, 4, gen, device)
        x = torch.randn(n, h, generator=gen).to(device, dtype).requires_grad_()
        out.append(((x, None, idx, w.requires_grad_(), None, 4, 1, g), {"num_worst_tokens": worst}))
    idx, w = _routing(5, 2, 4, gen, device)
    x = torch.randn(5, 256, generator=gen).to(device, torch.bfloat16)
    out.append(((x, None, idx, w, None, 4, 1, g), {"expert_alignment": 4}))
    # the caller's per-expert counts (get_dispatch_layout's), with top-k and without (is_token_in_rank routes)
    _, per_expert, in_rank = dispatch_layout(idx, 4, 1)
    out.append(((x, None, idx, w, None, 4, 1, g), {"expert_alignment": 2, "num_tokens_per_expert": per_expert}))
    out.append(((x, None, None, None, in_rank, 4, 1, g), {"num_tokens_per_expert": per_expert}))
    # No fp8 (x, scales) sample: opcheck's schema check cannot compare float8 inputs (NotImplementedError in
    # SchemaCheckMode.has_mutated); tests/ep covers fp8 dispatch.
    return out


def _handle(n, gen, device, worst=0):
    g = single_process_group_name()
    idx, w = _routing(n, 2, 4, gen, device)
    recv = dispatch_impl(torch.zeros(n, 128, device=device), None, idx, w, None, 4, 1, g, 1, worst)
    return g, recv


@sample_inputs("ep_dispatch_cached")
def _cached_samples(device):
    gen = torch.Generator().manual_seed(2)
    out = []
    for worst in (0, 16):
        g, (_, _, _, _, _, mask, rc, src) = _handle(8, gen, device, worst)
        x = torch.randn(8, 128, generator=gen).to(device).requires_grad_()
        out.append(((x, None, mask, rc, src, g), {"num_worst_tokens": worst}))
    return out


@sample_inputs("ep_combine")
def _combine_samples(device):
    gen = torch.Generator().manual_seed(3)
    out = []
    for worst in (0, 16):
        g, (_, _, _, rw, _, mask, rc, src) = _handle(8, gen, device, worst)
        x = torch.randn(src.shape[0], 128, generator=gen).to(device, torch.bfloat16).requires_grad_()
        out.append(((x, rw.clone().requires_grad_(), mask, rc, src, g), {"num_worst_tokens": worst}))
    return out


@sample_inputs("ep_low_latency_dispatch")
def _ll_dispatch_samples(device):
    g = single_process_group_name()
    gen = torch.Generator().manual_seed(4)
    idx, _ = _routing(5, 3, 4, gen, device)
    x = torch.randn(5, 256, generator=gen).to(device, torch.bfloat16)
    xg = torch.randn(5, 128, generator=gen).to(device).requires_grad_()
    return [((x, idx, 8, 4, 1, g), {"use_fp8": True}), ((x, idx, 6, 4, 1, g), {"use_fp8": False}),
            ((xg, idx, 6, 4, 1, g), {"use_fp8": False})]


@sample_inputs("ep_low_latency_combine")
def _ll_combine_samples(device):
    g = single_process_group_name()
    gen = torch.Generator().manual_seed(5)
    idx, w = _routing(5, 3, 4, gen, device)
    x = torch.randn(5, 128, generator=gen).to(device, torch.bfloat16)
    recv_x, _, _, src_info, layout_range = ll_dispatch_impl(x, idx, 8, 4, 1, g, use_fp8=False)
    y = torch.randn(recv_x.shape, generator=gen).to(device, torch.bfloat16)
    yg = torch.randn(recv_x.shape, generator=gen).to(device).requires_grad_()
    return [((y, idx, w, src_info, layout_range, 8, g), {}),
            ((yg, idx, w.clone().requires_grad_(), src_info, layout_range, 8, g), {})]
