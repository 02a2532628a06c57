"""Drop-in modules with upstream Python APIs: change one import, keep the code.

    from torch_deepstack.compat import deep_ep      # instead of: import deep_ep

Submodules load lazily (importing this package imports none of them).
"""
import importlib

_SUBMODULES = ("deep_ep", "deep_gemm", "flash_mla")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
