"""Helpers shared by the data tests (imported by name: tests/ has no packages)."""
import numpy as np


def random_bytes_samples(n: int, max_len: int = 9000, seed: int = 0) -> list[bytes]:
    """Samples of random sizes (0 .. max_len), so offsets fall anywhere relative to 4 KiB pages and chunks."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=int(rng.integers(0, max_len)), dtype=np.uint8).tobytes() for _ in range(n)]


def as_list(batch):
    """collate_fn keeping the list of samples (importable by spawned workers, unlike a lambda)."""
    return batch


def sample_bytes(s) -> bytes:
    return bytes(s.numpy())
