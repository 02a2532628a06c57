"""`deepstack jit`: prebuild, list and clear the kernel cache."""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed

from torch_deepstack.cli_args import int_at_least


def add_parser(sub):
    p = sub.add_parser("jit", help="manage the JIT kernel cache (prebuild, list, clear)")
    p.add_argument("action", nargs="?", choices=("prebuild", "list", "clear"), help="what to do")
    p.add_argument("--prebuild", action="store_true", help="same as the action 'prebuild'")
    p.add_argument("--area", action="append", help="limit prebuild to these areas (repeatable)")
    # (0 would silently mean "default"; a negative count failed deep in ThreadPoolExecutor)
    p.add_argument("-j", "--jobs", type=int_at_least(1), default=None, help="parallel nvcc processes")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from torch_deepstack import jit
    from torch_deepstack.jit import config

    action = "prebuild" if args.prebuild else args.action
    if action is None:
        print("usage: deepstack jit {prebuild,list,clear}", file=sys.stderr)
        return 2
    if action == "list":
        entries = jit.list_entries()
        for e in entries:
            print(f"{e['arch']:7s} {e['registers']:4d} regs {e['spill_stores']:4d} B spill "
                  f"{e['compile_seconds']:6.2f}s  {e['instantiation']}")
        print(f"{len(entries)} kernels in {config.cache_dir()}")
        return 0
    if action == "clear":
        print(f"removed {jit.clear()} kernels from {config.cache_dir()}")
        return 0
    # Resolve the areas first: a misspelt --area is a usage error wherever nvcc is or is not installed.
    try:
        specs = jit.prebuild_specs(args.area)
    except KeyError as e:
        print(f"deepstack jit: error: argument --area: {e.args[0]}", file=sys.stderr)
        return 2
    if jit.find_nvcc() is None:
        print("deepstack jit prebuild: nvcc not found (set DEEPSTACK_NVCC or CUDA_HOME)", file=sys.stderr)
        return 1
    from tqdm import tqdm
    failures = 0
    with ThreadPoolExecutor(max_workers=args.jobs or config.compile_threads()) as pool:
        futs = {pool.submit(jit.build, s): s for s in specs}
        for f in tqdm(as_completed(futs), total=len(futs), desc="compiling kernels", unit="kernel"):
            try:
                f.result()
            except jit.JitCompileError as e:
                failures += 1
                print(f"FAILED {futs[f].instantiation()}:\n{e}", file=sys.stderr)
    print(f"{len(specs) - failures}/{len(specs)} kernels cached in {config.cache_dir()}")
    return 1 if failures else 0
