"""ncu target for the MLA decode: per config, one CUDA-graph replay of each variant (and of live FlashMLA) inside
cudaProfilerStart/Stop, each after ~settle-ms of its own flushed replays, so `ncu --profile-from-start off` profiles
exactly those launches (decode and combine kernels) at the clock the variant's own load settles to.

  ncu --clock-control none --profile-from-start off --section SpeedOfLight --section WarpStateStats \\
      python benchmarks/ncu_mla.py --configs "128,2,128,8192" --variants seesaw_pair --flashmla-so flashmla_ops.abi3.so

Configs and variants are written as for ab_mla.py (b,s_q,h_q,mean_sk; kernel[+NAME=VALUE...]), the data is
bench_mla.py's. With --flashmla-so (see flashmla_live.py) FlashMLA's decode is profiled after ours, once a replay of
its graph has matched our output; the process restarts itself once with the shim preloaded.
"""
from __future__ import annotations

import argparse

import ab_mla
import bench_mla
import flashmla_live
from torch_deepstack.mla import get_mla_metadata, kernels, mla_decode_with_kvcache
from torch_deepstack.testing.bench import capture_graph, flush_l2, profile_one_call, settle


def settled(replay, settle_ms: float):
    """The warm-up for profile_one_call: about settle_ms of flushed replays, then one more flush."""
    def warm():
        settle(replay, settle_ms)
        flush_l2()
    return warm


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", required=True, help="'b,s_q,h_q,mean_sk;...'")
    p.add_argument("--variants", help="comma-separated kernel[+NAME=VALUE...] (ab_mla.py notation; default: the "
                                      "kernel the default rule picks for each config)")
    p.add_argument("--flashmla-so", help="also profile live FlashMLA (sgl-kernel's flashmla_ops.abi3.so)")
    p.add_argument("--settle-ms", type=float, default=300.0)
    args = p.parse_args()
    flashmla_live.preload_shim(args.flashmla_so)
    live_mla = flashmla_live.load(args.flashmla_so)
    kernels.get_kernel = ab_mla._get_kernel   # the variants' -D defines (ab_mla.py's hook)
    for config in args.configs.split(";"):
        b, s_q, h_q, mean = (int(x) for x in config.split(","))
        q, cache, bt, seq = bench_mla.build(b, s_q, h_q, mean)
        sched, splits = get_mla_metadata(seq, s_q * h_q, 1)

        def ours(q=q, cache=cache, bt=bt, seq=seq, sched=sched, splits=splits):
            return mla_decode_with_kvcache(q, cache, bt, seq, bench_mla.DV, sched, splits, causal=True)

        for variant in (args.variants or kernels.decode_kernel_for(s_q * h_q)).split(","):
            ab_mla.apply_variant(variant)
            replay = capture_graph(ours, warmup=1)[0]
            profile_one_call(f"{config} {variant}", replay, settled(replay, args.settle_ms))
        if live_mla is not None:
            replay, why = live_mla.checked_graph(q, cache, bt, seq, bench_mla.DV, True, ours())
            if replay is None:
                print(f"{config} FlashMLA not profiled: {why}", flush=True)
            else:
                profile_one_call(f"{config} FlashMLA", replay, settled(replay, args.settle_ms))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
