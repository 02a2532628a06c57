"""DeepGEMM 1.x's `deep_gemm.jit_kernels.utils` helper names, pointing at the current ones."""
from torch_deepstack.compat.deep_gemm.gemm import get_num_sms, set_num_sms  # noqa: F401
from torch_deepstack.compat.deep_gemm.utils.layout import (  # noqa: F401
    get_col_major_tma_aligned_tensor, get_m_alignment_for_contiguous_layout, get_tma_aligned_size,
)
from torch_deepstack.compat.deep_gemm.utils.math import ceil_div  # noqa: F401
