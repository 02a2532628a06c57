"""Plain-PyTorch references of the quantisation ops, registered as their CPU kernels (the spec and CI oracle)."""
from __future__ import annotations

import torch

from torch_deepstack.checks import check_eps
from torch_deepstack._library import reference, sample_inputs
from torch_deepstack.quant.checks import check_group_quant_input, check_swiglu_quant_input
from torch_deepstack.quant.scale_layout import FP8_E4M3_MAX, mn_major_tma_aligned_empty


def ceil_to_ue8m0(s: torch.Tensor, clamp_exponent: bool = False) -> torch.Tensor:
    """Round positive fp32 scales up to a power of two (the UE8M0 format), exactly, on the bits: bump the
    exponent when any mantissa bit is set. clamp_exponent keeps the biased exponent in [1, 254] (DeepGEMM's
    helper: 0 and denormals -> 2^-126, inf -> 2^127, so a scale is never 0 or inf)."""
    bits = s.float().contiguous().view(torch.int32)
    exp = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    if clamp_exponent:
        exp = exp.clamp(1, 254)
    return (exp << 23).view(torch.float32)


def group_quant_fp8_values(x: torch.Tensor, group_size: int, eps: float, scale_ue8m0: bool):
    """(q [..., K] e4m3, scales [..., K // group_size] fp32, row-major). Shared by the reference kernels."""
    eps = check_eps("quantisation", eps)
    *lead, k = x.shape
    xg = x.float().reshape(*lead, k // group_size, group_size)
    amax = xg.abs().amax(dim=-1).clamp_min(eps)
    scale = amax / FP8_E4M3_MAX
    if scale_ue8m0:
        scale = ceil_to_ue8m0(scale)
    # Multiply by the inverse scale, computed once per group in fp32 exactly as the CUDA kernel does:
    # 448 / amax for plain scales (DeepGEMM's convention), 1 / scale for power-of-two ones (exact).
    # (Tensor / Tensor: `448 / t` would be computed as reciprocal(t) * 448, rounding twice.)
    inv = torch.ones_like(scale) / scale if scale_ue8m0 else torch.full_like(amax, FP8_E4M3_MAX) / amax
    q = (xg * inv.unsqueeze(-1)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return q.reshape(*lead, k).to(torch.float8_e4m3fn), scale


@reference("per_token_group_quant_fp8")
def per_token_group_quant_fp8_ref(x: torch.Tensor, group_size: int = 128, eps: float = 1e-4,
                                  scale_ue8m0: bool = False):
    check_group_quant_input(x, group_size, "per_token_group_quant_fp8")
    q, scale = group_quant_fp8_values(x, group_size, eps, scale_ue8m0)
    out_scale = mn_major_tma_aligned_empty(scale.shape, device=x.device)
    out_scale.copy_(scale)
    return q.contiguous(), out_scale


@sample_inputs("per_token_group_quant_fp8")
def _samples(device):
    out = []
    for shape, dtype, gs, ue8m0 in [((7, 256), torch.bfloat16, 128, False), ((1, 128), torch.float32, 128, False),
                                    ((3, 5, 384), torch.bfloat16, 128, True), ((2, 130, 128), torch.float32, 128, False), ((65, 512), torch.float16, 64, False)]:
        x = torch.randn(shape, device=device, dtype=dtype) * 3
        out.append(((x,), {"group_size": gs, "scale_ue8m0": ue8m0}))
    return out


def swiglu_f32(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of h = [gate | up] (along the last dim), in fp32: what the SwiGLU kernels compute."""
    f = h.shape[-1] // 2
    hf = h.float()
    return torch.nn.functional.silu(hf[..., :f]) * hf[..., f:]


@reference("swiglu_quant_fp8")
def swiglu_quant_fp8_ref(h: torch.Tensor, eps: float = 1e-4, scale_ue8m0: bool = False):
    """silu(gate) * up in fp32 (h = [gate | up] along the last dim), quantised per 1x128 group as
    per_token_group_quant_fp8 quantises: (q [..., F] e4m3, scales [..., F / 128] MN-major)."""
    check_swiglu_quant_input(h, "swiglu_quant_fp8")
    q, scale = group_quant_fp8_values(swiglu_f32(h), 128, eps, scale_ue8m0)
    out_scale = mn_major_tma_aligned_empty(scale.shape, device=h.device)
    out_scale.copy_(scale)
    return q.contiguous(), out_scale


@sample_inputs("swiglu_quant_fp8")
def _swiglu_samples(device):
    return [((torch.randn(37, 512, device=device, dtype=torch.bfloat16) * 3,), {}),
            ((torch.randn(2, 5, 256, device=device),), {"scale_ue8m0": True}),
            ((torch.randn(9, 768, device=device, dtype=torch.float16)[:, :512],), {})]
