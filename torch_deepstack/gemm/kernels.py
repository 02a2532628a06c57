"""CUDA faces of the FP8 GEMM and quantisation ops: validate, canonicalise scale layouts, pick the config,
build the TMA descriptors, launch the JIT-specialised kernel (src/gemm/*.cuh) on the current stream."""
from __future__ import annotations

import functools
import os
from dataclasses import replace

import torch

from torch_deepstack.checks import check_eps
from torch_deepstack._library import cuda_kernel
from torch_deepstack.gemm import checks
from torch_deepstack.gemm.checks import cdiv, check_dual_token_quant_input, check_quant_input
from torch_deepstack.gemm.heuristic import (BAND_M_BLOCKS, GemmConfig, experiment_defines, select_config, smem_bytes,
                                             with_tma_store)
from torch_deepstack.gemm.layout import as_mn_major_sf
from torch_deepstack.gemm.reference import transposed_quant_empty
from torch_deepstack.jit import KernelSpec, get_kernel, register_prebuild
from torch_deepstack.jit.tma import make_tensor_map
from torch_deepstack.memo import BoundedMemo, operand_key as _operand_key
from torch_deepstack.quant.scale_layout import mn_major_tma_aligned_empty, tma_aligned_size

KIND_DENSE, KIND_CONTIGUOUS, KIND_MASKED, KIND_K_GROUPED = 0, 1, 2, 3
_GEMM_HEADER = "gemm/fp8_gemm.cuh"
_GEMM_SIGNATURE = "ttttt" + "pppp" + "i" * 9
_CTYPE = {torch.bfloat16: "__nv_bfloat16", torch.float32: "float", torch.float16: "__half"}
_NUM_SMS_OVERRIDE: int | None = None


@functools.lru_cache(maxsize=None)
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    full = _device_sms(device.index if device.index is not None else torch.cuda.current_device())
    return min(full, _NUM_SMS_OVERRIDE) if _NUM_SMS_OVERRIDE else full


def set_num_sms(n: int | None) -> None:
    """Limit the persistent grid to n SMs (None: all of them)."""
    global _NUM_SMS_OVERRIDE
    _NUM_SMS_OVERRIDE = int(n) if n else None


_SWITCHES = ("DEEPSTACK_GEMM_CONFIG", "DEEPSTACK_GEMM_DEFINES", "DEEPSTACK_GEMM_MULTICAST", "DEEPSTACK_GEMM_TMA_STORE",
             "DEEPSTACK_GEMM_SPLIT_TAIL", "DEEPSTACK_GEMM_ROWS256")
_ENV_DATA = getattr(os.environ, "_data", None)
_SWITCH_KEYS = tuple(os.environ.encodekey(v) for v in _SWITCHES) if _ENV_DATA is not None else None


def switches() -> tuple:
    """The DEEPSTACK_GEMM_* switches' current raw values and the SM limit: part of every plan and call key, so a
    change between calls (tests, A/B runs) takes effect at the next call. Read from os.environ's own dict
    (os.environ.get decodes and re-encodes: ~0.7 us a name on every call)."""
    if _SWITCH_KEYS is None:
        return (*map(os.environ.get, _SWITCHES), _NUM_SMS_OVERRIDE)
    return (*map(_ENV_DATA.get, _SWITCH_KEYS), _NUM_SMS_OVERRIDE)


def _forced_config(cfg: GemmConfig) -> GemmConfig:
    """DEEPSTACK_GEMM_CONFIG="block_m,block_n,stages" overrides the heuristic (tuning sweeps and debugging)."""
    raw = os.environ.get("DEEPSTACK_GEMM_CONFIG", "").strip()
    if not raw:
        return cfg
    bm, bn, st = (int(v) for v in raw.split(","))
    return GemmConfig(bm, bn, st, cfg.num_sms, cfg.tma_store)


def gemm_spec(cfg: GemmConfig, n: int, k: int, kind: int, sf_b_per_row: bool, out_dtype, c_dtype, has_c,
              cluster: int = 1) -> KernelSpec:
    args = (cfg.block_m, cfg.block_n, n, k, cfg.stages, kind, sf_b_per_row, _CTYPE[out_dtype], _CTYPE[c_dtype], has_c)
    if cfg.tma_store:
        args += (cluster, True)
    elif cluster > 1:
        args += (cluster,)
    return KernelSpec(_GEMM_HEADER, "deepstack::fp8_gemm_kernel", args, defines=experiment_defines())


def use_multicast(kind: int, cfg: GemmConfig, m_rows: int, sf_b_per_row: bool, n: int = 0) -> bool:
    """2-CTA clusters sharing B by TMA multicast, for dense 1D2D kernels with 128-row tiles at most 160 wide (wider
    ones spill) and at least two M-blocks. OPT-IN (DEEPSTACK_GEMM_MULTICAST=1): bit-identical to the plain kernel,
    but 1-8% slower on the H200 at M = 4096 (the kernel is not L2-bound there; docs/gemm.md). Those multicast kernels
    had no TMA-store epilogue; DEEPSTACK_GEMM_MULTICAST=2 (experiment) adds it where use_tma_store's policy would
    take it for one CTA: 25% fewer L2 -> shared-memory bytes per K slice at 128x128, aimed at the power cap.
    256-row tiles (n: the GEMM's N, at least two N-blocks) share A instead, between horizontally adjacent N-blocks
    (src/gemm/fp8_gemm.cuh, kMcastA; DeepGEMM's M = 4096 form), with the TMA-store epilogue under either value:
    bit-identical, but 1-4% slower than 256-row tiles alone at M = 4096 on the H200 (ab_gemm.py --steady, three
    calls; ncu at 4096 x 7168 x 16384: 4% more SM cycles, 6% fewer L2 bytes), and still 1-3% slower after the
    cluster kernels got their uniform registers back (2026-12-01; docs/gemm.md), hence also opt-in. 64-row tiles
    (the M <= 128 calls) share A the same way: bit-identical, 0.9-2.6% slower at M = 64 and up to 12% at M = 128
    (H200, 2026-12-01 18:03 UTC, ab_gemm.py --steady; docs/gemm.md), opt-in too."""
    if os.environ.get("DEEPSTACK_GEMM_MULTICAST", "0") not in ("1", "2") or kind != KIND_DENSE or sf_b_per_row:
        return False
    if cfg.block_m == 256:   # 256-row tiles share A between two N-blocks instead (at least two of them)
        return cfg.block_n <= 128 and n > cfg.block_n
    if cfg.block_m == 64:    # so do 64-row tiles (experiment; M <= 128 calls re-read all of A on every SM)
        return cfg.block_n <= 160 and n > cfg.block_n
    return cfg.block_m == 128 and cfg.block_n <= 160 and m_rows > 128


def shares_a(cfg: GemmConfig, cluster: int) -> bool:
    """Whether a cluster's CTAs share A (adjacent N-blocks, 256- and 64-row tiles) rather than B (adjacent M-blocks);
    256-row tiles count their N-blocks in pairs even without clusters (src/gemm/fp8_gemm.cuh, kMcastA)."""
    return cfg.block_m == 256 or (cfg.block_m == 64 and cluster == 2)


# The TMA-store epilogue's staging tile costs a pipeline stage (128x128: 6 -> 5); it paid for 128-row tiles on the
# H200 (+25% at K = 512, +9-11% at K = 1536-2048, +0-1% at 7168; at K = 16384 -9% / +2% with the serial promotion,
# +3.5% with the pipelined one, 2026-11-29 21:11 UTC, against 0.6% between two timings of one binary), but not for
# 64-row tiles (0 to -13%). Not measured above K = 16384, hence the limit. docs/gemm.md has the A/B numbers. It also
# needs D's tensor map, encoded on the host once per output pointer: calls with M <= 128 (kernels of ~15-25 us, +1-3%
# measured with a reused D) keep the plain epilogue, so a caller that allocates D per call pays no encode there.
TMA_STORE_MAX_K = 16384
# The weight-gradient (1D1D) kernels' TMA store, measured on the k-grouped kind (H200, 2026-11-30 21:50 UTC,
# benchmarks/bench_k_grouped.py, against the staged stores): +23% at 256-token segments, +3% / +6% at 1024
# (4096 x 7168 / 7168 x 2048), -3% at 4096; so up to K = 2048 (the longest segment, for the k-grouped kind).
WGRAD_TMA_STORE_MAX_K = 2048


def use_tma_store(kind: int, cfg: GemmConfig, m_rows: int, k: int, sf_b_per_row: bool, out_dtype, has_c: bool,
                  cluster: int) -> bool:
    """TMA-store epilogue (src/gemm/fp8_gemm.cuh, kTmaStore): possible for bf16 output without C (any kind, the
    weight gradients' 1D1D kernels included; grouped warps with invalid rows among their 16 store through the staged
    path), any BLOCK_N (grouped kinds and 1D1D: at most 128; widths that are not multiples of 64 stage unswizzled
    16 x BLOCK_N boxes), no clusters (but for the experiment DEEPSTACK_GEMM_MULTICAST=2, dense kind); on by default
    for dense, contiguous and k-grouped 128-row tiles (dense 256-row tiles: always; their kernel has no other
    epilogue) with M > 128 (M_sum for the contiguous kind) and
    K <= TMA_STORE_MAX_K (weight gradients: WGRAD_TMA_STORE_MAX_K), off by default for the masked kind (measured
    slower). DEEPSTACK_GEMM_TMA_STORE=1/0 forces it on/off wherever it is possible (A/B runs, tests)."""
    clusters = cluster == 1 or (kind == KIND_DENSE and (cfg.block_m == 256 or
                                                        os.environ.get("DEEPSTACK_GEMM_MULTICAST", "0") == "2"))
    if not (out_dtype == torch.bfloat16 and not has_c and clusters):
        return False
    if (kind != KIND_DENSE or sf_b_per_row) and cfg.block_n > 128:   # (192-wide grouped kernels spill, ptxas)
        return False
    forced = os.environ.get("DEEPSTACK_GEMM_TMA_STORE", "").strip()
    if not forced:
        # masked: 5-6% slower at 4 x 256 rows, equal at 1 x 1024 (H200, 2026-11-29 20:53 UTC), so off there
        return (kind != KIND_MASKED and cfg.block_m >= 128 and m_rows > 128
                and k <= (WGRAD_TMA_STORE_MAX_K if sf_b_per_row else TMA_STORE_MAX_K))
    if forced not in ("0", "1"):
        raise ValueError(f"DEEPSTACK_GEMM_TMA_STORE must be 0 or 1, got {forced!r}")
    return forced == "1"


# 256-row tiles (src/gemm/fp8_gemm.cuh, kWaves = 2) against the 128-row tiles the model picks, per row, in a wave:
# ~0.97 of the time, measured on the H200 (2026-11-30 23:30-23:50 UTC, ab_gemm.py --steady, M = 4096, three calls,
# the last two with the unrolled loop: 24576 x 1536 +3.3-4.7%, 32768 x 512 +1.9-3.2%, 7168 x 2048 +3.2-3.7%,
# 7168 x 16384 +0.2-6.2%, 4096 x 7168 -0.6..+1.7%). A 256-row tile costs two 128-row tiles' time at this factor,
# so it is taken where the waves it leaves (fewer, each twice as long) come out ahead.
ROWS256_COST = 0.97
CONTIGUOUS_256_MAX_GROUPS = 1 << 15     # (group ids are 16-bit in the 256-row contiguous kernel's lookahead)


def use_256_rows(kind: int, cfg: GemmConfig, m_rows: int, n: int, k: int, sf_b_per_row: bool, out_dtype,
                 has_c: bool, num_groups: int = 1) -> bool:
    """256 x 128 tiles instead of the model's 128 x 128 (DeepGEMM's M = 4096 tile, with our two-wave kernel) for dense
    1D2D GEMMs with bf16 output and no C that get the TMA-store epilogue (which the 256-row kernel needs), where
    2 x ROWS256_COST x waves(256) < waves(128). Wider 128-row tiles the model picked for wave fill (N = 2112: 176)
    stay. DEEPSTACK_GEMM_ROWS256=0 turns it off (A/B runs), =1 is the default, =2 also takes them for the grouped
    contiguous kind (opt-in): a tile whose 128-row halves hold two groups runs one pass over K per half (see
    src/gemm/fp8_gemm.cuh TilePasses), so they pay only where groups are multiples of 256 rows (H200, 2026-12-01:
    +1.4..+3.0% at 4 x 8192 and 8 x 4096 rows; MoE-like sizes padded to 128 lost 1-7.4%, docs/gemm.md). That kernel
    packs two group ids per register (below 2^15 groups) and is not taken at exactly three K slices (K = 257-384),
    where ptxas spills 8 bytes in it alone."""
    rows256 = os.environ.get("DEEPSTACK_GEMM_ROWS256", "1").strip() or "1"
    if rows256 not in ("0", "1", "2"):
        raise ValueError(f"DEEPSTACK_GEMM_ROWS256 must be 0, 1 or 2, got {rows256!r}")
    if rows256 == "0" or (cfg.block_m, cfg.block_n) != (128, 128):
        return False
    kinds = (KIND_DENSE, KIND_CONTIGUOUS) if rows256 == "2" else (KIND_DENSE,)
    if (kind not in kinds or sf_b_per_row
            or not use_tma_store(kind, cfg, m_rows, k, sf_b_per_row, out_dtype, has_c, 1)):
        return False
    if kind == KIND_CONTIGUOUS and (num_groups >= CONTIGUOUS_256_MAX_GROUPS or cdiv(k, 128) == 3):
        return False
    waves = lambda bm: cdiv(cdiv(m_rows, bm) * cdiv(n, 128), cfg.num_sms)  # noqa: E731
    return 2 * ROWS256_COST * waves(256) < waves(128)


# Host-side caches: the hot path must cost a few microseconds, not the ~170 us that rebuilding the config, the
# kernel lookup and four tensor maps per call cost (measured on the H200: small GEMMs were host-bound).
_PLANS: dict = {}
_TMAPS = BoundedMemo()


def _tmap(ptr: int, dtype, dims: tuple, strides: tuple, box: tuple, swizzle: int = 0) -> bytes:
    """A tensor map depends only on these values, so equal keys can share the encoded bytes."""
    key = (ptr, dtype, dims, strides, box, swizzle)
    m = _TMAPS.get(key)
    if m is None:
        m = _TMAPS.remember(key, make_tensor_map(ptr, dtype, list(dims), list(strides), list(box),
                                                 swizzle_bytes=swizzle))
    return m


def _rows_map(t: torch.Tensor, rows: int, row_stride: int, box_rows: int) -> bytes:
    """fp8 operand viewed as [rows, K] with the given row stride; 128-byte swizzled boxes [box_rows, 128]."""
    return _tmap(t.data_ptr(), t.dtype, (t.shape[-1], rows), (row_stride,), (128, box_rows), 128)


def _sf_map(sf: torch.Tensor, mn: int, cols: int, box: int) -> bytes:
    """MN-major scales viewed as `cols` columns of `mn` contiguous floats, TMA-aligned; boxes of `box` floats."""
    return _tmap(sf.data_ptr(), torch.float32, (mn, cols), (tma_aligned_size(mn) * 4,), (box, 1))


def choose_spec(kind: int, m_rows: int, num_groups: int, n: int, k: int, expected_m: int, sf_b_per_row: bool,
                k_template, out_dtype, c_dtype, num_sms_: int) -> tuple[KernelSpec, GemmConfig, int]:
    """The specialisation a call runs: (spec, block config, cluster size). Honours the DEEPSTACK_GEMM_* switches;
    needs no GPU, so benchmarks and the prebuild list compile exactly what calls will load."""
    cfg = select_config(expected_m, n, k, num_groups if kind == KIND_MASKED else 1, num_sms_, sf_b_per_row)
    if use_256_rows(kind, cfg, m_rows, n, k, sf_b_per_row, out_dtype, c_dtype is not None, num_groups):
        cfg = replace(cfg, block_m=256)          # (stages: cut to what fits beside the TMA-store tile below)
    cfg = _forced_config(cfg)
    cluster = 2 if use_multicast(kind, cfg, m_rows, sf_b_per_row, n) else 1
    if use_tma_store(kind, cfg, m_rows, k, sf_b_per_row, out_dtype, c_dtype is not None, cluster):
        cfg = with_tma_store(cfg, sf_b_per_row)
    # (clusters: use_multicast gives them to the dense kind only)
    if cfg.block_m == 256 and not (kind in (KIND_DENSE, KIND_CONTIGUOUS) and not sf_b_per_row and cfg.tma_store
                                   and cfg.block_n <= 128
                                   and (kind == KIND_DENSE or num_groups < CONTIGUOUS_256_MAX_GROUPS)):
        raise ValueError("256-row GEMM tiles are for dense and contiguous FP8 GEMMs (1x128 x 128x128 scales; "
                         f"contiguous: below {CONTIGUOUS_256_MAX_GROUPS} groups) with bf16 output, no C, M > 128 and "
                         f"BLOCK_N <= 128 (the TMA-store epilogue); got {cfg} for kind {kind}")
    spec = gemm_spec(cfg, n, k if k_template is None else k_template, kind, sf_b_per_row, out_dtype,
                     c_dtype or out_dtype, c_dtype is not None, cluster)
    return spec, cfg, cluster


def _plan(kind, device, m_rows, num_groups, n, k, expected_m, sf_b_per_row, k_template, out_dtype, c_dtype):
    key = (kind, device.index, m_rows, num_groups, n, k, expected_m, sf_b_per_row, k_template, out_dtype, c_dtype,
           switches())
    plan = _PLANS.get(key)
    if plan is None:
        spec, cfg, cluster = choose_spec(kind, m_rows, num_groups, n, k, expected_m, sf_b_per_row, k_template,
                                         out_dtype, c_dtype, num_sms(device))
        # tiles and the rasterisation band count cluster tiles (cluster x BLOCK_M rows each; tiles sharing A:
        # BLOCK_M rows, cluster x BLOCK_N columns), bands of 16 such tiles up to 128 rows high, 2048 rows for taller
        share_a = shares_a(cfg, cluster)
        tile_rows = cfg.block_m * (1 if share_a else cluster)
        m_blocks = cdiv(m_rows, tile_rows)
        tiles = (m_blocks * cdiv(n, cfg.block_n * (cluster if share_a else 1)) *
                 (num_groups if kind in (KIND_MASKED, KIND_K_GROUPED) else 1))
        band_blocks = BAND_M_BLOCKS * 128 // max(tile_rows, 128)
        kernel, smem = get_kernel(spec, _GEMM_SIGNATURE), smem_bytes(cfg, sf_b_per_row)
        # persistent grid: one CTA per SM, or as many whole clusters as fit at once (GPCs place clusters whole)
        slots = cfg.num_sms if cluster == 1 else min(cfg.num_sms // cluster,
                                                     kernel.max_active_clusters(cluster, cfg.threads, smem))
        grid = cluster * max(1, min(slots, tiles))
        plan = (kernel, cfg, grid, max(1, min(band_blocks, m_blocks)), smem, cluster)
        _PLANS[key] = plan
    return plan


def _prepare_gemm(kind, a, sfa, b, sfb, d, c, layout, *, m_rows, num_groups, n, k, expected_m, sf_b_per_row,
                  k_template=None, plan_k=None):
    """The GEMM's launch, packed (PreparedLaunch). m_rows: M (dense), M_sum (contiguous) or M_max (masked).
    k: the operands' K (k-grouped: the sum of the segments); plan_k: the K the block sizes are chosen for, if not k."""
    kernel, cfg, grid, band, smem, cluster = _plan(kind, a.device, m_rows, num_groups, n,
                                                   k if plan_k is None else plan_k, expected_m, sf_b_per_row,
                                                   k_template, d.dtype, None if c is None else c.dtype)
    kb = cdiv(k, 128)
    groups_b = b.shape[0] if b.dim() == 3 else 1
    a_rows = a.shape[0] * a.shape[1] if a.dim() == 3 else a.shape[0]
    # multicast: each CTA of a cluster loads half of the shared operand (B; A for 256- and 64-row tiles, shares_a)
    share_a = shares_a(cfg, cluster)
    tmap_a = _rows_map(a, a_rows, a.stride(-2), cfg.block_m // (cluster if share_a else 1))
    tmap_b = _rows_map(b, groups_b * n, b.stride(-2), cfg.block_n // (1 if share_a else cluster))
    tmap_sfa = _sf_map(sfa, m_rows, kb * (num_groups if kind == KIND_MASKED else 1), cfg.block_m)
    # (maps a kernel does not read are filled with tmap_sfa: 1D2D kernels read B scales with plain loads)
    tmap_sfb = _sf_map(sfb, n, kb, cfg.block_n) if sf_b_per_row else tmap_sfa
    tmap_d = tmap_sfa
    if cfg.tma_store and (d.data_ptr() | d.stride(-2) * 2) % 16 == 0:
        # D for the TMA-store epilogue: 16 x 64 boxes with the 128-byte swizzle, one per math warp and 64 columns,
        # or for widths that are not multiples of 64 one unswizzled 16 x BLOCK_N box per math warp (the kernel tests
        # the same alignment and stores directly without it) (masked and k-grouped: D [G, M, N] with packed groups,
        # viewed as G * M rows)
        d_rows = m_rows * (num_groups if kind in (KIND_MASKED, KIND_K_GROUPED) else 1)
        box, swizzle = ((64, 16), 128) if cfg.block_n % 64 == 0 else ((cfg.block_n, 16), 0)
        tmap_d = _tmap(d.data_ptr(), d.dtype, (n, d_rows), (d.stride(-2) * 2,), box, swizzle)
    if sf_b_per_row:
        sg = sn = sk = 0
    elif sfb.dim() == 3:
        sg, sn, sk = sfb.stride()
    else:
        sg, (sn, sk) = 0, sfb.stride()
    args = (tmap_a, tmap_b, tmap_sfa, tmap_sfb, tmap_d, d, c, sfb, layout, m_rows, num_groups, d.stride(-2),
            0 if c is None else c.stride(-2), band, sg, sn, sk, kb)
    return kernel.prepare(grid, cfg.threads, *args, smem=smem, cluster=(cluster, 1, 1) if cluster > 1 else None)


# Calls seen before, by operand addresses and layouts: a training or decode loop calls each GEMM with the same
# operands step after step (weights, the caching allocator's reused blocks), so a repeated call skips the checks,
# the plan, the tensor maps and the packing: one dictionary lookup and one driver call (~19 -> ~5 us of Python on
# the CPU dev machine, 2-4x that on the H200 machine's host). Only launches whose every address is an operand's
# (or a view of one) are remembered, never one that reads a temporary (a scale-layout copy, C + D).
_CALLS = BoundedMemo()
# what prepare() returns as its temporaries when it did the work itself with torch ops (K = 0): never remembered
WORK_DONE = ("done by torch ops, not a replayable launch",)


def _run_memoised(key, prepare) -> None:
    """Launch the call `key` names: from the memo, or from `prepare()` -> (launches, temporaries), remembered
    when it made no temporaries (which stay alive here until the launches are issued)."""
    launches = _CALLS.get(key)
    if launches is None:
        launches, temporaries = prepare()
        if not temporaries:
            _CALLS.remember(key, launches)
    for launch in launches:
        launch.launch()


def _fill_no_k(d, c, accumulate):
    """K == 0: D = C (+ D when accumulating)."""
    if not accumulate:
        d.zero_()
    if c is not None:
        d.add_(c)


# Split tail, OPT-IN (DEEPSTACK_GEMM_SPLIT_TAIL=1): dense 1D2D GEMMs whose last 128-wide column of tiles is at most
# half full and adds a wave of 128x128 tiles (e.g. 4096 x 2112: 32 x 17 = 544 tiles = 4.1 waves on 132 SMs, so 5
# tile-times) run as two launches: the 128-wide columns (512 tiles, 4 waves) and the last N % 128 columns as their
# own GEMM, whose narrow tiles (64 x 32 at 4096 x 64) cost a fraction of a 128x128 tile. Each output element is still
# computed by one tile over the whole K in the same slice order (bit-identical, tested). H200, 4096x2112x7168: GPU
# time 115 -> 108 us (+7%, CUDA graphs), but the host path doubles (37 -> 75 us per call), and whole-call A/B runs
# whose host path outlasted the L2 flush before each call measured it 2-52% slower, so it is not the default.
# Since 2026-11-30 the heuristic itself takes 128x176 tiles at 4096 x 2112 (3 waves, heuristic.wave_fill_width), so
# the split applies only where the final pick is still 128x128 (e.g. 4096 x 3136).
SPLIT_TAIL_MAX_COLS = 64


def split_tail_columns(m: int, n: int, k: int, num_sms_: int) -> int:
    """How many trailing columns of a dense 1D2D GEMM run as a second launch (0: one launch)."""
    if os.environ.get("DEEPSTACK_GEMM_SPLIT_TAIL", "0") != "1" or os.environ.get("DEEPSTACK_GEMM_CONFIG"):
        return 0
    return _split_tail_columns(m, n, k, num_sms_)


@functools.lru_cache(maxsize=4096)
def _split_tail_columns(m: int, n: int, k: int, num_sms_: int) -> int:
    # cached: select_config is ~20 us of Python, too much for every call's host path
    tail = n % 128
    if n < 128 or not 0 < tail <= SPLIT_TAIL_MAX_COLS:
        return 0
    cfg = select_config(m, n, k, 1, num_sms_)
    if (cfg.block_m, cfg.block_n) != (128, 128):
        return 0
    m_blocks = cdiv(m, 128)
    return tail if cdiv(m_blocks * (n // 128), num_sms_) < cdiv(m_blocks * cdiv(n, 128), num_sms_) else 0


def _prepare_dense(a, sfa, b, sfb, d, c, accumulate, *, wgrad: bool):
    """The dense and weight-gradient GEMMs after their checks: (launches, temporaries). Empty problems and K = 0
    are done here (no launches)."""
    m, k = a.shape
    n = b.shape[0]
    if m == 0 or n == 0:
        return (), ()
    if k == 0:
        _fill_no_k(d, c, accumulate)
        return (), WORK_DONE
    c = d if accumulate and c is None else c
    temporaries = []
    if accumulate and c is not d:
        c = c + d
        temporaries.append(c)
    sfa_k = as_mn_major_sf(sfa)
    sfb_k = as_mn_major_sf(sfb) if wgrad else sfb
    temporaries += [t for t, orig in ((sfa_k, sfa), (sfb_k, sfb)) if t is not orig]
    # wgrad: B carries 1x128 scales too, and K (the token count) changes every step, so it is a run-time value
    # there (template K = 0).
    tail = 0 if wgrad else split_tail_columns(m, n, k, num_sms(a.device))
    if tail:
        main = n - tail
        launches = tuple(
            _prepare_gemm(KIND_DENSE, a, sfa_k, b[cols], sfb[blocks], d[:, cols], None if c is None else c[:, cols],
                          None, m_rows=m, num_groups=1, n=cols.stop - cols.start, k=k, expected_m=m,
                          sf_b_per_row=False)
            for cols, blocks in ((slice(0, main), slice(0, main // 128)), (slice(main, n), slice(main // 128, None))))
        return launches, temporaries
    return (_prepare_gemm(KIND_DENSE, a, sfa_k, b, sfb_k, d, c, None, m_rows=m, num_groups=1, n=n, k=k, expected_m=m,
                          sf_b_per_row=wgrad, k_template=0 if wgrad else None),), temporaries


def dense_call_specs(m: int, n: int, k: int, out_dtype, wgrad: bool = False, num_sms_: int = 132) -> list:
    """The specialisations an fp8_gemm_nt (or, wgrad=True, fp8_wgrad_gemm_nt) call of this shape loads, without C:
    what _prepare_dense launches, split tail included; needs no GPU (prebuilding for benchmarks and warm-up)."""
    if wgrad:
        return [choose_spec(KIND_DENSE, m, 1, n, k, m, True, 0, out_dtype, None, num_sms_)[0]]
    tail = split_tail_columns(m, n, k, num_sms_)
    return [choose_spec(KIND_DENSE, m, 1, cols, k, m, False, None, out_dtype, None, num_sms_)[0]
            for cols in ((n - tail, tail) if tail else (n,))]


def _dense_call(op, a, sfa, b, sfb, d, c, accumulate, wgrad):
    def prepare():
        checks.check_dense(op, a, sfa, b, sfb, d, c, sf_b_per_row=wgrad)
        return _prepare_dense(a, sfa, b, sfb, d, c, accumulate, wgrad=wgrad)
    # (the key spelled out in each face: ~10% faster than a helper that loops over the operands)
    _run_memoised((op, _operand_key(a), _operand_key(sfa), _operand_key(b), _operand_key(sfb), _operand_key(d),
                   _operand_key(c), accumulate, switches()), prepare)


@cuda_kernel("fp8_gemm_nt")
def fp8_gemm_nt_cuda(a, sfa, b, sfb, d, c=None, accumulate=False):
    _dense_call("fp8_gemm_nt", a, sfa, b, sfb, d, c, accumulate, wgrad=False)


@cuda_kernel("fp8_wgrad_gemm_nt")
def fp8_wgrad_gemm_nt_cuda(a, sfa, b, sfb, d, c=None, accumulate=False):
    _dense_call("fp8_wgrad_gemm_nt", a, sfa, b, sfb, d, c, accumulate, wgrad=True)


# Segment bounds of k-grouped calls (int32 [G + 1] in 128-deep slices, on the device), by (ks, device). Routing
# changes ks every training step, so most calls build theirs: a pinned host copy, no host sync.
_K_BOUNDS = BoundedMemo()


def _k_bounds(ks: tuple, device: torch.device) -> torch.Tensor:
    key = (ks, device)
    bounds = _K_BOUNDS.get(key)
    if bounds is None:
        host, total = [0], 0
        for k in ks:
            total += k // 128
            host.append(total)
        bounds = _K_BOUNDS.remember(key, torch.tensor(host, dtype=torch.int32).pin_memory().to(device,
                                                                                              non_blocking=True))
    return bounds


def _groups_packed(t) -> bool:
    """[G, M, N] with unit columns and groups back to back (the kernel addresses it as [G * M, N])."""
    return t is None or (t.stride(2) == 1 and t.stride(0) == t.shape[1] * t.stride(1))


@cuda_kernel("k_grouped_fp8_wgrad_gemm_nt")
def k_grouped_fp8_wgrad_gemm_nt_cuda(a, sfa, b, sfb, d, ks, c=None, accumulate=False):
    """One launch for all segments (the k-grouped kernel: every group's M x N tiles in one persistent grid, each
    walking its own K segment; empty segments store zeros or C). Under CUDA-graph capture (whose launches must
    not read a bounds tensor this module may free) and for unpacked D / C: one weight-gradient GEMM per segment."""
    op = "k_grouped_fp8_wgrad_gemm_nt"
    checks.check_k_grouped(op, a, sfa, b, sfb, d, ks, c)
    ks = tuple(int(x) for x in ks)
    m, n = a.shape[0], b.shape[0]
    if m == 0 or n == 0:
        return
    if not any(ks):
        _fill_no_k(d, c, accumulate)
        return
    if _groups_packed(d) and _groups_packed(c) and not torch.cuda.is_current_stream_capturing():
        sfa, sfb = as_mn_major_sf(sfa), as_mn_major_sf(sfb)
        c = d if accumulate and c is None else c
        if accumulate and c is not d:
            c = c + d
        # block sizes chosen for the longest segment rounded up to a power of two (a bounded set of plans)
        plan_k = 1 << (max(ks) - 1).bit_length()
        _prepare_gemm(KIND_K_GROUPED, a, sfa, b, sfb, d, c, _k_bounds(ks, a.device), m_rows=m, num_groups=len(ks),
                      n=n, k=sum(ks), expected_m=m, sf_b_per_row=True, k_template=0, plan_k=plan_k).launch()
        return
    k_grouped_per_segment(a, sfa, b, sfb, d, ks, c, accumulate)


def k_grouped_per_segment(a, sfa, b, sfb, d, ks, c=None, accumulate=False) -> None:
    """k_grouped_fp8_wgrad_gemm_nt's operation as one weight-gradient GEMM per segment (empty segments: D[g] = C[g]
    or zeros): the op's path under CUDA-graph capture and for unpacked D / C, and what the benchmark and the GPU
    tests compare the one launch with. Operands as the op takes them (CUDA tensors, checked by the op)."""
    sfa, sfb = as_mn_major_sf(sfa), as_mn_major_sf(sfb)
    start = 0
    for g, k in enumerate(int(x) for x in ks):
        cg = None if c is None else c[g]
        if k == 0:
            _fill_no_k(d[g], cg, accumulate)
        else:
            seg, sseg = slice(start, start + k), slice(start // 128, (start + k) // 128)
            fp8_wgrad_gemm_nt_cuda(a[:, seg], sfa[:, sseg], b[:, seg], sfb[:, sseg], d[g], cg, accumulate)
        start += k


@cuda_kernel("m_grouped_fp8_gemm_nt_contiguous")
def m_grouped_contiguous_cuda(a, sfa, b, sfb, d, m_indices):
    op = "m_grouped_fp8_gemm_nt_contiguous"

    def prepare():
        checks.check_contiguous(op, a, sfa, b, sfb, d, m_indices)
        m, k = a.shape
        g, n = b.shape[0], b.shape[1]
        if m == 0 or n == 0:
            return (), ()
        if k == 0:
            d[m_indices >= 0] = 0
            return (), WORK_DONE
        bk = b if b.stride(0) == n * b.stride(1) else b.contiguous()
        sfa_k, idx = as_mn_major_sf(sfa), m_indices.contiguous()
        launch = _prepare_gemm(KIND_CONTIGUOUS, a, sfa_k, bk, sfb, d, None, idx, m_rows=m, num_groups=g, n=n, k=k,
                               expected_m=m, sf_b_per_row=False)
        return (launch,), [t for t, orig in ((bk, b), (sfa_k, sfa), (idx, m_indices)) if t is not orig]
    if m_indices.dtype == torch.int32 and b.dim() == 3:   # (else prepare's argument checks raise)
        checks.check_m_indices_once(op, m_indices, b.shape[0])   # every call: the ids may change in place
    _run_memoised((op, _operand_key(a), _operand_key(sfa), _operand_key(b), _operand_key(sfb), _operand_key(d),
                   _operand_key(m_indices), switches()), prepare)


@cuda_kernel("m_grouped_fp8_gemm_nt_masked")
def m_grouped_masked_cuda(a, sfa, b, sfb, d, masked_m, expected_m):
    op = "m_grouped_fp8_gemm_nt_masked"

    def prepare():
        checks.check_masked(op, a, sfa, b, sfb, d, masked_m, expected_m)
        g, m, k = a.shape
        n = b.shape[1]
        if m == 0 or n == 0 or g == 0:
            return (), ()
        if k == 0:
            rows = torch.arange(m, device=d.device)[None, :] < masked_m[:, None]
            d.masked_fill_(rows[..., None], 0)
            return (), WORK_DONE
        bk = b if b.stride(0) == n * b.stride(1) else b.contiguous()
        sfa_k, counts = as_mn_major_sf(sfa), masked_m.contiguous()
        launch = _prepare_gemm(KIND_MASKED, a, sfa_k, bk, sfb, d, None, counts, m_rows=m, num_groups=g, n=n, k=k,
                               expected_m=max(1, min(expected_m, m)), sf_b_per_row=False)
        return (launch,), [t for t, orig in ((bk, b), (sfa_k, sfa), (counts, masked_m)) if t is not orig]
    _run_memoised((op, _operand_key(a), _operand_key(sfa), _operand_key(b), _operand_key(sfb), _operand_key(d),
                   _operand_key(masked_m), expected_m, switches()), prepare)


# ---- quantisation kernels --------------------------------------------------------------------------------------
_QUANT_HEADER = "gemm/quant_fp8.cuh"


# Plans by input layout (op, shape, strides, dtype, flags): the checks, the specialisation and the launch constants
# are worked out on the first call of a layout; later calls allocate the outputs and launch (~40% of the host path).
_QUANT_PLANS = BoundedMemo()


def _quant_plan(op, x, flags, build, check=check_quant_input):
    key = (op, x.shape, x.stride(), x.dtype, flags)
    plan = _QUANT_PLANS.get(key)
    if plan is None:
        check(op, x)
        plan = _QUANT_PLANS.remember(key, build())
    return plan


def _unit_cols(x):
    """x with unit column stride (the kernels read rows as vectors); a copy only when it has not."""
    return x if x.stride(1) == 1 else x.contiguous()


def _quant_kernel(name: str, signature: str, *template_args):
    return get_kernel(KernelSpec(_QUANT_HEADER, f"deepstack::{name}", template_args), signature)


def _block_quant_empty(n: int, k: int, transpose: bool, device):
    """q and its 128x128-block scales for x [N, K] (q^T [K, N] with transpose), and the scales' (block row, block
    column) strides as the kernels take them."""
    nb, kb = cdiv(n, 128), cdiv(k, 128)
    shape, sf_shape, strides = ((k, n), (kb, nb), (1, nb)) if transpose else ((n, k), (nb, kb), (kb, 1))
    return (torch.empty(shape, dtype=torch.float8_e4m3fn, device=device),
            torch.empty(sf_shape, dtype=torch.float32, device=device), strides)


@cuda_kernel("per_block_quant_fp8")
def per_block_quant_fp8_cuda(x, transpose=False, eps=1e-4, scale_ue8m0=False):
    kernel = _quant_plan("per_block_quant_fp8", x, (transpose, scale_ue8m0), lambda: x.numel() and _quant_kernel(
        "per_block_quant_fp8_kernel", "pppiilliif", _CTYPE[x.dtype], transpose, scale_ue8m0))
    x, (n, k) = _unit_cols(x), x.shape
    q, sf, (sf_sy, sf_sx) = _block_quant_empty(n, k, transpose, x.device)
    if kernel:
        kernel.launch((cdiv(k, 128), cdiv(n, 128)), 256, x, q, sf, n, k, x.stride(0), q.stride(0), sf_sy, sf_sx,
                      check_eps("quantisation", eps))
    return q, sf


@cuda_kernel("per_block_quant_fp8_dual")
def per_block_quant_fp8_dual_cuda(x, eps=1e-4, scale_ue8m0=False):
    kernel = _quant_plan("per_block_quant_fp8_dual", x, scale_ue8m0, lambda: x.numel() and _quant_kernel(
        "per_block_quant_fp8_dual_kernel", "pppppiilf", _CTYPE[x.dtype], scale_ue8m0))
    x, (n, k) = _unit_cols(x), x.shape
    (q, sf, _), (qt, sft, _) = _block_quant_empty(n, k, False, x.device), _block_quant_empty(n, k, True, x.device)
    if kernel:
        kernel.launch((cdiv(k, 128), cdiv(n, 128)), 256, x, q, sf, qt, sft, n, k, x.stride(0), check_eps("quantisation", eps))
    return q, sf, qt, sft


@cuda_kernel("per_token_group_quant_fp8_t")
def per_token_group_quant_fp8_t_cuda(x, eps=1e-4, scale_ue8m0=False):
    kernel = _quant_plan("per_token_group_quant_fp8_t", x, scale_ue8m0, lambda: x.numel() and _quant_kernel(
        "per_token_group_quant_fp8_t_kernel", "pppiiillif", _CTYPE[x.dtype], scale_ue8m0))
    x, (m, k) = _unit_cols(x), x.shape
    q, sf = transposed_quant_empty(m, k, x.device)
    if kernel:
        kernel.launch((cdiv(k, 64), cdiv(m, 128)), 256, x, q, sf, m, k, q.stride(0), x.stride(0), q.stride(0),
                      sf.stride(1) if sf.shape[1] > 1 else tma_aligned_size(k), check_eps("quantisation", eps))
    return q, sf


@cuda_kernel("per_token_group_quant_fp8_dual")
def per_token_group_quant_fp8_dual_cuda(x, eps=1e-4, scale_ue8m0=False):
    kernel = _quant_plan("per_token_group_quant_fp8_dual", x, scale_ue8m0, lambda: x.numel() and _quant_kernel(
        "per_token_group_quant_fp8_dual_kernel", "pppppiiililif", _CTYPE[x.dtype], scale_ue8m0),
        check=check_dual_token_quant_input)
    x, (m, k) = _unit_cols(x), x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    sf = mn_major_tma_aligned_empty((m, k // 128), device=x.device)
    qt, sft = transposed_quant_empty(m, k, x.device)
    if kernel:
        kernel.launch((k // 128, cdiv(m, 128)), 256, x, q, sf, qt, sft, m, k, qt.stride(0), x.stride(0),
                      tma_aligned_size(m), qt.stride(0), tma_aligned_size(k), check_eps("quantisation", eps))
    return q, sf, qt, sft


# ---- ahead-of-time list: DeepSeek-V3 projection shapes -------------------------------------------------------
DSV3_NK = ((2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048))


_MOE_HEADER = "gemm/moe_combine.cuh"
_SWIGLU_HEADER = "gemm/swiglu.cuh"


def _rows_vectorised(width: int, *tensors) -> bool:
    """Whether the elementwise MoE kernels may move `width`-element row pieces of these 2-D tensors (same dtype) in
    16-byte units: the width, every row stride and every start a multiple of 16 bytes (else one element a thread)."""
    esize = tensors[0].element_size()
    return (width * esize) % 16 == 0 and all(t.data_ptr() % 16 == 0 and (t.stride(0) * esize) % 16 == 0
                                             for t in tensors)


def _moe_rows_operands(y, rows):
    """y contiguous in hidden and rows int64 contiguous, as the combine kernels read them."""
    y = y if y.stride(1) == 1 else y.contiguous()
    return y, (rows if rows.dtype == torch.int64 and rows.is_contiguous() else rows.long().contiguous())


def _moe_kernel(name: str, dtype: torch.dtype, vec: bool, signature: str):
    return get_kernel(KernelSpec(_MOE_HEADER, f"deepstack::{name}", (_CTYPE[dtype], vec)), signature)


@cuda_kernel("moe_combine")
def moe_combine_cuda(y, rows, weights, check_rows=True):
    checks.check_moe_combine("moe_combine", y, rows, weights)
    if check_rows and not torch.cuda.is_current_stream_capturing():   # (under capture: not checked, as MLA's data)
        checks.check_moe_rows("moe_combine", rows, y.shape[0])
        checks.ROWS_CHECKED.note((rows,), (y.shape[0],))           # the weight gradient's check then needs no sync
    t, k = rows.shape
    hidden = y.shape[1]
    out = torch.empty(t, hidden, dtype=y.dtype, device=y.device)
    if t == 0 or hidden == 0:
        return out
    y, rows = _moe_rows_operands(y, rows)
    vec = _rows_vectorised(hidden, y)
    units = hidden // (16 // y.element_size()) if vec else hidden
    _moe_kernel("moe_combine_kernel", y.dtype, vec, "plppiiip").launch(
        min(t, 8 * num_sms(y.device)), min(256, (units + 31) // 32 * 32), y, y.stride(0), rows, weights.contiguous(),
        t, k, hidden, out)
    return out


@cuda_kernel("moe_combine_weight_grad")
def moe_combine_weight_grad_cuda(grad, y, rows):
    checks.check_moe_combine_weight_grad("moe_combine_weight_grad", grad, y, rows)
    checks.check_moe_rows_range_once("moe_combine_weight_grad", rows, y.shape[0])   # the kernel reads y[rows]
    t, k = rows.shape
    hidden = y.shape[1]
    out = torch.empty(t, k, dtype=torch.float32, device=y.device)
    if t == 0 or k == 0:
        return out
    (y, rows), grad = _moe_rows_operands(y, rows), grad.contiguous()
    vec = _rows_vectorised(hidden, y, grad)
    _moe_kernel("moe_combine_weight_grad_kernel", y.dtype, vec, "pplpiiip").launch(
        min(t, 8 * num_sms(y.device)), 256, grad, y, y.stride(0), rows, t, k, hidden, out)
    return out


def _launch_swiglu(h, grad, out, backward: bool):
    rows, f = h.shape[0], h.shape[1] // 2
    if rows == 0 or f == 0:
        return out
    vec = _rows_vectorised(f, *(t for t in (h, grad, out) if t is not None))
    kernel = get_kernel(KernelSpec(_SWIGLU_HEADER, "deepstack::swiglu_kernel", (_CTYPE[h.dtype], vec, backward)),
                        "plplplii")
    units = rows * (f // (16 // h.element_size()) if vec else f)
    kernel.launch(max(1, min(cdiv(units, 256), 16 * num_sms(h.device))), 256, h, h.stride(0), grad,
                  grad.stride(0) if grad is not None else 0, out, out.stride(0), rows, f)
    return out


@cuda_kernel("swiglu")
def swiglu_cuda(h):
    checks.check_swiglu("swiglu", h)
    return _launch_swiglu(h, None, torch.empty(h.shape[0], h.shape[1] // 2, dtype=h.dtype, device=h.device), False)


@cuda_kernel("swiglu_backward")
def swiglu_backward_cuda(grad, h):
    checks.check_swiglu("swiglu_backward", h, grad)
    grad = grad if grad.stride(1) == 1 else grad.contiguous()
    return _launch_swiglu(h, grad, torch.empty(h.shape, dtype=h.dtype, device=h.device), True)


@register_prebuild("gemm")
def _prebuild():
    """DeepSeek-V3 dense projections at M = 64 and 4096, the MoE grouped shapes, the weight gradient and the
    quantisers: every kernel family once, so `deepstack jit prebuild` and the spill check cover them all."""
    bf16, f32 = torch.bfloat16, torch.float32
    specs = []
    for n, k in DSV3_NK:
        for m in (64, 4096):
            specs.append(choose_spec(KIND_DENSE, m, 1, n, k, m, False, None, bf16, None, 132)[0])
            specs += dense_call_specs(m, n, k, bf16)
    for n, k in ((4096, 7168), (7168, 2048)):
        specs.append(choose_spec(KIND_CONTIGUOUS, 4 * 8192, 4, n, k, 4 * 8192, False, None, bf16, None, 132)[0])
        specs.append(choose_spec(KIND_MASKED, 4096, 4, n, k, 256, False, None, bf16, None, 132)[0])
    for m, n in ((7168, 2048), (2048, 7168)):
        specs.append(gemm_spec(select_config(m, n, 1, 1, 132, True), n, 0, KIND_DENSE, True, f32, f32, True))
        specs += dense_call_specs(m, n, 8192, bf16, wgrad=True)   # FP8Linear's bf16 weight gradients
    # FP8Experts' weight gradients (DeepSeek-V3 experts, 2 x 2048 -> 7168 -> 2048; bf16 and fp32 out, fp32 C)
    for m, n in ((4096, 7168), (7168, 2048)):
        specs += [choose_spec(KIND_K_GROUPED, m, 32, n, 1024, m, True, 0, out, c, 132)[0]
                  for out, c in ((bf16, None), (f32, None), (f32, f32))]
    for dt in ("__nv_bfloat16", "float"):
        for t in (False, True):
            specs.append(KernelSpec(_QUANT_HEADER, "deepstack::per_block_quant_fp8_kernel", (dt, t, False)))
        specs.append(KernelSpec(_QUANT_HEADER, "deepstack::per_block_quant_fp8_dual_kernel", (dt, False)))
        specs.append(KernelSpec(_QUANT_HEADER, "deepstack::per_token_group_quant_fp8_dual_kernel", (dt, False)))
        specs.append(KernelSpec(_QUANT_HEADER, "deepstack::per_token_group_quant_fp8_t_kernel", (dt, False)))
        specs.append(KernelSpec(_MOE_HEADER, "deepstack::moe_combine_kernel", (dt, True)))
        specs.append(KernelSpec(_MOE_HEADER, "deepstack::moe_combine_weight_grad_kernel", (dt, True)))
        specs += [KernelSpec(_SWIGLU_HEADER, "deepstack::swiglu_kernel", (dt, True, b)) for b in (False, True)]
    return specs
