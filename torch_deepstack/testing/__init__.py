"""Helpers for benchmarks (bench.py) shared by every area's benchmarks/bench_<area>.py script."""
