"""DeepGEMM's timing helpers: `bench` (CUDA events around a loop) and `bench_kineto` (per-kernel device time from
the PyTorch profiler). Without a GPU both time on the host (perf_counter; profiled CPU ops), so scripts still run.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

import torch
from torch.autograd import DeviceType

from torch_deepstack.testing.bench import flush_l2 as _flush_l2

# DeepGEMM kernel-name fragments whose work runs in torch_deepstack's single GEMM kernel (`fp8_gemm_kernel`, all
# forms), used only when the name as given matches nothing.
_OUR_KERNEL = {"fp8_wgrad_gemm": "fp8_gemm", "sm90_fp8_gemm_1d1d": "fp8_gemm", "sm90_fp8_gemm_1d2d": "fp8_gemm",
               "sm90_k_grouped_fp8_gemm": "fp8_gemm"}


def bench(fn, num_warmups: int = 5, num_tests: int = 10, high_precision: bool = False) -> float:
    """Mean seconds per fn() over num_tests back-to-back calls after num_warmups, L2 flushed once before. With
    high_precision a long GPU job is queued first, so the timed launches are queued before the GPU reaches them
    and the host launch cost drops out."""
    if not torch.cuda.is_available():
        for _ in range(num_warmups):
            fn()
        t0 = time.perf_counter()
        for _ in range(num_tests):
            fn()
        return (time.perf_counter() - t0) / num_tests
    torch.cuda.synchronize()
    _flush_l2()
    for _ in range(num_warmups):
        fn()
    if high_precision:
        big = torch.randn(8192, 8192, device="cuda")
        big @ big
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(num_tests):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / num_tests


@contextlib.contextmanager
def _quiet(enabled: bool):
    """Silence stdout and stderr at the file-descriptor level (the profiler's C++ side prints there)."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def _outermost(events, name):
    """Events whose name contains `name` and that do not sit inside another such event (a CPU op and its own
    dispatcher levels count once)."""
    def inside_match(e):
        p = e.cpu_parent
        while p is not None:
            if name in p.name:
                return True
            p = p.cpu_parent
        return False
    return [e for e in events if name in e.name and not inside_match(e)]


def bench_kineto(fn, kernel_names, num_tests: int = 30, suppress_kineto_output: bool = False, trace_path=None,
                 flush_l2: bool = True, with_multiple_kernels: bool = False, barrier=None):
    """Seconds per launch of each kernel whose name contains one of `kernel_names` (a str, or a tuple giving a
    tuple back), from a profile of num_tests calls of fn (after one warm-up call). with_multiple_kernels: the
    summed time of all matching launches per fn() call instead. Without a GPU, CPU ops are matched and timed
    (e.g. "deepstack::fp8_gemm_nt", "aten::mm"). A name that matches nothing raises (listing what ran), where
    DeepGEMM would return 0."""
    names = (kernel_names,) if isinstance(kernel_names, str) else tuple(kernel_names)
    on_gpu = torch.cuda.is_available()
    fn()
    flush = _flush_l2 if on_gpu and flush_l2 else None   # (flush_l2: DeepGEMM's keyword)
    if on_gpu:
        torch.cuda.synchronize()
    activity = torch.profiler.ProfilerActivity.CUDA if on_gpu else torch.profiler.ProfilerActivity.CPU
    with _quiet(suppress_kineto_output), torch.profiler.profile(activities=[activity], acc_events=True) as prof:
        for _ in range(num_tests):
            if flush is not None:
                flush()
            if barrier is not None:
                barrier()
            fn()
        if on_gpu:
            torch.cuda.synchronize()
    if trace_path is not None:
        prof.export_chrome_trace(trace_path)
    kind = DeviceType.CUDA if on_gpu else DeviceType.CPU
    events = [e for e in prof.events() if e.device_type == kind]
    times = []
    for name in names:
        hits = _outermost(events, name) or _outermost(events, _OUR_KERNEL.get(name, name))
        if not hits:
            seen = sorted({e.name for e in events})
            raise ValueError(f"bench_kineto: no {'kernel' if on_gpu else 'op'} name contains {name!r}; "
                             f"profiled: {seen[:30]}")
        total_us = sum(e.time_range.elapsed_us() for e in hits)
        times.append(total_us / 1e6 / (num_tests if with_multiple_kernels else len(hits)))
    return tuple(times) if not isinstance(kernel_names, str) else times[0]
