"""Registry of kernel specialisations worth compiling ahead of time (`deepstack jit prebuild`).

Each area registers a function returning the KernelSpecs its common shapes need, e.g. the FP8 GEMM registers the
DeepSeek-V3 projection shapes. Prebuilding compiles them in parallel into the disk cache, so the first training
or serving step does not pay nvcc's seconds.
"""
from __future__ import annotations

from typing import Callable, Iterable

_PREBUILD: dict[str, Callable[[], Iterable]] = {}


def register_prebuild(area: str):
    def deco(fn):
        _PREBUILD[area] = fn
        return fn
    return deco


def prebuild_specs(areas: Iterable[str] | None = None) -> list:
    import torch_deepstack  # noqa: F401  (areas register on import)
    names = list(areas) if areas else sorted(_PREBUILD)
    unknown = [a for a in names if a not in _PREBUILD]
    if unknown:
        raise KeyError(f"no prebuild list for {unknown}; known areas: {sorted(_PREBUILD)}")
    specs = []
    for a in names:
        specs.extend(_PREBUILD[a]())
    return list(dict.fromkeys(specs))
