"""The 656-byte FP8 KV-cache row (DeepSeek-V3.2's format, here used for dense decode):

    bytes [0, 512)    512 e4m3 values: the latent (NoPE) channels, each divided by its group's scale
    bytes [512, 528)  4 fp32 scales, one per 128 channels, rounded up to powers of two (UE8M0 style)
    bytes [528, 656)  64 bf16 rope channels, unquantised (precision-sensitive)

Dequantised key = concat(e4m3 * scale, rope) (576 channels); V = its first 512 channels.
"""
from __future__ import annotations

import torch

from torch_deepstack.mla.checks import FP8_TOKEN_BYTES

E4M3_MAX = 448.0
GROUP = 128
LATENT = 512
ROPE = 64


def _ceil_pow2(x: torch.Tensor) -> torch.Tensor:
    bits = x.float().contiguous().view(torch.int32)
    exp = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exp << 23).view(torch.float32)


def quantize_rows(kv: torch.Tensor) -> torch.Tensor:
    """[..., 576] float -> [..., 656] uint8 rows."""
    lead = kv.shape[:-1]
    x = kv.float()
    latent = x[..., :LATENT].reshape(*lead, LATENT // GROUP, GROUP)
    amax = latent.abs().amax(dim=-1).clamp_min(1e-4)
    scale = _ceil_pow2(amax / E4M3_MAX)
    q = (latent / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    rope = x[..., LATENT:].to(torch.bfloat16)
    out = torch.empty(*lead, FP8_TOKEN_BYTES, dtype=torch.uint8, device=kv.device)
    out[..., :LATENT] = q.reshape(*lead, LATENT).view(torch.uint8)
    out[..., LATENT:LATENT + 16] = scale.contiguous().view(torch.uint8).reshape(*lead, 16)
    out[..., LATENT + 16:] = rope.contiguous().view(torch.uint8).reshape(*lead, 2 * ROPE)
    return out


def dequantize_rows(rows: torch.Tensor) -> torch.Tensor:
    """[..., 656] uint8 rows -> [..., 576] float32."""
    rows = rows.view(torch.uint8) if rows.dtype != torch.uint8 else rows
    lead = rows.shape[:-1]
    q = rows[..., :LATENT].contiguous().view(torch.float8_e4m3fn).float().reshape(*lead, LATENT // GROUP, GROUP)
    scale = rows[..., LATENT:LATENT + 16].contiguous().view(torch.float32).reshape(*lead, LATENT // GROUP, 1)
    rope = rows[..., LATENT + 16:].contiguous().view(torch.bfloat16).float()
    return torch.cat([(q * scale).reshape(*lead, LATENT), rope], dim=-1)
