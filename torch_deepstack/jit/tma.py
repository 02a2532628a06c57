"""TMA tensor-map descriptors (CUtensorMap, 128 bytes) built on the host with cuTensorMapEncodeTiled.

Pass the returned bytes to a kernel parameter declared `const __grid_constant__ CUtensorMap` (signature code `t`).
Dimensions are given innermost first, as the driver wants them.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from torch_deepstack.jit import driver

# CUtensorMapDataType
_DTYPES = {torch.uint8: 0, torch.float8_e4m3fn: 0, torch.float8_e5m2: 0, torch.uint16: 1, torch.int32: 3,
           torch.int64: 5, torch.float16: 6, torch.float32: 7, torch.float64: 8, torch.bfloat16: 9}
SWIZZLE = {0: 0, 32: 1, 64: 2, 128: 3}     # CUtensorMapSwizzle, keyed by swizzle width in bytes
L2_PROMOTION_256B = 3
OOB_FILL_NONE = 0


@functools.lru_cache(maxsize=1)
def _encode():
    f = driver.lib().cuTensorMapEncodeTiled
    f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                  ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64),
                  ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32),
                  ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return f


def make_tensor_map(ptr: int, dtype: torch.dtype, dims: list[int], strides_bytes: list[int], box: list[int],
                    swizzle_bytes: int = 0, l2_promotion: int = L2_PROMOTION_256B) -> bytes:
    """Encode a tiled tensor map.

    dims: global sizes, innermost first. strides_bytes: byte strides of dims[1:] (len(dims) - 1 values, each a
    multiple of 16). box: the tile loaded by one TMA copy, innermost first (box[0] * element size must be a
    multiple of 16 bytes and at most the swizzle width when swizzling).
    """
    if dtype not in _DTYPES:
        raise TypeError(f"make_tensor_map: unsupported dtype {dtype}")
    rank = len(dims)
    if len(strides_bytes) != rank - 1 or len(box) != rank:
        raise ValueError(f"make_tensor_map: need {rank - 1} strides and {rank} box sizes, "
                         f"got {strides_bytes} and {box}")
    bad = [s for s in strides_bytes if s % 16]
    if bad:
        raise ValueError(f"make_tensor_map: global strides must be multiples of 16 bytes, got {strides_bytes}")
    if ptr % 16:
        raise ValueError("make_tensor_map: the global address must be 16-byte aligned")
    desc = (ctypes.c_uint8 * 128)()
    gdim = (ctypes.c_uint64 * rank)(*dims)
    gstride = (ctypes.c_uint64 * max(rank - 1, 1))(*strides_bytes)
    boxd = (ctypes.c_uint32 * rank)(*box)
    estride = (ctypes.c_uint32 * rank)(*([1] * rank))
    driver.check(_encode()(ctypes.addressof(desc), _DTYPES[dtype], rank, ptr, gdim, gstride, boxd, estride,
                           0, SWIZZLE[swizzle_bytes], l2_promotion, OOB_FILL_NONE),
                 f"cuTensorMapEncodeTiled(dims={dims}, strides={strides_bytes}, box={box})")
    return bytes(desc)


def tensor_map_2d(t: torch.Tensor, box_rows: int, box_cols: int, swizzle_bytes: int = 0) -> bytes:
    """Tensor map of a row-major 2-D tensor (stride(-1) == 1); the box is box_rows x box_cols elements."""
    if t.dim() != 2 or t.stride(1) != 1:
        raise ValueError(f"tensor_map_2d: need a 2-D tensor contiguous in its last dim, got {tuple(t.shape)} "
                         f"strides {t.stride()}")
    return make_tensor_map(t.data_ptr(), t.dtype, [t.shape[1], t.shape[0]], [t.stride(0) * t.element_size()],
                           [box_cols, box_rows], swizzle_bytes)
