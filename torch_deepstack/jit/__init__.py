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


def check_device_arch(device: int | None = None) -> None:
    """Raise a clear error when the current GPU cannot run code built for the JIT's target arch (sm_90a needs
    exactly a Hopper GPU, compute capability 9.0), instead of the driver's 'no kernel image' at launch."""
    import torch

    from torch_deepstack._library import DeviceNotSupportedError
    from torch_deepstack.jit import config

    target = config.arch()
    major, minor = torch.cuda.get_device_capability(device)
    want = target[3:].rstrip("a")
    if f"{major}{minor}" != want:
        name = torch.cuda.get_device_name(device)
        raise DeviceNotSupportedError(
            f"deepstack's CUDA kernels are built for {target}; {name} is sm_{major}{minor}. Run the op on CPU "
            f"tensors (reference kernels), or on a Hopper GPU (H100/H200).")


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
            check_device_arch()
            compiled = build(spec)
            k = Kernel(compiled.cubin, compiled.entry, signature, name=spec.instantiation())
            _loaded[key] = k
    return k
