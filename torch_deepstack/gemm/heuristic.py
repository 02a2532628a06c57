"""Deterministic block-size choice for the FP8 GEMM kernels (no autotuning: one shape -> one config, always).

Model: a CTA walks its tiles; per 128-deep K slice a BLOCK_M x BLOCK_N tile costs
max(tensor-core cycles, bytes moved into the SM / L2 bandwidth per SM). The kernel time is then
waves x that cost, with waves = ceil(tiles / SMs). We take the config with the lowest modelled time; ties go to
larger BLOCK_M, then larger BLOCK_N. Non-power-of-two BLOCK_N (multiples of 16) fill more SMs on shapes like
N = 7168 or 2112 for one-warpgroup tiles (BLOCK_M 64, small M). Two-warpgroup tiles (BLOCK_M 128) take BLOCK_N in
{64, 128, 192} only: on the H200 at M = 4096 widths 96, 112, 144 and 160 ran 5-20% slower per FLOP than 128
(sweep of 2026-11-29, docs/gemm.md), which the model does not capture. Tiles at most 128 wide get a credit for
their pipelined promotion (PIPELINED_PROMOTION_CREDIT).
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
        return (self.block_m // 64 + 1) * 128


def spans_at_most_two_scale_blocks(block_n: int) -> bool:
    """The 1D2D kernel promotes with at most two 128-wide B scale blocks per tile. Tiles start at multiples of
    block_n, so their offset inside a scale block is a multiple of gcd(block_n, 128): e.g. 176-wide tiles can start 112
    columns in and touch three blocks, while 144, 160 and 192 never do."""
    return block_n <= 128 + math.gcd(block_n, 128)


def stage_bytes(block_m: int, block_n: int, sf_b_per_row: bool) -> int:
    # B scales (weight gradient only) take a 128-byte aligned slot per stage, as the kernel lays them out
    return block_m * 128 + block_n * 128 + block_m * 4 + ((block_n + 31) // 32 * 128 if sf_b_per_row else 0)


def epilogue_staging_bytes() -> int:
    """Shared memory of the staged epilogue (src/gemm/fp8_gemm.cuh): up to 8 math warps x 16 rows x 48 bytes;
    0 when DEEPSTACK_GEMM_DEFINES has DS_DIRECT_EPILOGUE (the A/B switch back to direct stores)."""
    return 0 if "DS_DIRECT_EPILOGUE" in os.environ.get("DEEPSTACK_GEMM_DEFINES", "") else 2 * 4 * 16 * 48


def tma_store_staging_bytes(block_m: int, block_n: int) -> int:
    """Shared memory of the TMA-store epilogue: the whole bf16 tile (the staged path's buffer is then not needed)."""
    return block_m * block_n * 2


def smem_bytes(cfg: GemmConfig, sf_b_per_row: bool) -> int:
    staging = tma_store_staging_bytes(cfg.block_m, cfg.block_n) if cfg.tma_store else epilogue_staging_bytes()
    return cfg.stages * stage_bytes(cfg.block_m, cfg.block_n, sf_b_per_row) + cfg.stages * 16 + 1024 + staging


def with_tma_store(cfg: GemmConfig, sf_b_per_row: bool = False) -> GemmConfig:
    """`cfg` with the TMA-store epilogue: its staging tile is reserved and the stage count cut to what still fits."""
    staging = tma_store_staging_bytes(cfg.block_m, cfg.block_n)
    fit = (SMEM_BUDGET - 1024 - 16 * MAX_STAGES - staging) // stage_bytes(cfg.block_m, cfg.block_n, sf_b_per_row)
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
    stages = min(MAX_STAGES,
                 (SMEM_BUDGET - 1024 - 16 * MAX_STAGES - epilogue_staging_bytes()) // stage_bytes(bm, bn, sf_b_per_row))
    return GemmConfig(bm, bn, stages, num_sms)
