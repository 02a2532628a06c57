"""batch_read's request parsing in C (`src/storage/pyrows.cpp`), built on first use against this Python's headers
and loaded with ctypes.PyDLL (its calls hold the GIL: it reads Python objects). It turns a list of request tuples
or ReadRequests into the int64 rows the array read path takes, at a few dozen ns per request against ~1 us for
the same loop in Python. Optional: without a compiler, Python headers, or with DEEPSTACK_PYROWS=0, `load()`
returns None and batch_read keeps its Python loop (same results either way).
"""
from __future__ import annotations

import ctypes
import logging
import os
import sysconfig
import threading

from torch_deepstack.storage import fastio

log = logging.getLogger("torch_deepstack.storage")

_lib = None
_tried = False
_lock = threading.Lock()
reason: str | None = None


def load():
    """The PyDLL, or None (see `reason`)."""
    global _lib, _tried, reason
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            if os.environ.get("DEEPSTACK_PYROWS", "1") == "0":
                raise RuntimeError("disabled by DEEPSTACK_PYROWS=0")
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
            _lib = lib
        except Exception as e:  # noqa: BLE001 - any failure means: keep the Python loop
            reason = str(e)
            log.info("batch_read's C request parser unavailable (%s); using the Python loop", reason)
            _lib = None
        _tried = True
        return _lib


__all__ = ["load"]
