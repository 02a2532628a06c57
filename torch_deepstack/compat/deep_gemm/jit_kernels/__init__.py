"""DeepGEMM 1.x's `deep_gemm.jit_kernels`: only its `utils` helpers (1.x test code imports them from there);
the JIT machinery itself has no counterpart (torch_deepstack compiles its kernels in torch_deepstack.jit)."""
from torch_deepstack.compat.deep_gemm.jit_kernels import utils  # noqa: F401
