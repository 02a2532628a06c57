"""The launch signatures in ep/intranode.py and ep/ipc.py match the kernels' parameter lists in src/ep (checked
on the CPU: a mismatch would otherwise first show as a launch error on the GPU)."""
import re
from pathlib import Path

import pytest

from torch_deepstack.ep import intranode, ipc

SRC = Path(__file__).resolve().parents[2] / "src" / "ep"


def _param_count(header: str, name: str) -> int:
    text = (SRC / header).read_text()
    m = re.search(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?" + name + r"\s*\(", text)
    assert m, f"{name} not found in src/ep/{header}"
    depth, i, commas = 1, m.end(), 0
    while depth:
        c = text[i]
        depth += c == "(" or -(c == ")")
        commas += c == "," and depth == 1
        i += 1
    body = text[m.end():i - 1].strip()
    return commas + 1 if body else 0


@pytest.mark.parametrize("name", sorted(intranode._SIG))
def test_fused_kernel_signatures(name):
    header = "low_latency.cuh" if name.startswith("ll_") else "intranode.cuh"
    assert len(intranode._SIG[name].replace(" ", "")) == _param_count(header, name)


def test_barrier_kernel_signature():
    assert len(ipc._SIGNATURE) == _param_count("ipc_barrier.cuh", "ipc_barrier_kernel")
