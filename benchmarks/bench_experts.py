"""FP8Experts (MoE expert MLPs as grouped FP8 GEMMs) against the expert loop MoE layers are usually written with.

Per config (T tokens routed top-k over G local experts, d_model -> d_ff -> d_model, SwiGLU, bf16 activations and
master weights; FLOP = 2 * T * k * d_model * 3 * d_ff forward, 3x that for forward + backward):
  inference (no_grad):
    bf16 loop      for each expert: its tokens gathered, F.linear (cuBLAS bf16) up/gate and down, index_add back
    bf16 grouped   torch._grouped_mm (PyTorch's bf16 grouped GEMM) on the same sorted rows, where this torch has it
    FP8Experts     the module (pairs sorted into the contiguous layout, two grouped FP8 GEMMs)
  training (forward + backward to x, the weights and the routing weights): all three.
  decode (the masked layout low-latency dispatch hands out, both in CUDA graphs): bf16 torch.bmm over all M_max rows
  and FP8Experts.forward_masked (two masked grouped FP8 GEMMs) with frozen FP8 weights (freeze_fp8_weight_).
Every FP8Experts output is checked against the bf16 loop first (calc_diff < 5e-3, the tolerance of
tests/gemm/test_experts.py). Timing: bench_gpu_interleaved (L2 write-flushed before each call, contenders settled
~100 ms each, rotated rounds), whole calls including FP8Experts' host sync for the row counts.

  python benchmarks/bench_experts.py             # the configs below; writes docs/benchmarks.md's block
  python benchmarks/bench_experts.py --quick     # the first config, printed only
  python benchmarks/bench_experts.py --dry-run   # a tiny config on the CPU reference kernels: checks, no timing
  python benchmarks/bench_experts.py --profile   # where the first config's time goes (torch.profiler, kernels)
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import torch_deepstack  # noqa: F401
from torch_deepstack.compat.deep_gemm import calc_diff
from torch_deepstack.gemm import FP8Experts
from torch_deepstack.testing.bench import BenchTable, bench_gpu_interleaved

# DeepSeek-V3's routed experts (d_model 7168, d_ff 2048, top-8 of 256) as one rank of EP8 sees them (32 local
# experts), at a prefill micro-batch, and a smaller expert count with more tokens per expert.
CONFIGS = [(4096, 8, 32, 7168, 2048), (8192, 8, 32, 7168, 2048), (4096, 8, 8, 7168, 2048)]   # (T, k, G, d, d_ff)
MAX_DIFF = 5e-3


def make_inputs(t, k, g, d, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(t, d, device=device, generator=gen).to(torch.bfloat16)
    weights, idx = torch.rand(t, g, device=device, generator=gen).topk(k, dim=-1)   # k distinct experts per token
    return x, idx, (weights / weights.sum(-1, keepdim=True)).float()


def bf16_loop(mod: FP8Experts, x, idx, w):
    """The usual MoE code: one gather, two (three) bf16 GEMMs and a scatter per expert."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(mod.num_experts):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        h = F.linear(x[tok], mod.w_in[e])
        act = F.silu(h[:, :mod.d_ff]) * h[:, mod.d_ff:] if mod.gated else F.silu(h)
        out.index_add_(0, tok, F.linear(act, mod.w_out[e]).float() * w[tok, slot].unsqueeze(-1))
    return out.to(x.dtype)


def bf16_grouped(mod: FP8Experts, x, idx, w):
    """torch._grouped_mm (bf16, rows sorted by expert, group ends as offsets) for both projections."""
    t, k = idx.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    ends = torch.cumsum(torch.bincount(flat, minlength=mod.num_experts), 0).to(torch.int32)
    tokens = order // k
    rows = x[tokens]
    h = torch._grouped_mm(rows, mod.w_in.transpose(1, 2), offs=ends)
    act = F.silu(h[:, :mod.d_ff]) * h[:, mod.d_ff:] if mod.gated else F.silu(h)
    y = torch._grouped_mm(act, mod.w_out.transpose(1, 2), offs=ends)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return out.index_add_(0, tokens, y.float() * w.reshape(-1)[order].unsqueeze(-1)).to(x.dtype)


def _train_step(fn, mod, x, idx, w):
    """One training step of `fn(mod, x, idx, w)`: its own gradients (none accumulated from earlier steps)."""
    mod.zero_grad(set_to_none=True)
    x.grad = w.grad = None
    fn(mod, x, idx, w).float().square().mean().backward()


def _fp8(mod, x, idx, w):
    return mod(x, idx, w)


def run(configs, device: str, time_it: bool) -> BenchTable:
    table = BenchTable("gemm", "experts", "FP8Experts against a bf16 expert loop",
                       ["T", "k", "G", "d_model", "d_ff", "mode", "bf16 loop ms", "bf16 grouped ms", "FP8Experts ms",
                        "FP8Experts TFLOPS", "loop / FP8Experts", "grouped / FP8Experts", "calc_diff vs loop"])
    table.notes += ["SwiGLU experts, bf16 activations and master weights, k distinct experts per token drawn "
                    "uniformly; FLOP = 2 T k d_model 3 d_ff (x3 for training)",
                    "bf16 grouped: torch._grouped_mm (forward, and its autograd for training; '-' where this torch "
                    "lacks it or refuses)"]
    for t, k, g, d, dff in configs:
        torch.manual_seed(0)
        mod = FP8Experts(g, d, dff, device=device)
        x, idx, w = make_inputs(t, k, g, d, device)
        with torch.no_grad():
            want = bf16_loop(mod, x, idx, w)
            got = mod(x, idx, w)
        diff = calc_diff(got, want)
        if not diff < MAX_DIFF:
            raise SystemExit(f"FP8Experts differs from the bf16 loop at {(t, k, g, d, dff)}: calc_diff {diff:.2e}")
        grouped_ok = True
        try:
            with torch.no_grad():
                gdiff = calc_diff(bf16_grouped(mod, x, idx, w), want)
            grouped_ok = gdiff < 1e-3
        except (RuntimeError, AttributeError, TypeError) as e:   # (no torch._grouped_mm, or not for this device)
            print(f"bf16 grouped skipped: {str(e).splitlines()[0][:120]}")
            grouped_ok = False
        xg = x.clone().requires_grad_(True)
        wg = w.clone().requires_grad_(True)

        modes = {"inference": ({"loop": lambda: bf16_loop(mod, x, idx, w), "fp8": lambda: mod(x, idx, w),
                                **({"grouped": lambda: bf16_grouped(mod, x, idx, w)} if grouped_ok else {})}, 1),
                 "training": ({"loop": lambda: _train_step(bf16_loop, mod, xg, idx, wg),
                               "fp8": lambda: _train_step(_fp8, mod, xg, idx, wg),
                               **({"grouped": lambda: _train_step(bf16_grouped, mod, xg, idx, wg)}
                                  if grouped_ok else {})}, 3)}
        for mode, (fns, flop_mult) in modes.items():
            if not time_it:   # dry run: each contender once
                with torch.set_grad_enabled(mode == "training"):
                    for fn in fns.values():
                        fn()
                ms = {name: float("nan") for name in fns}
            else:
                with torch.set_grad_enabled(mode == "training"):
                    ms = bench_gpu_interleaved(fns)
            flop = 2 * t * k * d * 3 * dff * flop_mult
            table.add(t, k, g, d, dff, mode, round(ms["loop"], 3), round(ms["grouped"], 3) if "grouped" in ms else "-",
                      round(ms["fp8"], 3), round(flop / ms["fp8"] / 1e9, 1), round(ms["loop"] / ms["fp8"], 2),
                      round(ms["grouped"] / ms["fp8"], 2) if "grouped" in ms else "-",
                      f"{diff:.1e}")
    return table


# Decode behind low-latency dispatch (EP8, 128 tokens per rank, top-8 of 256: ~32 rows per local expert on average):
# (G local experts, M_max rows per expert, expected rows, d_model, d_ff).
DECODE_CONFIGS = [(32, 128, 32, 7168, 2048), (32, 256, 64, 7168, 2048)]


def run_decode(configs, device: str, time_it: bool) -> BenchTable:
    """forward_masked against bf16 torch.bmm over the whole padded layout (what a graph-safe bf16 decode step does),
    both captured in CUDA graphs and timed as replays (decode steps are replayed)."""
    from torch_deepstack.testing.bench import capture_graph
    table = BenchTable("gemm", "experts_decode", "FP8Experts.forward_masked against bf16 bmm (decode layout)",
                       ["G", "M_max", "expected_m", "d_model", "d_ff", "bf16 bmm us", "FP8 masked us",
                        "bmm / FP8", "FP8 TFLOPS (valid rows)", "calc_diff vs bmm (valid rows)"])
    table.notes += ["x [G, M_max, d_model] bf16, valid rows per expert drawn uniformly in [0, 2 expected_m], "
                    "SwiGLU; both contenders captured in a CUDA graph (no host sync in either), L2 flushed before "
                    "each replay"]
    for g, m_max, expected, d, dff in configs:
        torch.manual_seed(0)
        mod = FP8Experts(g, d, dff, device=device).freeze_fp8_weight_()   # serving: FP8 weights made once
        x = torch.randn(g, m_max, d, device=device).to(torch.bfloat16)
        masked_m = torch.randint(0, min(2 * expected, m_max) + 1, (g,), device=device).to(torch.int32)

        def bmm():
            h = torch.bmm(x, mod.w_in.transpose(1, 2))
            return torch.bmm(F.silu(h[..., :dff]) * h[..., dff:], mod.w_out.transpose(1, 2))

        def fp8():
            return mod.forward_masked(x, masked_m, expected)
        with torch.no_grad():
            want, got = bmm(), fp8()
            rows = torch.arange(m_max, device=device)[None, :] < masked_m[:, None]
            diff = calc_diff(got[rows], want[rows])
            if not diff < MAX_DIFF:
                raise SystemExit(f"forward_masked differs from bf16 bmm at {(g, m_max, expected)}: {diff:.2e}")
            if time_it:
                fns = {name: capture_graph(fn)[0] for name, fn in (("bmm", bmm), ("fp8", fp8))}
                ms = bench_gpu_interleaved(fns)
            else:
                ms = {"bmm": float("nan"), "fp8": float("nan")}
        flop = 2 * int(masked_m.sum()) * d * 3 * dff
        table.add(g, m_max, expected, d, dff, round(ms["bmm"] * 1e3, 1), round(ms["fp8"] * 1e3, 1),
                  round(ms["bmm"] / ms["fp8"], 2), round(flop / ms["fp8"] / 1e9, 1), f"{diff:.1e}")
    return table


def profile_config(config, steps: int = 5) -> None:
    """The first config's inference and training calls of each contender under torch.profiler: kernels by self
    CUDA time, so the GEMMs can be told from the layout and combine work around them."""
    from torch.profiler import ProfilerActivity, profile
    t, k, g, d, dff = config
    torch.manual_seed(0)
    mod = FP8Experts(g, d, dff, device="cuda")
    x, idx, w = make_inputs(t, k, g, d, "cuda")
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    cases = {"inference bf16 grouped": (False, lambda: bf16_grouped(mod, x, idx, w)),
             "inference FP8Experts": (False, lambda: mod(x, idx, w)),
             "training FP8Experts": (True, lambda: _train_step(_fp8, mod, xg, idx, wg))}
    for name, (grad, fn) in cases.items():
        with torch.set_grad_enabled(grad):
            for _ in range(2):
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    fn()
                torch.cuda.synchronize()
        print(f"\n== {config} {name}: {steps} calls")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=16, max_name_column_width=70))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the first config, printed only")
    ap.add_argument("--dry-run", action="store_true", help="a tiny config on the CPU: checks the script, no timing")
    ap.add_argument("--profile", action="store_true", help="where the first config's time goes (torch.profiler)")
    args = ap.parse_args()
    if args.profile:
        return profile_config(CONFIGS[0]) or 0
    if args.dry_run:
        run([(64, 2, 4, 256, 128)], "cpu", time_it=False)
        run_decode([(4, 32, 8, 256, 128)], "cpu", time_it=False)
        return 0
    tables = [run(CONFIGS[:1] if args.quick else CONFIGS, "cuda", time_it=True),
              run_decode(DECODE_CONFIGS[:1] if args.quick else DECODE_CONFIGS, "cuda", time_it=True)]
    if not args.quick:
        for table in tables:
            table.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
