"""CRC32C (Castagnoli), the checksum 3FS keeps per chunk.

The `crc32c` package (a pyproject dependency) uses SSE4.2/ARMv8 instructions; the table-driven fallback below
keeps the stack importable without it, at a speed only good enough for tests.
"""
from __future__ import annotations

try:
    from crc32c import crc32c as _hw_crc32c
except ImportError:  # pragma: no cover - exercised only where the wheel is missing
    _hw_crc32c = None

_POLY = 0x82F63B78
_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ _POLY if _c & 1 else _c >> 1
    _TABLE.append(_c)


def _py_crc32c(data, value: int = 0) -> int:
    crc = value ^ 0xFFFFFFFF
    table = _TABLE
    for b in memoryview(data).cast("B"):
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def crc32c(data, value: int = 0) -> int:
    """CRC32C of `data` (any buffer), continuing from `value`."""
    if _hw_crc32c is not None:
        return _hw_crc32c(data, value)
    return _py_crc32c(data, value)


HARDWARE = _hw_crc32c is not None
