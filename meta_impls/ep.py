"""Fakes of the expert-parallel ops. Receive counts of normal dispatch depend on every rank's routing: they are
unbacked sizes, or static when the caller passes num_worst_tokens (the padded, graph-capturable form)."""
import torch

from torch_deepstack._library import fake
from torch_deepstack.ep.checks import FP8_GROUP, check_topology, check_x
from torch_deepstack.ep.ops import check_dispatch_args, check_handle_args, check_ll_args
from torch_deepstack.quant.scale_layout import mn_major_tma_aligned_empty


@fake("ep_get_dispatch_layout")
def ep_get_dispatch_layout_fake(topk_idx, num_experts, num_ranks):
    check_topology("ep_get_dispatch_layout", num_experts, num_ranks)
    dev = topk_idx.device
    return (torch.empty(num_ranks, dtype=torch.int32, device=dev),
            torch.empty(num_experts, dtype=torch.int32, device=dev),
            torch.empty(topk_idx.shape[0], num_ranks, dtype=torch.bool, device=dev))


@fake("ep_dispatch")
def ep_dispatch_fake(x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_experts, num_ranks, group_name,
                     expert_alignment=1, num_worst_tokens=0, num_tokens_per_expert=None):
    check_dispatch_args("ep_dispatch", x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_experts,
                        num_ranks, expert_alignment, num_worst_tokens, num_tokens_per_expert)
    n_recv = num_worst_tokens if num_worst_tokens > 0 else torch.library.get_ctx().new_dynamic_size()
    dev = x.device
    k = topk_idx.shape[1] if topk_idx is not None else 0
    scales = (torch.empty(n_recv, x_scales.shape[1], dtype=x_scales.dtype, device=dev) if x_scales is not None
              else torch.empty(0, dtype=torch.float32, device=dev))
    return (x.new_empty(n_recv, x.shape[1]), scales,
            torch.empty(n_recv, k, dtype=torch.int64, device=dev),
            torch.empty(n_recv, k if topk_weights is not None else 0, dtype=torch.float32, device=dev),
            torch.empty(num_experts // num_ranks, dtype=torch.int32, device=dev),
            torch.empty(x.shape[0], num_ranks, dtype=torch.bool, device=dev),
            torch.empty(num_ranks, num_ranks, dtype=torch.int32, device=dev),
            torch.empty(n_recv, dtype=torch.int32, device=dev))


@fake("ep_dispatch_cached")
def ep_dispatch_cached_fake(x, x_scales, is_token_in_rank, rank_counts, recv_src_idx, group_name, num_worst_tokens=0):
    check_x("ep_dispatch_cached", x, x_scales)
    check_handle_args("ep_dispatch_cached", x.shape[0], is_token_in_rank, rank_counts, recv_src_idx, num_worst_tokens)
    n_recv = recv_src_idx.shape[0]
    scales = (torch.empty(n_recv, x_scales.shape[1], dtype=x_scales.dtype, device=x.device)
              if x_scales is not None else torch.empty(0, dtype=torch.float32, device=x.device))
    return x.new_empty(n_recv, x.shape[1]), scales


@fake("ep_combine")
def ep_combine_fake(x, topk_weights, is_token_in_rank, rank_counts, recv_src_idx, group_name, num_worst_tokens=0):
    check_handle_args("ep_combine", is_token_in_rank.shape[0], is_token_in_rank, rank_counts, recv_src_idx,
                      num_worst_tokens)
    torch._check(x.shape[0] == recv_src_idx.shape[0])
    n = is_token_in_rank.shape[0]
    k = topk_weights.shape[1] if topk_weights is not None else 0
    return x.new_empty(n, x.shape[1]), torch.empty(n, k, dtype=torch.float32, device=x.device)


@fake("ep_low_latency_dispatch")
def ep_low_latency_dispatch_fake(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, num_ranks, group_name,
                                 use_fp8=True, round_scale=False):
    check_ll_args("ep_low_latency_dispatch", x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, num_ranks)
    L = num_experts // num_ranks
    rows = num_max_dispatch_tokens_per_rank * num_ranks
    dev = x.device
    if use_fp8:
        recv = torch.empty(L, rows, x.shape[1], dtype=torch.float8_e4m3fn, device=dev)
        scales = mn_major_tma_aligned_empty((L, rows, x.shape[1] // FP8_GROUP), device=dev)
    else:
        recv = x.new_empty(L, rows, x.shape[1])
        scales = torch.empty(0, dtype=torch.float32, device=dev)
    return (recv, scales, torch.empty(L, dtype=torch.int32, device=dev),
            torch.empty(L, rows, dtype=torch.int32, device=dev),
            torch.empty(L, num_ranks, dtype=torch.int64, device=dev))


@fake("ep_low_latency_combine")
def ep_low_latency_combine_fake(x, topk_idx, topk_weights, src_info, layout_range, num_max_dispatch_tokens_per_rank,
                                group_name):
    torch._check(x.dim() == 3)
    return x.new_empty(topk_idx.shape[0], x.shape[2])
