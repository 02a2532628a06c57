"""The few CUDA driver calls the launcher needs, through ctypes into libcuda (no extra dependency).

Cubins are loaded with the context-independent library API (cuLibraryLoadData / cuLibraryGetKernel), so one
load serves every device; a CUkernel is accepted wherever a CUfunction is, in the current context.
"""
from __future__ import annotations

import ctypes
import functools

CUresult = ctypes.c_int
CU_LAUNCH_PARAM_END = ctypes.c_void_p(0)
CU_LAUNCH_PARAM_BUFFER_POINTER = ctypes.c_void_p(1)
CU_LAUNCH_PARAM_BUFFER_SIZE = ctypes.c_void_p(2)
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION = 4


class CudaDriverError(RuntimeError):
    pass


class LaunchAttribute(ctypes.Structure):
    # CUlaunchAttribute: an enum id, padding to 8 bytes, then a 64-byte value union.
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_uint32 * 16)]


class LaunchConfig(ctypes.Structure):
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


@functools.lru_cache(maxsize=1)
def lib() -> ctypes.CDLL:
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise CudaDriverError("libcuda.so.1 (the NVIDIA driver) is not available on this machine") from e
    cuda.cuInit.argtypes = [ctypes.c_uint]
    check_result = cuda.cuInit(0)
    if check_result != 0:
        raise CudaDriverError(f"cuInit failed with CUDA error {check_result}: no usable GPU/driver")
    cuda.cuGetErrorString.argtypes = [CUresult, ctypes.POINTER(ctypes.c_char_p)]
    cuda.cuLibraryLoadData.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p,
                                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint,
                                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
    cuda.cuLibraryGetKernel.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_char_p]
    cuda.cuKernelSetAttribute.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    cuda.cuLaunchKernel.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                                    ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    cuda.cuLaunchKernelEx.argtypes = [ctypes.POINTER(LaunchConfig), ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_void_p]
    cuda.cuCtxGetCurrent.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    cuda.cuDevicePrimaryCtxRetain.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
    cuda.cuCtxSetCurrent.argtypes = [ctypes.c_void_p]
    return cuda


@functools.lru_cache(maxsize=1)
def raw_launch_fn():
    """cuLaunchKernel without argtypes, for the hot path: callers pass c_void_p handles and plain ints."""
    fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernel
    fn.restype = ctypes.c_int
    return fn


CUDA_ERROR_INVALID_VALUE = 1


def check(res: int, what: str) -> None:
    if res != 0:
        msg = ctypes.c_char_p()
        lib().cuGetErrorString(res, ctypes.byref(msg))
        text = msg.value.decode() if msg.value else "unknown error"
        raise CudaDriverError(f"{what} failed: CUDA error {res} ({text})")


def ensure_context(device: int) -> None:
    """Make the device's primary context current on this thread (torch uses the same primary context)."""
    ctx = ctypes.c_void_p()
    check(lib().cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
    if not ctx.value:
        check(lib().cuDevicePrimaryCtxRetain(ctypes.byref(ctx), device), "cuDevicePrimaryCtxRetain")
        check(lib().cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


def load_kernel(cubin: bytes, entry: str) -> tuple[ctypes.c_void_p, object]:
    """Load a cubin and return (CUkernel handle, library handle to keep alive)."""
    library = ctypes.c_void_p()
    buf = ctypes.create_string_buffer(cubin, len(cubin))
    check(lib().cuLibraryLoadData(ctypes.byref(library), buf, None, None, 0, None, None, 0), "cuLibraryLoadData")
    kernel = ctypes.c_void_p()
    check(lib().cuLibraryGetKernel(ctypes.byref(kernel), library, entry.encode()), f"cuLibraryGetKernel({entry})")
    return kernel, library


def kernel_param_offsets(kernel: ctypes.c_void_p) -> list[tuple[int, int]] | None:
    """(offset, size) of each kernel parameter as the cubin lays them out (cuKernelGetParamInfo, CUDA 12.4+).

    Not always the natural C layout: a parameter aligned to 128 bytes (CUtensorMap in CUDA 13 headers) is placed so
    that its address in the constant bank is aligned, which puts the first one at offset 112, not 0. Returns None
    when the driver lacks the call."""
    fn = getattr(lib(), "cuKernelGetParamInfo", None)
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
    out = []
    off, size = ctypes.c_size_t(), ctypes.c_size_t()
    while (res := fn(kernel, len(out), ctypes.byref(off), ctypes.byref(size))) == 0:
        out.append((off.value, size.value))
    if not out and res != CUDA_ERROR_INVALID_VALUE:   # (every kernel of ours has parameters: a real failure)
        check(res, "cuKernelGetParamInfo")
    return out


def max_active_clusters(kernel: ctypes.c_void_p, cluster: int, threads: int, smem: int, device: int) -> int:
    """How many `cluster`-CTA clusters of this kernel fit on the GPU at once (cuOccupancyMaxActiveClusters). GPCs
    place clusters whole, so this can be below SMs / cluster: a persistent grid larger than it runs a tail wave."""
    set_max_dynamic_smem(kernel, smem, device)
    func = ctypes.c_void_p()
    check(lib().cuKernelGetFunction(ctypes.byref(func), kernel), "cuKernelGetFunction")
    attr = LaunchAttribute()
    attr.id = CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
    attr.value[0], attr.value[1], attr.value[2] = cluster, 1, 1
    cfg = LaunchConfig(cluster, 1, 1, threads, 1, 1, smem, None, ctypes.pointer(attr), 1)
    n = ctypes.c_int()
    check(lib().cuOccupancyMaxActiveClusters(ctypes.byref(n), func, ctypes.byref(cfg)), "cuOccupancyMaxActiveClusters")
    return n.value


def set_max_dynamic_smem(kernel: ctypes.c_void_p, nbytes: int, device: int) -> None:
    check(lib().cuKernelSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, nbytes, kernel, device),
          "cuKernelSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)")


class IpcMemHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * 64)]


CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1


def _in_context(device: int, fn):
    """Run fn() with `device`'s primary context current (the one torch uses), restoring the previous one."""
    cuda = lib()
    push, pop = cuda.cuCtxPushCurrent_v2, cuda.cuCtxPopCurrent_v2
    push.argtypes = [ctypes.c_void_p]
    pop.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    ctx = ctypes.c_void_p()
    check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), device), "cuDevicePrimaryCtxRetain")
    check(push(ctx), "cuCtxPushCurrent")
    try:
        return fn()
    finally:
        pop(ctypes.byref(ctypes.c_void_p()))


def ipc_export(ptr: int) -> tuple[bytes, int]:
    """(IPC handle of the allocation holding device address `ptr`, ptr's offset in it)."""
    cuda = lib()
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    fn = cuda.cuMemGetAddressRange_v2
    fn.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
    check(fn(ctypes.byref(base), ctypes.byref(size), ptr), "cuMemGetAddressRange")
    handle = IpcMemHandle()
    cuda.cuIpcGetMemHandle.argtypes = [ctypes.POINTER(IpcMemHandle), ctypes.c_uint64]
    check(cuda.cuIpcGetMemHandle(ctypes.byref(handle), base.value), "cuIpcGetMemHandle")
    return ctypes.string_at(ctypes.addressof(handle), 64), ptr - base.value   # all 64 bytes (NULs included)


def ipc_import(device: int, handle: bytes) -> int:
    """Map a peer's allocation into `device`'s context (peer access enabled as needed): its base address here.

    Opening it in this device's own context is what lets this device's kernels use the address; torch's tensor
    sharing opens it in the exporting GPU's context instead."""
    cuda = lib()
    fn = cuda.cuIpcOpenMemHandle_v2
    fn.argtypes = [ctypes.POINTER(ctypes.c_uint64), IpcMemHandle, ctypes.c_uint]
    if len(handle) != 64:
        raise ValueError(f"an IPC memory handle has 64 bytes, got {len(handle)}")
    h = IpcMemHandle()
    ctypes.memmove(ctypes.addressof(h), handle, 64)
    out = ctypes.c_uint64()
    _in_context(device, lambda: check(fn(ctypes.byref(out), h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS),
                                      "cuIpcOpenMemHandle"))
    return out.value


def ipc_close(device: int, base: int) -> None:
    cuda = lib()
    cuda.cuIpcCloseMemHandle.argtypes = [ctypes.c_uint64]
    _in_context(device, lambda: cuda.cuIpcCloseMemHandle(base))


CU_MEMHOSTALLOC_PORTABLE, CU_MEMHOSTALLOC_DEVICEMAP = 0x01, 0x02


class HostMappedWords:
    """`n` zeroed int32 words of pinned host memory that kernels can store into (cuMemHostAlloc with DEVICEMAP):
    a kernel reports a rare event (an error) by a plain store and the host reads it with no copy, event or sync.
    `device_ptr` is the address to pass to kernels; `[i]` reads word i on the host."""

    def __init__(self, n: int):
        cuda = lib()
        cuda.cuMemHostAlloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]
        cuda.cuMemHostGetDevicePointer_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p,
                                                      ctypes.c_uint]
        cuda.cuMemFreeHost.argtypes = [ctypes.c_void_p]
        host = ctypes.c_void_p()
        check(cuda.cuMemHostAlloc(ctypes.byref(host), 4 * n, CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP),
              "cuMemHostAlloc")
        self._host = host
        ctypes.memset(host, 0, 4 * n)
        dev = ctypes.c_uint64()
        check(cuda.cuMemHostGetDevicePointer_v2(ctypes.byref(dev), host, 0), "cuMemHostGetDevicePointer")
        self.device_ptr = dev.value
        self._words = (ctypes.c_int32 * n).from_address(host.value)

    def __getitem__(self, i: int) -> int:
        return self._words[i]

    def free(self) -> None:
        if self._host is not None:
            self._words = None
            lib().cuMemFreeHost(self._host)
            self._host = None

