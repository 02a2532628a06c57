"""Shared pytest setup: the `cuda` marker skips cleanly on machines without a usable NVIDIA GPU."""
import os

import pytest
import torch


def cuda_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    reason = ("needs an sm_90 NVIDIA GPU" if not torch.cuda.is_available()
              else f"needs sm_90, this GPU is sm_{''.join(map(str, torch.cuda.get_device_capability()))}")
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_jit_cache(tmp_path_factory, monkeypatch):
    # Tests compile into a per-session cache unless the caller chose one (the GPU runs reuse a warm cache).
    if "DEEPSTACK_JIT_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("DEEPSTACK_JIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "jit-cache"))
