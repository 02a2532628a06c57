"""Low-overhead launch of a JIT-compiled kernel.

Kernel parameters are packed with one precompiled `struct.Struct` into a per-thread buffer that the driver reads
through CU_LAUNCH_PARAM_BUFFER_POINTER: no per-argument ctypes objects on the hot path. The launch goes onto the
current torch stream, so it is ordered with torch's work and is captured by `torch.cuda.graph`.

Signature codes, one per kernel parameter, in order (the C++ parameter types they stand for):
    p  pointer (T*; pass a tensor, an int address, or None)      8 bytes
    i  int32      u  uint32      l  int64      f  float32
    t  CUtensorMap passed as `const __grid_constant__ CUtensorMap` (128 bytes; pass the bytes from
       torch_deepstack.jit.tma)
Offsets come from the cubin itself (cuKernelGetParamInfo): with CUDA 13 headers a tensor map is placed where its
constant-bank address is 128-byte aligned, which no C layout rule predicts (a first-parameter map sits at offset
112). The natural C layout below is only the fallback for drivers older than CUDA 12.4, where a kernel should
take its tensor maps first.
"""
from __future__ import annotations

import ctypes
import struct
import threading

import torch

from torch_deepstack.jit import driver

_CODES = {"p": ("Q", 8, 8), "i": ("i", 4, 4), "u": ("I", 4, 4), "l": ("q", 8, 8), "f": ("f", 4, 4),
          "t": ("128s", 128, 64)}
_DEFAULT_SMEM_LIMIT = 48 * 1024
_CUDA_ERROR_INVALID_CONTEXT = 201
_c_void_p = ctypes.c_void_p
_get_device = getattr(torch._C, "_cuda_getDevice", None)
_get_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def param_struct(signature: str, offsets: list | None = None) -> struct.Struct:
    """A Struct laying parameters out as the CUDA ABI does: each at its natural alignment, or at the (offset, size)
    pairs the cubin declares (`offsets`, from driver.kernel_param_offsets), which is what the driver reads."""
    if offsets is not None and len(offsets) != len(signature):
        raise ValueError(f"kernel signature {signature!r} has {len(signature)} parameters, the cubin {len(offsets)}")
    fmt, off = "<", 0
    for i, c in enumerate(signature):
        if c not in _CODES:
            raise ValueError(f"unknown kernel signature code {c!r} in {signature!r} (use one of {''.join(_CODES)})")
        code, size, align = _CODES[c]
        if offsets is not None:
            want, want_size = offsets[i]
            if want_size != size or want < off:
                raise ValueError(f"kernel parameter {i} ({c!r}, {size} bytes) does not match the cubin's "
                                 f"{want_size} bytes at offset {want}: fix the signature {signature!r}")
            pad = want - off
        else:
            pad = (-off) % align
        fmt += "x" * pad + code
        off += pad + size
    return struct.Struct(fmt)


def _param_extra(buf, size) -> ctypes.Array:
    """cuLaunchKernel's `extra` array for a packed parameter buffer and its c_size_t size (both must outlive it)."""
    return (ctypes.c_void_p * 5)(driver.CU_LAUNCH_PARAM_BUFFER_POINTER.value, ctypes.addressof(buf),
                                 driver.CU_LAUNCH_PARAM_BUFFER_SIZE.value, ctypes.addressof(size),
                                 driver.CU_LAUNCH_PARAM_END.value)


class _ThreadBuffers(threading.local):
    def __init__(self, size: int):
        self.buf = ctypes.create_string_buffer(max(size, 8))
        self.size = ctypes.c_size_t(size)
        self.extra = _param_extra(self.buf, self.size)


def _dims(v) -> tuple:
    return (v, 1, 1) if v.__class__ is int else (*v, 1, 1)[:3]


class Kernel:
    """A loaded cubin entry function; call `launch(grid, block, *args, smem=0, stream=None)`."""

    def __init__(self, cubin: bytes, entry: str, signature: str, name: str = ""):
        self.name = name or entry
        self.entry = entry
        self.signature = signature
        # The autograd engine runs CUDA backward passes in a thread of its own, where no context may be current yet
        # (torch binds one lazily); a kernel first loaded there (a backward GEMM's new shape) needs one for its
        # parameter layout query.
        driver.ensure_context(_get_device())
        self._handle, self._library = driver.load_kernel(cubin, entry)
        self._setup_packing(signature, driver.kernel_param_offsets(self._handle))
        self._smem_configured: dict[int, int] = {}
        self._launch_fn = driver.raw_launch_fn()

    def _setup_packing(self, signature: str, offsets) -> None:
        """The parameter layout (`offsets` from the cubin, or None: the natural C layout) and the per-thread buffer."""
        self._struct = param_struct(signature, offsets)
        self._pointer_slots = tuple(i for i, c in enumerate(signature) if c == "p")
        self._tls = _ThreadBuffers(self._struct.size)
        self._nargs = len(signature)

    def _pack(self, args) -> ctypes.Array:
        if len(args) != self._nargs:
            raise TypeError(f"{self.name}: expected {self._nargs} kernel arguments "
                            f"({self.signature}), got {len(args)}")
        vals = list(args)
        for i in self._pointer_slots:
            a = vals[i]
            if a.__class__ is not int:
                vals[i] = 0 if a is None else a.data_ptr()
        tls = self._tls
        self._struct.pack_into(tls.buf, 0, *vals)
        return tls.extra

    def prepare(self, grid, block, *args, smem: int = 0, cluster=None) -> "PreparedLaunch":
        """The launch with these exact arguments, packed once: calling it launches on the current stream. For call
        sites that see the same arguments again (the GEMM faces memoise calls by their operands' pointers and
        layouts): a call then costs one driver call instead of checks, lookups and packing."""
        self._pack(args)
        return PreparedLaunch(self, _dims(grid), _dims(block), None if cluster is None else _dims(cluster), smem,
                              self._tls.buf.raw[:self._struct.size])

    def _configure_smem(self, smem: int, device: int) -> None:
        if self._smem_configured.get(device, _DEFAULT_SMEM_LIMIT) < smem:
            driver.set_max_dynamic_smem(self._handle, smem, device)
            self._smem_configured[device] = smem

    def launch(self, grid, block, *args, smem: int = 0, stream: int | None = None) -> None:
        """Launch on torch's current stream of the current device (or on `stream`, a raw cudaStream_t)."""
        self._issue(_dims(grid), _dims(block), smem, stream, self._pack(args))

    def _issue(self, grid: tuple, block: tuple, smem: int, stream, extra, config=None) -> None:
        """One driver launch of packed parameters (`extra`); `config`: a cluster launch's cuLaunchKernelEx config.
        stream None: torch's current stream of the current device."""
        if stream is None or smem > _DEFAULT_SMEM_LIMIT:
            device = _get_device()
            if smem > _DEFAULT_SMEM_LIMIT:
                self._configure_smem(smem, device)
            if stream is None:
                stream = _get_stream(device)
        if config is not None:
            config.hStream = stream
            driver.check(driver.lib().cuLaunchKernelEx(ctypes.byref(config), self._handle, None, extra),
                         f"cluster launch of {self.name} grid={grid} block={block} smem={smem}")
            return
        gx, gy, gz = grid
        bx, by, bz = block
        # Plain ctypes call (no argtypes): ints convert as C ints, handles go as c_void_p. Twice as fast as argtypes.
        res = self._launch_fn(self._handle, gx, gy, gz, bx, by, bz, smem, _c_void_p(stream) if stream else None,
                              None, extra)
        if res:
            if res == _CUDA_ERROR_INVALID_CONTEXT:   # a thread that never touched CUDA through torch
                driver.ensure_context(_get_device())
                res = self._launch_fn(self._handle, gx, gy, gz, bx, by, bz, smem,
                                      _c_void_p(stream) if stream else None, None, extra)
            driver.check(res, f"launch of {self.name} grid={grid} block={block} smem={smem}")

    def max_active_clusters(self, cluster: int, threads: int, smem: int) -> int:
        """Clusters of `cluster` CTAs (`threads` each, `smem` dynamic bytes) that fit on the current GPU at once."""
        return driver.max_active_clusters(self._handle, cluster, threads, smem, torch._C._cuda_getDevice())

    def launch_cluster(self, grid, block, cluster, *args, smem: int = 0, stream: int | None = None) -> None:
        """Launch with thread-block clusters (cuLaunchKernelEx); `cluster` is (x, y, z)."""
        grid, block = _dims(grid), _dims(block)
        config, _attr = _cluster_config(grid, block, _dims(cluster), smem, None)   # (_attr: alive until the launch)
        self._issue(grid, block, smem, stream, self._pack(args), config)


def _cluster_config(grid: tuple, block: tuple, cluster: tuple, smem: int, stream):
    """cuLaunchKernelEx's config with the cluster-dimension attribute (keep both alive until the launch)."""
    attr = driver.LaunchAttribute()
    attr.id = driver.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
    attr.value[0], attr.value[1], attr.value[2] = cluster
    return driver.LaunchConfig(*grid, *block, smem, stream, ctypes.pointer(attr), 1), attr


class PreparedLaunch:
    """A kernel launch with its parameters packed (Kernel.prepare); `launch()` issues it on torch's current stream.
    Holds no tensors, only their addresses: the caller guarantees they are still the call's operands."""

    __slots__ = ("kernel", "grid", "block", "cluster", "smem", "_buf", "_size", "_extra", "_config", "_attr")

    def __init__(self, kernel: Kernel, grid: tuple, block: tuple, cluster, smem: int, params: bytes):
        self.kernel, self.grid, self.block, self.cluster, self.smem = kernel, grid, block, cluster, smem
        self._buf = ctypes.create_string_buffer(params, max(len(params), 8))
        # the driver reads the buffer and its size at launch time; both live as long as this object
        self._size = ctypes.c_size_t(len(params))
        self._extra = _param_extra(self._buf, self._size)
        self._config = self._attr = None
        if cluster is not None:
            self._config, self._attr = _cluster_config(grid, block, cluster, smem, None)

    def launch(self) -> None:
        self.kernel._issue(self.grid, self.block, self.smem, None, self._extra, self._config)
