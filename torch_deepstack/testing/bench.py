"""Timing and reporting shared by the benchmark scripts in benchmarks/.

Method (see ../shared/specs/gpu-notes.md): warm up, flush L2 before every repetition (a 256 MB write) or rotate
through several input sets (`bench_gpu_rotating`), time each repetition with CUDA events, report the median. `use_graph=True` captures the call in a CUDA graph first, so launch
gaps of multi-kernel ops are not measured. Results go to JSON (bench_results/<area>.json) and to a markdown table
inside docs/benchmarks.md, between markers that a rerun replaces.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shlex
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

_L2_FLUSH_BYTES = 256 * 1024 * 1024
_flush_buf: torch.Tensor | None = None


def flush_l2(kind: str = "write") -> None:
    """Evict L2 with a 256 MB pass: "write" (the default method) leaves it full of dirty lines that the timed call
    may have to write back; "read" leaves it clean (to see what that write-back costs)."""
    global _flush_buf
    if _flush_buf is None:
        _flush_buf = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    if kind == "write":
        _flush_buf.zero_()
    elif kind == "read":
        _flush_buf.view(torch.float32).sum()
    else:
        raise ValueError(f"flush_l2: kind must be 'write' or 'read', got {kind!r}")


def bench_gpu(fn, warmup: int = 10, rep: int = 50, flush: bool | str = True, use_graph: bool = False,
              samples: list | None = None, settle_ms: float = 0.0) -> float:
    """Median milliseconds of `fn()` on the current CUDA stream. flush: True (= "write"), "read" or False, see
    flush_l2. `samples`, if given, is extended by the rep times in time order. settle_ms > 0: before the timed
    repetitions, about that much GPU time of flushed untimed calls, so the clock has settled to this call's own
    load rather than whatever ran before (see bench_gpu_interleaved)."""
    flush_kind = "write" if flush is True else flush
    for _ in range(warmup):
        fn()
    call = fn
    if use_graph:
        call = capture_graph(fn, warmup=0)[0]
        call()
    settle(call, settle_ms, flush_kind)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    for s, e in zip(starts, ends):
        _flushed(call, flush_kind, s, e)
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    if samples is not None:
        samples.extend(times)
    return statistics.median(times)


def profile_one_call(name: str, call, warm=None) -> None:
    """`warm()` (default: three calls of `call`), then one call between cudaProfilerStart/Stop: the launches
    `ncu --profile-from-start off` profiles. Prints "profiled <name>" so ncu's report can be matched to it."""
    if warm is None:
        for _ in range(3):
            call()
    else:
        warm()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print("profiled", name, flush=True)


def capture_graph(fn, warmup: int = 3):
    """(replay, outputs): fn captured in a CUDA graph after `warmup` calls on a side stream (what the capture of an
    autograd step or a first cuBLAS call needs); `outputs` are the captured call's results, refilled by replay()."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fn()
    return graph.replay, outs


def _flushed(fn, flush_kind, start=None, end=None) -> None:
    """One call of fn after an L2 flush (flush_kind: "write", "read" or falsy), between the events if given."""
    if flush_kind:
        flush_l2(flush_kind)
    if start is not None:
        start.record()
    fn()
    if end is not None:
        end.record()


def settle(call, settle_ms: float, flush_kind: str = "write") -> None:
    """Untimed calls of `call` (each after a flush, as when timed) for about settle_ms of GPU time, so the clock has
    settled to this call's own load (under load the H200 sits at its power cap; see bench_gpu_interleaved)."""
    for _ in range(_settle_calls(call, settle_ms, flush_kind)):
        _flushed(call, flush_kind)


def _settle_calls(call, settle_ms: float, flush_kind) -> int:
    """How many flushed calls of `call` take about settle_ms of GPU time."""
    return int(settle_ms / _call_ms(call, flush_kind)) if settle_ms > 0 else 0


def _call_ms(fn, flush_kind) -> float:
    """GPU milliseconds of one flushed call of fn, flush included (three calls, synchronised)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        _flushed(fn, flush_kind)
    end.record()
    end.synchronize()
    return max(start.elapsed_time(end) / 3, 1e-3)


def _rotated(names: list, r: int) -> list:
    """The contenders' order in round r: rotated by r, so each leads (and follows each other) equally often."""
    return names[r % len(names):] + names[:r % len(names)]


def bench_gpu_interleaved(fns: dict, rounds: int = 5, rep: int = 10, settle_ms: float = 100.0,
                          flush: bool | str = True, samples: dict | None = None, enter: dict | None = None) -> dict:
    """Median milliseconds of each of several contenders timed the same way: `rounds` rounds, each contender in
    turn (the order rotated every round) runs about settle_ms of flushed calls, then `rep` timed repetitions with
    the L2 flushed before each; every contender's rounds * rep samples are pooled. So no contender is timed in the
    wake of another's power draw more than the others, and each is timed at its own steady clock (triton's do_bench
    warms up for 25 ms). `samples`, if given, receives each contender's samples in time order; `enter`, if given,
    maps a contender to a function called (on the host) before each of its blocks, e.g. to select a kernel variant.
    On the H200 under FP8 GEMM load the board sits at its power cap (~690 W) and the SM clock between 1.4 and
    1.98 GHz, set by what ran in the last ~100 ms: 30 ms of settling still moved ratios by up to 8% against 100 ms
    (docs/gemm.md, 2026-11-30), hence the 100 ms default."""
    flush_kind = "write" if flush is True else flush
    names = list(fns)
    enter = {name: (enter or {}).get(name, lambda: None) for name in names}
    settle = {}
    for name in names:
        enter[name]()
        fns[name]()
        # settle calls: this contender's calls (each after a flush, as when timed) for about settle_ms of GPU time
        settle[name] = _settle_calls(fns[name], settle_ms, flush_kind)
    events = {name: [] for name in names}
    for r in range(rounds):
        for name in _rotated(names, r):
            fn = fns[name]
            enter[name]()
            for _ in range(settle[name]):
                _flushed(fn, flush_kind)
            for _ in range(rep):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                _flushed(fn, flush_kind, s, e)
                events[name].append((s, e))
    torch.cuda.synchronize()
    out = {}
    for name in names:
        times = [s.elapsed_time(e) for s, e in events[name]]
        if samples is not None:
            samples[name] = times
        out[name] = statistics.median(times)
    return out


def bench_do_bench(fns: dict, rounds: int = 3, samples: dict | None = None) -> dict:
    """Milliseconds of each contender by triton's `do_bench` (25 ms of warm-up, ~100 ms of repetitions with its L2
    clear before each, the median), the method behind published reference numbers such as issue 3's DeepGEMM table;
    `rounds` rounds with the contenders' order rotated, the median of each contender's round medians (so none is
    always timed in another's wake). `samples` receives each contender's round medians."""
    try:
        from triton.testing import do_bench
    except ImportError as e:
        raise RuntimeError("the do_bench method needs triton (pip install triton)") from e
    names = list(fns)
    got = {name: [] for name in names}
    for r in range(rounds):
        for name in _rotated(names, r):
            got[name].append(float(do_bench(fns[name], warmup=25, rep=100, return_mode="median")))
    if samples is not None:
        samples.update(got)
    return {name: statistics.median(v) for name, v in got.items()}


def bench_gpu_rotating(fn, input_sets: list, warmup: int = 10, rep: int = 50) -> float:
    """Median milliseconds of `fn(*input_sets[i % n])`, cycling through several input sets (together larger than
    L2) instead of flushing: the way to time calls too short for a 256 MB flush to stay out of the way."""
    if not input_sets:
        raise ValueError("bench_gpu_rotating needs at least one input set")
    n = len(input_sets)
    for i in range(warmup):
        fn(*input_sets[i % n])
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    for i, (s, e) in enumerate(zip(starts, ends)):
        args = input_sets[i % n]
        s.record()
        fn(*args)
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def bench_host(fn, iters: int = 20000, warmup: int = 1000, runs: int = 1, between=None) -> float:
    """Host microseconds per call of `fn()` (for launch overhead: no synchronisation inside a run): the mean over
    `iters` calls, the best of `runs` such runs; `between` (e.g. torch.cuda.synchronize, so launches never wait
    on a full queue) is called after the warm-up and after each run, outside the timing."""
    import time
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(runs):
        if between is not None:
            between()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - t0) / iters)
    if between is not None:
        between()
    return best * 1e6


def back_to_back(fn, steps, sync):
    """(host, wall) seconds per call of `steps` calls issued back to back after a synchronised warm-up: host = time to
    issue them (nothing waited for), wall = until the GPU is done. Wall is the throughput a training or serving loop
    sees; it includes host time that CUDA-event timing of single calls can miss (docs/gemm.md "Host time")."""
    import time
    for _ in range(3):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    host = (time.perf_counter() - t0) / steps
    sync()
    return host, (time.perf_counter() - t0) / steps


def device_name() -> str:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.multi_processor_count} SMs), torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU, torch {torch.__version__}"


@dataclass
class BenchTable:
    area: str
    name: str
    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *row) -> None:
        assert len(row) == len(self.columns), (row, self.columns)
        self.rows.append(list(row))
        print(" | ".join(_fmt(v) for v in row), flush=True)

    def markdown(self, command: str) -> str:
        date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        lines = [f"### {self.title}", "", f"- date: {date}", f"- device: {device_name()}",
                 f"- command: `{command}`", *[f"- {n}" for n in self.notes], "",
                 "| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"

    def save(self, repo_root: Path | None = None, command: str | None = None) -> None:
        """Write bench_results/<area>-<name>.json and replace this table's block in docs/benchmarks.md."""
        root = Path(repo_root or Path(__file__).resolve().parents[2])
        command = command or "python " + " ".join(shlex.quote(a) for a in sys.argv)
        out = Path(os.environ.get("DEEPSTACK_BENCH_OUT", root / "bench_results"))
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{self.area}-{self.name}.json").write_text(json.dumps(
            {"area": self.area, "name": self.name, "title": self.title, "device": device_name(),
             "command": command, "columns": self.columns, "rows": self.rows, "notes": self.notes}, indent=1))
        (out / f"{self.area}-{self.name}.md").write_text(self.markdown(command))
        docs = root / "docs" / "benchmarks.md"
        if docs.parent.is_dir():
            update_markdown_block(docs, f"{self.area}:{self.name}", self.markdown(command))


def update_markdown_block(path: Path, key: str, body: str) -> None:
    start, end = f"<!-- bench:{key} start -->", f"<!-- bench:{key} end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{body}{end}"
    if start in text and end in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)
