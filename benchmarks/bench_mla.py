"""Benchmark MLA decode (deepstack::mla_decode_with_kvcache) against the plain PyTorch gather + bmm path.

Method (the issue's): lengths ~ N(mean, mean/2) clipped at >= s_q, shuffled pages, h_kv = 1; the whole op
(decode + combine, metadata computed once and reused) captured in a CUDA graph and replayed; L2 flushed
(256 MB write) before every replay; ~100 ms of untimed replays (--settle-ms), then the median of CUDA-event times.
  FLOP  = 2 * s_q * h_q * (d + dv) * sum(s_k)
  bytes = sum(s_k) * d * 2 (one read of the cache; FP8: 656 bytes per token) + b * s_q * h_q * (d + dv) * 2

    python benchmarks/bench_mla.py                 # the full sweep (b, s_q, h_q, mean s_k), bf16 + FP8 rows
    python benchmarks/bench_mla.py --quick         # a few configs
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import torch

import flashmla_live
import torch_deepstack  # noqa: F401
from torch_deepstack.mla import fp8_format, get_mla_metadata, kernels, mla_decode_with_kvcache
from torch_deepstack.testing.bench import bench_gpu

D, DV, PAGE = 576, 512, 64


def lengths(b, mean, s_q, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, generator=g) * mean / 2 + mean).clamp_min(s_q).long()


def build(b, s_q, h_q, mean, seed=0, fp8=False):
    lens = lengths(b, mean, s_q, seed)
    nblk = (lens + PAGE - 1) // PAGE
    max_blocks = int(nblk.max())
    total = int(nblk.sum())
    g = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(total, generator=g)
    bt = torch.zeros(b, max_blocks, dtype=torch.int32)
    off = 0
    for i, n in enumerate(nblk.tolist()):
        bt[i, :n] = perm[off:off + n].to(torch.int32)
        off += n
    cache = (torch.randn(total, PAGE, 1, D, device="cuda") / 10).to(torch.bfloat16)
    if fp8:
        cache = torch.cat([fp8_format.quantize_rows(c.float()) for c in cache.split(4096)])
    q = (torch.randn(b, s_q, h_q, D, device="cuda") / 10).to(torch.bfloat16)
    return q, cache, bt.cuda(), lens.to(torch.int32).cuda()


def torch_decode(q, cache, bt, seq, causal):
    """The plain PyTorch path: gather the pages, pad to the longest request, two bmm's and a masked softmax."""
    b, s_q, h_q, d = q.shape
    k = cache[bt.long()].flatten(1, 2).squeeze(2)                      # [b, T, d]
    scores = torch.bmm(q.reshape(b, s_q * h_q, d), k.transpose(1, 2)).float() * d ** -0.5
    t = torch.arange(k.shape[1], device=q.device)
    s_idx = torch.arange(s_q, device=q.device)[None, :]
    limit = seq[:, None] - s_q + s_idx + 1 if causal else seq[:, None].expand(b, s_q)
    mask = t[None, None, :] >= limit[:, :, None]                       # [b, s_q, T]
    mask = mask[:, :, None, :].expand(b, s_q, h_q, -1).reshape(b, s_q * h_q, -1)
    p = torch.softmax(scores.masked_fill(mask, -math.inf), dim=-1).to(q.dtype)
    return torch.bmm(p, k[..., :DV]).reshape(b, s_q, h_q, DV)


SETTLE_MS = 100.0   # --settle-ms: untimed flushed replays before each timing, so every contender runs at its own
# steady clock. Before 2026-12-01 there were none, and a row read the clock that the work before it left: memory-bound
# rows up to 6% slow after heavy work, compute-bound ones up to 15% fast after light work (docs/mla.md).


def time_graph(fn, reps, captured=False):
    """Median microseconds of fn replayed from a CUDA graph (fn already a replay if `captured`), L2 flushed before
    each replay, after about SETTLE_MS of untimed replays."""
    return bench_gpu(fn, warmup=0 if captured else 1, rep=reps, use_graph=not captured, settle_ms=SETTLE_MS) * 1e3


def time_kernels(fn, reps, decode_kernels, rounds):
    """{kernel: best-of-rounds median µs}, the bf16 decode kernels interleaved round by round (A B A B ...)."""
    best = {}
    saved = kernels._DECODE_KERNEL
    try:
        for _ in range(rounds):
            for k in decode_kernels:
                kernels._DECODE_KERNEL = k
                best[k] = min(best.get(k, math.inf), time_graph(fn, reps))
    finally:
        kernels._DECODE_KERNEL = saved
    return best


def run(configs, reps, baseline, fp8_rows, causal=True, decode_kernels=(), rounds=1, meta=True):
    rows = []
    for b, s_q, h_q, mean in configs:
        res = {"b": b, "s_q": s_q, "h_q": h_q, "mean_sk": mean}
        q, cache, bt, seq = build(b, s_q, h_q, mean)
        sum_sk = int(seq.sum())
        flop = 2 * s_q * h_q * (D + DV) * sum_sk
        qo_bytes = b * s_q * h_q * (D + DV) * 2
        sched, splits = get_mla_metadata(seq, s_q * h_q, 1)
        decode = lambda: mla_decode_with_kvcache(q, cache, bt, seq, DV, sched, splits, causal=causal)  # noqa: E731
        if decode_kernels:
            default = kernels.decode_kernel_for(s_q * h_q)   # timed too (interleaved) when not in the list
            timed = decode_kernels if default in decode_kernels else (*decode_kernels, default)
            per_kernel = time_kernels(decode, reps, timed, rounds)
            res.update({f"us_{k}": per_kernel[k] for k in decode_kernels})
            us = per_kernel[default]
        else:
            us = time_graph(decode, reps)
        res.update(us=us, tbps=(sum_sk * D * 2 + qo_bytes) / us / 1e6, tflops=flop / us / 1e6)
        if meta:
            res["meta_us"] = time_graph(lambda: get_mla_metadata(seq, s_q * h_q, 1), reps)
        if baseline:
            try:
                res["torch_us"] = time_graph(lambda: torch_decode(q, cache, bt, seq, causal), max(3, reps // 6))
            except torch.OutOfMemoryError:
                res["torch_us"] = float("nan")
        del cache
        if fp8_rows and s_q * h_q <= fp8_rows:
            q8, cache8, bt8, seq8 = build(b, s_q, h_q, mean, fp8=True)
            us8 = time_graph(lambda: mla_decode_with_kvcache(q8, cache8, bt8, seq8, DV, sched, splits, causal=causal,
                                                             is_fp8_kvcache=True), reps)
            res.update(fp8_us=us8, fp8_speedup=us / us8)
            del cache8
        torch.cuda.empty_cache()
        if FLASHMLA_SO and (FLASHMLA_ALL or (b, s_q, h_q, mean) in FLASHMLA_REF):
            res.update(flashmla_in_worker((b, s_q, h_q, mean), reps))
        rows.append(res)
        print(json.dumps(res), flush=True)
    return rows


FLASHMLA_SO = None   # --flashmla-so: FlashMLA's extension file, timed live (flashmla_live.py)
FLASHMLA_ALL = False  # --flashmla-all: on every config, not only the reference rows
_WORKER_MARK = "FLASHMLA_RESULT "
WORKER_TIMEOUT_S = 300   # a worker normally takes ~12 s; one that hangs is given up


def flashmla_in_worker(config, reps, tries=3) -> dict:
    """FlashMLA and ours timed on this config in a fresh process (`--flashmla-worker`): {flashmla_us, flashmla_ours_us}
    or {} (reason printed). A process of its own, because the extension's host code, once it has failed in a process
    (flashmla_shim.cpp), tends to keep failing there; a new process usually runs."""
    cmd = [sys.executable, __file__, "--flashmla-worker", "--flashmla-so", FLASHMLA_SO, "--reps", str(reps),
           "--settle-ms", str(SETTLE_MS), "--configs", ",".join(map(str, config))]
    why = ""
    for _ in range(tries):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            why = f"no result within {WORKER_TIMEOUT_S} s"
            continue
        for line in done.stdout.splitlines():
            if line.startswith(_WORKER_MARK):
                return json.loads(line[len(_WORKER_MARK):])
        why = ((done.stdout + done.stderr).strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    print(f"live FlashMLA not timed on {config}: {why[:200]}", flush=True)
    return {}


def flashmla_worker(config, reps) -> None:
    """The --flashmla-worker process: ours and a CUDA graph of FlashMLA's decode whose replayed output matched ours,
    each timed twice (order swapped, best of each), printed as one marked JSON line."""
    live_mla = flashmla_live.load(FLASHMLA_SO)
    if live_mla is None:
        return
    b, s_q, h_q, mean = config
    q, cache, bt, seq = build(b, s_q, h_q, mean)
    sched, splits = get_mla_metadata(seq, s_q * h_q, 1)
    ours = lambda: mla_decode_with_kvcache(q, cache, bt, seq, DV, sched, splits, causal=True)  # noqa: E731
    live, why = live_mla.checked_graph(q, cache, bt, seq, DV, True, ours())
    if live is None:
        print(f"FlashMLA graph: {why}")
        return
    best = {ours: math.inf, live: math.inf}
    for order in ((ours, live), (live, ours)):
        for fn in order:
            best[fn] = min(best[fn], time_graph(fn, reps, captured=fn is live))
    print(_WORKER_MARK + json.dumps({"flashmla_us": best[live], "flashmla_ours_us": best[ours]}), flush=True)


# The FlashMLA reference rows (same H200, its own draw of varied lengths): (b, s_q, h_q, mean s_k) -> (µs,
# GB/s, TFLOPS). Its draws' actual mean lengths (from its bytes and FLOPs: 8027-8408 at mean 8192, 4031-4057 at
# 4096) are up to 6% below ours (seed 0: 8444; 4222-4289), so the fair comparison is the rate, not the time: TB/s
# where s_q * h_q <= 32 (memory-bound), else TFLOPS.
FLASHMLA_REF = {(64, 1, 16, 4096): (94.8, 3179, 95), (128, 1, 16, 8192): (323.0, 3852, 116),
                (128, 1, 64, 8192): (330.7, 3723, 444), (128, 1, 128, 8192): (484.4, 2517, 591),
                (128, 2, 64, 4096): (256.2, 2459, 561), (128, 2, 128, 8192): (902.0, 1412, 644)}


def flashmla_cols(r) -> tuple[str, str]:
    ref = FLASHMLA_REF.get((r["b"], r["s_q"], r["h_q"], r["mean_sk"]))
    if ref is None:
        return "", ""
    memory_bound = r["s_q"] * r["h_q"] <= 32
    ratio = r["tbps"] * 1e3 / ref[1] if memory_bound else r["tflops"] / ref[2]
    return f"{ref[0]:.1f}", f"{ratio:.3f} ({'TB/s' if memory_bound else 'TFLOPS'})"


def live_cols(r) -> str:
    t = r.get("flashmla_us")
    return " | |" if t is None else f" {t:.1f} | {t / r['flashmla_ours_us']:.3f} |"


def table(rows) -> str:
    head = ("| b | s_q | h_q | mean s_k | µs | TB/s | TFLOPS | FlashMLA ref µs | ours / FlashMLA rate | torch µs | "
            "speedup | FP8 µs | FP8 gain | metadata µs |")
    ab = sorted(k[3:] for k in (rows[0] if rows else {}) if k.startswith("us_"))
    if ab:
        head += "".join(f" {k} µs |" for k in ab)
    live = any("flashmla_us" in r for r in rows)
    if live:
        head += " FlashMLA live µs | ours / FlashMLA live speed |"
    lines = [head, "|" + "---|" * (14 + len(ab) + 2 * live)]
    for r in rows:
        t = r.get("torch_us")
        torch_cols = ("", "") if t is None else (f"{t:.0f}", f"{t / r['us']:.1f}x")
        fp8_cols = ("", "") if "fp8_us" not in r else (f"{r['fp8_us']:.1f}", f"{r['fp8_speedup']:.2f}x")
        ref_cols = flashmla_cols(r)
        lines.append(f"| {r['b']} | {r['s_q']} | {r['h_q']} | {r['mean_sk']} | {r['us']:.1f} | {r['tbps']:.2f} | "
                     f"{r['tflops']:.0f} | {ref_cols[0]} | {ref_cols[1]} | {torch_cols[0]} | {torch_cols[1]} | {fp8_cols[0]} | {fp8_cols[1]} | "
                     f"{r.get('meta_us', math.nan):.1f} |" + "".join(f" {r['us_' + k]:.1f} |" for k in ab)
                     + (live_cols(r) if live else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    global SETTLE_MS, FLASHMLA_SO, FLASHMLA_ALL
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few configs only")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--fp8-max-rows", type=int, default=64, help="FP8 rows for configs with s_q*h_q <= this")
    ap.add_argument("--fp8-configs-only", action="store_true",
                    help="only the configs that get an FP8 row (s_q*h_q <= --fp8-max-rows)")
    ap.add_argument("--decode-kernels", help="A/B the bf16 decode kernels, e.g. 'general,overlap' (interleaved, "
                                             "best of --rounds); the us column follows the default rule")
    ap.add_argument("--rounds", type=int, default=2, help="rounds for --decode-kernels")
    ap.add_argument("--no-metadata", action="store_true", help="skip timing get_mla_metadata")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--flashmla-so", default=os.environ.get(flashmla_live.ENV),
                    help="FlashMLA's extension file (sgl-kernel's flashmla_ops.abi3.so) to time as a live contender "
                         "(default: $DEEPSTACK_FLASHMLA_SO; see flashmla_live.py), on the issue's reference configs")
    ap.add_argument("--flashmla-all", action="store_true", help="time live FlashMLA on every config")
    ap.add_argument("--flashmla-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--settle-ms", type=float, default=SETTLE_MS,
                    help="GPU time of untimed replays before each timing (0: time at once, the method before "
                         "2026-12-01)")
    ap.add_argument("--configs", help="only these configs: 'b,s_q,h_q,mean_sk;...'")
    args = ap.parse_args(argv)
    SETTLE_MS, FLASHMLA_SO, FLASHMLA_ALL = args.settle_ms, args.flashmla_so, args.flashmla_all
    if args.flashmla_worker:
        flashmla_live.preload_shim(args.flashmla_so)   # restarts this process once, with the shim preloaded
        flashmla_worker(tuple(int(x) for x in args.configs.split(",")), args.reps)
        return 0
    if args.quick:
        configs = [(64, 1, 16, 4096), (128, 1, 16, 8192), (128, 1, 64, 8192), (128, 1, 128, 8192),
                   (128, 2, 64, 4096), (128, 2, 128, 8192)]
    else:
        configs = [(b, s_q, h, sk) for b in (64, 128) for s_q in (1, 2) for h in (16, 32, 64, 128)
                   for sk in (4096, 8192, 16384)]
    if args.configs:
        configs = [tuple(int(x) for x in c.split(",")) for c in args.configs.split(";") if c.strip()]
    if args.fp8_configs_only:
        configs = [c for c in configs if c[1] * c[2] <= args.fp8_max_rows]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    ab = tuple(k for k in (args.decode_kernels or "").split(",") if k)
    rows = run(configs, args.reps, not args.no_baseline, args.fp8_max_rows, decode_kernels=ab, rounds=args.rounds,
               meta=not args.no_metadata)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
