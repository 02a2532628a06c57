"""Plain-PyTorch references of the FP8 GEMM and quantisation ops, registered as their CPU kernels.

They define the ops: dequantise (fp8 value * its scale) and multiply in fp32. The CUDA kernels compute the same sum
slice by slice (tensor-core partial per 128-wide K slice, scaled and added in fp32), so they agree to fp32 rounding.
"""
from __future__ import annotations

import torch

from torch_deepstack.checks import check_eps
from torch_deepstack._library import autograd, reference, sample_inputs
from torch_deepstack.gemm import checks
from torch_deepstack.gemm.checks import FP8, cdiv, check_dual_token_quant_input, check_quant_input
from torch_deepstack.quant.reference import ceil_to_ue8m0, per_token_group_quant_fp8_ref, swiglu_f32
from torch_deepstack.quant.scale_layout import FP8_E4M3_MAX, mn_major_tma_aligned_empty


def dequant_rows(x: torch.Tensor, sf: torch.Tensor) -> torch.Tensor:
    """x [..., R, K] fp8 with sf [..., R, ceil(K/128)] per 1x128 group -> fp32."""
    k = x.shape[-1]
    return x.float() * sf.float().repeat_interleave(128, dim=-1)[..., :k]


def dequant_blocks(x: torch.Tensor, sf: torch.Tensor) -> torch.Tensor:
    """x [..., N, K] fp8 with sf [..., ceil(N/128), ceil(K/128)] per 128x128 block -> fp32."""
    n, k = x.shape[-2:]
    s = sf.float().repeat_interleave(128, dim=-2)[..., :n, :].repeat_interleave(128, dim=-1)[..., :k]
    return x.float() * s


def _finish(d, out, c, accumulate):
    if accumulate:
        out = out + d.float()
    if c is not None:
        out = out + c.float()
    d.copy_(out)


@reference("fp8_gemm_nt")
def fp8_gemm_nt_ref(a, sfa, b, sfb, d, c=None, accumulate=False):
    checks.check_dense("fp8_gemm_nt", a, sfa, b, sfb, d, c)
    _finish(d, dequant_rows(a, sfa) @ dequant_blocks(b, sfb).T, c, accumulate)


@reference("fp8_wgrad_gemm_nt")
def fp8_wgrad_gemm_nt_ref(a, sfa, b, sfb, d, c=None, accumulate=False):
    checks.check_dense("fp8_wgrad_gemm_nt", a, sfa, b, sfb, d, c, sf_b_per_row=True)
    _finish(d, dequant_rows(a, sfa) @ dequant_rows(b, sfb).T, c, accumulate)


@reference("k_grouped_fp8_wgrad_gemm_nt")
def k_grouped_fp8_wgrad_gemm_nt_ref(a, sfa, b, sfb, d, ks, c=None, accumulate=False):
    checks.check_k_grouped("k_grouped_fp8_wgrad_gemm_nt", a, sfa, b, sfb, d, ks, c)
    start = 0
    for g, k in enumerate(int(x) for x in ks):
        seg, sseg = slice(start, start + k), slice(start // 128, (start + k) // 128)
        out = dequant_rows(a[:, seg], sfa[:, sseg]) @ dequant_rows(b[:, seg], sfb[:, sseg]).T
        _finish(d[g], out, None if c is None else c[g], accumulate)
        start += k


@reference("m_grouped_fp8_gemm_nt_contiguous")
def m_grouped_contiguous_ref(a, sfa, b, sfb, d, m_indices):
    checks.check_contiguous("m_grouped_fp8_gemm_nt_contiguous", a, sfa, b, sfb, d, m_indices)
    checks.check_m_indices_values("m_grouped_fp8_gemm_nt_contiguous", m_indices, b.shape[0])
    a32 = dequant_rows(a, sfa)
    for g in range(b.shape[0]):
        rows = (m_indices == g).nonzero().flatten()
        if rows.numel():
            d[rows] = (a32[rows] @ dequant_blocks(b[g], sfb[g]).T).to(d.dtype)


@reference("m_grouped_fp8_gemm_nt_masked")
def m_grouped_masked_ref(a, sfa, b, sfb, d, masked_m, expected_m):
    checks.check_masked("m_grouped_fp8_gemm_nt_masked", a, sfa, b, sfb, d, masked_m, expected_m)
    for g in range(b.shape[0]):
        m = min(int(masked_m[g]), a.shape[1])
        if m > 0:
            d[g, :m] = (dequant_rows(a[g, :m], sfa[g, :m]) @ dequant_blocks(b[g], sfb[g]).T).to(d.dtype)


# ---- quantisation --------------------------------------------------------------------------------------------

def _scale_inv(amax, eps, ue8m0):
    amax = amax.clamp_min(check_eps("quantisation", eps))
    scale = amax / FP8_E4M3_MAX
    # Tensor / tensor (an exact IEEE division, as the kernels do): a Python scalar over a tensor is not exact.
    if ue8m0:
        scale = ceil_to_ue8m0(scale)
        return scale, torch.ones_like(scale) / scale
    return scale, torch.full_like(amax, FP8_E4M3_MAX) / amax


def per_block_quant_values(x, eps=1e-4, ue8m0=False):
    """(q [N, K] e4m3, sf [ceil(N/128), ceil(K/128)]) of a 2-D tensor, one scale per 128x128 block."""
    n, k = x.shape
    nb, kb = cdiv(n, 128), cdiv(k, 128)
    xp = torch.zeros(nb * 128, kb * 128, dtype=torch.float32, device=x.device)
    xp[:n, :k] = x.float()
    blocks = xp.view(nb, 128, kb, 128)
    scale, inv = _scale_inv(blocks.abs().amax(dim=(1, 3)), eps, ue8m0)
    q = (blocks * inv[:, None, :, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).view(nb * 128, kb * 128)[:n, :k]
    return q.to(FP8), scale


@reference("per_block_quant_fp8")
def per_block_quant_fp8_ref(x, transpose=False, eps=1e-4, scale_ue8m0=False):
    check_quant_input("per_block_quant_fp8", x)
    q, sf = per_block_quant_values(x, eps, scale_ue8m0)
    if transpose:
        return q.t().contiguous(), sf.t().contiguous()
    return q.contiguous(), sf.contiguous()


@reference("per_block_quant_fp8_dual")
def per_block_quant_fp8_dual_ref(x, eps=1e-4, scale_ue8m0=False):
    check_quant_input("per_block_quant_fp8_dual", x)
    q, sf = per_block_quant_values(x, eps, scale_ue8m0)
    # (clones: for a single block the transposed views are already contiguous and would alias the plain outputs)
    return (q.contiguous(), sf.contiguous(), q.t().clone(memory_format=torch.contiguous_format),
            sf.t().clone(memory_format=torch.contiguous_format))


def transposed_quant_empty(m: int, k: int, device):
    """q [K, M] e4m3 whose rows are padded to 16 bytes (a view of [K, align(M, 16)]) and sf [K, ceil(M/128)]
    MN-major TMA-aligned: the operand layout of the weight-gradient GEMM."""
    m_pad = (m + 15) // 16 * 16
    q = torch.empty(k, m_pad, dtype=FP8, device=device)[:, :m]
    sf = mn_major_tma_aligned_empty((k, cdiv(m, 128)), device=device)
    return q, sf


@reference("per_token_group_quant_fp8_t")
def per_token_group_quant_fp8_t_ref(x, eps=1e-4, scale_ue8m0=False):
    check_quant_input("per_token_group_quant_fp8_t", x)
    m, k = x.shape
    if m == 0 or k == 0:   # (nothing to write; an empty [K, 0] q has no padded rows to view)
        return transposed_quant_empty(m, k, x.device)
    mb = cdiv(m, 128)
    xp = torch.zeros(k, mb * 128, dtype=torch.float32, device=x.device)
    xp[:, :m] = x.float().t()
    groups = xp.view(k, mb, 128)
    scale, inv = _scale_inv(groups.abs().amax(dim=-1), eps, scale_ue8m0)
    qv = (groups * inv[..., None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).view(k, mb * 128)
    q, sf = transposed_quant_empty(m, k, x.device)
    base = q.as_strided((k, q.stride(0)), q.stride())
    base.zero_()
    q.copy_(qv[:, :m].to(FP8))
    sf.copy_(scale)
    return q, sf


# ---- opcheck samples (small: they run on CPU in CI) ----------------------------------------------------------

def _fp8(*shape, device):
    return (torch.randn(*shape, device=device) * 2).to(FP8)


def _sf(*shape, device):
    return torch.rand(*shape, device=device) * 0.01 + 0.001


@sample_inputs("fp8_gemm_nt")
def _dense_samples(device):
    out = []
    for m, n, k, dt, with_c in [(7, 200, 256, torch.bfloat16, False), (65, 144, 384, torch.float32, True),
                                (1, 16, 16, torch.bfloat16, True)]:
        a, b = _fp8(m, k, device=device), _fp8(n, k, device=device)
        sfa = mn_major_tma_aligned_empty((m, cdiv(k, 128)), device=device)
        sfa.copy_(_sf(m, cdiv(k, 128), device=device))
        d = torch.empty(m, n, dtype=dt, device=device)
        c = torch.randn(m, n, device=device, dtype=dt) if with_c else None
        out.append(((a, sfa, b, _sf(cdiv(n, 128), cdiv(k, 128), device=device), d), {"c": c}))
    return out


@sample_inputs("fp8_wgrad_gemm_nt")
def _wgrad_samples(device):
    m, n, k = 48, 80, 256
    sfa = mn_major_tma_aligned_empty((m, 2), device=device)
    sfa.copy_(_sf(m, 2, device=device))
    sfb = mn_major_tma_aligned_empty((n, 2), device=device)
    sfb.copy_(_sf(n, 2, device=device))
    d = torch.randn(m, n, device=device)
    d16 = torch.empty(m, n, device=device, dtype=torch.bfloat16)
    return [((_fp8(m, k, device=device), sfa, _fp8(n, k, device=device), sfb, d), {"accumulate": True}),
            ((_fp8(m, k, device=device), sfa, _fp8(n, k, device=device), sfb, d16), {})]


@sample_inputs("k_grouped_fp8_wgrad_gemm_nt")
def _k_grouped_samples(device):
    m, n, ks = 32, 48, [128, 0, 256]
    k = sum(ks)
    sfa = mn_major_tma_aligned_empty((m, k // 128), device=device)
    sfa.copy_(_sf(m, k // 128, device=device))
    sfb = mn_major_tma_aligned_empty((n, k // 128), device=device)
    sfb.copy_(_sf(n, k // 128, device=device))
    d = torch.randn(len(ks), m, n, device=device)
    return [((_fp8(m, k, device=device), sfa, _fp8(n, k, device=device), sfb, d, ks), {"accumulate": True})]


@sample_inputs("m_grouped_fp8_gemm_nt_contiguous")
def _contiguous_samples(device):
    g, n, k = 3, 96, 256
    sizes = [100, 0, 30]
    ids = []
    for i, s in enumerate(sizes):
        pad = cdiv(s, 128) * 128
        ids += [i] * s + [-1] * (pad - s)
    m = len(ids)
    sfa = mn_major_tma_aligned_empty((m, 2), device=device)
    sfa.copy_(_sf(m, 2, device=device))
    d = torch.zeros(m, n, dtype=torch.bfloat16, device=device)
    return [((_fp8(m, k, device=device), sfa, _fp8(g, n, k, device=device), _sf(g, 1, 2, device=device), d,
              torch.tensor(ids, dtype=torch.int32, device=device)), {})]


@sample_inputs("m_grouped_fp8_gemm_nt_masked")
def _masked_samples(device):
    g, m, n, k = 3, 40, 64, 128
    sfa = mn_major_tma_aligned_empty((g, m, 1), device=device)
    sfa.copy_(_sf(g, m, 1, device=device))
    d = torch.zeros(g, m, n, dtype=torch.bfloat16, device=device)
    masked = torch.tensor([40, 0, 17], dtype=torch.int32, device=device)
    return [((_fp8(g, m, k, device=device), sfa, _fp8(g, n, k, device=device), _sf(g, 1, 1, device=device), d,
              masked, 24), {})]


@sample_inputs("per_block_quant_fp8")
def _block_quant_samples(device):
    return [((torch.randn(200, 272, device=device, dtype=torch.bfloat16) * 3,), {"transpose": t, "scale_ue8m0": u})
            for t, u in ((False, False), (True, True))] + \
           [((torch.randn(128, 128, device=device),), {})]


@reference("per_token_group_quant_fp8_dual")
def per_token_group_quant_fp8_dual_ref(x, eps=1e-4, scale_ue8m0=False):
    check_dual_token_quant_input("per_token_group_quant_fp8_dual", x)
    x = x if x.stride(-1) == 1 else x.contiguous()
    return (*per_token_group_quant_fp8_ref(x, 128, eps, scale_ue8m0),
            *per_token_group_quant_fp8_t_ref(x, eps, scale_ue8m0))


@sample_inputs("per_token_group_quant_fp8_dual")
def _dual_token_quant_samples(device):
    return [((torch.randn(130, 256, device=device, dtype=torch.bfloat16) * 3,), {}),
            ((torch.randn(256, 128, device=device),), {"scale_ue8m0": True})]


@sample_inputs("per_block_quant_fp8_dual")
def _dual_block_quant_samples(device):
    return [((torch.randn(200, 272, device=device, dtype=torch.bfloat16) * 3,), {}),
            ((torch.randn(256, 384, device=device, dtype=torch.bfloat16),), {"scale_ue8m0": True}),
            ((torch.randn(128, 128, device=device),), {})]


@sample_inputs("per_token_group_quant_fp8_t")
def _t_quant_samples(device):
    return [((torch.randn(130, 48, device=device, dtype=torch.bfloat16) * 3,), {}),
            ((torch.randn(256, 32, device=device),), {"scale_ue8m0": True})]


@reference("moe_combine")
def moe_combine_ref(y, rows, weights, check_rows=True):
    """out[t] = sum_c weights[t, c] * y[rows[t, c]] over slots with rows >= 0, in fp32, rounded once to y's dtype."""
    checks.check_moe_combine("moe_combine", y, rows, weights)
    if check_rows:
        checks.check_moe_rows("moe_combine", rows, y.shape[0])
    r = rows.long()
    valid = r >= 0
    picked = y[r.clamp(min=0)].float()                                  # [T, k, hidden]
    w = torch.where(valid, weights, 0.0).unsqueeze(-1)
    return torch.where(valid.unsqueeze(-1), picked * w, 0.0).sum(1).to(y.dtype)


def moe_rows_inverse(rows: torch.Tensor, weights: torch.Tensor, num_rows: int):
    """For each row of y, the token whose slot reads it (-1: none) and that slot's weight: the gather form of
    moe_combine's gradient, so its backward is itself a moe_combine with one slot per row."""
    t, k = rows.shape
    r = rows.reshape(-1).long()
    valid = r >= 0
    dst = torch.where(valid, r, num_rows)                              # empty slots land in a spare entry
    token = torch.arange(t * k, device=rows.device) // k
    src = torch.full((num_rows + 1,), -1, dtype=torch.int64, device=rows.device).index_put_((dst,), token)
    w = torch.zeros(num_rows + 1, dtype=torch.float32, device=rows.device).index_put_((dst,), weights.reshape(-1))
    return src[:num_rows, None], w[:num_rows, None]


def _moe_combine_setup(ctx, inputs, output):
    y, rows, weights, _ = inputs
    ctx.save_for_backward(y, rows, weights)


def _moe_combine_backward(ctx, grad):
    y, rows, weights = ctx.saved_tensors
    grad = grad.to(y.dtype).contiguous()
    grad_y = grad_w = None
    if ctx.needs_input_grad[0]:   # y's row r: the weight of the slot that read it times that token's gradient
        src, w = moe_rows_inverse(rows, weights, y.shape[0])
        grad_y = torch.ops.deepstack.moe_combine(grad, src, w, False)
    if ctx.needs_input_grad[2]:   # weights[t, c]: <grad[t], y[rows[t, c]]> in fp32, 0 for empty slots
        grad_w = torch.ops.deepstack.moe_combine_weight_grad(grad, y, rows)
    return grad_y, None, grad_w, None


autograd("moe_combine", _moe_combine_backward, _moe_combine_setup)


@sample_inputs("moe_combine")
def _moe_combine_samples(device):
    gen = torch.Generator().manual_seed(0)
    out = []
    for m, t, k, hidden, dtype in ((37, 11, 3, 72, torch.bfloat16), (20, 6, 2, 13, torch.float32),
                                   (9, 4, 2, 8, torch.float16)):
        perm = torch.randperm(m, generator=gen)[:t * k].view(t, k)
        rows = torch.where(torch.rand(t, k, generator=gen) < 0.2, -1, perm)
        y = torch.randn(m, hidden, generator=gen).to(dtype).to(device).requires_grad_(dtype == torch.float32)
        w = torch.rand(t, k, generator=gen).to(device).requires_grad_(dtype == torch.float32)
        out.append(((y, rows.to(device), w), {}))
    out.append(((out[0][0][0], out[0][0][1].int(), out[0][0][2]), {"check_rows": False}))
    return out


@reference("moe_combine_weight_grad")
def moe_combine_weight_grad_ref(grad, y, rows):
    """moe_combine's gradient for weights: out[t, c] = <grad[t], y[rows[t, c]]> in fp32, 0 where rows[t, c] < 0."""
    checks.check_moe_combine_weight_grad("moe_combine_weight_grad", grad, y, rows)
    checks.check_moe_rows_range("moe_combine_weight_grad", rows, y.shape[0])
    r = rows.long()
    picked = y[r.clamp(min=0)].float()                                  # [T, k, hidden]
    return torch.where(r >= 0, (picked @ grad.float().unsqueeze(-1)).squeeze(-1), 0.0)


@sample_inputs("moe_combine_weight_grad")
def _moe_combine_weight_grad_samples(device):
    out = []
    for (y, rows, _), _kw in _moe_combine_samples(device)[:3]:
        grad = torch.randn(rows.shape[0], y.shape[1]).to(y.dtype).to(device)
        out.append(((grad, y.detach(), rows), {}))
    return out


@reference("swiglu")
def swiglu_ref(h):
    """silu(gate) * up of h = [gate | up], in fp32, rounded once to h's dtype."""
    checks.check_swiglu("swiglu", h)
    return swiglu_f32(h).to(h.dtype)


@reference("swiglu_backward")
def swiglu_backward_ref(grad, h):
    """swiglu's gradient as one [rows, 2F] tensor: (grad * up * silu'(gate) | grad * silu(gate)), in fp32."""
    checks.check_swiglu("swiglu_backward", h, grad)
    f = h.shape[1] // 2
    gate, up, g = h[:, :f].float(), h[:, f:].float(), grad.float()
    sig = torch.sigmoid(gate)
    return torch.cat([g * up * sig * (1 + gate * (1 - sig)), g * gate * sig], dim=1).to(h.dtype)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_grad(ctx, grad):
    h, = ctx.saved_tensors
    return torch.ops.deepstack.swiglu_backward(grad.contiguous(), h)


autograd("swiglu", _swiglu_grad, _swiglu_setup)


@sample_inputs("swiglu")
def _swiglu_samples(device):
    return [((torch.randn(37, 2 * 136, device=device, dtype=torch.bfloat16),), {}),
            ((torch.randn(5, 2 * 7, device=device, requires_grad=True),), {}),
            ((torch.randn(9, 48, device=device, dtype=torch.float16)[:, :32],), {})]


@sample_inputs("swiglu_backward")
def _swiglu_backward_samples(device):
    return [((torch.randn(37, 136, device=device, dtype=torch.bfloat16),
              torch.randn(37, 2 * 136, device=device, dtype=torch.bfloat16)), {}),
            ((torch.randn(5, 7, device=device), torch.randn(5, 14, device=device)), {})]
