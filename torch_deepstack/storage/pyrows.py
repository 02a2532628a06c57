"""batch_read's request parsing in C (`src/storage/pyrows.cpp`), built on first use against this Python's headers
and loaded with ctypes.PyDLL (its calls hold the GIL: it reads Python objects). It turns a list of request tuples
or ReadRequests into the int64 rows the array read path takes, at a few dozen ns per request against ~1 us for
the same loop in Python. Optional: without a compiler, Python headers, or with DEEPSTACK_PYROWS=0, `load()`
returns None and batch_read keeps its Python loop (same results either way).
"""
from __future__ import annotations

import ctypes
import os
import sys
import sysconfig
import threading

from torch_deepstack.storage import fastio

_lib = None
_tried = False
_lock = threading.Lock()
reason: str | None = None


def _open():
    src = fastio._source("pyrows.cpp")
    inc = sysconfig.get_paths().get("include")
    if src is None:
        raise RuntimeError("src/storage/pyrows.cpp not found")
    if not inc or not os.path.exists(os.path.join(inc, "Python.h")):
        raise RuntimeError("Python.h not found (install the Python development headers)")
    lib = ctypes.PyDLL(fastio._build(src, ("-I" + inc,), "pyrows"))
    lib.ds_rows_parse.argtypes = [ctypes.py_object, ctypes.c_ssize_t, ctypes.py_object, ctypes.py_object,
                                  ctypes.py_object, ctypes.py_object, ctypes.c_void_p, ctypes.c_ssize_t,
                                  ctypes.c_void_p, ctypes.py_object, ctypes.c_void_p, ctypes.c_void_p]
    lib.ds_rows_parse.restype = ctypes.c_ssize_t
    lib.ds_rows_release.argtypes = [ctypes.c_void_p]
    lib.ds_rows_release.restype = None
    lib.ds_rows_results.argtypes = [ctypes.py_object, ctypes.py_object, ctypes.c_void_p, ctypes.py_object]
    lib.ds_rows_results.restype = ctypes.py_object
    return lib


def load():
    """The PyDLL, or None (see `reason`)."""
    if _tried:
        return _lib
    return fastio.load_once(sys.modules[__name__], "DEEPSTACK_PYROWS", _open, "batch_read's C request parser",
                            "using the Python loop")


__all__ = ["load"]
