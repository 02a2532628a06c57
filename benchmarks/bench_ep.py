"""Expert-parallel dispatch and combine: ours vs torch.distributed all_to_all_single in the same run.

Shape (DeepSeek-V3 training, DeepEP's benchmark): 4096 tokens per rank, hidden 7168, top-8 of 256 experts, bf16 and
FP8 (e4m3 + 1x128 fp32 scales) dispatch, bf16 combine. Bandwidth is counted as DeepEP counts it: bytes *received*
by dispatch (num_recv_tokens x (hidden x 2), or hidden + hidden/128 x 4 for FP8) and bytes *sent* by combine (the
same rows in bf16), over the call's time. The baseline moves exactly the same rows with one all_to_all_single whose
split sizes are already on the host (so it does no routing, no count exchange and no packing: a lower bound on
what a torch.distributed dispatch costs).

Low-latency mode: 128 tokens per rank, FP8 dispatch, bf16 combine, microseconds per call (DeepEP reports 77/114 us
at EP8 on H800).

    python benchmarks/bench_ep.py                       # one process per GPU (NCCL), both transports
    python benchmarks/bench_ep.py --shared-gpu 2        # also 2 processes on GPU 0 over the IPC transport
"""
from __future__ import annotations

import argparse
import datetime

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torch_deepstack.testing.local_cluster import free_port


def routing(n, num_experts, topk, rank, device):
    g = torch.Generator(device="cpu").manual_seed(1000 + rank)
    scores = torch.randn(n, num_experts, generator=g).abs() + 1
    return scores.topk(topk, dim=1).indices.to(device)


def run_rank(rank, world, port, backend, transports, args, results):
    import torch_deepstack  # noqa: F401
    from torch_deepstack.ep import Buffer
    from torch_deepstack.testing.bench import bench_gpu
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    dev = torch.device("cuda", rank % torch.cuda.device_count() if backend == "nccl" else 0)
    torch.cuda.set_device(dev)
    Buffer.set_num_sms(args.num_sms)
    n, h, k, e = args.tokens, args.hidden, args.topk, args.experts
    rep, warm = args.rep, args.warmup
    x = torch.randn(n, h, device=dev, dtype=torch.bfloat16)
    idx = routing(n, e, k, rank, dev)
    w = torch.rand(n, k, device=dev)
    q, s = torch.ops.deepstack.per_token_group_quant_fp8(x, 128)
    rows = []
    for transport in transports:
        buf = Buffer(None, num_nvl_bytes=args.nvl_bytes, transport=transport,
                     num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(args.ll_tokens, h, world, e))
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, e)
        kw = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                  topk_idx=idx, topk_weights=w)
        recv_x, _, _, _, handle, _ = buf.dispatch(x, **kw)
        num_recv = recv_x.shape[0]
        t_bf16 = bench_gpu(lambda: buf.dispatch(x, **kw), warmup=warm, rep=rep)
        t_fp8 = bench_gpu(lambda: buf.dispatch((q, s), **kw), warmup=warm, rep=rep)
        t_comb = bench_gpu(lambda: buf.combine(recv_x, handle), warmup=warm, rep=rep)
        t_cached = bench_gpu(lambda: buf.dispatch(x, handle=handle), warmup=warm, rep=rep)
        t_cached8 = bench_gpu(lambda: buf.dispatch((q, s), handle=handle), warmup=warm, rep=rep)
        # low-latency, 128 tokens per rank
        m = args.ll_tokens
        lx, lidx, lw = x[:m].contiguous(), idx[:m].contiguous(), w[:m].contiguous()
        (rx, rs), cnt, lh, _, _ = buf.low_latency_dispatch(lx, lidx, m, e, use_fp8=True)
        ly = torch.randn(rx.shape, device=dev, dtype=torch.bfloat16)
        t_ll_d = bench_gpu(lambda: buf.low_latency_dispatch(lx, lidx, m, e, use_fp8=True), warmup=warm, rep=rep)
        t_ll_c = bench_gpu(lambda: buf.low_latency_combine(ly, lidx, lw, lh), warmup=warm, rep=rep)
        # the capturable forms, replayed from a CUDA graph (no host work in the timing)
        worst = n * world
        wrx, _, _, _, wh, _ = buf.dispatch(x, num_worst_tokens=worst, **kw)
        t_w_d = bench_gpu(lambda: buf.dispatch(x, num_worst_tokens=worst, **kw), warmup=2, rep=rep, use_graph=True)
        t_w_c = bench_gpu(lambda: buf.combine(wrx, wh), warmup=2, rep=rep, use_graph=True)
        t_ll_dg = bench_gpu(lambda: buf.low_latency_dispatch(lx, lidx, m, e, use_fp8=True), warmup=2, rep=rep,
                            use_graph=True)
        t_ll_cg = bench_gpu(lambda: buf.low_latency_combine(ly, lidx, lw, lh), warmup=2, rep=rep, use_graph=True)
        buf.destroy()
        rows.append((transport, num_recv, t_bf16, t_fp8, t_comb, t_cached, t_cached8, t_ll_d, t_ll_c,
                     t_w_d, t_w_c, t_ll_dg, t_ll_cg))
    # baseline: the same received rows with one all_to_all_single (bf16 rows, then fp8 rows + scales as bytes)
    base = {}
    if backend == "nccl":
        send_counts = in_rank.sum(0).tolist()
        counts = [torch.zeros(world, dtype=torch.int64, device=dev) for _ in range(world)]
        dist.all_gather(counts, in_rank.sum(0).to(torch.int64))
        recv_counts = [int(c[rank]) for c in counts]
        order = in_rank.t().nonzero()[:, 1]
        send_bf16 = x.index_select(0, order)
        out_bf16 = torch.empty(sum(recv_counts), h, device=dev, dtype=torch.bfloat16)
        fp8_rows = torch.cat([q.view(torch.uint8), s.contiguous().view(torch.uint8)], 1).index_select(0, order)
        out_fp8 = torch.empty(sum(recv_counts), fp8_rows.shape[1], device=dev, dtype=torch.uint8)
        base["bf16"] = bench_gpu(lambda: dist.all_to_all_single(out_bf16, send_bf16, recv_counts, send_counts),
                                 warmup=warm, rep=rep)
        base["fp8"] = bench_gpu(lambda: dist.all_to_all_single(out_fp8, fp8_rows, recv_counts, send_counts),
                                warmup=warm, rep=rep)
    if rank == 0:
        results.put((rows, base))
    dist.barrier()
    dist.destroy_process_group()


def run_world(world, backend, transports, args):
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.spawn(run_rank, args=(world, free_port(), backend, transports, args, results), nprocs=world, join=True)
    return results.get()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--ll-tokens", type=int, default=128)
    ap.add_argument("--world-size", type=int, default=0, help="processes, one per GPU (default: all GPUs)")
    ap.add_argument("--shared-gpu", type=int, default=0, help="also run N processes sharing GPU 0 over IPC")
    ap.add_argument("--transports", default="ipc,dist")
    ap.add_argument("--nvl-bytes", type=int, default=1 << 30)
    ap.add_argument("--num-sms", type=int, default=24, help="SMs of the NVLink send kernels (DeepEP's test: 24)")
    ap.add_argument("--rep", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    from torch_deepstack.testing.bench import BenchTable
    world = args.world_size or torch.cuda.device_count()
    t = BenchTable("ep", "normal_and_low_latency", "EP dispatch/combine (4096 tok/rank, hidden 7168, top-8 of 256)",
                   ["ranks", "transport", "recv tok", "call", "ours us", "ours GB/s", "all_to_all us",
                    "all_to_all GB/s", "ours / a2a"])
    t.notes.append("GB/s as DeepEP counts it (dispatch: received bytes, combine: sent bytes); baseline = one "
                   "all_to_all_single of the same rows with host-known splits, same run; ours / a2a = speed ratio")
    t.notes.append("DeepEP's published normal-mode figures (153/158 GB/s at EP8 on H800) come from its test's tuning "
                   "loop, which times dispatch with a cached handle (FP8 x) and combine: compare them with the "
                   "'cached dispatch fp8' and 'combine bf16' rows")
    t.notes.append("low-latency rows: 128 tokens per rank, FP8 dispatch (incl. quantisation), bf16 combine")
    t.notes.append(f"NVLink send kernels on {args.num_sms} SMs (Buffer.set_num_sms); receive/reduce kernels, which "
                   f"run after the barrier, on all SMs")
    t.notes.append("(graph) rows: the capturable forms (num_worst_tokens = tokens x ranks; low-latency) replayed "
                   "from a CUDA graph; other rows are eager calls, which include host syncs and op launches")
    h = args.hidden
    configs = [(world, "nccl", args.transports.split(","))]
    if args.shared_gpu:
        configs.append((args.shared_gpu, "gloo", ["ipc"]))
    for ranks, backend, transports in configs:
        rows, base = run_world(ranks, backend, transports, args)
        label = f"{ranks}" + (" (1 GPU)" if backend == "gloo" else "")
        for (transport, num_recv, t_bf16, t_fp8, t_comb, t_cached, t_cached8, t_ll_d, t_ll_c,
             t_w_d, t_w_c, t_ll_dg, t_ll_cg) in rows:
            b16, b8 = num_recv * h * 2, num_recv * (h + h // 128 * 4)
            for call, ms, nbytes, key in [("dispatch bf16", t_bf16, b16, "bf16"), ("dispatch fp8", t_fp8, b8, "fp8"),
                                          ("combine bf16", t_comb, b16, "bf16"),
                                          ("cached dispatch bf16", t_cached, b16, "bf16"),
                                          ("cached dispatch fp8", t_cached8, b8, "fp8"),
                                          ("worst-case dispatch bf16 (graph)", t_w_d, b16, "bf16"),
                                          ("worst-case combine bf16 (graph)", t_w_c, b16, "bf16")]:
                bm = base.get(key)
                t.add(label, transport, num_recv, call, ms * 1e3, nbytes / ms / 1e6,
                      bm * 1e3 if bm else "-", nbytes / bm / 1e6 if bm else "-", bm / ms if bm else "-")
            t.add(label, transport, args.ll_tokens, "LL dispatch fp8", t_ll_d * 1e3, "-", "-", "-", "-")
            t.add(label, transport, args.ll_tokens, "LL combine bf16", t_ll_c * 1e3, "-", "-", "-", "-")
            t.add(label, transport, args.ll_tokens, "LL dispatch fp8 (graph)", t_ll_dg * 1e3, "-", "-", "-", "-")
            t.add(label, transport, args.ll_tokens, "LL combine bf16 (graph)", t_ll_cg * 1e3, "-", "-", "-", "-")
    t.save()


if __name__ == "__main__":
    main()
