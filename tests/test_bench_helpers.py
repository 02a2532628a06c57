"""The benchmark timing helpers' own logic (torch_deepstack.testing.bench), with the GPU timer replaced."""
import sys
import types

import pytest

import torch

from torch_deepstack.testing import bench
from torch_deepstack.testing.bench import bench_do_bench, profile_one_call, settle


def _fake_triton(monkeypatch, do_bench):
    triton = types.ModuleType("triton")
    testing = types.ModuleType("triton.testing")
    testing.do_bench = do_bench
    triton.testing = testing
    monkeypatch.setitem(sys.modules, "triton", triton)
    monkeypatch.setitem(sys.modules, "triton.testing", testing)


def test_do_bench_method_rotates_the_contenders_and_takes_the_median_of_rounds(monkeypatch):
    order = []
    times = {"a": iter([3.0, 1.0, 2.0]), "b": iter([5.0, 7.0, 6.0])}

    def do_bench(fn, warmup, rep, return_mode):
        assert (warmup, rep, return_mode) == (25, 100, "median")   # triton's defaults, the method
        name = fn()
        order.append(name)
        return next(times[name])

    _fake_triton(monkeypatch, do_bench)
    samples = {}
    out = bench_do_bench({"a": lambda: "a", "b": lambda: "b"}, rounds=3, samples=samples)
    assert order == ["a", "b", "b", "a", "a", "b"]
    assert out == {"a": 2.0, "b": 6.0}
    assert samples == {"a": [3.0, 1.0, 2.0], "b": [5.0, 7.0, 6.0]}


def test_do_bench_method_without_triton_says_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton.testing", None)   # import fails as if triton were absent
    with pytest.raises(RuntimeError, match="needs triton"):
        bench_do_bench({"a": lambda: None})


def test_profile_one_call_profiles_exactly_one_call_after_the_warm_up(monkeypatch, capsys):
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: events.append("sync"))
    monkeypatch.setattr(torch.cuda.profiler, "start", lambda: events.append("start"))
    monkeypatch.setattr(torch.cuda.profiler, "stop", lambda: events.append("stop"))
    profile_one_call("a", lambda: events.append("call"))
    assert events == ["call"] * 3 + ["sync", "start", "call", "sync", "stop"]
    events.clear()
    profile_one_call("b", lambda: events.append("call"), warm=lambda: events.append("warm"))
    assert events == ["warm", "sync", "start", "call", "sync", "stop"]
    assert capsys.readouterr().out.splitlines() == ["profiled a", "profiled b"]


def test_settle_runs_flushed_calls_for_about_the_asked_gpu_time(monkeypatch):
    events = []
    monkeypatch.setattr(bench, "_call_ms", lambda fn, flush_kind: 2.5)     # one flushed call: 2.5 ms
    monkeypatch.setattr(bench, "flush_l2", lambda kind: events.append(f"flush {kind}"))
    settle(lambda: events.append("call"), 10.0)
    assert events == ["flush write", "call"] * 4
    events.clear()
    settle(lambda: events.append("call"), 0.0)                               # nothing asked: nothing run
    assert events == []
