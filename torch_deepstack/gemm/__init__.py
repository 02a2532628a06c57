"""FP8 GEMM with fine-grained scaling (DeepGEMM's job) for sm_90a, as torch.ops.deepstack ops.

Ops (D is written in place; the Python functions below allocate it):
  fp8_gemm_nt                        D = C + A @ B.T, A 1x128 scales, B 128x128 block scales, bf16/fp32 out
  m_grouped_fp8_gemm_nt_contiguous   MoE prefill: rows grouped by a per-row group id (-1 = padding)
  m_grouped_fp8_gemm_nt_masked       MoE decode: [G, M_max, K] with device-side valid-row counts
  fp8_wgrad_gemm_nt                  weight gradient: 1x128 scales on both operands, fp32 accumulate, fp32/bf16 out
  k_grouped_fp8_wgrad_gemm_nt        MoE weight gradient: one K segment per expert
  per_block_quant_fp8                weights -> e4m3 + 128x128 scales (optionally transposed)
  per_block_quant_fp8_dual           both orientations in one pass (FP8Linear's forward and dgrad operands)
  per_token_group_quant_fp8_t        activations/gradients -> transposed e4m3 + 1x128 scales along M
  per_token_group_quant_fp8_dual     per-token 1x128 and the transposed layout in one pass (x and dy in FP8Linear)
  moe_combine                        MoE combine: each token's expert rows, weighted, summed in fp32
  moe_combine_weight_grad            its routing-weight gradient (one dot product per token and slot)
  swiglu / swiglu_backward           silu(gate) * up of h = [gate | up] and its gradient, each one pass in fp32
(per-token 1x128 quantisation is torch_deepstack.quant.per_token_group_quant_fp8.)
`FP8Linear` is an nn.Module whose forward, dgrad and wgrad all run through these ops; `FP8Experts` runs a layer of
MoE expert MLPs as grouped FP8 GEMMs (forward and backward). See docs/gemm.md.
"""
from torch_deepstack.gemm import reference, kernels  # noqa: F401  (register the CPU and CUDA faces)
from torch_deepstack.gemm.api import (  # noqa: F401
    fp8_gemm_nt,
    fp8_wgrad_gemm_nt,
    k_grouped_fp8_wgrad_gemm_nt,
    m_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_contiguous_offsets,
    m_grouped_fp8_gemm_nt_masked,
    m_indices_from_offsets,
    moe_combine,
    swiglu,
    per_block_quant_fp8,
    per_block_quant_fp8_dual,
    per_token_group_quant_fp8_dual,
    per_token_group_quant_fp8_t,
)
from torch_deepstack.gemm.kernels import set_num_sms  # noqa: F401
from torch_deepstack.gemm.layout import get_mn_major_tma_aligned_tensor  # noqa: F401
from torch_deepstack.gemm.linear import FP8Linear  # noqa: F401
from torch_deepstack.gemm.experts import FP8Experts  # noqa: F401
