"""A serving decode step over a paged MLA cache, run four ways: eager, a hand-captured CUDA graph, torch.compile and
torch.compile(mode="reduce-overhead") (Inductor's CUDA graph trees). What a server's loop sees per step, host time
included: which of PyTorch's ways to cut launch overhead pays for MLA decoding, and what the graph trees cost
against a graph captured by hand.

The step, for L layers: one plan (get_mla_metadata, shared by every layer), then per layer the new latent row of
each request appended to that layer's cache (mla_append_kv) and a decode (mla_decode_with_kvcache, causal, s_q = 1).
Every step writes the same slots (the slots are reserved once: the host bookkeeping of a real server is the same for
all four and is left out), so all steps do identical work. Timing: wall time of N steps issued back to back after
warm-up, synchronised at the end (no L2 flush: consecutive layers' caches do not fit in L2 anyway).

    python benchmarks/bench_decode_step.py            # b = 64 and 128, h_q = 16 and 128, 1 and 8 layers
    python benchmarks/bench_decode_step.py --quick    # one config, docs left as they are
    python benchmarks/bench_decode_step.py --config 64,16,4096,8    # this config alone (A/B runs)
"""
from __future__ import annotations

import argparse

import torch

import torch_deepstack  # noqa: F401
from torch_deepstack._library import mark_static
from torch_deepstack.mla import PagedKVCache, get_mla_metadata, mla_append_kv, mla_decode_with_kvcache
from torch_deepstack.testing.bench import BenchTable, back_to_back, capture_graph

D = 576
CONFIGS = [(64, 16, 4096, 1), (64, 16, 4096, 8), (128, 128, 4096, 1), (128, 128, 4096, 8)]   # (b, h_q, s_k, layers)


def make_step(b: int, h_q: int, s_k: int, layers: int, seed: int = 0):
    """(step, inputs): step(q [L, b, 1, h_q, D], kv [L, b, 1, D], slots [b]) -> outputs [L, b, 1, h_q, 512]."""
    gen = torch.Generator().manual_seed(seed)
    pc = PagedKVCache(num_blocks=b * (s_k // 64 + 2), max_batch=b, max_seq_len=s_k + 128, device="cuda")
    for r in range(b):
        pc.reserve(r, s_k)
    slots = torch.cat([pc.reserve(r, 1) for r in range(b)])
    caches = [torch.randn(pc.k_cache.shape, generator=gen).div_(10).to("cuda", torch.bfloat16) for _ in range(layers)]
    mark_static(*caches)   # (as PagedKVCache marks its own: the compiled graphs write the caches in place)

    def step(q, kv, slots):
        sched, splits = get_mla_metadata(pc.seqlens, h_q, 1)
        outs = []
        for layer in range(layers):
            mla_append_kv(caches[layer], kv[layer], slots)
            out, _ = mla_decode_with_kvcache(q[layer], caches[layer], pc.block_table, pc.seqlens, 512, sched,
                                             splits, None, True)
            outs.append(out)
        return torch.stack(outs)

    q = (torch.randn(layers, b, 1, h_q, D, generator=gen) / 10).to("cuda", torch.bfloat16)
    kv = (torch.randn(layers, b, 1, D, generator=gen) / 10).to("cuda", torch.bfloat16)
    return step, (q, kv, slots)


def per_step_us(fn, steps: int) -> float:
    return back_to_back(fn, steps, torch.cuda.synchronize)[1] * 1e6


def run(configs, steps: int) -> BenchTable:
    table = BenchTable("mla", "decode_step", "MLA decode step: eager, CUDA graph, torch.compile, reduce-overhead",
                       ["b", "h_q", "s_k", "layers", "eager us", "CUDA graph us", "compiled us",
                        "reduce-overhead us", "graph speedup vs eager", "reduce-overhead / graph",
                        "max abs diff vs eager"])
    table.notes += ["per step: one get_mla_metadata, then per layer mla_append_kv (one row per request) + "
                    "mla_decode_with_kvcache (bf16 cache, causal, s_q = 1, h_kv = 1, every request at s_k tokens)",
                    "wall time per step of back-to-back steps after warm-up, host time included; CUDA graph: the "
                    "step captured by hand (torch.cuda.graph) and replayed with fresh inputs copied into its static "
                    "ones; compiled: torch.compile(fullgraph=True); reduce-overhead: the same with "
                    "mode=\"reduce-overhead\" (Inductor's CUDA graph trees)"]
    for b, h_q, s_k, layers in configs:
        torch._dynamo.reset()
        step, (q, kv, slots) = make_step(b, h_q, s_k, layers)
        want = step(q, kv, slots).clone()
        replay, captured = capture_graph(lambda: step(q, kv, slots))
        compiled = torch.compile(step, fullgraph=True)
        reduced = torch.compile(step, mode="reduce-overhead", fullgraph=True)
        diffs = []
        for fn in (lambda: (replay(), captured)[1], lambda: compiled(q, kv, slots), lambda: reduced(q, kv, slots)):
            for _ in range(3):   # (reduce-overhead: warm-up, recording, replay)
                got = fn()
            diffs.append(float((got.float() - want.float()).abs().max()))
        q_new, kv_new = q.clone(), kv.clone()   # (a server's next inputs, copied into the graph's static ones)

        def graph_step():
            q.copy_(q_new)
            kv.copy_(kv_new)
            replay()
        times = [per_step_us(lambda: step(q, kv, slots), steps), per_step_us(graph_step, steps),
                 per_step_us(lambda: compiled(q, kv, slots), steps), per_step_us(lambda: reduced(q, kv, slots), steps)]
        table.add(b, h_q, s_k, layers, *[round(t, 1) for t in times], round(times[0] / times[1], 2),
                  round(times[3] / times[1], 2), max(diffs))
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one config, docs left as they are")
    ap.add_argument("--config", default="", help="b,h_q,s_k,layers: this one config instead (docs left as they are)")
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    configs = ([tuple(int(v) for v in args.config.split(","))] if args.config else
               CONFIGS[:1] if args.quick else CONFIGS)
    table = run(configs, args.steps)
    if not (args.quick or args.config):
        table.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
