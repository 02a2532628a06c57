"""bench_mla.py's live-FlashMLA contender and settled timing, on the CPU: the agreement check that gates timing,
the worker protocol and the table columns (the GPU run itself needs sgl-kernel's FlashMLA extension and an H200)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_mla  # noqa: E402
import flashmla_live  # noqa: E402

CONFIG = (64, 1, 16, 4096)


def test_agreement_accepts_matching_results_and_rejects_wrong_ones():
    g = torch.Generator().manual_seed(0)
    out = torch.randn(3, 1, 16, 512, generator=g)
    lse = torch.randn(3, 16, 1, generator=g)
    lse[2] = float("inf")                                   # a request with no keys
    near = out + 1e-6 * torch.randn(out.shape, generator=g)
    assert flashmla_live.agrees((out, lse), (near, lse.clone()))[0]
    assert not flashmla_live.agrees((out, lse), (out.flip(-1), lse))[0]          # other values
    assert not flashmla_live.agrees((out, lse), (out, lse + 1e-2))[0]            # lse off
    other_empty = lse.clone()
    other_empty[2] = 0.0
    assert not flashmla_live.agrees((out, lse), (out, other_empty))[0]           # empty rows differ


def test_table_takes_the_live_ratio_from_the_workers_own_pair():
    base = {"b": 64, "s_q": 1, "h_q": 16, "mean_sk": 4096, "us": 100.0, "tbps": 3.0, "tflops": 90.0}
    rows = [dict(base, flashmla_us=95.0, flashmla_ours_us=90.0), dict(base, b=128)]
    lines = bench_mla.table(rows).splitlines()
    assert lines[0].endswith("| FlashMLA live µs | ours / FlashMLA live speed |")
    assert lines[1].count("---") == 16
    assert lines[2].endswith("| 95.0 | 1.056 |")          # 95 / 90: ours timed in the same worker process
    assert lines[3].endswith("| | |")
    assert "FlashMLA live" not in bench_mla.table([base])


def test_worker_output_is_parsed_and_a_failed_worker_is_retried(monkeypatch, capsys):
    calls = []

    def fake_run(cmd, capture_output, text, timeout):
        calls.append(cmd)
        if len(calls) == 1:
            return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="RuntimeError: storage\n")
        line = bench_mla._WORKER_MARK + json.dumps({"flashmla_us": 99.0, "flashmla_ours_us": 98.0})
        return subprocess.CompletedProcess(cmd, 0, stdout=f"device: x\n{line}\n", stderr="")

    monkeypatch.setattr(bench_mla.subprocess, "run", fake_run)
    monkeypatch.setattr(bench_mla, "FLASHMLA_SO", "/x/flashmla_ops.abi3.so")
    assert bench_mla.flashmla_in_worker(CONFIG, 20) == {"flashmla_us": 99.0, "flashmla_ours_us": 98.0}
    assert len(calls) == 2
    assert calls[0][2:] == ["--flashmla-worker", "--flashmla-so", "/x/flashmla_ops.abi3.so", "--reps", "20",
                            "--settle-ms", str(bench_mla.SETTLE_MS), "--configs", "64,1,16,4096"]


def test_worker_that_never_reports_leaves_the_config_untimed_and_says_why(monkeypatch, capsys):
    def fail(cmd, capture_output, text, timeout):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="Traceback\nRuntimeError: boom\n")

    monkeypatch.setattr(bench_mla.subprocess, "run", fail)
    monkeypatch.setattr(bench_mla, "FLASHMLA_SO", "/x/flashmla_ops.abi3.so")
    assert bench_mla.flashmla_in_worker(CONFIG, 20, tries=2) == {}
    assert "live FlashMLA not timed on (64, 1, 16, 4096): RuntimeError: boom" in capsys.readouterr().out


def test_worker_that_hangs_is_given_up(monkeypatch, capsys):
    def hang(cmd, capture_output, text, timeout):
        raise subprocess.TimeoutExpired(cmd, timeout)

    monkeypatch.setattr(bench_mla.subprocess, "run", hang)
    monkeypatch.setattr(bench_mla, "FLASHMLA_SO", "/x/flashmla_ops.abi3.so")
    assert bench_mla.flashmla_in_worker(CONFIG, 20, tries=2) == {}
    assert f"no result within {bench_mla.WORKER_TIMEOUT_S} s" in capsys.readouterr().out


def test_load_needs_a_path_and_the_preloaded_shim(monkeypatch, capsys):
    monkeypatch.delenv(flashmla_live.ENV, raising=False)
    assert flashmla_live.load(None) is None                  # not asked for: silently absent
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert flashmla_live.load("/nowhere/flashmla_ops.abi3.so") is None
    assert "preload_shim() was not called" in capsys.readouterr().out


@pytest.mark.cuda
def test_bench_gpu_settles_before_timing():
    from torch_deepstack.testing.bench import bench_gpu
    x = torch.ones(1 << 20, device="cuda")
    calls = []

    def fn():
        calls.append(1)
        return x * 2

    assert bench_gpu(fn, warmup=1, rep=5, settle_ms=5.0) > 0
    assert len(calls) > 1 + 3 + 5                             # warm-up, the settle estimate's 3 calls, the settle, reps
