"""DeepGEMM's `deep_gemm.testing`: timing (`bench`, `bench_kineto`), accuracy (`calc_diff`), traffic
(`count_bytes`) and `get_arch_major`."""
import torch

from torch_deepstack.compat.deep_gemm.testing import numeric  # noqa: F401
# (the function `bench` shadows the submodule of that name as an attribute, as in DeepGEMM)
from torch_deepstack.compat.deep_gemm.testing.bench import bench, bench_kineto  # noqa: F401
from torch_deepstack.compat.deep_gemm.testing.numeric import calc_diff, count_bytes  # noqa: F401

__all__ = ["bench", "bench_kineto", "calc_diff", "count_bytes", "get_arch_major"]


def get_arch_major() -> int:
    """The current GPU's compute-capability major (9 on H100/H200)."""
    return torch.cuda.get_device_capability()[0]
