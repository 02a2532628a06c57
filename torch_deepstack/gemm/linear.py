"""FP8Linear: an nn.Linear whose forward, data gradient and weight gradient run as FP8 GEMMs (DeepSeek-V3 recipe).

Recipe:
  forward  y  = x @ W.T      x: e4m3 per 1x128 group (per token), W: e4m3 per 128x128 block
  dgrad    dx = dy @ W       dy: 1x128 per token, W.T: 128x128 blocks (W quantised transposed)
  wgrad    dW = dy.T @ x     dy.T and x.T: 1x128 groups along the token dim; fp32 accumulation, fp32 result
All GEMMs accumulate each 128-deep K slice in fp32 with the scales applied (two-level accumulation).
Master weights stay in their own dtype (bf16 or fp32); their FP8 copies (both orientations) are cached and redone
only when the weight changes (tracked by its version counter, bumped by optimizer steps), so a forward/backward pair
quantises W at most twice per step. The forward saves x in FP8 (transposed, ready for wgrad), not in bf16.
Constraints: in_features and out_features multiples of 128.
"""
from __future__ import annotations

import torch
from torch import nn

from torch_deepstack.gemm import api
from torch_deepstack.quant.api import per_token_group_quant_fp8


class _WeightCache:
    """FP8 copies of a weight, keyed on (storage pointer, version counter)."""

    def __init__(self):
        self.key = None
        self.fwd = None   # (q [N, K], scales [N/128, K/128])
        self.bwd = None   # (q [K, N], scales [K/128, N/128])

    def _sync(self, w: torch.Tensor):
        key = (w.data_ptr(), w._version, w.device, w.dtype, tuple(w.shape))
        if key != self.key:
            self.key, self.fwd, self.bwd = key, None, None

    def forward_operand(self, w):
        if torch.compiler.is_compiling():   # data_ptr/_version are not traceable: quantise inside the graph
            return api.per_block_quant_fp8(w.detach())
        self._sync(w)
        if self.fwd is None:
            self.fwd = api.per_block_quant_fp8(w.detach())
        return self.fwd

    def backward_operand(self, w):
        if torch.compiler.is_compiling():
            return api.per_block_quant_fp8(w.detach(), transpose=True)
        self._sync(w)
        if self.bwd is None:
            self.bwd = api.per_block_quant_fp8(w.detach(), transpose=True)
        return self.bwd


def _wgrad_operand(t2d: torch.Tensor):
    """Quantise [M, C] along M: (q [C, M] whose rows are padded to align(M, 16) zeros, scales). Pass both to
    `_padded` for the GEMM operand. The padded view is made only where it is used, so a tensor saved for backward
    is never a view of an intermediate (torch.compile cannot save such aliases)."""
    return api.per_token_group_quant_fp8_t(t2d)


def _padded(q: torch.Tensor) -> torch.Tensor:
    """The transposed [C, align(M, 16)] operand, including the zero padding, as a view of q's storage."""
    m_pad = q.stride(0)
    return q.as_strided((q.shape[0], m_pad), (m_pad, 1))


def _out_dtype(dtype):
    return dtype if dtype in (torch.bfloat16, torch.float32) else torch.bfloat16


def _forward(x, weight, bias, cache) -> torch.Tensor:
    """y = x @ W.T (+ b) in FP8: x quantised per 1x128 group, W's cached 128x128-block copy."""
    xq, xs = per_token_group_quant_fp8(x.reshape(-1, x.shape[-1]))
    wq, ws = cache.forward_operand(weight)
    y = api.fp8_gemm_nt(xq, xs, wq, ws, out_dtype=_out_dtype(x.dtype))
    if bias is not None:
        y = y + bias.to(y.dtype)
    y = y.reshape(*x.shape[:-1], weight.shape[0])
    # No `.to` when the dtype already matches: under torch.compile on torch 2.11, an autograd.Function output that
    # is `t.to(same dtype)` (t itself) got a zero tangent in the compiled backward, i.e. all-zero gradients (2.10
    # and 2.13 are fine; tests/compile checks the gradients' values).
    return y if y.dtype == x.dtype else y.to(x.dtype)


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, cache):
        y = _forward(x, weight, bias, cache)
        if weight.requires_grad:
            xtq, xts = _wgrad_operand(x.reshape(-1, x.shape[-1]))
        else:
            xtq = xts = None
        ctx.save_for_backward(xtq, xts, weight)
        ctx.cache = cache
        ctx.x_shape, ctx.x_dtype, ctx.has_bias = x.shape, x.dtype, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        xtq, xts, weight = ctx.saved_tensors
        n = weight.shape[0]
        dy2 = dy.reshape(-1, n)
        if dy2.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            dy2 = dy2.float()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dyq, dys = per_token_group_quant_fp8(dy2)
            wtq, wts = ctx.cache.backward_operand(weight)
            dx = api.fp8_gemm_nt(dyq, dys, wtq, wts, out_dtype=_out_dtype(ctx.x_dtype))
            dx = dx.reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dytq, dyts = _wgrad_operand(dy2)
            dw = api.fp8_wgrad_gemm_nt(_padded(dytq), dyts, _padded(xtq), xts).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.float().sum(0).to(dy.dtype)
        return dx, dw, db, None


class FP8Linear(nn.Module):
    """Drop-in for nn.Linear(in_features, out_features, bias) computing in FP8 (see module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if v % 128:
                raise ValueError(f"FP8Linear: {name}={v} must be a multiple of 128 (the FP8 scaling block)")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self._cache = _WeightCache()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        if self.bias is not None:
            bound = 1 / self.in_features ** 0.5
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FP8Linear":
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device,
                linear.weight.dtype)
        with torch.no_grad():
            m.weight.copy_(linear.weight)
            if linear.bias is not None:
                m.bias.copy_(linear.bias)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"FP8Linear: input last dim {x.shape[-1]} != in_features {self.in_features}")
        params = (x, self.weight) if self.bias is None else (x, self.weight, self.bias)
        if torch.is_grad_enabled() and any(t.requires_grad for t in params):
            return _FP8LinearFn.apply(x, self.weight, self.bias, self._cache)
        # inference: no autograd node, and no transposed copy of x for a weight gradient that will not come
        return _forward(x, self.weight, self.bias, self._cache)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
