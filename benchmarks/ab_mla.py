"""A/B of the bf16/fp16 MLA decode kernels in one process, with compile-time variants and two ways to flush L2.

Each timing follows ~100 ms of untimed replays (--settle-ms, as bench_mla.py; A/Bs before 2026-12-01 had none).
Variants are `kernel[+NAME=VALUE...]`: a decode kernel as `kernels._DECODE_KERNEL` names it ("general", "overlap")
with extra -D defines for the decode kernel only (the combine kernel is untouched), e.g. a guarded experiment in a
.cuh; `+@NAME=VALUE` sets the attribute NAME of torch_deepstack.mla.kernels for that variant instead (e.g.
`general_pair+@_PAIR_CLUSTER=4`). Each variant is timed (whole op: decode + combine, CUDA-graph replay, median; interleaved, best of --rounds):
  dirty: the L2 flushed by a 256 MB write before every replay (bench_mla.py's method; leaves the L2 full of dirty
         lines that the decode then writes back),
  clean: the L2 flushed by reading 256 MB (no write-back during the decode),
and with --no-combine also without the combine kernel (wrong results for split requests: timing only).

    python benchmarks/ab_mla.py --variants general,overlap --configs "128,1,16,8192;64,1,16,4096"
    python benchmarks/ab_mla.py --variants "general,general+DEEPSTACK_MY_EXPERIMENT=1" --flush dirty,clean
    python benchmarks/ab_mla.py --fp8 --variants "general,general+@_FP8_SMALL_ROWS=0"   # FP8 caches

The memory-bound measurements of 2026-11-29 20:41-20:50 UTC in docs/mla.md were taken with this script's
predecessor (same build, timing and flush code).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_mla  # noqa: E402

from torch_deepstack.mla import get_mla_metadata, kernels, mla_decode_with_kvcache  # noqa: E402
from torch_deepstack.testing.bench import bench_gpu  # noqa: E402

_real_get_kernel = kernels.get_kernel
_state = {"defines": (), "combine": True}


class _NoLaunch:
    def launch(self, *args, **kwargs) -> None:
        pass

    def prepare(self, *args, **kwargs) -> "_NoLaunch":
        return self


def _get_kernel(spec, signature):
    """kernels.get_kernel with the current variant's defines on decode kernels (and the combine optionally off)."""
    if "combine" in spec.kernel:
        return _real_get_kernel(spec, signature) if _state["combine"] else _NoLaunch()
    if _state["defines"]:
        spec = dataclasses.replace(spec, defines=tuple(spec.defines) + _state["defines"])
    return _real_get_kernel(spec, signature)


_KERNEL_ATTRS: dict = {}   # kernels.* attributes a variant set, with their original values


def apply_variant(text: str) -> None:
    """Select the variant's kernel, -D defines and kernels.* attributes (the previous variant's attributes undone)."""
    for name, value in _KERNEL_ATTRS.items():
        setattr(kernels, name, value)
    _KERNEL_ATTRS.clear()
    kernels._DECODE_PLANS.clear()   # (the plans hold kernels built with the previous variant's defines)
    kernels._DECODE_KERNEL, defines = parse_variant(text)
    _state["defines"] = tuple(d for d in defines if not d[0].startswith("@"))
    for name, value in defines:
        if name.startswith("@"):
            if not hasattr(kernels, name[1:]):
                raise ValueError(f"variant {text!r}: torch_deepstack.mla.kernels has no attribute {name[1:]!r}")
            _KERNEL_ATTRS.setdefault(name[1:], getattr(kernels, name[1:]))
            setattr(kernels, name[1:], value)


def parse_variant(text: str) -> tuple[str, tuple]:
    """'general+A=1+B=2' -> ('general', (('A', 1), ('B', 2))); '+@NAME=V' gives ('@NAME', V)."""
    kernel, *defs = text.split("+")
    if kernel not in kernels._DECODE_KERNELS:
        raise ValueError(f"variant {text!r}: kernel must be one of {kernels._DECODE_KERNELS}")
    out = []
    for d in defs:
        name, _, value = d.partition("=")
        if not name or not value:
            raise ValueError(f"variant {text!r}: defines look like NAME=VALUE, got {d!r}")
        out.append((name, int(value) if value.lstrip("-").isdigit() else value))
    return kernel, tuple(out)


def run(configs, variants, flushes, reps, rounds, no_combine, fp8=False, settle_ms=bench_mla.SETTLE_MS):
    kernels.get_kernel = _get_kernel
    modes = [True, False] if no_combine else [True]
    rows = []
    try:
        for b, s_q, h_q, mean in configs:
            q, cache, bt, seq = bench_mla.build(b, s_q, h_q, mean, fp8=fp8)
            best = {}
            for _ in range(rounds):
                for v in variants:
                    apply_variant(v)
                    # per variant: the row-block cluster kernels may plan fewer parts (whole clusters per GPC)
                    sched, splits = get_mla_metadata(seq, s_q * h_q, 1)
                    fn = lambda: mla_decode_with_kvcache(q, cache, bt, seq, bench_mla.DV, sched, splits,  # noqa
                                                         causal=True, is_fp8_kvcache=fp8)
                    for comb in modes:
                        _state["combine"] = comb
                        kernels._DECODE_PLANS.clear()   # (a plan holds its combine kernel, or the no-launch one)
                        for fl in flushes:
                            t = bench_gpu(fn, warmup=1, rep=reps, flush="read" if fl == "clean" else "write",
                                          use_graph=True, settle_ms=settle_ms) * 1e3
                            key = f"{v} {fl}" + ("" if comb else " nocombine")
                            best[key] = min(best.get(key, math.inf), t)
            token_bytes = 656 if fp8 else bench_mla.D * 2
            nbytes = int(seq.sum()) * token_bytes + b * s_q * h_q * (bench_mla.D + bench_mla.DV) * 2
            row = {"config": f"{b}/{s_q}/{h_q}/{mean}" + (" fp8" if fp8 else ""), "GB": nbytes / 1e9, **best}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del cache
            torch.cuda.empty_cache()
    finally:
        apply_variant("general")
        kernels.get_kernel = _real_get_kernel
        kernels._DECODE_KERNEL, _state["defines"], _state["combine"] = "auto", (), True
    return rows


def table(rows) -> str:
    keys = [k for k in rows[0] if k not in ("config", "GB")] if rows else []
    lines = ["| config | " + " | ".join(f"{k} µs" for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for r in rows:
        lines.append(f"| {r['config']} | " + " | ".join(f"{r[k]:.1f} ({r['GB'] / r[k] * 1e3:.2f} TB/s)"
                                                         for k in keys) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="general", help="comma-separated kernel[+NAME=VALUE...]")
    ap.add_argument("--configs", default="128,1,16,8192;128,1,32,8192;64,1,16,4096;128,2,16,8192",
                    help="'b,s_q,h_q,mean_sk;...' (h_kv = 1)")
    ap.add_argument("--flush", default="dirty,clean", help="dirty (256 MB write), clean (256 MB read), or both")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-combine", action="store_true", help="also time without the combine kernel")
    ap.add_argument("--fp8", action="store_true", help="FP8 caches (656-byte rows) instead of bf16")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--settle-ms", type=float, default=bench_mla.SETTLE_MS,
                    help="GPU time of untimed replays before each timing (bench_mla.py's; 0: the method before "
                         "2026-12-01)")
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        parse_variant(v)
    flushes = [f for f in args.flush.split(",") if f]
    if any(f not in ("dirty", "clean") for f in flushes):
        raise SystemExit(f"--flush takes dirty and/or clean, got {args.flush!r}")
    configs = [tuple(int(x) for x in c.split(",")) for c in args.configs.split(";") if c.strip()]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    rows = run(configs, variants, flushes, args.reps, args.rounds, args.no_combine, args.fp8,
               settle_ms=args.settle_ms)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
