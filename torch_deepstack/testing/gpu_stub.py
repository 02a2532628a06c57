"""The FP8 and MLA ops' CUDA faces without a GPU: kernel loading, tensor-map encoding, the SM count and the driver's
launch call are replaced, everything else (checks, plans, memos, parameter packing) runs as on the GPU machine. For
timing the faces' host path on any machine (benchmarks/host_path.py) and for CPU tests of their host-side logic."""
from __future__ import annotations

import contextlib

import torch

from torch_deepstack.gemm import kernels
from torch_deepstack.jit import launch
from torch_deepstack.mla import kernels as mla_kernels
from torch_deepstack.quant import kernels as quant_kernels


class NoLaunchKernel(launch.Kernel):
    """A Kernel that packs its parameters as a loaded one does (natural C layout) and counts its launches."""

    def __init__(self, spec, signature: str):
        self.spec, self.name, self.entry = spec, "stub", "stub"
        self.signature, self._handle, self._library = signature, None, None
        self._setup_packing(signature, None)
        self._smem_configured = {0: 1 << 30}
        self.launches = 0

    def _launch_fn(self, *args) -> int:
        self.launches += 1
        return 0

    def max_active_clusters(self, *args) -> int:
        return 66


class _NoDriver:
    def cuLaunchKernelEx(self, config, handle, params, extra) -> int:
        return 0


def _clear_host_caches():
    for cache in (kernels._CALLS, kernels._QUANT_PLANS, kernels._PLANS, kernels._TMAPS, quant_kernels._PLANS,
                  mla_kernels._DEVICE_MAPS, mla_kernels._MAX_CLUSTERS, mla_kernels._DECODE_PLANS,
                  mla_kernels._APPENDS, mla_kernels._METADATA_PLANS):
        cache.clear()


@contextlib.contextmanager
def gpu_parts_stubbed():
    """Within: every face's kernel is a NoLaunchKernel (yields the dict (spec, signature) -> kernel)."""
    stubs: dict = {}

    def get_kernel(spec, signature):
        if (spec, signature) not in stubs:
            stubs[spec, signature] = NoLaunchKernel(spec, signature)
        return stubs[spec, signature]
    patches = [(kernels, "get_kernel", get_kernel), (quant_kernels, "get_kernel", get_kernel),
               (kernels, "make_tensor_map", lambda *args, **kwargs: bytes(128)), (kernels, "num_sms", lambda d: 132),
               (torch.cuda, "current_device", lambda: 0), (torch.cuda, "is_current_stream_capturing", lambda: False),
               (mla_kernels, "get_kernel", get_kernel), (mla_kernels, "_num_sms", lambda index: 132),
               (mla_kernels, "_max_active_clusters", lambda index, kernel, cluster: 66),
               (mla_kernels, "make_tensor_map", lambda *args, **kwargs: bytes(128)),
               (mla_kernels, "_device_copy_outside_graph_pools",
                lambda data, device: torch.frombuffer(bytearray(data), dtype=torch.uint8)),
               (launch, "_get_device", lambda: 0), (launch, "_get_stream", lambda device: 0),
               (launch.driver, "lib", lambda: _NoDriver())]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    _clear_host_caches()
    try:
        for mod, name, value in patches:
            setattr(mod, name, value)
        yield stubs
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)
        _clear_host_caches()
