"""Host microseconds per eager EP call (one process per GPU, IPC transport), optionally for several source trees.

Eager calls are host-bound when the host needs longer per call than the GPU: this times only the host side (a
loop of calls, best of 5 x 30, no profiler), and with --profile prints a cProfile of the two hot calls on rank 0.
Give several source trees (e.g. a `git worktree` of the previous commit and `.`) to A/B them in one run; each tree
runs in fresh processes with its own torch_deepstack.

    python benchmarks/ep_host_time.py                       # this tree, 2 GPUs
    python benchmarks/ep_host_time.py ../old . --profile    # A/B, then a profile of the last tree
"""
from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import os
import pstats
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _calls(buf, rank):
    from bench_ep import routing      # imported here: after the tree under test is first on sys.path
    n, h, k, e = 4096, 7168, 8, 256
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(n, h, generator=g).cuda().bfloat16()
    idx = routing(n, e, k, rank, "cuda")
    w = torch.rand(n, k, generator=g).cuda()
    q, s = torch.ops.deepstack.per_token_group_quant_fp8(x, 128)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, e)
    kw = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
              topk_idx=idx, topk_weights=w)
    rx, _, _, _, hd, _ = buf.dispatch(x, **kw)
    m = 128
    xl, il, wl = x[:m].contiguous(), idx[:m].contiguous(), w[:m].contiguous()
    lrx, _, lh, _, _ = buf.low_latency_dispatch(xl, il, m, e)
    ye = torch.randn(lrx[0].shape, device="cuda").bfloat16()
    return {
        "cached dispatch fp8": lambda: buf.dispatch((q, s), handle=hd),
        "cached dispatch bf16": lambda: buf.dispatch(x, handle=hd),
        "combine bf16": lambda: buf.combine(rx, hd),
        "exact dispatch bf16 (syncs)": lambda: buf.dispatch(x, **kw),
        "LL dispatch fp8 (syncs)": lambda: buf.low_latency_dispatch(xl, il, m, e),
        "LL combine bf16": lambda: buf.low_latency_combine(ye, il, wl, lh),
    }


def _rank(rank, world, port, tree, profile, results):
    sys.path.insert(0, tree)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    torch.cuda.set_device(rank)
    import torch_deepstack
    if not os.path.abspath(torch_deepstack.__file__).startswith(tree):
        raise RuntimeError(f"imported {torch_deepstack.__file__}, not the tree {tree}")
    from torch_deepstack.ep import Buffer
    buf = Buffer(None, num_nvl_bytes=1 << 30, num_rdma_bytes=1 << 30, transport="ipc")
    calls = _calls(buf, rank)
    for name, fn in calls.items():
        best = float("inf")
        for _ in range(5):
            torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(30):
                fn()
            best = min(best, (time.perf_counter() - t0) / 30 * 1e6)
        torch.cuda.synchronize()
        dist.barrier()
        if rank == 0:
            results[name] = best
    if profile:
        for name in ("cached dispatch fp8", "combine bf16", "exact dispatch bf16 (syncs)"):
            torch.cuda.synchronize()
            dist.barrier()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(200):
                calls[name]()
            prof.disable()
            torch.cuda.synchronize()
            dist.barrier()
            if rank == 0:
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(20)
                print(f"--- cProfile, {name}, 200 calls, rank 0\n{out.getvalue()}", flush=True)
    buf.destroy()
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trees", nargs="*", default=["."], help="source trees to import torch_deepstack from")
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="cProfile the hot calls of the last tree")
    args = ap.parse_args()
    if torch.cuda.device_count() < args.world_size:
        sys.exit(f"needs {args.world_size} GPUs, this machine has {torch.cuda.device_count()}")
    from torch_deepstack.testing.local_cluster import free_port
    table = {}
    for i, tree in enumerate(args.trees):
        results = mp.Manager().dict()
        mp.spawn(_rank, args=(args.world_size, free_port(), os.path.abspath(tree),
                              args.profile and i == len(args.trees) - 1, results), nprocs=args.world_size, join=True)
        table[tree] = dict(results)
    names = list(next(iter(table.values())))
    print(f"\nhost us per eager call, EP{args.world_size}, best of 5 x 30 calls, rank 0")
    print("| call | " + " | ".join(table) + " |")
    print("|---|" + "---|" * len(table))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{table[t][name]:.1f}" for t in table) + " |")


if __name__ == "__main__":
    main()
