"""FP8Linear and the Inductor FP8 pass against a bf16 nn.Linear (cuBLAS), inference and training, on the GPU.

Contenders per shape (T tokens x K in -> N out, bf16 activations and master weights):
  inference (no_grad forward, 2TKN FLOP):
    bf16      F.linear (cuBLAS bf16)
    FP8Linear eager module, weight FP8 copy cached (quantises x per call, then the FP8 GEMM)
    pass      torch.compile(nn.Linear, fullgraph=True) under `fp8_linear_pass()`: F.linear rewritten to
              deepstack::fp8_linear, which quantises the weight on every call (no cache: the functional form)
  training (forward + backward for x and W, 6TKN FLOP; the weight changes every step, as after an optimizer
  step, so FP8Linear re-quantises it twice per step):
    bf16      nn.Linear forward + torch.autograd.grad
    FP8Linear eager, forward/dgrad/wgrad in FP8 (DeepSeek-V3 recipe)
    compiled  torch.compile(FP8Linear, fullgraph=True), the same FP8 ops inside one graph
    graph     the bf16 and the FP8Linear step each captured whole in a CUDA graph and replayed: what the GPU work
              costs without Python and launch time (eager FP8Linear runs ~9 kernels through Python per step)
  serving (decode-sized batches, inference in CUDA graphs): bf16, FP8Linear (W quantised per replay) and FP8Linear
  frozen (freeze_fp8_weight_: one FP8 copy read by the graph)
  both modes, back to back only (the "loop" table): the bf16 module and the FP8 contender under
  torch.compile(mode="reduce-overhead"), i.e. Inductor with CUDA graph trees: PyTorch's own answer to a host-bound
  step, which replays the compiled forward and backward as CUDA graphs
Every output is checked against the bf16 result first (calc_diff, printed in the table). Timing:
`bench_gpu_interleaved` (L2 write-flushed before every call, each contender settled ~100 ms at its own clock,
5 rotated rounds of 10): the H200 runs at its power cap under these loads.

  python benchmarks/bench_linear.py            # writes docs/benchmarks.md's "FP8Linear" block
  python benchmarks/bench_linear.py --quick    # one shape, printed only
  python benchmarks/bench_linear.py --quick --shapes 2048x7168x4096   # that shape, printed only
  python benchmarks/bench_linear.py --profile 2048x7168x4096   # where each training contender's step time goes
  python benchmarks/bench_linear.py --prebuild-only    # nvcc here, no GPU: the cache a GPU run can carry
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import torch_deepstack  # noqa: F401
from torch_deepstack.compile import fp8_linear_pass
from torch_deepstack.gemm import FP8Linear
from torch_deepstack.testing.bench import (BenchTable, back_to_back, bench_gpu_interleaved, bench_host,
                                           capture_graph)
from torch_deepstack.compat.deep_gemm import calc_diff

# DeepSeek-V3-like projections at a training micro-batch of 8192 tokens (and one of 2048): attention output
# (16384 -> 7168), expert up/gate (7168 -> 2048) and down (2048 -> 7168), a dense MLP slice (7168 -> 4096).
SHAPES = [(8192, 7168, 2048), (8192, 2048, 7168), (8192, 16384, 7168), (2048, 7168, 4096)]
MAX_DIFF = 2e-3   # FP8 (e4m3, 1x128 / 128x128 scales) against bf16: a broken kernel reads ~1


def _compile_with_pass(lin, x, mode):
    """(torch.compile(lin, mode=mode, fullgraph=True) under fp8_linear_pass, its first output); checks that the pass
    rewrote the one linear. No FX graph cache: a cache hit skips the pass (nothing would be rewritten)."""
    with torch._inductor.config.patch(fx_graph_cache=False), fp8_linear_pass() as p:
        before = p.count
        compiled = torch.compile(lin, mode=mode, fullgraph=True)
        y = compiled(x)
        if p.count - before != 1:
            raise RuntimeError(f"fp8_linear_pass rewrote {p.count - before} linears (mode {mode}), expected 1")
    return compiled, y


def _inference(t, k, n, device):
    """(contenders, calc_diff of each FP8 one against bf16)"""
    x = torch.randn(t, k, device=device, dtype=torch.bfloat16)
    lin = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
    fp8 = FP8Linear.from_linear(lin)
    torch._dynamo.reset()
    with torch.no_grad():
        ref = F.linear(x, lin.weight)
        compiled, y_pass = _compile_with_pass(lin, x, "default")
        compiled_ro, y_pass_ro = _compile_with_pass(lin, x, "reduce-overhead")
        diffs = {"FP8Linear": calc_diff(fp8(x), ref), "pass": calc_diff(y_pass, ref),
                 "pass RO": calc_diff(y_pass_ro, ref)}
        bf16_ro = torch.compile(lin, mode="reduce-overhead", fullgraph=True)
        bf16_ro(x)

    no_grad = torch.no_grad()   # (as a decorator: each call runs under no_grad)
    fns = {"bf16": no_grad(lambda: F.linear(x, lin.weight)), "FP8Linear": no_grad(lambda: fp8(x)),
           "pass": no_grad(lambda: compiled(x)), "pass RO": no_grad(lambda: compiled_ro(x)),
           "bf16 RO": no_grad(lambda: bf16_ro(x))}
    return fns, diffs


def _training(t, k, n, device):
    x = torch.randn(t, k, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(t, n, device=device, dtype=torch.bfloat16)
    lin = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
    fp8 = FP8Linear.from_linear(lin)
    torch._dynamo.reset()
    compiled = torch.compile(fp8, fullgraph=True)
    compiled_ro = torch.compile(fp8, mode="reduce-overhead", fullgraph=True)
    bf16_ro = torch.compile(lin, mode="reduce-overhead", fullgraph=True)

    def step(module, weight, new_weight):
        if new_weight:   # the optimizer step's effect on the FP8 weight cache (bf16 has none)
            torch.autograd.graph.increment_version(weight)
        y = module(x)
        return torch.autograd.grad(y, (x, weight), dy)

    ref = step(lin, lin.weight, False)

    def worst(grads):   # the larger calc_diff of dx and dW against bf16's
        return max(calc_diff(got, want) for got, want in zip(grads, ref))

    diffs = {name: worst(step(module, fp8.weight, True))
             for name, module in (("FP8Linear", fp8), ("compiled", compiled), ("compiled RO", compiled_ro))}
    step(bf16_ro, lin.weight, False)
    fns = {"bf16": lambda: step(lin, lin.weight, False), "FP8Linear": lambda: step(fp8, fp8.weight, True),
           "compiled": lambda: step(compiled, fp8.weight, True),
           "compiled RO": lambda: step(compiled_ro, fp8.weight, True),
           "bf16 RO": lambda: step(bf16_ro, lin.weight, False)}
    # The same steps replayed from CUDA graphs (no Python or launch time per step); for FP8Linear the capture
    # includes the weight re-quantisation, since the step bumps the version.
    if device == "cuda":
        graphs = {"bf16 graph": capture_graph(fns["bf16"]), "FP8Linear graph": capture_graph(fns["FP8Linear"])}
        replay, grads = graphs["FP8Linear graph"]
        replay()
        diffs["FP8Linear graph"] = worst(grads)
        fns.update({name: replay for name, (replay, _) in graphs.items()})
    return fns, diffs


STACK = (2048, 7168, 4096, 8)   # T tokens through 8 layers alternating K -> N and N -> K, GELU between
STACK_MAX_DIFF = 1e-2   # FP8 rounding compounds over the stack's layers


def _stack_training(t, k, n, layers, device):
    """Training steps of a layer stack (bf16 nn.Linear and quantize_'d FP8Linear copies), eager, compiled and under
    reduce-overhead: what one graph per step buys when the step has many layers (a single layer's step pays the
    compiled wrappers' and CUDA graph trees' fixed host cost alone). Returns (contenders, worst calc_diff)."""
    import copy

    from torch_deepstack.compile import quantize_
    dims = [k if i % 2 == 0 else n for i in range(layers + 1)]
    mods = []
    for i in range(layers):
        mods += [nn.Linear(dims[i], dims[i + 1], bias=False, device=device, dtype=torch.bfloat16)]
        if i < layers - 1:
            mods.append(nn.GELU())
    bf16 = nn.Sequential(*mods)
    fp8 = quantize_(copy.deepcopy(bf16))
    x = torch.randn(t, k, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(t, dims[-1], device=device, dtype=torch.bfloat16)
    torch._dynamo.reset()
    models = {"bf16": bf16, "FP8Linear": fp8, "compiled": torch.compile(fp8, fullgraph=True),
              "compiled RO": torch.compile(fp8, mode="reduce-overhead", fullgraph=True),
              "bf16 RO": torch.compile(bf16, mode="reduce-overhead", fullgraph=True)}

    def step(name):
        model = models[name]
        weights = tuple(bf16.parameters()) if name.startswith("bf16") else tuple(fp8.parameters())
        if not name.startswith("bf16"):   # the optimizer step's effect on the FP8 weight caches
            for w in weights:
                torch.autograd.graph.increment_version(w)
        return torch.autograd.grad(model(x), (x, *weights), dy)

    ref = step("bf16")
    worst = max(calc_diff(got, want) for name in models if not name.startswith("bf16")
                for got, want in zip(step(name), ref))
    step("bf16 RO")
    return {name: (lambda name=name: step(name)) for name in models}, worst


SERVING = [(64, 7168, 2048), (256, 7168, 2048), (64, 2048, 7168), (256, 2048, 7168)]   # decode-sized batches


def _serving(t, k, n, device):
    """Inference at a decode-sized batch, each contender captured in a CUDA graph as a server runs it: bf16
    F.linear; FP8Linear as it is (the graph quantises W on every replay, so replays follow weight changes); FP8Linear
    frozen (freeze_fp8_weight_: the graph reads one FP8 copy). Returns (replays, calc_diff of the FP8 ones)."""
    x = torch.randn(t, k, device=device, dtype=torch.bfloat16)
    lin = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
    fp8, frozen = FP8Linear.from_linear(lin), FP8Linear.from_linear(lin).freeze_fp8_weight_()
    with torch.no_grad():
        ref = F.linear(x, lin.weight)
        frozen(x)   # the frozen copy is made outside the capture
        graphs = {"bf16 graph": capture_graph(lambda: F.linear(x, lin.weight)),
                  "FP8 graph": capture_graph(lambda: fp8(x)), "FP8 frozen graph": capture_graph(lambda: frozen(x))}
    diffs = {}
    for name in ("FP8 graph", "FP8 frozen graph"):
        replay, out = graphs[name]
        replay()
        diffs[name] = calc_diff(out, ref)
    return {name: replay for name, (replay, _) in graphs.items()}, diffs


def prebuild(jobs=2):
    """Every GEMM specialisation of SHAPES (forward, dgrad, wgrad) and the quantisers, compiled into the JIT cache."""
    from concurrent.futures import ThreadPoolExecutor
    from torch_deepstack.gemm import kernels
    from torch_deepstack.jit import cache, prebuild_specs
    bf16, f32 = torch.bfloat16, torch.float32
    specs = [sp for sp in prebuild_specs(["gemm", "quant"]) if "gemm" not in sp.kernel]
    for t, k, n in SHAPES + [(STACK[0], STACK[2], STACK[1])] + SERVING:   # (the stack's N -> K layers)
        specs += kernels.dense_call_specs(t, n, k, bf16) + kernels.dense_call_specs(t, k, n, bf16)
        specs += kernels.dense_call_specs(n, k, t, bf16, wgrad=True)   # (FP8Linear: the bf16 weight's gradient)
        specs += kernels.dense_call_specs(n, k, t, f32, wgrad=True)
    specs = list(dict.fromkeys(specs))
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(cache.build, specs))
    print(f"prebuilt {len(specs)} specialisations")


def profile_training(t, k, n, steps=20, loop_steps=200):
    """Where a training step's time goes, per contender: a loop of loop_steps back-to-back steps (host time to issue
    them, nothing waited for, and wall time until the GPU is done: the real throughput, which CUDA-event timing of
    single steps can hide when the host is the bottleneck), then the step's ops and kernels (torch.profiler, self
    times)."""
    from torch.profiler import ProfilerActivity, profile
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fns, _ = _training(t, k, n, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for name, fn in fns.items():
        host, wall = back_to_back(fn, loop_steps, sync)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                fn()
            sync()
        print(f"\n== {t} x {k} -> {n} training, {name}: {loop_steps} steps back to back: host {host * 1e6:.0f} us "
              f"per step (issue only), wall {wall * 1e6:.0f} us per step")
        sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=60))
        if name in ("FP8Linear", "compiled"):
            _launch_timeline(fn, name)
        if device == "cuda" and name in ("bf16", "FP8Linear", "compiled"):
            _loop_tail(fn, name, loop_steps)
        if name in ("FP8Linear", "compiled"):   # the host side: Python functions by own time
            import cProfile
            import pstats
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(steps):
                fn()
            pr.disable()
            sync()
            pstats.Stats(pr).sort_stats("tottime").print_stats(25)
    _op_host_times(t, k, n, device)


def _loop_tail(fn, name, steps):
    """Per-step host times in a back-to-back loop (mean against median: a heavy tail of slow steps), what the CUDA
    caching allocator did meanwhile (device mallocs/frees, retries: a retry frees cached blocks and synchronises),
    and the same loop with Python's cyclic garbage collector off."""
    import gc
    import statistics

    def loop():
        stamps = [time.perf_counter()]
        for _ in range(steps):
            fn()
            stamps.append(time.perf_counter())
        torch.cuda.synchronize()
        return [(b - a) * 1e6 for a, b in zip(stamps, stamps[1:])]
    keys = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")
    before = torch.cuda.memory_stats()
    per_step = loop()
    after = torch.cuda.memory_stats()
    q = statistics.quantiles(per_step, n=10)
    print(f"   {name}: per-step host us in a loop of {steps}: mean {statistics.mean(per_step):.0f}, median "
          f"{statistics.median(per_step):.0f}, p10 {q[0]:.0f}, p90 {q[-1]:.0f}, max {max(per_step):.0f}; allocator "
          + ", ".join(f"{k} +{after.get(k, 0) - before.get(k, 0)}" for k in keys))
    gc.disable()
    try:
        per_step = loop()
    finally:
        gc.enable()
    print(f"   {name}: with gc disabled: mean {statistics.mean(per_step):.0f}, median {statistics.median(per_step):.0f}")


def _launch_timeline(fn, name, steps=50):
    """Host time from a step's start to each of its kernel launches and to its return (median over steps): what
    CUDA-event timing of a step can see is the span from the first launch to the last; host time outside that span
    leaves the GPU idle between steps without showing in the events."""
    import statistics
    from torch_deepstack.jit import launch
    stamps = []
    real = launch.Kernel._issue   # (every launch, plain, cluster or a remembered GEMM call's, goes through it)

    def timed(self, *a, **k):
        stamps.append(time.perf_counter())
        return real(self, *a, **k)

    rows = []
    launch.Kernel._issue = timed
    try:
        for _ in range(steps):
            stamps.clear()
            t0 = time.perf_counter()
            fn()
            rows.append([(t - t0) * 1e6 for t in stamps] + [(time.perf_counter() - t0) * 1e6])
    finally:
        launch.Kernel._issue = real
    cols = list(zip(*[r for r in rows if len(r) == len(rows[-1])]))
    med = [statistics.median(c) for c in cols]
    if len(med) == 1:
        print(f"   {name}: no JIT kernel launches (CPU reference kernels); the step takes {med[0]:.0f} us")
        return
    print(f"   {name}: deepstack launches at " + ", ".join(f"{v:.0f}" for v in med[:-1]) +
          f" us after the step starts; the step returns at {med[-1]:.0f} us (medians of {len(cols[0])} steps)")


def _op_host_times(t, k, n, device, calls=200):
    """Host time per call of each op of the FP8Linear step (issue only, nothing waited for) next to torch's."""
    from torch_deepstack.gemm import api
    from torch_deepstack.quant.api import per_token_group_quant_fp8
    x = torch.randn(t, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    xq, xs = per_token_group_quant_fp8(x)
    wq, ws = api.per_block_quant_fp8(w)
    xtq, xts = api.per_token_group_quant_fp8_t(x)
    cases = {"torch.empty (reference)": lambda: torch.empty(t, n, device=device, dtype=torch.bfloat16),
             "F.linear bf16 (reference)": lambda: torch.nn.functional.linear(x, w),
             "per_token_group_quant_fp8": lambda: per_token_group_quant_fp8(x),
             "per_block_quant_fp8": lambda: api.per_block_quant_fp8(w),
             "per_block_quant_fp8 transposed": lambda: api.per_block_quant_fp8(w, transpose=True),
             "per_token_group_quant_fp8_t": lambda: api.per_token_group_quant_fp8_t(x),
             "per_token_group_quant_fp8_dual": lambda: api.per_token_group_quant_fp8_dual(x),
             "per_block_quant_fp8_dual": lambda: api.per_block_quant_fp8_dual(w),
             "fp8_gemm_nt": lambda: api.fp8_gemm_nt(xq, xs, wq, ws),
             "fp8_wgrad_gemm_nt": lambda: api.fp8_wgrad_gemm_nt(xtq, xts, xtq, xts)}
    sync = torch.cuda.synchronize if device == "cuda" else None
    print(f"\nhost time per call, {t} x {k} -> {n} (us, issue only, best of 3 runs of {calls // 4} calls)")
    for name, fn in cases.items():
        print(f"  {name:34s} {bench_host(fn, iters=calls // 4, warmup=1, runs=3, between=sync):8.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one shape, docs left as they are")
    ap.add_argument("--cpu-check", action="store_true",
                    help="build every contender on the CPU at a small shape (reference kernels), call each once and "
                         "check the FP8 results; no timing")
    ap.add_argument("--profile", default=None, metavar="TxKxN",
                    help="profile the training contenders at one shape (torch.profiler: kernels and host time "
                         "per step) instead of the table")
    ap.add_argument("--shapes", default=None, metavar="TxKxN,...",
                    help="these shapes instead of the default list (with --quick: printed only)")
    ap.add_argument("--prebuild-only", action="store_true",
                    help="compile the kernels the GPU run loads (GEMMs of every shape, quantisers) into "
                         "DEEPSTACK_JIT_CACHE_DIR with nvcc, no GPU needed, and stop")
    args = ap.parse_args()
    if args.prebuild_only:
        return prebuild()
    if args.profile:
        return profile_training(*(int(v) for v in args.profile.split("x")))
    if args.cpu_check:
        for run in (_inference, _training):
            fns, diffs = run(64, 256, 384, "cpu")
            for fn in fns.values():
                fn()
            assert max(diffs.values()) < MAX_DIFF, diffs
            print(run.__name__[1:], "ok:", {k: f"{v:.1e}" for k, v in diffs.items()})
        fns, worst = _stack_training(64, 256, 384, 3, "cpu")
        for fn in fns.values():
            fn()
        assert worst < STACK_MAX_DIFF, worst
        print(f"layer stack ok: {worst:.1e}")
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_linear.py needs a CUDA GPU (sm_90)")
    table = BenchTable("gemm", "fp8_linear", "FP8Linear and the FP8 compile pass against bf16 nn.Linear",
                       ["T x K -> N", "mode", "bf16 us", "FP8 eager us", "eager speedup", "FP8 compiled us",
                        "compiled speedup", "bf16 graph us", "FP8 graph us", "graph speedup",
                        "FP8 eager TFLOPS", "max calc_diff vs bf16"])
    table.notes += ["bf16: cuBLAS through F.linear / autograd; FP8 eager: FP8Linear (inference with its cached FP8 "
                    "weight; training re-quantises the weight every step, forward + dgrad + wgrad in FP8)",
                    "FP8 compiled: inference = torch.compile(nn.Linear) under fp8_linear_pass (weight quantised "
                    "every call); training = torch.compile(FP8Linear, fullgraph=True)",
                    "graph: the training step (with the FP8 weight re-quantisation) captured whole in a CUDA graph "
                    "and replayed, for bf16 and FP8Linear: the step without Python and launch time",
                    "timing: bench_gpu_interleaved (L2 flushed before every call, 5 rotated rounds of 10 after "
                    "~100 ms of settling per contender); FLOP: inference 2TKN, training 6TKN",
                    "back to back (a training or serving loop's throughput, host time included): the next table"]
    loop_table = BenchTable("gemm", "fp8_linear_loop", "FP8Linear back to back: eager, compiled and reduce-overhead",
                            ["T x K -> N", "mode", "bf16 eager us", "bf16 reduce-overhead us", "FP8 eager us",
                             "FP8 compiled us", "FP8 reduce-overhead us", "FP8 eager / bf16 eager",
                             "FP8 compiled / bf16 eager", "FP8 reduce-overhead / bf16 eager",
                             "FP8 reduce-overhead / bf16 reduce-overhead"])
    loop_table.notes += ["wall time per call of 100 calls issued back to back after 3 warm-up calls (no flushes, L2 "
                         "warm), host time included: the throughput a loop sees, which event timing of single calls "
                         "can miss when the host is the bottleneck; ratios are speedups (bf16 time / FP8 time)",
                         "FP8 compiled: as in the table above (inference: nn.Linear under fp8_linear_pass, training: "
                         "FP8Linear), torch.compile(fullgraph=True); reduce-overhead: the same with "
                         "mode=\"reduce-overhead\" (Inductor's CUDA graph trees replay the compiled forward and "
                         "backward; inputs that are not parameters are copied into the graphs' buffers each call)",
                         "the layer-stack row: a training step through 8 bias-free layers (quantize_'d copies for "
                         "FP8), as a model's step would run it: compiled and reduce-overhead pay their fixed host "
                         "cost once per step, not per layer"]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    for t, k, n in shapes[:1] if args.quick and not args.shapes else shapes:
        for mode, run, flop, fp8c in (("inference", _inference, 2, "pass"), ("training", _training, 6, "compiled")):
            fns, diffs = run(t, k, n, "cuda")
            worst = max(diffs.values())
            if worst > MAX_DIFF:
                raise RuntimeError(f"{t}x{k}->{n} {mode}: FP8 result off by calc_diff {diffs} (limit {MAX_DIFF})")
            timed = [name for name in fns if not name.endswith(" RO")]   # (reduce-overhead: back to back only)
            ms = bench_gpu_interleaved({name: fns[name] for name in timed})
            graph = ((ms["bf16 graph"] * 1e3, ms["FP8Linear graph"] * 1e3, ms["bf16 graph"] / ms["FP8Linear graph"])
                     if "bf16 graph" in ms else ("-", "-", "-"))
            table.add(f"{t} x {k} -> {n}", mode, ms["bf16"] * 1e3, ms["FP8Linear"] * 1e3,
                      ms["bf16"] / ms["FP8Linear"], ms[fp8c] * 1e3, ms["bf16"] / ms[fp8c], *graph,
                      flop * t * k * n / ms["FP8Linear"] / 1e9, f"{worst:.1e}")
            # back to back (wall per call of 100 calls, no flushes): the throughput a loop sees, host time included
            loop = {name: back_to_back(fns[name], 100, torch.cuda.synchronize)[1] * 1e6
                    for name in ("bf16", "bf16 RO", "FP8Linear", fp8c, fp8c + " RO")}
            loop_table.add(f"{t} x {k} -> {n}", mode, loop["bf16"], loop["bf16 RO"], loop["FP8Linear"], loop[fp8c],
                           loop[fp8c + " RO"], loop["bf16"] / loop["FP8Linear"], loop["bf16"] / loop[fp8c],
                           loop["bf16"] / loop[fp8c + " RO"], loop["bf16 RO"] / loop[fp8c + " RO"])
            print(f"{t} x {k} -> {n} {mode}: back to back us " + ", ".join(f"{k_} {v:.0f}" for k_, v in loop.items()),
                  flush=True)
    if not args.quick or args.shapes is None:
        t, k, n, layers = STACK
        fns, worst = _stack_training(t, k, n, layers, "cuda")
        if worst > STACK_MAX_DIFF:
            raise RuntimeError(f"layer stack: FP8 gradients off by calc_diff {worst} (limit {STACK_MAX_DIFF})")
        loop = {name: back_to_back(fn, 100, torch.cuda.synchronize)[1] * 1e6 for name, fn in fns.items()}
        loop_table.add(f"{t} x {layers} layers ({k} -> {n} -> {k} ..., GELU)", "training", loop["bf16"],
                       loop["bf16 RO"], loop["FP8Linear"], loop["compiled"], loop["compiled RO"],
                       loop["bf16"] / loop["FP8Linear"], loop["bf16"] / loop["compiled"],
                       loop["bf16"] / loop["compiled RO"], loop["bf16 RO"] / loop["compiled RO"])
    serving_table = BenchTable("gemm", "fp8_linear_serving", "FP8Linear serving: decode-sized batches in CUDA graphs",
                               ["T x K -> N", "bf16 graph us", "FP8 graph us (W quantised per replay)",
                                "FP8 frozen graph us", "frozen speedup", "per-replay-W speedup",
                                "max calc_diff vs bf16"])
    serving_table.notes += ["inference (no_grad), each contender captured whole in a CUDA graph and replayed (timing as "
                            "in the first table); speedups: bf16 time / FP8 time",
                            "FP8 graph: FP8Linear as it is; a graph captured with it quantises W on every replay, so "
                            "that replays follow weight changes (docs/gemm.md \"FP8Linear\", CUDA graphs)",
                            "FP8 frozen graph: after freeze_fp8_weight_(), the graph reads one FP8 copy of W"]
    for t, k, n in ([] if args.shapes else SERVING[:1] if args.quick else SERVING):
        fns, diffs = _serving(t, k, n, "cuda")
        if max(diffs.values()) > MAX_DIFF:
            raise RuntimeError(f"serving {t}x{k}->{n}: FP8 result off by calc_diff {diffs} (limit {MAX_DIFF})")
        ms = bench_gpu_interleaved(fns)
        serving_table.add(f"{t} x {k} -> {n}", ms["bf16 graph"] * 1e3, ms["FP8 graph"] * 1e3,
                          ms["FP8 frozen graph"] * 1e3, ms["bf16 graph"] / ms["FP8 frozen graph"],
                          ms["bf16 graph"] / ms["FP8 graph"], f"{max(diffs.values()):.1e}")
    if args.quick:
        for tab in (table, loop_table, serving_table):
            print(tab.markdown("bench_linear.py --quick"))
    else:
        for tab in (table, loop_table, serving_table):
            tab.save()


if __name__ == "__main__":
    main()
