"""Argument checks shared by every area's CUDA glue: clear Python errors naming the argument, never a CUDA crash."""
from __future__ import annotations

import math
import weakref

import torch


def check_same_device(op: str, **tensors) -> None:
    """All given tensors (None entries ignored) must live on one device."""
    devs = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got " +
                         ", ".join(f"{k} on {v}" for k, v in devs.items()))


def check_dtype(op: str, name: str, t: torch.Tensor, *dtypes: torch.dtype) -> None:
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must be {' or '.join(map(str, dtypes))}, got {t.dtype}")


def check_shape(op: str, name: str, t: torch.Tensor, expected: tuple, what: str = "") -> None:
    """`expected` may hold None for a free dimension."""
    ok = t.dim() == len(expected) and all(e is None or s == e for s, e in zip(t.shape, expected))
    if not ok:
        shown = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{op}: {name} must have shape {shown}{' (' + what + ')' if what else ''}, "
                         f"got {list(t.shape)}")


def check_eps(op: str, eps) -> float:
    """The quantisers' floor on a group's amax: positive and finite, else all-zero groups (padding rows) get a zero
    scale and NaN values."""
    e = float(eps)
    if not (e > 0 and math.isfinite(e)):
        raise ValueError(f"{op}: eps must be a positive finite number (the floor on each group's amax), got {eps!r}")
    return e


class CheckedData:
    """Tensors whose contents passed a data check (on a GPU a host sync, which also stalls the host until the GPU has
    caught up), with their version counters: the check runs again only when one of them is written in place through
    PyTorch (which bumps `_version`), is another tensor or view, or the limits change. Used by the MLA ops (a decode
    step's layers share one block table and seqlens, so they check once per step instead of once per layer;
    PagedKVCache notes its whole tables after each of its own writes, and the slots it hands out, so its steps sync
    for none of them) and the contiguous grouped GEMM's group ids (FP8Experts notes the layouts it builds). A tensor
    noted whole passes as any view that keeps its full last dimension (a row subset of a block table; not a column
    slice, which has fewer pages per request than the noted check allowed). (Data written by a kernel that bypasses
    PyTorch's version counters is not re-checked.)"""

    def __init__(self, limit: int = 256):
        self._seen: dict = {}
        self._limit = limit

    @staticmethod
    def _base(t):
        return t if t._base is None else t._base

    def _key(self, tensors, limits, whole: bool) -> tuple:
        """Whole: the base tensors, any views of them; else these very views (base, offset, shape, strides)."""
        return tuple(("whole", id(self._base(t))) if whole else
                     (id(self._base(t)), t.storage_offset(), tuple(t.shape), t.stride()) for t in tensors) + limits

    def _alive(self, key, tensors) -> bool:
        entry = self._seen.get(key)
        return entry is not None and all(ref() is self._base(t) and v == t._version
                                         for (ref, v), t in zip(entry, tensors))

    def _full_width(self, t) -> bool:
        base = self._base(t)
        return t.dim() < 2 or (t.shape[-1] == base.shape[-1] and t.stride()[-1] == base.stride()[-1])

    def passed(self, tensors: tuple, limits: tuple) -> bool:
        """Checked before as these very views, or noted whole (views of full width) at their current versions."""
        if self._alive(self._key(tensors, limits, False), tensors):
            return True
        return all(self._full_width(t) for t in tensors) and self._alive(self._key(tensors, limits, True), tensors)

    def note(self, tensors: tuple, limits: tuple, whole: bool = False) -> None:
        if len(self._seen) >= self._limit:
            self._seen.clear()
        self._seen[self._key(tensors, limits, whole)] = tuple((weakref.ref(self._base(t)), t._version)
                                                              for t in tensors)

    def check_once(self, tensors: tuple, limits: tuple, check) -> None:
        """check() (which raises on bad data) unless these tensors passed at their current versions."""
        if not self.passed(tensors, limits):
            check()
            self.note(tensors, limits)

    def check_eager(self, tensors: tuple, limits: tuple, check) -> None:
        """check_once, except while a CUDA graph is captured (no host sync is allowed there; the ops' data checks
        are skipped under capture)."""
        if tensors[0].is_cuda and torch.cuda.is_current_stream_capturing():
            return
        self.check_once(tensors, limits, check)
