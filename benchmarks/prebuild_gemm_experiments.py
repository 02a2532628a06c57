"""Compile (no GPU needed) every FP8 GEMM specialisation that benchmarks/run_gemm_experiments.sh loads: the GPU
bit-identity tests of the lean slices and the two-tile id lookahead against their A/B controls (DS_NO_LEAN_SLICE,
DS_ID_LOOKAHEAD1; both defaults since 2026-11-30 06:31) and of the opt-in DEEPSTACK_GEMM_MULTICAST=2, and the
ab_gemm / ncu_gemm shapes and variants, into DEEPSTACK_JIT_CACHE_DIR, so that call spends no device time in nvcc.

  DEEPSTACK_JIT_CACHE_DIR=$PWD/.jit_gemmnx python benchmarks/prebuild_gemm_experiments.py            # build
  DEEPSTACK_JIT_CACHE_DIR=$PWD/.jit_gemmnx python benchmarks/prebuild_gemm_experiments.py --check    # hits only
  DEEPSTACK_JIT_CACHE_DIR=... python benchmarks/prebuild_gemm_experiments.py --sass                  # SASS table

The cache key hashes every file under src/, so the cubins match only the source they were built from: build and
run from the same commit. --check compiles nothing and exits 1 if any specialisation is missing (on the device a
missing one would be compiled by the JIT at its first call). --sass prints SASS instructions per K slice and warp
(steady part of the first pipelined trip: from slice 1's first QGMMA to slice 7's, over 6) for the main shapes,
default against each experiment (needs cuobjdump: $CUOBJDUMP, PATH or triton's copy).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_gemm import parse_shape, parse_variant, select, spec_args  # noqa: E402

from torch_deepstack.gemm import kernels  # noqa: E402
from torch_deepstack.jit import cache  # noqa: E402
from torch_deepstack.jit.prebuild import prebuild_specs  # noqa: E402

D, C, M = kernels.KIND_DENSE, kernels.KIND_CONTIGUOUS, kernels.KIND_MASKED
ENV_KEYS = ("DEEPSTACK_GEMM_DEFINES", "DEEPSTACK_GEMM_MULTICAST", "DEEPSTACK_GEMM_CONFIG", "DEEPSTACK_GEMM_TMA_STORE",
            "DEEPSTACK_GEMM_SPLIT_TAIL")

# The device call's benchmark cases (ab_gemm.py / ncu_gemm.py notation), as in docs/gemm.md.
DENSE_SHAPES = "4096x7168x2048,4096x4096x7168,4096x7168x16384,4096x24576x1536,4096x32768x512,4096x2112x7168"
DENSE_VARIANTS = ("default:", "nolean:DS_NO_LEAN_SLICE", "mc2::2")
CONTIG_SHAPES = "c4x8192x7168x2048,c4x8192x4096x7168,32768x7168x2048"
CONTIG_VARIANTS = ("default:", "la1:DS_ID_LOOKAHEAD1", "la1_nolean:DS_ID_LOOKAHEAD1,DS_NO_LEAN_SLICE")
# ncu_gemm.py (one process; each experiment is a no-op on the other kind, a control for launch-to-launch spread)
NCU_SHAPES = "c4x8192x7168x2048,32768x7168x2048,4096x4096x7168"
NCU_VARIANTS = ("default:", "la1:DS_ID_LOOKAHEAD1", "nolean:DS_NO_LEAN_SLICE")
CASES = ((DENSE_SHAPES, DENSE_VARIANTS), (CONTIG_SHAPES, CONTIG_VARIANTS), (NCU_SHAPES, NCU_VARIANTS))


def _variant(defines="", multicast="0", tma=""):
    """An ab_gemm variant (name, defines, multicast, tma_store, split_tail), as select() takes it."""
    return parse_variant(f":{defines}:{multicast}:{tma}:0")


def _cfg(text):
    return tuple(int(v) for v in text.split(","))


def test_cases():
    """(variant, config, (kind, m_rows, groups, n, k, expected_m)) as the GPU tests call the ops (tests/gemm/test_gemm_cuda.py:
    _check_define_matches_default, test_contiguous_id_lookahead_matches_load_at_start,
    test_multicast_tma_store_matches_single_ctas)."""
    out = []
    for define in ("", "DS_ID_LOOKAHEAD1", "DS_NO_LEAN_SLICE"):
        for cfg, tma in (("128,128,6", "1"), ("128,176,5", "0"), ("64,128,8", "0"), ("64,112,8", "0")):
            for k in (384, 4224):
                v = _variant(define, tma=tma)
                # _grouped_inputs(1100, 576, k, [157, 0, 201, 77, 300]); masked expected_m = mean(masked_m) = 147
                out += [(v, _cfg(cfg), a) for a in ((D, 1100, 1, 576, k, 1100), (C, 1100, 5, 576, k, 1100),
                                                     (M, 300, 5, 576, k, 147))]
    for define in ("DS_NO_ID_LOOKAHEAD", "DS_PRODUCER_ID_LOOKAHEAD", "DS_ID_LOOKAHEAD1", ""):
        for cfg, tma in (("128,128,6", "1"), ("128,128,6", "0"), ("64,128,8", "0")):
            out.append((_variant(define, tma=tma), _cfg(cfg), (C, 1196, 5, 576, 384, 1196)))
    for cfg in ("128,128,6", "128,160,5"):
        for m, n, k in ((129, 200, 384), (700, 7168, 2048), (4095, 256, 128), (300, 4096, 4224)):
            for mc in ("2", "0"):
                out.append((_variant(multicast=mc), _cfg(cfg), (D, m, 1, n, k, m)))
    return out


def bench_cases():
    out = []
    for shapes, variants in CASES:
        for text in shapes.split(","):
            out += [(parse_variant(v), None, spec_args(parse_shape(text))) for v in variants]
    return out


def spec_of(variant, cfg, args):
    """The specialisation a call with these switches runs (ab_gemm.select sets them; restored afterwards)."""
    saved = {k: os.environ.get(k) for k in ENV_KEYS}
    try:
        select(variant, cfg)
        kind, m_rows, groups, n, k, em = args
        return kernels.choose_spec(kind, m_rows, groups, n, k, em, False, None, torch.bfloat16, None, 132)[0]
    finally:
        for key, val in saved.items():
            if val is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = val


def _cuobjdump() -> str | None:
    found = os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
        p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(p) if p.is_file() else None
    except ImportError:
        return None


def per_slice(cubin: Path, tool: str) -> tuple[float, int, dict]:
    """SASS instructions per K slice and warp in the steady part of the first pipelined trip, the static total, and
    the per-slice opcode counts."""
    text = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    ops = []
    for line in text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ops.append(re.sub(r"^@!?U?P\w+\s+", "", m.group(2).strip()).split()[0].split(".")[0])
    q = [i for i, op in enumerate(ops) if op == "QGMMA"]
    span = ops[q[4]:q[28]] if len(q) >= 32 else []
    if not span or "CS2R" in span:   # no trip of eight (K < 1024), or the serial loop (tiles wider than 128)
        return float("nan"), len(ops), {}
    return len(span) / 6, len(ops), {k: round(v / 6, 2) for k, v in collections.Counter(span).most_common(8)}


def sass_report() -> None:
    tool = _cuobjdump()
    if tool is None:
        raise SystemExit("no cuobjdump found (set CUOBJDUMP)")
    print("| shape | variant | config | SASS per K slice and warp | static SASS | top opcodes per slice |")
    print("|---|---|---|---|---|---|")
    seen = set()
    for variant, cfg, args in bench_cases():
        spec = spec_of(variant, cfg, args)
        if (spec, args) in seen:
            continue
        seen.add((spec, args))
        r = cache.build(spec)
        ps, total, top = per_slice(r.path, tool)
        name = f"{'dcm'[args[0]]} {args[1]}x{args[3]}x{args[4]}"
        cfg = f"{spec.template_args[0]}x{spec.template_args[1]}/{spec.template_args[4]}"
        print(f"| {name} | {variant[0]} | {cfg} | {ps:.1f} | {total} | {top} |", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compile nothing; exit 1 if a specialisation is missing")
    p.add_argument("--sass", action="store_true", help="print the SASS-per-K-slice table (builds what it needs)")
    args = p.parse_args()
    if args.sass:
        sass_report()
        return 0
    # (+ the quantisers the tests and benchmarks build their inputs with, and the default GEMM list)
    specs = list(dict.fromkeys([spec_of(*case) for case in test_cases() + bench_cases()]
                               + [s for s in prebuild_specs(["gemm", "quant"]) if s.defines == ()]))
    missing = [s for s in specs if not (cache.entry_dir(s) / "kernel.cubin").is_file()]
    if args.check:
        print(f"{len(specs)} specialisations, {len(missing)} missing from {cache.config.cache_dir()}")
        for s in missing:
            print("  missing", s.instantiation(), s.defines)
        return 1 if missing else 0
    for i, s in enumerate(missing):
        r = cache.build(s)
        print(f"[{i + 1}/{len(missing)}] {r.meta['registers']} regs, {r.meta['spill_stores']} B spills, "
              f"{r.meta['stack_frame']} B stack: {s.instantiation()} {s.defines}", flush=True)
    print(f"{len(specs)} specialisations in {cache.config.cache_dir()} ({len(missing)} compiled now)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
