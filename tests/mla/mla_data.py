"""Shared data builders and the FlashMLA-style accuracy check for the MLA tests (CPU and CUDA)."""
from __future__ import annotations

import dataclasses
import math

import torch

from tests.helpers import calc_diff
from torch_deepstack.mla import fp8_format, get_mla_metadata, mla_decode_with_kvcache
from torch_deepstack.mla.reference import mla_decode_fp32

PAGE = 64


def make_case(b, s_q, h_q, h_kv, d, dtype, seqlens, *, fp8=False, device="cpu", seed=0, extra_blocks=3):
    """q, cache, shuffled block table and seqlens; every cache slot no request uses holds NaN."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(1, max((s + PAGE - 1) // PAGE for s in seqlens))
    num_blocks = b * max_blocks + extra_blocks
    bt = torch.randperm(num_blocks, generator=g)[: b * max_blocks].reshape(b, max_blocks).to(torch.int32)
    k = (torch.randn(num_blocks, PAGE, h_kv, 576 if fp8 else d, generator=g) / 10).clamp(-1, 1)
    q = (torch.randn(b, s_q, h_q, d, generator=g) / 10).clamp(-1, 1).to(dtype)
    cache = fp8_format.quantize_rows(k) if fp8 else k.to(dtype)
    valid = torch.zeros(num_blocks, PAGE, dtype=torch.bool)
    for i, s in enumerate(seqlens):
        flat = torch.arange(s)
        valid[bt[i, flat // PAGE].long(), flat % PAGE] = True
    if fp8:
        cache[~valid] = 0xFF          # NaN e4m3, NaN scales, NaN bf16 rope
    else:
        cache[~valid] = float("nan")
    seq = torch.tensor(seqlens, dtype=torch.int32)
    return q.to(device), cache.to(device), bt.to(device), seq.to(device)


def varied_lengths(b, mean, s_q=1, seed=0, zeros=()):
    g = torch.Generator().manual_seed(seed)
    lens = (torch.randn(b, generator=g) * mean / 2 + mean).clamp_min(s_q).long().tolist()
    for z in zeros:
        lens[z] = 0
    return lens


def assert_mla_close(out, lse, ref_out, ref_lse, atol=8e-4, rtol=2.01 / 128, cos=5e-6, lse_rtol=8.01 / 65536):
    out, lse = out.float().cpu(), lse.float().cpu()
    ref_out, ref_lse = ref_out.float().cpu(), ref_lse.float().cpu()
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert not out.isnan().any(), "NaN in out"
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "lse +inf positions differ"
    assert not lse.isnan().any(), "NaN in lse"
    err = (out - ref_out).abs()
    ok = (err <= atol) | (err <= rtol * ref_out.abs())
    assert bool(ok.all()), f"out: {int((~ok).sum())} elements off, max abs err {float(err.max()):.3g}"
    d = calc_diff(out, ref_out)
    assert d < cos, f"out cosine diff {d:.3g} >= {cos}"
    fin = torch.isfinite(ref_lse)
    lerr = (lse[fin] - ref_lse[fin]).abs()
    lok = (lerr <= 1e-6) | (lerr <= lse_rtol * ref_lse[fin].abs())
    assert bool(lok.all()), f"lse: {int((~lok).sum())} off, max err {float(lerr.max()) if lerr.numel() else 0:.3g}"
    empty = torch.isinf(ref_lse)   # rows with no keys: out must be exactly 0
    if empty.any():
        rows = empty.permute(0, 2, 1)  # [b, s_q, h_q]
        assert float(out[rows].abs().max()) == 0.0


def default_scale(d):
    return 1.0 / math.sqrt(d)


def decode_and_reference(q, cache, bt, seq, causal, fp8=False, parts=0):
    """One mla_decode_with_kvcache call (metadata for q's rows per KV head, `parts` SM parts; 0: the device's) and
    the fp32 reference on the same inputs: (out, lse, ref_out in q's dtype, ref_lse)."""
    s_q, h_q, d = q.shape[1], q.shape[2], q.shape[3]
    h_kv = cache.shape[2]
    sched, splits = get_mla_metadata(seq, s_q * h_q // h_kv, h_kv, num_sm_parts=parts)
    out, lse = mla_decode_with_kvcache(q, cache, bt, seq, 512, sched, splits, causal=causal, is_fp8_kvcache=fp8)
    if out.is_cuda:
        torch.cuda.synchronize()
    ref_out, ref_lse = mla_decode_fp32(q.cpu(), cache.cpu(), bt.cpu(), seq.cpu(), d ** -0.5, causal, fp8)
    return out, lse, ref_out.to(q.dtype), ref_lse


def add_kernel_defines(monkeypatch, defines, applies=lambda kernel_name: True):
    """Compile the MLA kernels whose name `applies` to with extra -D defines ((NAME, VALUE), ...) for this test:
    the switches the kernels keep for A/B runs (benchmarks/ab_mla.py does the same)."""
    from torch_deepstack.mla import kernels
    real = kernels.get_kernel

    def get_kernel(spec, signature):
        if applies(spec.kernel):
            spec = dataclasses.replace(spec, defines=tuple(spec.defines) + tuple(defines))
        return real(spec, signature)
    monkeypatch.setattr(kernels, "get_kernel", get_kernel)
