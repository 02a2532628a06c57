"""JIT settings from the environment, read each time they are needed so tests can change them.

| variable                      | meaning                                                              |
|-------------------------------|----------------------------------------------------------------------|
| DEEPSTACK_JIT_CACHE_DIR       | where compiled cubins live (default ~/.cache/torch_deepstack/jit)     |
| DEEPSTACK_JIT_VERBOSE=1       | print every nvcc command line, its timing and the ptxas report         |
| DEEPSTACK_JIT_PTXAS_CHECK=1   | fail a compile whose ptxas report shows spills, a stack frame or       |
|                               | serialised wgmmas (a C75xx note)                                       |
| DEEPSTACK_NVCC                | path of nvcc (default: $CUDA_HOME/bin/nvcc, then nvcc on PATH)         |
| DEEPSTACK_JIT_ARCH            | target arch (default sm_90a, the only one our kernels are written for)|
| DEEPSTACK_JIT_NVCC_THREADS    | parallel compiles for `deepstack jit prebuild` (default: CPU count)   |
"""
from __future__ import annotations

import os
from pathlib import Path


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch_deepstack" / "jit"
    return Path(os.environ.get("DEEPSTACK_JIT_CACHE_DIR", default)).expanduser()


def verbose() -> bool:
    return _flag("DEEPSTACK_JIT_VERBOSE")


def ptxas_check() -> bool:
    return _flag("DEEPSTACK_JIT_PTXAS_CHECK")


def arch() -> str:
    return os.environ.get("DEEPSTACK_JIT_ARCH", "sm_90a")


def compile_threads() -> int:
    return int(os.environ.get("DEEPSTACK_JIT_NVCC_THREADS", os.cpu_count() or 1))
