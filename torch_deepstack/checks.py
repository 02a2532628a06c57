"""Argument checks shared by every area's CUDA glue: clear Python errors naming the argument, never a CUDA crash."""
from __future__ import annotations

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
