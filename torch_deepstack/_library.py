"""The `deepstack` op library: every op schema in one table, and the helper that keeps an op's four faces
(schema, CPU reference kernel, fake in `meta_impls/`, CUDA kernel) together.

Each area module registers its faces with the decorators below:

    @reference("per_token_group_quant_fp8")          # plain PyTorch, registered as the CPU kernel
    @cuda_kernel("per_token_group_quant_fp8")        # fast path, registered for the CUDA key
    @fake("per_token_group_quant_fp8")               # in meta_impls/<area>.py
    @sample_inputs("per_token_group_quant_fp8")      # what opcheck runs, for every op (tests enforce it)

`finalize()` (run once by `torch_deepstack/__init__.py` after every area is imported) gives each op a clear
error for a device it has no kernel on, instead of the dispatcher's generic message.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch

NAMESPACE = "deepstack"

# Held at module level for the life of the process: an op is unregistered when its Library is collected.
LIB = torch.library.Library(NAMESPACE, "DEF")

# name -> (schema, tags). One line per op; the argument names are part of the public API.
SCHEMAS: dict[str, tuple[str, tuple]] = {
    # --- quantisation (torch_deepstack/quant) -------------------------------------------------------
    "per_token_group_quant_fp8": (
        "(Tensor x, int group_size=128, float eps=1e-4, bool scale_ue8m0=False) -> (Tensor, Tensor)", ()),
    "swiglu_quant_fp8": ("(Tensor h, float eps=1e-4, bool scale_ue8m0=False) -> (Tensor, Tensor)", ()),
    # --- FP8 GEMM with fine-grained scaling (torch_deepstack/gemm); the GEMMs write into d ------------------
    "fp8_gemm_nt": (
        "(Tensor a, Tensor sfa, Tensor b, Tensor sfb, Tensor(a!) d, Tensor? c=None, bool accumulate=False) -> ()", ()),
    "m_grouped_fp8_gemm_nt_contiguous": (
        "(Tensor a, Tensor sfa, Tensor b, Tensor sfb, Tensor(a!) d, Tensor m_indices) -> ()", ()),
    "m_grouped_fp8_gemm_nt_masked": (
        "(Tensor a, Tensor sfa, Tensor b, Tensor sfb, Tensor(a!) d, Tensor masked_m, int expected_m) -> ()", ()),
    "fp8_wgrad_gemm_nt": (
        "(Tensor a, Tensor sfa, Tensor b, Tensor sfb, Tensor(a!) d, Tensor? c=None, bool accumulate=False) -> ()", ()),
    "k_grouped_fp8_wgrad_gemm_nt": (
        "(Tensor a, Tensor sfa, Tensor b, Tensor sfb, Tensor(a!) d, int[] ks, Tensor? c=None, bool accumulate=False) -> ()", ()),
    "per_block_quant_fp8": (
        "(Tensor x, bool transpose=False, float eps=1e-4, bool scale_ue8m0=False) -> (Tensor, Tensor)", ()),
    "per_block_quant_fp8_dual": (
        "(Tensor x, float eps=1e-4, bool scale_ue8m0=False) -> (Tensor, Tensor, Tensor, Tensor)", ()),
    "per_token_group_quant_fp8_t": ("(Tensor x, float eps=1e-4, bool scale_ue8m0=False) -> (Tensor, Tensor)", ()),
    "per_token_group_quant_fp8_dual": (
        "(Tensor x, float eps=1e-4, bool scale_ue8m0=False) -> (Tensor, Tensor, Tensor, Tensor)", ()),
    # MoE: the weighted sum of each token's expert output rows (FP8Experts' combine; also its backward's gathers)
    "moe_combine": ("(Tensor y, Tensor rows, Tensor weights, bool check_rows=True) -> Tensor", ()),
    "moe_combine_weight_grad": ("(Tensor grad, Tensor y, Tensor rows) -> Tensor", ()),
    # the SwiGLU between an expert MLP's GEMMs, h = [gate | up]: silu(gate) * up, and its gradient in one tensor
    "swiglu": ("(Tensor h) -> Tensor", ()),
    "swiglu_backward": ("(Tensor grad, Tensor h) -> Tensor", ()),
    # --- compile integration (torch_deepstack/compile): the functional op graph passes swap in ------------
    "fp8_linear": ("(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor", ()),
    # --- expert parallelism (torch_deepstack/ep) -------------------------------------------------------
    "ep_get_dispatch_layout": ("(Tensor topk_idx, int num_experts, int num_ranks) -> (Tensor, Tensor, Tensor)", ()),
    "ep_dispatch": (
        "(Tensor x, Tensor? x_scales, Tensor? topk_idx, Tensor? topk_weights, Tensor? is_token_in_rank, "
        "int num_experts, int num_ranks, str group_name, int expert_alignment=1, int num_worst_tokens=0, "
        "Tensor? num_tokens_per_expert=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)", ()),
    "ep_dispatch_cached": (
        "(Tensor x, Tensor? x_scales, Tensor is_token_in_rank, Tensor rank_counts, Tensor recv_src_idx, "
        "str group_name, int num_worst_tokens=0) -> (Tensor, Tensor)", ()),
    "ep_combine": (
        "(Tensor x, Tensor? topk_weights, Tensor is_token_in_rank, Tensor rank_counts, Tensor recv_src_idx, "
        "str group_name, int num_worst_tokens=0) -> (Tensor, Tensor)", ()),
    "ep_low_latency_dispatch": (
        "(Tensor x, Tensor topk_idx, int num_max_dispatch_tokens_per_rank, int num_experts, int num_ranks, "
        "str group_name, bool use_fp8=True, bool round_scale=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)", ()),
    "ep_low_latency_combine": (
        "(Tensor x, Tensor topk_idx, Tensor topk_weights, Tensor src_info, Tensor layout_range, "
        "int num_max_dispatch_tokens_per_rank, str group_name) -> Tensor", ()),
    # --- MLA decode over a paged KV cache (torch_deepstack/mla) -------------------------------------------
    "get_mla_metadata": (
        "(Tensor cache_seqlens, int num_q_tokens_per_head_k, int num_heads_k, int num_sm_parts=0) -> (Tensor, Tensor)", ()),
    "mla_decode_with_kvcache": (
        "(Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens, int head_dim_v, "
        "Tensor tile_scheduler_metadata, Tensor num_splits, float? softmax_scale=None, bool causal=False, "
        "bool is_fp8_kvcache=False) -> (Tensor, Tensor)", ()),
    "mla_append_kv": ("(Tensor(a!) k_cache, Tensor kv, Tensor slot_mapping, bool is_fp8_kvcache=False) -> ()", ()),
}


class DeviceNotSupportedError(NotImplementedError):
    """An op was called with tensors on a device it has no kernel for."""


@dataclass
class OpFaces:
    name: str
    reference: Callable | None = None
    cuda: Callable | None = None
    fake: Callable | None = None
    samples: Callable | None = None


FACES: dict[str, OpFaces] = {}
_defined: set[str] = set()
_finalized = False


def define(name: str) -> None:
    """Define one op from SCHEMAS (idempotent)."""
    if name in _defined:
        return
    if name not in SCHEMAS:
        raise KeyError(f"deepstack::{name} has no schema in torch_deepstack/_library.py SCHEMAS")
    schema, tags = SCHEMAS[name]
    LIB.define(name + schema, tags=tags)
    _defined.add(name)
    FACES[name] = OpFaces(name)


def define_all() -> None:
    for name in SCHEMAS:
        define(name)


def _faces(name: str) -> OpFaces:
    define(name)
    return FACES[name]


def _kernel_decorator(name: str, face: str, dispatch_key: str):
    def deco(fn):
        f = _faces(name)
        if getattr(f, face) is not None:
            raise RuntimeError(f"deepstack::{name} already has a {face} kernel")
        LIB.impl(name, fn, dispatch_key)
        setattr(f, face, fn)
        return fn
    return deco


def reference(name: str):
    """Register the plain-PyTorch reference as the op's CPU kernel."""
    return _kernel_decorator(name, "reference", "CPU")


def cuda_kernel(name: str):
    """Register the fast CUDA implementation."""
    return _kernel_decorator(name, "cuda", "CUDA")


def fake(name: str):
    """Register the fake (meta) implementation used by FakeTensor tracing, torch.compile and export."""
    def deco(fn):
        f = _faces(name)
        torch.library.register_fake(f"{NAMESPACE}::{name}", fn, lib=LIB)
        f.fake = fn
        return fn
    return deco


def sample_inputs(name: str):
    """Register `fn(device) -> list[(args, kwargs)]`: the inputs opcheck runs this op on."""
    def deco(fn):
        _faces(name).samples = fn
        return fn
    return deco


def autograd(name: str, backward: Callable, setup_context: Callable) -> None:
    define(name)
    torch.library.register_autograd(f"{NAMESPACE}::{name}", backward, setup_context=setup_context, lib=LIB)


def _missing_kernel(name: str, device: str, available: list[str]):
    def raiser(*args, **kwargs):
        raise DeviceNotSupportedError(
            f"torch.ops.{NAMESPACE}.{name} has no {device.upper()} kernel; it runs on: "
            f"{', '.join(available) or 'nothing yet'}. Move the inputs to a supported device.")
    return raiser


def finalize() -> None:
    """Give every op without a CPU or CUDA kernel a clear error on that device. Idempotent."""
    global _finalized
    if _finalized:
        return
    define_all()
    for name, f in FACES.items():
        available = [d for d, k in (("cpu", f.reference), ("cuda", f.cuda)) if k is not None]
        if f.reference is None:
            LIB.impl(name, _missing_kernel(name, "cpu", available), "CPU")
        if f.cuda is None:
            LIB.impl(name, _missing_kernel(name, "cuda", available), "CUDA")
    _finalized = True


def op(name: str):
    """The OpOverloadPacket `torch.ops.deepstack.<name>`."""
    return getattr(getattr(torch.ops, NAMESPACE), name)


_Tensor = torch.Tensor
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_functorch_level = torch._C._functorch.maybe_current_level
_is_compiling = torch.compiler.is_compiling
_profiling = torch._C._autograd._profiler_enabled


def may_skip_dispatcher(tensors, device_type: str = "cuda") -> bool:
    """Whether an eager call on `tensors` may go straight to the op's kernel for `device_type`: the dispatcher's hop
    into a Python kernel costs 12-18 us on the H200 machine's host, as much as the kernel's own Python. Only when
    nothing could see or change the call on its way: plain tensors (no subclass such as DTensor or FakeTensor),
    on that device, not under torch.compile, vmap or grad transforms, no dispatch or function mode (FlopCounterMode,
    torch.device(...) as a context), no profiler (it records ops in the dispatcher), and no tensor that autograd
    would track (none of our ops has a derivative: the dispatcher's autograd fallback handles that case)."""
    if _is_compiling():   # (first: Dynamo folds it to True, so it never traces the rest)
        return False
    for t in tensors:
        if t is not None and t.__class__ is not _Tensor:
            return False
    if tensors[0].device.type != device_type or _dispatch_modes() or _function_modes() or _profiling():
        return False
    if _functorch_level() is not None:
        return False
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return False
    return True


def kernel_for(name: str, *tensors):
    """What an eager caller should call for op `name` on `tensors`: its CUDA kernel directly when
    `may_skip_dispatcher`, else the op (through the dispatcher, which picks the kernel)."""
    face = FACES[name].cuda
    if face is not None and may_skip_dispatcher(tensors):
        return face
    return op(name)


def allocating_into_cuda_graph_pool() -> bool:
    """Whether this thread's new CUDA allocations may be landing in a CUDA graph's private memory pool: while the
    current stream captures (torch.cuda.graph), or while Inductor's CUDA graph trees (torch.compile(
    mode="reduce-overhead")) warm up or record a compiled function, which they run on their own stream with the
    thread's allocations routed to their pool. Long-lived state (a cache, a buffer made on first use) must not be
    allocated then: the trees hand pool memory that their outputs do not hold to later replays, and refuse to record
    while a tensor they do not track lives in their pool."""
    if torch.cuda.is_current_stream_capturing():
        return True
    trees = sys.modules.get("torch._inductor.cudagraph_trees")
    if trees is None:
        return False
    manager = trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    return (manager is not None and (manager.in_warmup or manager.in_recording)
            and torch.cuda.current_stream() == manager.stream)


def mark_static(*tensors: torch.Tensor) -> None:
    """Fixed addresses for torch.compile (long-lived device state: KV caches, frozen FP8 weights): compiled graphs
    take them as they are, and its CUDA graphs (mode="reduce-overhead") read and write them in place instead of
    copying them into graph-owned buffers on every replay, or skipping the graphs when the step writes them."""
    from torch._dynamo import mark_static_address
    for t in tensors:
        mark_static_address(t)
