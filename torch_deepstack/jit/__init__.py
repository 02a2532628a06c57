"""Runtime JIT for deepstack's CUDA kernels: compile one specialisation, cache it on disk, load it, launch it.

    from torch_deepstack.jit import KernelSpec, get_kernel
    spec = KernelSpec("quant/per_token_group_quant_fp8.cuh", "per_token_group_quant_fp8_kernel",
                      template_args=("__nv_bfloat16", 128, False))
    kernel = get_kernel(spec, signature="pppiiiif")      # one code per kernel parameter, see launch.py
    kernel.launch(grid, block, *args, smem=0)            # on torch's current stream; CUDA-graph capturable

Shape constants are template arguments (DeepGEMM style): the first call compiles that specialisation with nvcc
for sm_90a (a few seconds), later calls and later processes load it from the cache (see cache.py and config.py).
"""
from __future__ import annotations

import threading

from torch_deepstack.jit.cache import CompiledKernel, KernelSpec, build, clear, list_entries  # noqa: F401
from torch_deepstack.jit.config import cache_dir  # noqa: F401
from torch_deepstack.jit.nvcc import JitCompileError, NvccNotFoundError, find_nvcc  # noqa: F401
from torch_deepstack.jit.prebuild import register_prebuild, prebuild_specs  # noqa: F401

_loaded: dict = {}
_lock = threading.Lock()


def get_kernel(spec: KernelSpec, signature: str):
    """Compile (or fetch from the disk cache) and load `spec`; memoised per process."""
    key = (spec, signature)
    k = _loaded.get(key)
    if k is not None:
        return k
    with _lock:
        k = _loaded.get(key)
        if k is None:
            from torch_deepstack.jit.launch import Kernel
            compiled = build(spec)
            k = Kernel(compiled.cubin, compiled.entry, signature, name=spec.instantiation())
            _loaded[key] = k
    return k
