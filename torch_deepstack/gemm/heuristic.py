"""Deterministic block-size choice for the FP8 GEMM kernels (no autotuning: one shape -> one config, always).

Model: a CTA walks its tiles; per 128-deep K slice a BLOCK_M x BLOCK_N tile costs
max(tensor-core cycles, bytes moved into the SM / L2 bandwidth per SM). The kernel time is then
waves x that cost, with waves = ceil(tiles / SMs). We take the config with the lowest modelled time; ties go to
larger BLOCK_M, then larger BLOCK_N. Non-power-of-two BLOCK_N (multiples of 16) fill more SMs on shapes like
N = 7168 or 2112 for one-warpgroup tiles (BLOCK_M 64, small M). Two-warpgroup tiles (BLOCK_M 128) take BLOCK_N in
{64, 128, 192} in the model; tiles at most 128 wide get a credit for their pipelined promotion
(PIPELINED_PROMOTION_CREDIT). A 128-row tile the model picked then moves to 176 or 192 columns where fewer waves
pay for those widths' measured per-column cost (ROW128_WIDE_COST, wave_fill_width): on the H200 at M = 4096
4096 x 2112 runs 128 x 176 (3 waves instead of 5 tile-times). Widths 112, 144 and 160 stay out: 6-18% more time per
column than 128 on average (up to 37%) even with the compile-time B-scale split (2026-11-30, docs/gemm.md).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

SMEM_BUDGET = 232448            # bytes of shared memory one SM90 CTA may use
MAX_STAGES = 10
MMA_FMA_PER_CYCLE = 4096        # dense FP8 per SM (H100/H200)
L2_BYTES_PER_CYCLE = 64.0       # sustained L2 -> SM bandwidth per SM (model constant, fitted to H200 sweeps)
BAND_M_BLOCKS = 16              # rasterisation band (M-blocks walked together)
# 1D2D tiles at most 128 wide overlap each K slice's promotion with the next slice's wgmmas (two accumulator sets;
# wider tiles lack the registers). Measured on the H200 (2026-11-29): 6-13% faster than the serial promotion at
# M = 4096, and 128x128 then beat 128x192 by 5% at N = 2112 and 11% at N = 32768; the credit is fitted to that.
PIPELINED_PROMOTION_CREDIT = 0.85
# Time per column of a 128-row tile relative to 128x128 (pipelined promotion), within a wave, measured on the H200
# (2026-11-30 00:55 UTC, six M = 4096 DeepSeek-V3 shapes, whole-call A/B, kernels with the B-scale block split known
# at compile time and the TMA-store epilogue): 176 0.98-1.06 (serial promotion), 192 0.94-1.00; 112 1.07-1.37,
# 144 1.00-1.13, 160 0.99-1.27 (not offered). A width replaces 128 only when waves x width x cost drop below
# WAVE_FILL_MARGIN of 128's (the spread of those ratios).
ROW128_WIDE_COST = {176: 1.03, 192: 1.00}
WAVE_FILL_MARGIN = 0.95


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    stages: int
    num_sms: int
    tma_store: bool = False     # TMA-store epilogue (its own BLOCK_M x BLOCK_N bf16 staging tile in shared memory)

    @property
    def threads(self) -> int:
        # one math warpgroup per 64 rows, two for 256-row tiles (two 64-row waves each), plus the producer's
        return (min(self.block_m // 64, 2) + 1) * 128


def spans_at_most_two_scale_blocks(block_n: int) -> bool:
    """Tiles start at multiples of block_n, so their offset inside a 128-wide B scale block is a multiple of
    gcd(block_n, 128): e.g. 176-wide tiles can start 112 columns in and touch three blocks, while 144, 160 and 192
    never do. The kernel handles three (one main-loop copy per offset); the model keeps to two for 64-row tiles."""
    return block_n <= 128 + math.gcd(block_n, 128)


def wave_fill_width(m: int, n: int, num_groups: int, num_sms: int, block_n: int) -> int:
    """For a 128-row tile of width block_n (128 or 192) picked by the model: 176 or 192 where waves x width x
    ROW128_WIDE_COST beats block_n's by WAVE_FILL_MARGIN, else block_n. 4096 x 2112 on 132 SMs: 128 -> 5 waves x
    128 = 640 column-times, 176 -> 3 x 176 x 1.03 = 544 (measured 1080 -> 1251 TFLOPS)."""
    def cost(bn):
        waves = cdiv(cdiv(max(m, 1), 128) * cdiv(n, bn) * num_groups, num_sms)
        return waves * bn * (1.0 if bn == 128 else ROW128_WIDE_COST[bn])
    base = cost(block_n)
    best = min((bn for bn in ROW128_WIDE_COST if bn != block_n), key=cost)
    return best if cost(best) < WAVE_FILL_MARGIN * base else block_n


def stage_bytes(block_m: int, block_n: int, sf_b_per_row: bool) -> int:
    # B scales (weight gradient only) take a 128-byte aligned slot per stage, as the kernel lays them out
    return block_m * 128 + block_n * 128 + block_m * 4 + ((block_n + 31) // 32 * 128 if sf_b_per_row else 0)


def experiment_defines() -> tuple:
    """DEEPSTACK_GEMM_DEFINES="A=1,B" adds -D flags to every GEMM specialisation (kernel experiments): (("A", "1"),
    ("B", 1))."""
    raw = os.environ.get("DEEPSTACK_GEMM_DEFINES", "").strip()
    items = (kv.strip() for kv in raw.split(","))
    return tuple((kv.split("=", 1)[0], kv.split("=", 1)[1] if "=" in kv else 1) for kv in items if kv)


def experiment_on(name: str) -> bool:
    """Whether DEEPSTACK_GEMM_DEFINES names the switch `name` (switches that change the shared-memory layout)."""
    return any(k == name for k, _ in experiment_defines())


def epilogue_staging_bytes() -> int:
    """Shared memory of the staged epilogue (src/gemm/fp8_gemm.cuh): up to 8 math warps x 16 rows x 48 bytes;
    0 with the DS_DIRECT_EPILOGUE experiment (the A/B switch back to direct stores)."""
    return 0 if experiment_on("DS_DIRECT_EPILOGUE") else 2 * 4 * 16 * 48


def tma_store_staging_bytes(block_m: int, block_n: int) -> int:
    """Shared memory of the TMA-store epilogue: the whole bf16 tile (the staged path's buffer is then not needed)."""
    return block_m * block_n * 2


def sched_ring_bytes() -> int:
    """Shared memory of the opt-in scheduler-thread ring (DS_SCHED_WARP experiment): 4 slots x (2 mbarriers + int4)."""
    return 4 * 32 if experiment_on("DS_SCHED_WARP") else 0


def wgrad_pipe_sfb_bytes(cfg: GemmConfig, sf_b_per_row: bool) -> int:
    """The second set of B-scale slots of the weight-gradient kernels' pipelined promotion (BLOCK_N <= 128;
    src/gemm/fp8_gemm.cuh kSfbSlots); none with the serial loop (the DS_SERIAL_PROMOTE / DS_DBG switches)."""
    serial = experiment_on("DS_SERIAL_PROMOTE") or experiment_on("DS_DBG")
    if not sf_b_per_row or cfg.block_n > 128 or serial:
        return 0
    return cfg.stages * ((cfg.block_n + 31) // 32 * 128)


def smem_bytes(cfg: GemmConfig, sf_b_per_row: bool) -> int:
    staging = tma_store_staging_bytes(cfg.block_m, cfg.block_n) if cfg.tma_store else epilogue_staging_bytes()
    return (cfg.stages * stage_bytes(cfg.block_m, cfg.block_n, sf_b_per_row) + cfg.stages * 16 + 1024 + staging +
            sched_ring_bytes() + wgrad_pipe_sfb_bytes(cfg, sf_b_per_row))


def with_tma_store(cfg: GemmConfig, sf_b_per_row: bool = False) -> GemmConfig:
    """`cfg` with the TMA-store epilogue: its staging tile is reserved and the stage count cut to what still fits."""
    staging = tma_store_staging_bytes(cfg.block_m, cfg.block_n)
    per_stage = (stage_bytes(cfg.block_m, cfg.block_n, sf_b_per_row) +
                 wgrad_pipe_sfb_bytes(replace(cfg, stages=1), sf_b_per_row))   # (1D1D: the second B-scale slots)
    fit = (SMEM_BUDGET - 1024 - 16 * MAX_STAGES - staging - sched_ring_bytes()) // per_stage
    return replace(cfg, stages=min(cfg.stages, fit), tma_store=True)


def select_config(m: int, n: int, k: int, num_groups: int, num_sms: int, sf_b_per_row: bool = False,
                  block_m_choices: tuple = (64, 128)) -> GemmConfig:
    """m: rows per group (expected rows for the masked kind), n, k: the problem; num_groups: independent GEMMs."""
    max_bn = 160 if sf_b_per_row else 192
    best_key, best = None, None
    for bm in block_m_choices:
        if bm == 128 and m <= 64 and 64 in block_m_choices:
            continue
        for bn in range(16, max_bn + 1, 16):
            if not sf_b_per_row and not spans_at_most_two_scale_blocks(bn):
                continue
            if bm == 128 and bn % 64:
                continue
            tiles = cdiv(max(m, 1), bm) * cdiv(n, bn) * num_groups
            waves = cdiv(tiles, num_sms)
            per_slice = max(bm * bn * 128 / MMA_FMA_PER_CYCLE, (bm + bn) * 128 / L2_BYTES_PER_CYCLE)
            if not sf_b_per_row and bn <= 128:
                per_slice *= PIPELINED_PROMOTION_CREDIT
            cost = waves * per_slice
            key = (round(cost, 3), -bm, -bn)
            if best_key is None or key < best_key:
                best_key, best = key, (bm, bn)
    bm, bn = best
    if bm == 128 and not sf_b_per_row and bn in (128, 192):
        bn = wave_fill_width(m, n, num_groups, num_sms, bn)
    stages = min(MAX_STAGES,
                 (SMEM_BUDGET - 1024 - 16 * MAX_STAGES - epilogue_staging_bytes() - sched_ring_bytes()) //
                 stage_bytes(bm, bn, sf_b_per_row))
    return GemmConfig(bm, bn, stages, num_sms)
