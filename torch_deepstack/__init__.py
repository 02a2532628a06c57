"""torch_deepstack: DeepSeek-style training and serving infrastructure as PyTorch ops.

Importing the package defines every `torch.ops.deepstack.*` op with its CPU reference kernel, its fake
(meta) implementation and, where one exists, its CUDA kernel. CUDA kernels compile on first use
(`torch_deepstack.jit`), so importing needs neither a GPU nor nvcc.
"""
from torch_deepstack import _library
from torch_deepstack._library import DeviceNotSupportedError

_library.define_all()

# Areas register their reference and CUDA faces; meta_impls registers the fakes.
from torch_deepstack import quant  # noqa: E402,F401
from torch_deepstack import gemm  # noqa: E402,F401
from torch_deepstack import ep  # noqa: E402,F401
from torch_deepstack import mla  # noqa: E402,F401
from torch_deepstack import data  # noqa: E402,F401  (storage-backed datasets; no ops)
from torch_deepstack.compile import fp8_linear  # noqa: E402,F401  (the op; passes load lazily)
from torch_deepstack._meta_loader import load_meta_impls  # noqa: E402

meta_impls = load_meta_impls()

_library.finalize()

__version__ = "0.1.0"
__all__ = ["DeviceNotSupportedError", "__version__"]
