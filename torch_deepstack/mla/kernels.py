"""CUDA faces of the MLA ops: validate, allocate, pick the specialisation, launch (no host sync on the hot path).

Set DEEPSTACK_MLA_CHECK_BLOCK_TABLE=0 to skip the eager block-table range check (a host sync per call; it is
always skipped while a CUDA graph is being captured)."""
from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from torch_deepstack._library import cuda_kernel
from torch_deepstack.jit import KernelSpec, get_kernel, register_prebuild
from torch_deepstack.jit.tma import make_tensor_map
from torch_deepstack.memo import BoundedMemo, operand_key
from torch_deepstack.mla.checks import (CHECKED, HEAD_DIM_V, PAGE_SIZE, SCHED_INTS, check_append_inputs,
                                        check_block_table_values, check_decode_inputs, check_metadata_inputs,
                                        num_sm_parts_for)
from torch_deepstack.mla.reference import default_softmax_scale
from torch_deepstack.mla.schedule import FIXED_COST

_CTYPE = {torch.bfloat16: "__nv_bfloat16", torch.float16: "__half"}
_DECODE_SIG = "pppppppppp" + "p" + "iiiiii" + "llll" + "f"   # the tensor map goes by pointer
_COMBINE_SIG = "pppppiiii"
_META_SIG = "pppii"
_CHUNK_BYTES = 64 * 64 * 2
_LOG2E = 1.4426950408889634


def decode_spec(dtype: torch.dtype, d: int, fp8: bool, cluster: int = 1) -> KernelSpec:
    return KernelSpec("mla/mla_decode.cuh", "deepstack::mla::mla_decode_kernel",
                      (_CTYPE[dtype], d, fp8) + ((cluster,) if cluster > 1 else ()))


# bf16/fp16 caches: mla_decode.cuh ("general") or mla_decode_overlap.cuh ("overlap": WG1's P V half queued behind
# WG0's next Q K^T, so the softmax no longer idles the tensor cores). "general_pair" / "overlap_pair": the same
# kernels launched as clusters of _PAIR_CLUSTER row-block CTAs that load each page once and multicast it; used when
# the number of 64-row blocks is a multiple of the cluster size, else the plain kernel. "auto" takes seesaw_pair for
# more than 64 q rows per KV head in an even number of 64-row blocks (H200 2026-11-29 22:53 UTC: 5-9% faster than
# the overlap kernel at 256 rows and general_pair at 128), else the overlap kernel for more than _OVERLAP_MIN_ROWS
# rows (an odd number of blocks, not paired), else the general kernel; the other names force one kernel
# (benchmarks and tests compare them).
# "seesaw" / "seesaw_pair" (mla_decode_seesaw.cuh): both consumer warpgroups compute S and softmax, for alternate
# tiles, so each softmax hides under the other warpgroup's tensor work.
_DECODE_KERNELS = ("general", "overlap", "general_pair", "overlap_pair", "seesaw", "seesaw_pair")
_DECODE_KERNEL = "auto"
_OVERLAP_MIN_ROWS = 128
_PAIR_CLUSTER = 2   # the kernels take pairs only (clusters of 4 measured slower: docs/mla.md)


def overlap_spec(dtype: torch.dtype, d: int, cluster: int = 1) -> KernelSpec:
    return KernelSpec("mla/mla_decode_overlap.cuh", "deepstack::mla::mla_decode_overlap_kernel",
                      (_CTYPE[dtype], d) + ((cluster,) if cluster > 1 else ()))


def overlap_smem_bytes(d: int) -> int:
    """Mirror of OverlapLayout<d>::kAlloc."""
    chunks = d // 64
    return 3 * chunks * _CHUNK_BYTES + _CHUNK_BYTES + 2 * 64 * 4 + (2 * chunks + 4) * 8 + 1024


def seesaw_spec(dtype: torch.dtype, d: int, cluster: int = 1) -> KernelSpec:
    return KernelSpec("mla/mla_decode_seesaw.cuh", "deepstack::mla::mla_decode_seesaw_kernel",
                      (_CTYPE[dtype], d) + ((cluster,) if cluster > 1 else ()))


def seesaw_smem_bytes(d: int) -> int:
    """Mirror of SeesawLayout<d>::kAlloc (d = 576 keeps each P tile in its stage's rope chunk)."""
    chunks = d // 64
    p_bufs = 0 if chunks == 9 else 2 * _CHUNK_BYTES
    return 3 * chunks * _CHUNK_BYTES + p_bufs + 5 * 64 * 4 + 256 * 4 + (2 * chunks + 6) * 8 + 4 * 4 + 1024


def decode_kernel_for(rows: int) -> str:
    """The bf16/fp16 decode kernel (a name from _DECODE_KERNELS) for this many q rows per KV head."""
    if _DECODE_KERNEL == "auto":
        if rows > 64 and (rows + 63) // 64 % _PAIR_CLUSTER == 0:
            return "seesaw_pair"   # 5-9% faster than overlap / general_pair at 128 and 256 rows (H200, docs/mla.md)
        return "overlap" if rows > _OVERLAP_MIN_ROWS else "general"
    if _DECODE_KERNEL not in _DECODE_KERNELS:
        raise ValueError(f"_DECODE_KERNEL must be 'auto' or one of {_DECODE_KERNELS}, got {_DECODE_KERNEL!r}")
    return _DECODE_KERNEL


def decode_cluster_for(rows: int) -> int:
    """Row-block CTAs per cluster (1: no cluster) of the bf16/fp16 decode kernel for `rows` q rows per KV head."""
    blocks = (rows + 63) // 64
    if decode_kernel_for(rows).endswith("_pair") and blocks % _PAIR_CLUSTER == 0:
        return _PAIR_CLUSTER
    return 1


def bf16_decode_spec(dtype: torch.dtype, d: int, rows: int) -> tuple[KernelSpec, int, int]:
    """(spec, shared-memory bytes, cluster size) of the decode kernel that a bf16/fp16 cache with `rows` q rows per
    KV head takes."""
    cluster = decode_cluster_for(rows)
    return (*_named_kernel_spec(decode_kernel_for(rows), dtype, d, cluster), cluster)


def _named_kernel_spec(kernel: str, dtype: torch.dtype, d: int, cluster: int) -> tuple[KernelSpec, int]:
    """(spec, shared-memory bytes) of the bf16/fp16 decode kernel called `kernel` (one of _DECODE_KERNELS)."""
    if kernel.startswith("overlap"):
        return overlap_spec(dtype, d, cluster), overlap_smem_bytes(d)
    if kernel.startswith("seesaw"):
        return seesaw_spec(dtype, d, cluster), seesaw_smem_bytes(d)
    return decode_spec(dtype, d, False, cluster), decode_smem_bytes(d)


# FP8 caches with few q rows per KV head (s_q * h_q / h_kv <= 32) take mla_decode_fp8.cuh: transposed products with
# the rows as the small wgmma N (16 or 32) and a bulk-copy-fed raw ring for the dequantising warps. Module
# attributes so a benchmark can compare against the general kernel (_FP8_SMALL_ROWS = False) or another stage size.
_FP8_SMALL_ROWS = True
_FP8_STAGE_TOKENS = 32          # raw ring stage; 16 measured 5-10% slower (more barriers per page)
_FP8_SMALL_SIG = "ppppppppppp" + "iiiiii" + "llll" + "f"   # both few-rows kernels (mla_decode_fp8*.cuh)
def fp8_small_spec(n: int, stage_tokens: int) -> KernelSpec:
    return KernelSpec("mla/mla_decode_fp8.cuh", "deepstack::mla::fp8small::mla_decode_fp8_kernel", (n, stage_tokens))


# Register-A FP8 few-rows kernel (mla_decode_fp8_regs.cuh): no K tile in shared memory, both wgmma A operands
# converted straight from the raw rows (exact e4m3 -> f16), two worker warpgroups on alternate pages merged per
# request. _FP8_SMALL_KERNEL picks the few-rows kernel: "auto" (the register-A kernel for the row counts (16 / 32)
# in _FP8_REGS_ROWS, where it measured faster; docs/mla.md), "smem" (always mla_decode_fp8.cuh), "regs" (always
# the register-A kernel).
_FP8_SMALL_KERNEL = "auto"
_FP8_REGS_ROWS = frozenset({16, 32})   # H200 2026-11-30 03:15: 128/1/16/8192 216 vs 278 us, 128/1/32/8192 312 vs 326
# 32-row channel-split variant (kSplit): both workers take every page, each owns two of the four 128-channel groups
# (its half of S^T, exchanged through shared memory; O^T for its 256 V channels; no per-request merge), built with
# _FP8_SPLIT32_DEFINES (below; each worker runs the softmax of its 16 rows, SPLIT_ROWS, in every form measured
# since). First measured with SPLIT_ROWS + SPLIT_COPIES (one code copy per worker), H200 03:45 UTC A/B:
# 128/1/32/8192 295.6 vs 310.2 us with the workers on alternate pages,
# 128/2/16/8192 297.1 vs 312.0, 64/1/32/4096 96.7 vs 100.5 (the plain split, _FP8_SPLIT32_DEFINES = (), 340 us).
# Default since 2026-11-30 04:32 UTC (the FP8 GPU suite passed on every 32-row form; A/B 297.1 vs 310.8 us at
# 128/1/32/8192). DEEPSTACK_MLA_FP8_SPLIT32=0 before import (or _FP8_REGS_SPLIT32 = False) restores alternate pages.
_FP8_REGS_SPLIT32 = os.environ.get("DEEPSTACK_MLA_FP8_SPLIT32", "1") == "1"


def _fp8_regs_split(n: int) -> bool:
    return n == 32 and bool(_FP8_REGS_SPLIT32)


@functools.lru_cache(maxsize=None)   # built on every FP8 decode call otherwise (~0.7 us of Python)
def fp8_regs_spec(n: int, split: bool = False, defines: tuple = ()) -> KernelSpec:
    args = (n, True) if split else (n,)   # the default instantiations keep their cache keys
    return KernelSpec("mla/mla_decode_fp8_regs.cuh", "deepstack::mla::fp8regs::mla_decode_fp8_regs_kernel", args,
                      defines=defines)


# The register-A kernel's build switches (-D defines of mla_decode_fp8_regs.cuh; what each does: the comments below
# and docs/mla.md). Every combination named here is prebuilt, so an A/B run or the tests find it compiled (and
# tests/jit checks it for spills).
_SPLIT_ROWS, _SPLIT_COPIES = ("DEEPSTACK_FP8R_SPLIT_ROWS", 1), ("DEEPSTACK_FP8R_SPLIT_COPIES", 1)
_LEAN, _FAST, _WK_SHFL = (("DEEPSTACK_FP8R_LEAN", 1), ("DEEPSTACK_FP8R_FAST_SOFTMAX", 1),
                          ("DEEPSTACK_FP8R_WK_SHFL", 1))
_SPLIT_XV, _SPLIT_P2VOTE = ("DEEPSTACK_FP8R_SPLIT_XV", 1), ("DEEPSTACK_FP8R_SPLIT_P2VOTE", 1)

# The split variant's first switches: the row-split softmax, one code copy per worker, both.
_FP8_SPLIT_AB_DEFINES = ((_SPLIT_ROWS,), (_SPLIT_COPIES,), (_SPLIT_ROWS, _SPLIT_COPIES))


# 16 rows: the raw ring in 1, 2 or 4 stages per page (-DDEEPSTACK_FP8R_SUBPAGES; a stage goes back to the copies
# after its last P V block, and the ring holds 4.5 pages instead of 4). `+@_FP8_REGS16_SUBPAGES=4` in ab_mla.py;
# DEEPSTACK_MLA_FP8_SUBPAGES before import. 1 (whole pages) stays: 2 and 4 measured 1-6% slower (H200 2026-11-30
# 04:40 UTC: the page stream is not what limits the kernel; docs/mla.md).
_FP8_REGS16_SUBPAGES = int(os.environ.get("DEEPSTACK_MLA_FP8_SUBPAGES", "1"))
_FP8_REGS16_SUBPAGE_CHOICES = (1, 2, 4)


# 16 rows: the workers' chain switches (-D defines of mla_decode_fp8_regs.cuh; docs/mla.md "16 rows: the page ring is
# not the limit"): LEAN (one ex2.approx.ftz per exp2, stale-token masks only on last pages), FAST_SOFTMAX (one
# barrier vote instead of the max reduction on pages that move no running maximum). _FP8_REGS16_DEFINES is what
# the 16-row build uses: both since 2026-11-30 05:00 UTC (H200 A/B: 128/1/16/8192 201.5 vs 209.1 us, 128/1/16/16384
# 367.1 vs 382.5; the FP8 GPU suite passed on it). DEEPSTACK_MLA_FP8_R16=k before import: _FP8_REGS16_AB_DEFINES
# [k - 1] instead (0: neither switch, 1: LEAN alone).
# WK_SHFL (=3, the default since 2026-11-30 05:06 UTC): the worker index read through a shuffle, so that the
# compiler keeps the P^T descriptors in uniform registers (64 R2UR per page gone, 1528 -> 1365 SASS instructions in
# the page loop; H200 A/B 05:04: 128/1/16/8192 198.8 vs 201.7 us, 128/1/16/16384 364.0 vs 368.9; FP8 suite passed).
_FP8_REGS16_AB_DEFINES = ((_LEAN,), (_LEAN, _FAST), (_LEAN, _FAST, _WK_SHFL))
_FP8_REGS16_DEFINES: tuple = ((), *_FP8_REGS16_AB_DEFINES)[int(os.environ.get("DEEPSTACK_MLA_FP8_R16", "3"))]

# 32 rows (the channel split): the forms. LEAN (the 16-row chain's exp2 and mask change) on both switches was the
# default from 2026-11-30 05:06 UTC (H200 A/B 05:04: 128/1/32/8192 287.3 vs 299.4 us). A/B forms (prebuilt; docs/mla.md
# "32 rows: the fast softmax vote per worker"): 1: + FAST_SOFTMAX (each worker votes over its 16 rows and the four
# groups' scales), 2: WK_SHFL instead of the code copies (one copy, the worker index warp-uniform), 3: both; 4 and 5:
# 1 and 3 with SPLIT_XV (the S^T exchange as float4) and SPLIT_P2VOTE (the P^T barrier votes whether any rescale
# factor moved). None changes the arithmetic (bit-identical to the LEAN build, tested).
_FP8_SPLIT32_LEAN_DEFINES = (_SPLIT_ROWS, _SPLIT_COPIES, _LEAN)
_FP8_SPLIT32_AB_DEFINES = ((_SPLIT_ROWS, _SPLIT_COPIES, _LEAN, _FAST), (_SPLIT_ROWS, _LEAN, _WK_SHFL),
                           (_SPLIT_ROWS, _LEAN, _FAST, _WK_SHFL),
                           (_SPLIT_ROWS, _SPLIT_COPIES, _LEAN, _FAST, _SPLIT_XV, _SPLIT_P2VOTE),
                           (_SPLIT_ROWS, _LEAN, _FAST, _WK_SHFL, _SPLIT_XV, _SPLIT_P2VOTE))
# What _FP8_REGS_SPLIT32 builds: form 5 since 2026-11-30 05:16 UTC (H200 A/B 05:13: 128/1/32/8192 258.4 vs 286.8
# us, 128/2/16/8192 255.2 vs 286.8, 64/1/32/4096 83.2 vs 92.0; 05:14: 128/1/32/16384 477.7 vs 533.6; FP8 suite
# passed on it). The earlier defaults stay prebuilt: _FP8_SPLIT32_LEAN_DEFINES (05:06-05:16) and
# _FP8_SPLIT_AB_DEFINES[2] (04:32-05:06); set _FP8_SPLIT32_DEFINES to either to build it.
_FP8_SPLIT32_FAST_DEFINES = _FP8_SPLIT32_AB_DEFINES[4]
_FP8_SPLIT32_DEFINES = _FP8_SPLIT32_FAST_DEFINES
# _FP8_SPLIT32_FORM = k (`+@_FP8_SPLIT32_FORM=k` in ab_mla.py, DEEPSTACK_MLA_FP8_R32=k before import) builds
# _FP8_SPLIT32_AB_DEFINES[k - 1] instead of _FP8_SPLIT32_DEFINES (0: that).
_FP8_SPLIT32_FORM = int(os.environ.get("DEEPSTACK_MLA_FP8_R32", "0"))


def _fp8_split32_defines() -> tuple:
    form = int(_FP8_SPLIT32_FORM)
    if not 0 <= form <= len(_FP8_SPLIT32_AB_DEFINES):
        raise ValueError(f"kernels._FP8_SPLIT32_FORM must be 0..{len(_FP8_SPLIT32_AB_DEFINES)}, got {form!r}")
    return tuple(_FP8_SPLIT32_DEFINES) if form == 0 else _FP8_SPLIT32_AB_DEFINES[form - 1]


def _fp8_regs16_defines() -> tuple:
    sub = int(_FP8_REGS16_SUBPAGES)
    if sub not in _FP8_REGS16_SUBPAGE_CHOICES:
        raise ValueError(f"kernels._FP8_REGS16_SUBPAGES must be one of {_FP8_REGS16_SUBPAGE_CHOICES}, got {sub!r}")
    # (no defines: the default instantiation keeps its cache key)
    return tuple(_FP8_REGS16_DEFINES) + (() if sub == 1 else (("DEEPSTACK_FP8R_SUBPAGES", sub),))


def fp8_few_rows_spec(n: int) -> KernelSpec:
    """The FP8 few-rows kernel that a call with n (16 or 32) padded q rows per KV head takes."""
    if _fp8_use_regs(n):
        split = _fp8_regs_split(n)
        return fp8_regs_spec(n, split, _fp8_split32_defines() if split else _fp8_regs16_defines() if n == 16 else ())
    return fp8_small_spec(n, _FP8_STAGE_TOKENS)


@functools.lru_cache(maxsize=None)
def fp8_regs_smem_bytes(n: int, split: bool = False) -> int:
    """Dynamic shared memory for the register-A kernel: the largest fp8regs::Layout<n, split>::kAlloc any
    DEEPSTACK_FP8R_SUBPAGES build may need (the kernel traps on less)."""
    if n == 16 and not split:
        return max(fp8_regs_layout_bytes(n, split, sub) for sub in _FP8_REGS16_SUBPAGE_CHOICES)
    return fp8_regs_layout_bytes(n, split, 1)


def fp8_regs_layout_bytes(n: int, split: bool = False, subpages: int = 1) -> int:
    """Mirror of fp8regs::Layout<n, split>::kAlloc (16 rows: with the ring in `subpages` stages per page)."""
    stages = (4 if n == 16 else 3) if subpages == 1 else 9 * subpages // 2
    stage_bytes = 64 // subpages * 656
    row_state = 2 * 2 * (n // 4) * 128 * 4 if n == 32 and not split else 0   # the workers' row sums and maxima
    exchange = 2 * 2 * (n // 2) * 128 * 4 + 2 * n * 4 if split else 0   # partial S^T [parity][worker], row factors/sums
    p_copies = 4 if split else 8
    return (9 * n * 128 + p_copies * n * 128 + stages * stage_bytes + 2 * 4 * (n + 4) * 4 + 3 * n * 4 + 16 + row_state
            + exchange + (2 * stages + 2) * 8 + 1024)


def fp8_regs_merge_floats(n: int) -> int:
    """Mirror of fp8regs::Layout<n>::kMergeFloats (per worker thread, 128 threads per CTA)."""
    return 8 * (n // 2) + 4 * (n // 8)


def _fp8_use_regs(n: int) -> bool:
    if _FP8_SMALL_KERNEL not in ("auto", "smem", "regs"):
        raise ValueError(f"kernels._FP8_SMALL_KERNEL must be 'auto', 'smem' or 'regs', got {_FP8_SMALL_KERNEL!r}")
    return _FP8_SMALL_KERNEL == "regs" or (_FP8_SMALL_KERNEL == "auto" and n in _FP8_REGS_ROWS)


def fp8_small_layout_bytes(n: int, stage_tokens: int, f16: bool, tma: bool = False) -> int:
    """Mirror of fp8small::Layout<n, stage_tokens, f16, tma>::kAlloc."""
    if f16:   # four P^T copies, [2][64][4] scales, [2][8][4] group maxima, [n] Q prescales; a smaller raw ring
        tok_bytes = 528 if tma else 656
        raw = 96 * 528 if tma else (2 if stage_tokens == 32 else 5) * stage_tokens * 656
        extra = 4 * n * 128 + 2 * 64 * 16 + 2 * 8 * 16 + n * 4
    else:
        tok_bytes = 656
        raw = (3 if n == 16 else 2) * 32 * 656
        extra = n * 128
    stages = raw // (stage_tokens * tok_bytes)
    raw_at = -(-(9 * n * 128 + 2 * 9 * _CHUNK_BYTES + extra) // 128) * 128
    return raw_at + raw + 4 * n * 4 + (stages + 4) * 8 + 4 * 4 + 1024


@functools.lru_cache(maxsize=None)   # per decode call otherwise (~1.6 us of Python)
def fp8_small_smem_bytes(n: int, stage_tokens: int) -> int:
    """Dynamic shared memory for the FP8 few-rows kernel: the larger of its layouts with and without the f16 path
    (16 rows), so a -DDEEPSTACK_MLA_FP8_F16 variant launches with enough (the kernel traps on less)."""
    layouts = [fp8_small_layout_bytes(n, stage_tokens, False)]
    if n == 16:
        layouts += [fp8_small_layout_bytes(n, stage_tokens, True, tma) for tma in (False, True)]
    return max(layouts)


def _fp8_tensor_maps(raw: torch.Tensor, stage_tokens: int) -> bytes:
    """The FP8 few-rows kernel's two TMA maps over a uint8 [blocks, 64, h_kv, 656] cache: the latent + scale bytes
    as int32 [132, h_kv, 64, blocks] (box: stage_tokens tokens of one head, no swizzle) and the rope as bf16
    [64, h_kv, 64, blocks] (box: a page, 128-byte swizzle)."""
    nb, page, h_kv, _ = raw.shape
    strides = [raw.stride(2), raw.stride(1), raw.stride(0)]
    lat = make_tensor_map(raw.data_ptr(), torch.int32, [132, h_kv, page, nb], strides, [132, 1, stage_tokens, 1])
    rope = make_tensor_map(raw.data_ptr() + 528, torch.bfloat16, [64, h_kv, page, nb], strides, [64, 1, page, 1],
                           swizzle_bytes=128)
    return lat + rope


# The decode kernels read their TMA descriptors from device memory (a by-value CUtensorMap kernel parameter after
# other parameters failed to launch with error 701 through the JIT's packed-buffer launch). One device copy per
# cache tensor (address, shape, strides), made on first use: call once before CUDA-graph capture. Entries are never
# dropped: a captured graph may read any of them for as long as it lives, and each is a function of its key alone
# (a new cache at a freed cache's address and layout gets the same descriptors), a few hundred bytes apiece.
_DEVICE_MAPS: dict = {}


def _uploaded_maps(key: tuple, device: torch.device, what: str, make) -> torch.Tensor:
    """The descriptor bytes `make()` returns, in device memory, uploaded once per key (first use). A first use
    inside CUDA-graph capture is refused: the upload cannot be captured."""
    m = _DEVICE_MAPS.get(key)
    if m is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"mla_decode_with_kvcache: call it once on this {what} before CUDA-graph capture "
                               "(its TMA descriptors are uploaded on first use)")
        m = _DEVICE_MAPS[key] = _device_copy_outside_graph_pools(make(), device)
    return m


def _device_copy_outside_graph_pools(data: bytes, device: torch.device) -> torch.Tensor:
    """`data` in device memory from the caching allocator's ordinary pool, also while this thread allocates into a
    CUDA-graph pool: torch.compile(mode="reduce-overhead") warms its graphs up with the thread's allocations routed
    into the graphs' pool, and a tensor that outlives the call there is an error (or is overwritten by later
    replays). Pool routing is per thread, so a helper thread makes the copy (synchronously: done on return)."""
    with ThreadPoolExecutor(1, thread_name_prefix="deepstack-mla-descriptors") as helper:
        return helper.submit(lambda: torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)).result()


def _fp8_tensor_maps_device(raw: torch.Tensor, stage_tokens: int) -> torch.Tensor:
    """_fp8_tensor_maps in device memory (see _uploaded_maps)."""
    key = ("fp8", raw.data_ptr(), tuple(raw.shape), raw.stride(), stage_tokens, raw.device)
    return _uploaded_maps(key, raw.device, "FP8 k_cache", lambda: _fp8_tensor_maps(raw, stage_tokens))


def combine_spec(dtype: torch.dtype) -> KernelSpec:
    return KernelSpec("mla/mla_combine.cuh", "deepstack::mla::mla_combine_kernel", (_CTYPE[dtype],))


def metadata_spec() -> KernelSpec:
    return KernelSpec("mla/mla_metadata.cuh", "deepstack::mla::mla_metadata_kernel", (FIXED_COST,))


@register_prebuild("mla")
def _prebuild():
    specs = [metadata_spec(), decode_spec(torch.bfloat16, 576, True),
             *(fp8_small_spec(n, _FP8_STAGE_TOKENS) for n in (16, 32)), *(fp8_regs_spec(n) for n in (16, 32)),
             fp8_regs_spec(32, split=True), *(fp8_regs_spec(32, True, d) for d in _FP8_SPLIT_AB_DEFINES),
             fp8_regs_spec(32, True, _FP8_SPLIT32_LEAN_DEFINES),
             *(fp8_regs_spec(32, True, d) for d in _FP8_SPLIT32_AB_DEFINES),
             *(fp8_regs_spec(16, False, d) for d in _FP8_REGS16_AB_DEFINES),
             *(fp8_regs_spec(16, False, tuple(_FP8_REGS16_DEFINES) + (("DEEPSTACK_FP8R_SUBPAGES", sub),))
               for sub in _FP8_REGS16_SUBPAGE_CHOICES if sub != 1)]
    for dt in _CTYPE:
        specs.append(combine_spec(dt))
        specs += [spec(dt, d) for d in (576, 512)
                  for spec in (lambda t, dd: decode_spec(t, dd, False), overlap_spec,
                               lambda t, dd: decode_spec(t, dd, False, _PAIR_CLUSTER), seesaw_spec,
                               lambda t, dd: seesaw_spec(t, dd, _PAIR_CLUSTER))]
    return specs


def decode_smem_bytes(d: int) -> int:
    chunks = d // 64
    return 3 * chunks * _CHUNK_BYTES + _CHUNK_BYTES + 2 * 64 * 4 + 6 * 8 + 4 * 4 + 1024   # SmemLayout<d>::kAlloc


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_MAX_CLUSTERS: dict = {}


def _max_active_clusters(device_index: int, kernel: str, cluster: int) -> int | None:
    """Clusters of `cluster` decode CTAs (bf16, d = 576: the largest shared memory) resident at once on the GPU;
    None while a CUDA graph is being captured and the value is not known yet (loading a module there is not safe)."""
    key = (device_index, kernel, cluster)
    n = _MAX_CLUSTERS.get(key)
    if n is None and not torch.cuda.is_current_stream_capturing():
        spec, smem = _named_kernel_spec(kernel, torch.bfloat16, 576, cluster)
        with torch.cuda.device(device_index):
            n = _MAX_CLUSTERS[key] = get_kernel(spec, _DECODE_SIG).max_active_clusters(cluster, 384, smem)
    return n


def _check_block_table_enabled() -> bool:
    return os.environ.get("DEEPSTACK_MLA_CHECK_BLOCK_TABLE", "1") != "0"


def default_num_sm_parts(dev_index: int, num_q_tokens_per_head_k: int, num_heads_k: int) -> int:
    """get_mla_metadata's part count with num_sm_parts=0 on CUDA device dev_index. The op's fake calls it too, so a
    compiled graph knows the metadata's shape: a static shape keeps the op inside the CUDA graphs of
    torch.compile(mode="reduce-overhead") (an unbacked size put it outside them), and the real call agrees with the
    trace because the cluster fit below, once measured, is remembered."""
    parts = num_sm_parts_for(_num_sms(dev_index), num_q_tokens_per_head_k, num_heads_k)
    cluster = decode_cluster_for(num_q_tokens_per_head_k)
    fit = _max_active_clusters(dev_index, decode_kernel_for(num_q_tokens_per_head_k), cluster) if cluster > 1 else None
    if fit is not None:
        # GPCs place clusters whole: no more parts than clusters of the decode kernel fit at once (else a tail wave;
        # a first call inside CUDA-graph capture skips this, correct either way).
        per_part = num_heads_k * ((num_q_tokens_per_head_k + 63) // 64) // cluster
        parts = max(1, min(parts, fit // per_part))
    return parts


# A decode loop plans every step with the same seqlens tensor: (part count, shared memory, kernel) by its address and
# layout and the arguments, so a repeat skips the checks and the part-count lookups (~half the face's host time).
_METADATA_PLANS = BoundedMemo()


@cuda_kernel("get_mla_metadata")
def get_mla_metadata_cuda(cache_seqlens, num_q_tokens_per_head_k: int, num_heads_k: int, num_sm_parts: int = 0):
    key = (operand_key(cache_seqlens), num_q_tokens_per_head_k, num_heads_k, num_sm_parts, _knobs())
    plan = _METADATA_PLANS.get(key)
    b = cache_seqlens.shape[0]
    if plan is None:
        check_metadata_inputs(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_sm_parts)
        dev = cache_seqlens.device
        dev_index = dev.index if dev.index is not None else torch.cuda.current_device()
        parts = num_sm_parts or default_num_sm_parts(dev_index, num_q_tokens_per_head_k, num_heads_k)
        smem = 8 * b + 20 * parts   # page and piece counts per request, 5 ints per part (mla_metadata.cuh)
        if smem > 200 * 1024:
            raise ValueError(f"get_mla_metadata: batch {b} with {parts} parts is too large for the one-CTA "
                             f"scheduler (8 * batch + 20 * parts must be <= {200 * 1024})")
        plan = (parts, smem, get_kernel(metadata_spec(), _META_SIG))
        if not torch.cuda.is_current_stream_capturing():   # (under capture the cluster fit may not be known yet)
            _METADATA_PLANS.remember(key, plan)
    parts, smem, kernel = plan
    sched = torch.empty(parts, SCHED_INTS, dtype=torch.int32, device=cache_seqlens.device)
    num_splits = torch.empty(b + 1, dtype=torch.int32, device=cache_seqlens.device)
    seq = cache_seqlens if cache_seqlens.is_contiguous() else cache_seqlens.contiguous()
    kernel.launch(1, 256, seq, sched, num_splits, b, parts, smem=smem)
    return sched, num_splits


def _kv_tensor_map(k_cache: torch.Tensor) -> bytes:
    es = k_cache.element_size()
    nb, page, h_kv, d = k_cache.shape
    return make_tensor_map(k_cache.data_ptr(), k_cache.dtype, [d, h_kv, page, nb],
                           [k_cache.stride(2) * es, k_cache.stride(1) * es, k_cache.stride(0) * es],
                           [64, 1, PAGE_SIZE, 1], swizzle_bytes=128)


def _kv_tensor_map_device(k_cache: torch.Tensor) -> torch.Tensor:
    """_kv_tensor_map in device memory (see _uploaded_maps)."""
    key = (k_cache.data_ptr(), tuple(k_cache.shape), k_cache.stride(), k_cache.dtype, k_cache.device)
    return _uploaded_maps(key, k_cache.device, "k_cache", lambda: _kv_tensor_map(k_cache))


def _knobs() -> tuple:
    """The module switches that pick a decode kernel (benchmarks and tests set them between calls), and get_kernel
    itself (tests and A/B runs wrap it to add -D defines): part of every decode plan's key."""
    return (get_kernel, _DECODE_KERNEL, _OVERLAP_MIN_ROWS, _PAIR_CLUSTER, _FP8_SMALL_ROWS, _FP8_STAGE_TOKENS,
            _FP8_SMALL_KERNEL, _FP8_REGS_ROWS, _FP8_REGS_SPLIT32, _FP8_REGS16_SUBPAGES, _FP8_REGS16_DEFINES,
            _FP8_SPLIT32_DEFINES, _FP8_SPLIT32_FORM)


class _DecodePlan:
    """One decode call's launches with everything fixed but its fresh outputs (out, lse and one float32 workspace:
    the split-KV partials, then the FP8 register-A kernel's merge buffer): kernels, grids, shared memory and the
    input addresses and scalars (as ints: a plan holds no tensors). Eager decode loops call each layer with the
    same operands step after step, so a plan is remembered by the operands' addresses and layouts (_DECODE_PLANS),
    and its packed launches by the output addresses the caching allocator hands back (`launches`)."""

    __slots__ = ("out_shape", "lse_shape", "dtype", "ws_floats", "lse_at", "extra_at", "decode", "grid", "smem",
                 "cluster", "head", "extra", "tail", "combine_grid", "combine_tail", "launches")

    def args(self, out, lse, ws) -> tuple:
        o_acc = ws.data_ptr()
        extra = self.extra if self.extra_at is None else o_acc + 4 * self.extra_at
        return (self.head[0], out, lse, o_acc, o_acc + 4 * self.lse_at, *self.head[1:], extra, *self.tail)

    def combine_args(self, out, lse, ws) -> tuple:
        o_acc = ws.data_ptr()
        return (o_acc, o_acc + 4 * self.lse_at, self.head[4], out, lse, *self.combine_tail)

    def run(self, device: torch.device):
        out = torch.empty(self.out_shape, dtype=self.dtype, device=device)
        lse = torch.empty(self.lse_shape, dtype=torch.float32, device=device)
        ws = torch.empty(self.ws_floats, dtype=torch.float32, device=device)
        key = (out.data_ptr(), lse.data_ptr(), ws.data_ptr())
        launches = self.launches.get(key)
        if launches is None:
            cluster = None if self.cluster == 1 else (1, 1, self.cluster)
            launches = self.launches.remember(key, (
                self.decode.prepare(self.grid, 384, *self.args(out, lse, ws), smem=self.smem, cluster=cluster),
                get_kernel(combine_spec(self.dtype), _COMBINE_SIG).prepare(
                    self.combine_grid, 256, *self.combine_args(out, lse, ws))))
        for launch in launches:
            launch.launch()
        return out, lse


_DECODE_PLANS = BoundedMemo()


def _decode_plan(q, k_cache, bt, seq, sched, splits, softmax_scale, causal, is_fp8_kvcache) -> _DecodePlan | None:
    """The plan of a checked decode call whose inputs are in the kernels' layouts (None: nothing to launch)."""
    op = "mla_decode_with_kvcache"
    b, s_q, h_q, d = q.shape
    h_kv = k_cache.shape[2]
    rows = s_q * (h_q // h_kv)
    if b == 0 or s_q == 0 or h_q == 0:
        return None
    if q.data_ptr() % 16 or any(s % 8 for s in q.stride()[:3]):
        raise ValueError(f"{op}: q rows must start on 16-byte boundaries (strides {q.stride()}); call .contiguous()")
    parts = sched.shape[0]
    plan = _DecodePlan()
    plan.out_shape, plan.lse_shape, plan.dtype = (b, s_q, h_q, HEAD_DIM_V), (b, h_q, s_q), q.dtype
    acc_rows = (b + parts) * h_kv * rows
    plan.lse_at, plan.extra_at, plan.extra = acc_rows * HEAD_DIM_V, None, 0
    plan.ws_floats = acc_rows * (HEAD_DIM_V + 1)
    plan.cluster = 1
    plan.combine_grid, plan.combine_tail = (b, h_kv, (rows + 7) // 8), (h_q, h_kv, s_q, rows)
    plan.launches = BoundedMemo(64)
    scale = default_softmax_scale(d, softmax_scale) * _LOG2E
    causal_flag = int(bool(causal) and s_q > 1)
    if is_fp8_kvcache:
        raw = k_cache.view(torch.uint8)
        if raw.stride(2) != raw.shape[3] or raw.stride(0) != PAGE_SIZE * raw.stride(1):
            raise ValueError(f"{op}: an FP8 k_cache must be contiguous within each block (strides {raw.stride()})")
        kptr, tok_stride = raw.data_ptr(), raw.stride(1)
    else:
        if k_cache.data_ptr() % 16 or any((s * k_cache.element_size()) % 16 for s in k_cache.stride()[:3]):
            raise ValueError(f"{op}: k_cache strides must be multiples of 16 bytes (strides {k_cache.stride()})")
        kptr, tok_stride = 0, 0   # (the bf16 kernels read the cache through a tensor map)
    plan.head = (q.data_ptr(), bt.data_ptr(), seq.data_ptr(), sched.data_ptr(), splits.data_ptr(), kptr)
    plan.tail = (h_q, h_kv, s_q, rows, causal_flag, bt.stride(0), q.stride(0), q.stride(1), q.stride(2), tok_stride,
                 scale)
    if is_fp8_kvcache and _FP8_SMALL_ROWS and rows <= 32 and kptr % 16 == 0 and tok_stride % 16 == 0:
        n = 16 if rows <= 16 else 32
        spec = fp8_few_rows_spec(n)
        if _fp8_use_regs(n):
            split = _fp8_regs_split(n)
            plan.smem = fp8_regs_smem_bytes(n, split)
            # the two worker warpgroups' partials of each request (written and read once, L2-resident; the
            # split variant has none)
            plan.extra_at = -(-plan.ws_floats // 64) * 64      # 256-byte aligned
            plan.ws_floats = plan.extra_at + (1 if split else parts * h_kv * 128 * fp8_regs_merge_floats(n))
        else:
            plan.smem = fp8_small_smem_bytes(n, _FP8_STAGE_TOKENS)
            plan.extra = _fp8_tensor_maps_device(raw, _FP8_STAGE_TOKENS).data_ptr()   # its raw ring's descriptors
        plan.decode, plan.grid = get_kernel(spec, _FP8_SMALL_SIG), (parts, h_kv, 1)
        return plan
    if is_fp8_kvcache:
        spec, plan.smem = decode_spec(q.dtype, d, True), decode_smem_bytes(d)
    else:
        plan.extra = _kv_tensor_map_device(k_cache).data_ptr()
        spec, plan.smem, plan.cluster = bf16_decode_spec(q.dtype, d, rows)
    plan.decode, plan.grid = get_kernel(spec, _DECODE_SIG), (parts, h_kv, (rows + 63) // 64)
    return plan


@cuda_kernel("mla_decode_with_kvcache")
def mla_decode_with_kvcache_cuda(q, k_cache, block_table, cache_seqlens, head_dim_v: int, tile_scheduler_metadata,
                                 num_splits, softmax_scale=None, causal: bool = False, is_fp8_kvcache: bool = False):
    # A repeated call (same operand addresses, layouts and arguments) skips the argument checks and the planning;
    # the data check (block table against the cache) follows the tables' versions either way.
    key = (operand_key(q), operand_key(k_cache), operand_key(block_table), operand_key(cache_seqlens),
           operand_key(tile_scheduler_metadata), operand_key(num_splits), head_dim_v, softmax_scale, causal,
           is_fp8_kvcache, _knobs())
    plan = _DECODE_PLANS.get(key)
    if plan is None:
        check_decode_inputs(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
                            is_fp8_kvcache)
    if _check_block_table_enabled() and not torch.cuda.is_current_stream_capturing():
        CHECKED.check_once((block_table, cache_seqlens), (k_cache.shape[0],),
                           lambda: check_block_table_values(block_table, cache_seqlens, k_cache.shape[0]))
    if plan is None:
        # (copies of inputs not in the kernels' layouts are temporaries: such calls are planned every time)
        bt = block_table if block_table.stride(1) == 1 else block_table.contiguous()
        seq, sched, splits = cache_seqlens.contiguous(), tile_scheduler_metadata.contiguous(), num_splits.contiguous()
        plan = _decode_plan(q, k_cache, bt, seq, sched, splits, softmax_scale, causal, is_fp8_kvcache)
        if plan is None:
            b, s_q, h_q, _ = q.shape
            return (torch.empty(b, s_q, h_q, HEAD_DIM_V, dtype=q.dtype, device=q.device),
                    torch.empty(b, h_q, s_q, dtype=torch.float32, device=q.device))
        if (bt is block_table and seq is cache_seqlens and sched is tile_scheduler_metadata
                and splits is num_splits):
            _DECODE_PLANS.remember(key, plan)
        else:
            return plan.run(q.device)   # (the copies stay alive until the launches are issued)
    return plan.run(q.device)


_APPEND_CTYPE = {torch.bfloat16: "__nv_bfloat16", torch.float16: "__half", torch.float32: "float"}


def append_spec(dtype: torch.dtype, d: int, fp8: bool) -> KernelSpec:
    return KernelSpec("mla/mla_append.cuh", "deepstack::mla::mla_append_kernel", (_APPEND_CTYPE[dtype], d, fp8))


# Packed append launches by operand addresses and layouts (a decode loop appends each layer's row to the same cache
# from the same kind of buffers step after step); only calls whose slots need no int64 copy.
_APPENDS = BoundedMemo()


@cuda_kernel("mla_append_kv")
def mla_append_kv_cuda(k_cache, kv, slot_mapping, is_fp8_kvcache: bool = False) -> None:
    op = "mla_append_kv"
    key = (operand_key(k_cache), operand_key(kv), operand_key(slot_mapping), is_fp8_kvcache, get_kernel)
    launch = _APPENDS.get(key)
    if launch is None:
        check_append_inputs(k_cache, kv, slot_mapping, is_fp8_kvcache)
        if kv.shape[0] == 0:
            return
    slots = slot_mapping if launch is not None else slot_mapping.to(torch.int64).contiguous()
    if _check_block_table_enabled() and not torch.cuda.is_current_stream_capturing():
        def check_slots():
            if bool((slots >= k_cache.shape[0] * PAGE_SIZE).any()):
                raise IndexError(f"{op}: slot {int(slots.max())} is out of range for a cache of {k_cache.shape[0]} "
                                 f"blocks x {PAGE_SIZE} slots")
        CHECKED.check_once((slot_mapping,), (k_cache.shape[0] * PAGE_SIZE,), check_slots)
    if launch is None:
        n, h_kv, d = kv.shape
        raw = k_cache.view(torch.uint8) if is_fp8_kvcache else k_cache
        es = raw.element_size()
        if raw.stride(-1) != 1 or raw.stride(0) != PAGE_SIZE * raw.stride(1) or kv.stride(-1) != 1:
            raise ValueError(f"{op}: k_cache must be contiguous within each block and kv in its last dim")
        if not is_fp8_kvcache and (kv.data_ptr() % 16 or raw.data_ptr() % 16 or any(
                (s * es) % 16 for s in (*kv.stride()[:2], *raw.stride()[1:3]))):
            raise ValueError(f"{op}: kv and k_cache rows must start on 16-byte boundaries")
        launch = get_kernel(append_spec(kv.dtype, d, is_fp8_kvcache), "pppllll").prepare(
            (n, h_kv), 128, kv, raw, slots, kv.stride(0), kv.stride(1), raw.stride(1) * es, raw.stride(2) * es)
        if slots is slot_mapping:
            _APPENDS.remember(key, launch)
    launch.launch()   # (a copied slots tensor is alive until here)
