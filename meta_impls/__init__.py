"""Fake (meta) implementations of every deepstack op, one module per area.

Installed as `torch_deepstack.meta_impls`. Fakes use only torch ops and `torch._check`: no data access and no
device queries, so FakeTensor tracing, torch.compile and torch.export work on any machine.
"""
from torch_deepstack.meta_impls import quant  # noqa: F401
from torch_deepstack.meta_impls import gemm  # noqa: F401
from torch_deepstack.meta_impls import ep  # noqa: F401
from torch_deepstack.meta_impls import mla  # noqa: F401
from torch_deepstack.meta_impls import compile  # noqa: F401,E402
