"""FP8Experts: a layer of MoE expert MLPs run as grouped FP8 GEMMs, in place of a Python loop over experts.

    experts = FP8Experts(num_experts=8, d_model=1024, d_ff=512)        # SwiGLU experts: down(silu(gate(x)) * up(x))
    y = experts(x, topk_idx, topk_weights)                             # x [T, d], topk_* [T, k]; idx -1 = no expert
    y = experts.forward_masked(recv, masked_m, expected_m)            # decode: low-latency dispatch's layout

What a call does (every product a `m_grouped_fp8_gemm_nt_contiguous`, DeepSeek-V3 recipe as in FP8Linear):
  1. the (token, slot) pairs are sorted by expert and each expert's rows padded to a multiple of 128 (the contiguous
     layout; padding rows carry group id -1, which the kernel skips). Inference quantises x once per token and
     gathers the FP8 rows (per-token 1x128 scaling is row-local, so this equals quantising the gathered rows);
     training gathers the bf16 rows (zero padding), which its weight gradient needs quantised along M;
  2. h = x_rows @ W_in[e].T for all experts in one grouped GEMM, act = silu(gate) * up (or silu(h) ungated);
  3. y_rows = act @ W_out[e].T in a second grouped GEMM; each token's output is the sum of its rows times their
     routing weights, in fp32 (`moe_combine`: one read per row, no scatter-add).
Backward: the data gradients are grouped GEMMs with each expert's weight transposed (quantised per 128x128 block),
the weight gradients one k-grouped wgrad GEMM per weight (each expert's rows a K segment, fp32 accumulation); the
combine's and the gather's gradients are `moe_combine` gathers too.
Master weights stay in their dtype; their FP8 copies (both orientations) are cached per weight version.
Eager calls read the per-expert row counts on the host (one sync per call, as DeepEP's normal mode has): to check
the expert ids and to size the padded layout exactly; the weight gradient needs them too (its K segments). Under
CUDA-graph capture or torch.compile (inference only) nothing is read back: the layout is sized for the worst case
on the device (T * k + G * 127 rows, rounded up to 128; the GEMMs skip the unused blocks) and ids are not checked.
Constraints: d_model and d_ff multiples of 128.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torch_deepstack.gemm import api, checks
from torch_deepstack.gemm.linear import FrozenFP8Weights, _capturing, _WeightCache
from torch_deepstack.quant.api import per_token_group_quant_fp8, swiglu_quant_fp8

ALIGN = 128   # rows per expert are padded to this (get_m_alignment_for_contiguous_layout)


def _stacked_block_quant(w: torch.Tensor):
    """w [G, N, K] -> (q [G, N, K], scales [G, N/128, K/128]) per 128x128 block (N a multiple of 128: blocks never
    straddle two experts, so one pass over the stacked rows is each expert's quantisation)."""
    g, n, k = w.shape
    q, s = api.per_block_quant_fp8(w.reshape(g * n, k))
    return q.view(g, n, k), s.view(g, n // 128, s.shape[-1])


def _expert_operands(w: torch.Tensor, transposed: bool):
    """(forward operand, data-gradient operand or None) of a stacked expert weight [G, N, K]: per 128x128 block as
    is, and with `transposed` each expert's W^T [G, K, N] (FP8Linear's weight cache makes and keeps them)."""
    return _stacked_block_quant(w), (_expert_transposed(w) if transposed else None)


def _expert_transposed(w: torch.Tensor):
    return _stacked_block_quant(w.transpose(1, 2).contiguous())


def _expert_weight_cache() -> _WeightCache:
    return _WeightCache(_expert_operands, _expert_transposed, owner="FP8Experts")


def _operands(t: torch.Tensor, wgrad_rows: int | None):
    """t [M, K]'s per-token 1x128 operand, and with `wgrad_rows` also the weight-gradient operand of its first
    wgrad_rows rows (quantised along M: q [K, rows], scales [K, rows / 128]), both from one pass over t
    (per_token_group_quant_fp8_dual, as FP8Linear quantises x and dy). M and wgrad_rows are multiples of 128 here,
    so the transposed copy has no padding and its first columns are the experts' rows (the spare block follows)."""
    if wgrad_rows is None:
        return per_token_group_quant_fp8(t), None
    q, s, qt, st = api.per_token_group_quant_fp8_dual(t)
    return (q, s), (qt[:, :wgrad_rows], st[:, :wgrad_rows // ALIGN])


def _grouped(a_op, w_op, m_indices: torch.Tensor, dtype: torch.dtype, zero_rows=None) -> torch.Tensor:
    """Rows of a quantised operand times their expert's FP8 weight, [M, N] in `dtype`. Rows with id -1 are not
    written by the GEMM; of those, `zero_rows` (the experts' padding rows) are zeroed, for outputs whose padding
    rows later enter a weight-gradient operand (quantised along M: 128-row groups that mix padding and real rows).
    The others are left as allocated: the next GEMM skips them and the combine never names them."""
    (aq, asf), (wq, ws) = a_op, w_op
    out = _new_rows(aq.shape[0], wq.shape[1], aq.device)
    y = api.m_grouped_fp8_gemm_nt_contiguous(aq, asf, wq, ws, m_indices, out=out)
    if zero_rows is not None:
        y.index_fill_(0, zero_rows, 0)
    return y if y.dtype == dtype else y.to(dtype)


def _new_rows(m: int, n: int, device) -> torch.Tensor:
    """A grouped GEMM's output, uninitialised (tests poison it to check that unwritten rows are never read)."""
    return torch.empty(m, n, dtype=torch.bfloat16, device=device)


def _padding_rows(counts: torch.Tensor, aligned: torch.Tensor, pad_start: torch.Tensor, num_pad: int):
    """The layout's padding rows (expert e's rows past its count, up to its 128-row boundary) as an index tensor,
    built on the device (num_pad, their number, from the host counts: no sync)."""
    pad = aligned - counts
    expert = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), pad, output_size=num_pad)
    first = torch.cumsum(pad, 0) - pad                          # each expert's first entry in the list
    within = torch.arange(num_pad, device=counts.device) - first[expert]
    return pad_start[expert] + counts[expert] + within


class _GatherRows(torch.autograd.Function):
    """The layout's rows: a[r] = x[src[r]], src == len(x) a zero row. The gradient sums each token's rows back
    (moe_combine over the pairs' rows with unit weights) instead of index_put's scatter-add."""

    @staticmethod
    def forward(ctx, x, src, pair_rows):
        ctx.save_for_backward(pair_rows)
        return torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, src)

    @staticmethod
    def backward(ctx, da):
        pair_rows, = ctx.saved_tensors
        ones = torch.ones(pair_rows.shape, dtype=torch.float32, device=da.device)
        return api.moe_combine(da.contiguous(), pair_rows, ones, False), None, None


def _gather_quantised(x: torch.Tensor, src: torch.Tensor):
    """Inference: x quantised per token once ([T, d] e4m3 + 1x128 scales), then the layout's rows gathered in FP8
    (padding rows get token 0's: the GEMMs skip them). The scales come out MN-major, as the GEMM reads them."""
    xq, xs = per_token_group_quant_fp8(x)
    src = src.clamp(max=max(x.shape[0] - 1, 0))
    aq = xq.view(torch.uint8).index_select(0, src).view(xq.dtype)
    return aq, xs.t().index_select(1, src).t()


class _GroupedFP8LinearFn(torch.autograd.Function):
    """y = rows of a times W[e].T per expert segment (the contiguous layout), with FP8 data and weight gradients."""

    @staticmethod
    def forward(ctx, a, weight, m_indices, ks, cache, need_da: bool, need_dw: bool, zero_rows, zero_da_rows):
        # zero_rows / zero_da_rows: the padding rows to zero in y / in a's gradient (None: left unwritten), where
        # they go on into a weight-gradient operand (the first layer's y, the second layer's da)
        wop, wtop = cache.operands(weight.detach(), need_da)
        aop, atop = _operands(a, sum(ks) if need_dw else None)    # atop: the wgrad operand, kept in FP8
        y = _grouped(aop, wop, m_indices, a.dtype, zero_rows)
        atq, ats = atop if atop is not None else (None, None)
        wtq, wts = wtop if wtop is not None else (None, None)
        ctx.save_for_backward(m_indices, atq, ats, wtq, wts, zero_da_rows)
        ctx.ks, ctx.w_dtype = ks, weight.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        m_indices, atq, ats, wtq, wts, zero_da_rows = ctx.saved_tensors
        need_da, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dyop, dytop = _operands(dy.contiguous(), sum(ctx.ks) if need_dw else None)
        da = _grouped(dyop, (wtq, wts), m_indices, dy.dtype, zero_da_rows) if need_da else None
        dw = None
        if need_dw:
            # bf16 master weights get a bf16 gradient straight from the GEMM (fp32 accumulation, one rounding)
            out_dtype = torch.bfloat16 if ctx.w_dtype == torch.bfloat16 else torch.float32
            dw = api.k_grouped_fp8_wgrad_gemm_nt(*dytop, atq, ats, ctx.ks, out_dtype=out_dtype)
            dw = dw if dw.dtype == ctx.w_dtype else dw.to(ctx.w_dtype)
        return da, dw, None, None, None, None, None, None, None


def _grouped_linear(a, weight, m_indices, ks, cache, a_op=None, zero_rows=None, zero_da_rows=None) -> torch.Tensor:
    """a's rows (or their FP8 operand a_op, inference) times their expert's weight (zero_rows, zero_da_rows: see
    _GroupedFP8LinearFn; training only)."""
    need_da = torch.is_grad_enabled() and a is not None and a.requires_grad
    need_dw = torch.is_grad_enabled() and weight.requires_grad
    if need_da or need_dw:
        return _GroupedFP8LinearFn.apply(a, weight, m_indices, ks, cache, need_da, need_dw, zero_rows,
                                         zero_da_rows if need_da else None)
    a_op = _operands(a, None)[0] if a_op is None else a_op
    return _grouped(a_op, cache.operands(weight.detach(), False)[0], m_indices, torch.bfloat16 if a is None
                    else a.dtype, zero_rows)


class FP8Experts(FrozenFP8Weights, nn.Module):
    """`num_experts` expert MLPs (d_model -> d_ff -> d_model, no biases) computed with grouped FP8 GEMMs.

    gated=True: SwiGLU experts, w_in [G, 2 * d_ff, d_model] holding each expert's gate rows then its up rows,
    act = silu(gate) * up; gated=False: act = silu(w_in x) with w_in [G, d_ff, d_model]. w_out [G, d_model, d_ff].
    forward(x [T, d_model], topk_idx [T, k] int (-1: no expert), topk_weights [T, k]) -> [T, d_model]:
    sum over a token's k slots of weight * expert(x). Gradients flow to x, both weights and topk_weights.
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, gated: bool = True, device=None, dtype=None):
        super().__init__()
        if num_experts < 1 or d_model % 128 or d_ff % 128:
            raise ValueError(f"FP8Experts: num_experts >= 1 and d_model, d_ff multiples of 128 are needed, got "
                             f"{num_experts}, {d_model}, {d_ff}")
        self.num_experts, self.d_model, self.d_ff, self.gated = num_experts, d_model, d_ff, gated
        kw = {"device": device, "dtype": dtype if dtype is not None else torch.bfloat16}
        self.w_in = nn.Parameter(torch.empty(num_experts, (2 if gated else 1) * d_ff, d_model, **kw))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_model, d_ff, **kw))
        self._in_cache, self._out_cache = _expert_weight_cache(), _expert_weight_cache()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.w_in, self.w_out):   # nn.Linear's default init, per expert
            bound = w.shape[-1] ** -0.5
            nn.init.uniform_(w, -bound, bound)

    @classmethod
    def from_linears(cls, up, down, gate=None) -> "FP8Experts":
        """From per-expert nn.Linear lists (no biases): up[e] d_model -> d_ff, down[e] d_ff -> d_model, and for
        SwiGLU experts gate[e] d_model -> d_ff."""
        first = up[0]
        mod = cls(len(up), first.in_features, first.out_features, gated=gate is not None,
                  device=first.weight.device, dtype=first.weight.dtype)
        if any(lin.bias is not None for lin in (*up, *down, *(gate or ()))):
            raise ValueError("FP8Experts.from_linears: the expert linears must have no bias")
        with torch.no_grad():
            ins = [torch.cat([g.weight, u.weight]) for g, u in zip(gate, up)] if gate is not None else \
                  [u.weight for u in up]
            mod.w_in.copy_(torch.stack(ins))
            mod.w_out.copy_(torch.stack([d.weight for d in down]))
        return mod

    def _fp8_weights(self):
        # (freeze_fp8_weight_ / refresh_fp8_weight_ from FrozenFP8Weights: for serving graphs, which would otherwise
        # re-quantise every expert weight on each replay)
        return ((self._in_cache, self.w_in), (self._out_cache, self.w_out))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, gated={self.gated}"

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        t, d = x.shape if x.dim() == 2 else (-1, -1)   # (not 2-D: refused below)
        if d != self.d_model or topk_idx.dim() != 2 or topk_idx.shape[0] != t or topk_weights.shape != topk_idx.shape:
            raise ValueError(f"FP8Experts: x must be [tokens, {self.d_model}] and topk_idx / topk_weights "
                             f"[tokens, k], got {tuple(x.shape)}, {tuple(topk_idx.shape)}, "
                             f"{tuple(topk_weights.shape)}")
        g, k = self.num_experts, topk_idx.shape[1]
        if t * k == 0:   # no (token, slot) pair: nothing routed
            return x.clone() if k else torch.zeros_like(x)
        flat = topk_idx.reshape(-1).long()
        expert = torch.where(flat < 0, g, torch.where(flat >= g, g + 1, flat))   # g: no expert, g + 1: bad id
        counts_all = torch.zeros(g + 2, dtype=torch.long, device=x.device).scatter_add_(0, expert,
                                                                                        torch.ones_like(expert))
        training = torch.is_grad_enabled() and (x.requires_grad or self.w_in.requires_grad
                                                 or self.w_out.requires_grad or topk_weights.requires_grad)
        if _host_sync_allowed(x):
            # eager: one sync reads the counts, to check the ids and to size the layout exactly
            host = counts_all.tolist()
            if host[g + 1]:
                raise ValueError(f"FP8Experts: topk_idx holds expert ids >= num_experts = {g} (use -1 for no "
                                 f"expert)")
            ks = [(c + ALIGN - 1) // ALIGN * ALIGN for c in host[:g]]
            m = sum(ks)
            num_pad = m - sum(host[:g])
        else:
            # CUDA-graph capture or torch.compile: no host sync, so the layout takes the most rows the routing can
            # need (every expert padded by up to ALIGN - 1) and ids are not checked (ids >= num_experts drop out,
            # as the MLA ops skip their data checks under capture); inference only
            if training:
                raise RuntimeError("FP8Experts: training steps need the per-expert row counts on the host (the "
                                   "weight gradient's K segments), so they run eagerly; under CUDA-graph capture "
                                   "or torch.compile call it under torch.no_grad()")
            ks, m = None, (t * k + g * (ALIGN - 1) + ALIGN - 1) // ALIGN * ALIGN
        counts = counts_all[:g]
        aligned = (counts + ALIGN - 1) // ALIGN * ALIGN
        pad_start = torch.cumsum(aligned, 0) - aligned              # each expert's first row in the layout
        exact_start = torch.cumsum(counts, 0) - counts              # ... and its first pair in sorted order
        order = torch.argsort(expert, stable=True)                  # pairs by expert, the no-expert ones last
        e_sorted = expert[order]
        valid = e_sorted < g
        e_c = e_sorted.clamp(max=g - 1)
        # a pair's row; pairs without an expert go to row m, in a spare block of ALIGN rows with id -1 after the
        # experts' rows (skipped by the GEMMs; the combine never reads it)
        rows = torch.where(valid, pad_start[e_c] + torch.arange(t * k, device=x.device) - exact_start[e_c], m)
        m_indices = torch.full((m + ALIGN,), -1, dtype=torch.int32, device=x.device)
        m_indices.index_put_((rows,), torch.where(valid, e_sorted, -1).to(torch.int32))
        if _host_sync_allowed(x):   # ids < g, each expert's rows from a multiple of 128: the GEMMs' data check passes
            checks.IDS_CHECKED.note((m_indices,), (g,))
        # each layout row's token (t: padding), and each (token, slot) pair's row (-1: no expert)
        src = torch.full((m + ALIGN,), t, dtype=torch.long, device=x.device).index_put_((rows,), order // k)
        pair_rows = torch.empty_like(rows).index_put_((order,), torch.where(valid, rows, -1)).view(t, k)
        if _host_sync_allowed(x):   # rows of the layout or -1, each named once: the combine's checks would pass
            checks.ROWS_CHECKED.note((pair_rows,), (m + ALIGN,))
        if training:
            # Padding rows (id -1) are never written by the GEMMs; zeroed only where they reach a weight gradient's
            # operand: h (-> the activation, the second layer's input) and the activation's gradient (-> dh, the
            # first layer's dy). The gathered input's are zero rows already; y_rows' and x_rows' gradient's are
            # never read.
            pad = _padding_rows(counts, aligned, pad_start, num_pad)
            a = _GatherRows.apply(x, src, pair_rows)
            h = _grouped_linear(a, self.w_in, m_indices, ks, self._in_cache, zero_rows=pad)
            y_rows = _grouped_linear(self._activation(h), self.w_out, m_indices, ks, self._out_cache,
                                     zero_da_rows=pad)
        else:   # (x quantised per token, FP8 rows gathered; the activation straight to the second GEMM's operand)
            h = _grouped_linear(None, self.w_in, m_indices, ks, self._in_cache, _gather_quantised(x, src))
            y_rows = _grouped_linear(None, self.w_out, m_indices, ks, self._out_cache, self._activation_fp8(h))
        # the weighted sum over a token's slots in fp32 (as DeepEP's combine accumulates), rounded once
        out = api.moe_combine(y_rows, pair_rows, topk_weights.float(), False)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def _activation(self, h: torch.Tensor) -> torch.Tensor:
        return api.swiglu(h) if self.gated else F.silu(h)

    def _activation_fp8(self, h: torch.Tensor):
        """The activation as the next GEMM's FP8 operand: SwiGLU in one fused pass (computed in fp32)."""
        return swiglu_quant_fp8(h) if self.gated else per_token_group_quant_fp8(F.silu(h))

    def forward_masked(self, x, masked_m: torch.Tensor, expected_m: int, out: torch.Tensor | None = None):
        """The experts on the decode layout that low-latency dispatch hands out (DeepEP's): x [G, M_max, d_model]
        (bf16/fp32, or already quantised as (e4m3, 1x128 scales) like `low_latency_dispatch(use_fp8=True)`'s),
        of which group g's first masked_m[g] rows (int32 on the device) are valid. Returns [G, M_max, d_model]
        bf16 expert outputs (not weighted: low_latency_combine applies the routing weights); rows past masked_m
        are not written (`out`, if given, keeps them). Two masked grouped FP8 GEMMs: no host sync and a grid that
        does not depend on masked_m, so a decode step captures in one CUDA graph; `expected_m` (a host hint of
        the rows per expert) picks the block sizes. Inference only (call it under torch.no_grad())."""
        aq, asf = x if isinstance(x, tuple) else per_token_group_quant_fp8(x)
        if aq.dim() != 3 or aq.shape[0] != self.num_experts or aq.shape[2] != self.d_model:
            raise ValueError(f"FP8Experts.forward_masked: x must be [num_experts={self.num_experts}, M_max, "
                             f"{self.d_model}], got {tuple(aq.shape)}")
        if torch.is_grad_enabled() and (aq.requires_grad or self.w_in.requires_grad or self.w_out.requires_grad):
            raise RuntimeError("FP8Experts.forward_masked is inference only: call it under torch.no_grad()")
        wq, ws = self._in_cache.operands(self.w_in.detach(), False)[0]
        h = api.m_grouped_fp8_gemm_nt_masked(aq, asf, wq, ws, masked_m, expected_m)
        hq, hs = self._activation_fp8(h)
        wq, ws = self._out_cache.operands(self.w_out.detach(), False)[0]
        return api.m_grouped_fp8_gemm_nt_masked(hq, hs, wq, ws, masked_m, expected_m, out=out)


def _host_sync_allowed(x: torch.Tensor) -> bool:
    """Whether a call may read the routing counts on the host: not while torch.compile traces it, nor while a CUDA
    graph is captured."""
    return not torch.compiler.is_compiling() and not _capturing(x)
