"""FP8 quantisation ops (the DeepSeek-V3 recipe: e4m3 values, fp32 scales = amax / 448).

`per_token_group_quant_fp8` quantises activations per 1x`group_size` group along the last dim and returns the
scales in the MN-major, TMA-aligned layout the FP8 GEMM kernels read (see `scale_layout`); `swiglu_quant_fp8`
quantises a SwiGLU activation silu(gate) * up the same way, in the same pass that computes it.
"""
from torch_deepstack.quant import reference, kernels  # noqa: F401  (register the CPU and CUDA faces)
from torch_deepstack.quant.scale_layout import (  # noqa: F401
    FP8_E4M3_MAX,
    mn_major_tma_aligned_empty,
    tma_aligned_size,
)
from torch_deepstack.quant.api import per_token_group_quant_fp8, swiglu_quant_fp8  # noqa: F401
