"""Helpers shared by tests and benchmarks: timing and result tables (bench.py), and real storage clusters and
etcd on loopback (local_cluster.py)."""
