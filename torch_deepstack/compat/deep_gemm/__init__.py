"""DeepGEMM's Python API on top of torch_deepstack's FP8 GEMM ops: code written against DeepGEMM runs by changing
one import (`from torch_deepstack.compat import deep_gemm`).

Covered (SM90 semantics, fp32 scales):
  - 2.x GEMMs: `fp8_gemm_nt`, `m_grouped_fp8_gemm_nt_contiguous` (per-row ids or the psum layout),
    `m_grouped_fp8_gemm_nt_masked` (also as `fp8_m_grouped_gemm_nt_masked`), `k_grouped_fp8_gemm_nt_contiguous`
    and `k_grouped_fp8_gemm_tn_contiguous` (DeepGEMM's layouts; see `k_grouped`);
  - 1.x GEMMs: `gemm_fp8_fp8_bf16_nt`, `m_grouped_gemm_fp8_fp8_bf16_nt_{contiguous,masked}`,
    `wgrad_gemm_fp8_fp8_fp32_nt`, `k_grouped_wgrad_gemm_fp8_fp8_fp32_nt`;
  - the helpers of `deep_gemm.utils` (also at the top level), `deep_gemm.testing` and 1.x's
    `deep_gemm.jit_kernels.utils`.
Operands are (data, scales) pairs and D is written in place, as in DeepGEMM. Differences are listed in
docs/gemm.md ("DeepGEMM compatibility").
"""
from torch_deepstack.compat.deep_gemm import jit_kernels, testing, utils  # noqa: F401  (submodules)
from torch_deepstack.compat.deep_gemm.gemm import (  # noqa: F401
    fp8_gemm_nn, fp8_gemm_nt, fp8_gemm_tn, fp8_gemm_tt, fp8_m_grouped_gemm_nt_masked, gemm_fp8_fp8_bf16_nt,
    get_num_sms, m_grouped_fp8_gemm_nn_contiguous, m_grouped_fp8_gemm_nt_contiguous, m_grouped_fp8_gemm_nt_masked,
    m_grouped_gemm_fp8_fp8_bf16_nt_contiguous, m_grouped_gemm_fp8_fp8_bf16_nt_masked, set_num_sms,
    wgrad_gemm_fp8_fp8_fp32_nt,
)
from torch_deepstack.compat.deep_gemm.k_grouped import (  # noqa: F401
    k_grouped_fp8_gemm_nt_contiguous, k_grouped_fp8_gemm_tn_contiguous, k_grouped_wgrad_gemm_fp8_fp8_fp32_nt,
)
from torch_deepstack.compat.deep_gemm.testing import bench, bench_kineto, calc_diff  # noqa: F401  (1.x top level)
from torch_deepstack.compat.deep_gemm.utils import *  # noqa: F401,F403
from torch_deepstack.compat.deep_gemm.utils import __all__ as _utils_all

__all__ = [
    "fp8_gemm_nt", "fp8_gemm_nn", "fp8_gemm_tn", "fp8_gemm_tt", "m_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_fp8_gemm_nn_contiguous", "m_grouped_fp8_gemm_nt_masked", "fp8_m_grouped_gemm_nt_masked",
    "k_grouped_fp8_gemm_nt_contiguous",
    "k_grouped_fp8_gemm_tn_contiguous", "gemm_fp8_fp8_bf16_nt", "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous",
    "m_grouped_gemm_fp8_fp8_bf16_nt_masked", "wgrad_gemm_fp8_fp8_fp32_nt", "k_grouped_wgrad_gemm_fp8_fp8_fp32_nt",
    "set_num_sms", "get_num_sms", "bench", "bench_kineto", "calc_diff", "utils", "testing", "jit_kernels",
    *_utils_all,
]
