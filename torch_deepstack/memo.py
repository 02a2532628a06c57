"""BoundedMemo: the host-side caches of per-call work (tensor maps, packed launches, per-layout plans and checks)."""
from __future__ import annotations


class BoundedMemo(dict):
    """A dict that forgets everything once it holds `limit` entries: its entries are cheap to rebuild, and a
    long-running process that keeps seeing new shapes or addresses must not grow without bound."""

    def __init__(self, limit: int = 4096):
        super().__init__()
        self.limit = limit

    def remember(self, key, value):
        if len(self) >= self.limit:
            self.clear()
        self[key] = value
        return value


def operand_key(t):
    """What a memoised launch depends on of a tensor operand: its address and layout (None for an absent one)."""
    return None if t is None else (t.data_ptr(), t.shape, t.stride(), t.dtype)
