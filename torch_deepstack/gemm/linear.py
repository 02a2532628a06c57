"""FP8Linear: an nn.Linear whose forward, data gradient and weight gradient run as FP8 GEMMs (DeepSeek-V3 recipe).

Recipe:
  forward  y  = x @ W.T      x: e4m3 per 1x128 group (per token), W: e4m3 per 128x128 block
  dgrad    dx = dy @ W       dy: 1x128 per token, W.T: 128x128 blocks (W quantised transposed)
  wgrad    dW = dy.T @ x     dy.T and x.T: 1x128 groups along the token dim; fp32 accumulation, stored in W's
                             dtype by the GEMM itself (bf16 or fp32)
All GEMMs accumulate each 128-deep K slice in fp32 with the scales applied (two-level accumulation).
Master weights stay in their own dtype (bf16 or fp32); their FP8 copies (both orientations, made in one pass over W
when a data gradient will be needed) are cached and redone only when the weight changes (tracked by its version
counter, bumped by optimizer steps), so a training step reads W once to quantise it. x and dy are each quantised
in both layouts in one pass too (per_token_group_quant_fp8_dual): six kernels per training step. The forward saves
x in FP8 (transposed, ready for wgrad), not in bf16.
Constraints: in_features and out_features multiples of 128; x and W bf16, fp16 or fp32, not necessarily the same
(y and dx come out in x's dtype, dW in W's).
"""
from __future__ import annotations

import torch
from torch import nn

from torch_deepstack._library import mark_static
from torch_deepstack.gemm import api
from torch_deepstack.quant.api import per_token_group_quant_fp8


def _capturing(w: torch.Tensor) -> bool:
    """Whether w's kernels would be recorded into a CUDA graph now (torch.cuda.graph, make_graphed_callables)."""
    return w.is_cuda and torch.cuda.is_current_stream_capturing()


class _WeightCache:
    """FP8 copies of a weight, keyed on (storage pointer, version counter); or, frozen, kept until refreshed.
    `quantise(w, transposed)` -> (forward operand, data-gradient operand or None) and `quantise_transposed(w)` -> the
    data-gradient operand make them: FP8Linear's 2-D weight by default, FP8Experts' stacked experts too."""

    def __init__(self, quantise=None, quantise_transposed=None, owner: str = "FP8Linear"):
        self.key = None
        self.fwd = None   # (q [N, K], scales [N/128, K/128])
        self.bwd = None   # (q [K, N], scales [K/128, N/128])
        self.frozen = False
        self.released = []   # copies a frozen cache gave up, kept alive: graphs captured with them still read them
        self._quantise = quantise or _weight_operands
        self._quantise_t = quantise_transposed or (lambda w: api.per_block_quant_fp8(w, transpose=True))
        self._owner = owner

    def _sync(self, w: torch.Tensor):
        key = (w.data_ptr(), w._version, w.device, w.dtype, tuple(w.shape))
        if key != self.key:
            self.key, self.fwd, self.bwd = key, None, None

    def operands(self, w, transposed: bool):
        """(forward operand, data-gradient operand or None): W per 128x128 block, and with `transposed` W^T too."""
        if self.frozen and self._has_frozen(w, transposed):   # (also while compiling: graphs read the copies)
            return self.fwd, (self.bwd if transposed else None)
        if torch.compiler.is_compiling():   # data_ptr/_version are not traceable: quantise inside the graph
            return self._quantise(w.detach(), transposed)
        if self.frozen:
            return self._frozen_operands(w, transposed)
        if _capturing(w):
            # A replay must read W as it is then: the cached copies would be stale after the next optimizer step,
            # and freed (their memory reused) once an eager call replaces them. Quantise inside the graph.
            return self._quantise(w.detach(), transposed)
        self._sync(w)
        if self.fwd is None:
            self.fwd, self.bwd = self._quantise(w.detach(), transposed)
        elif transposed and self.bwd is None:
            self.bwd = self._quantise_t(w.detach())
        return self.fwd, (self.bwd if transposed else None)

    def freeze(self, frozen: bool) -> None:
        if frozen == self.frozen:
            return
        if self.frozen and self.fwd is not None:
            self.released.append((self.fwd, self.bwd))
        self.frozen, self.key, self.fwd, self.bwd = frozen, None, None, None

    def _has_frozen(self, w, transposed: bool) -> bool:
        return (self.fwd is not None and (not transposed or self.bwd is not None)
                and self.key == (w.device, tuple(w.shape)))

    def _release_unless_for(self, w) -> None:
        """Frozen copies made for another device or shape (the module moved or was resized) are not W's: released."""
        if self.fwd is not None and self.key != (w.device, tuple(w.shape)):
            self.released.append((self.fwd, self.bwd))
            self.fwd = self.bwd = None

    def _frozen_operands(self, w, transposed: bool):
        self._release_unless_for(w)
        if not self._has_frozen(w, transposed):
            if _capturing(w):
                raise RuntimeError(f"{self._owner}: the frozen FP8 weight is made on the first call; call the module "
                                   "once outside CUDA graph capture (with gradients if the graph computes them)")
            if self.fwd is None:
                self.fwd, self.bwd = self._quantise(w.detach(), transposed)
                self.key = (w.device, tuple(w.shape))
            else:
                self.bwd = self._quantise_t(w.detach())
            mark_static(*self.fwd, *(self.bwd or ()))
        return self.fwd, (self.bwd if transposed else None)

    def refresh(self, w: torch.Tensor) -> None:
        """Re-quantise W into the frozen copies in place (graphs that read them see the new values)."""
        self._release_unless_for(w)
        if self.fwd is not None:
            fwd, bwd = self._quantise(w.detach(), self.bwd is not None)
            for old, new in zip((*self.fwd, *(self.bwd or ())), (*fwd, *(bwd or ()))):
                old.copy_(new)


def _weight_operands(w, transposed: bool):
    """W's 128x128-block operand and, with `transposed`, W^T's (else None): both from one pass over W."""
    if transposed:
        q, s, qt, st = api.per_block_quant_fp8_dual(w)
        return (q, s), (qt, st)
    return api.per_block_quant_fp8(w), None


def _wgrad_operand(t2d: torch.Tensor):
    """Quantise [M, C] along M: (q [C, M] whose rows are padded to align(M, 16) zeros, scales). Pass both to
    `_padded` for the GEMM operand. The padded view is made only where it is used, so a tensor saved for backward
    is never a view of an intermediate (torch.compile cannot save such aliases)."""
    return api.per_token_group_quant_fp8_t(t2d)


def _padded(q: torch.Tensor) -> torch.Tensor:
    """The transposed [C, align(M, 16)] operand, including the zero padding, as a view of q's storage."""
    if q.shape[1] == 0:   # no tokens (an MoE expert that got none): an empty view with a row stride the GEMM takes
        return q.as_strided((q.shape[0], 0), (16, 1))
    m_pad = q.stride(0)
    return q.as_strided((q.shape[0], m_pad), (m_pad, 1))


def _rows(t: torch.Tensor, c: int) -> torch.Tensor:
    """t as [rows, c] in the layout the quantisers read: contiguous rows starting on 16-byte boundaries. A
    broadcast gradient (`y.sum().backward()` gives dy with stride 0) or a strided input is copied once."""
    t2 = t if t.dim() == 2 else t.reshape(-1, c)   # (a reshape costs a dispatcher trip even when it is a no-op)
    misaligned = not torch.compiler.is_compiling() and t2.data_ptr() % 16   # (traced graphs allocate aligned)
    if t2.stride(-1) != 1 or (t2.shape[0] > 1 and t2.stride(0) != c) or misaligned:
        t2 = t2.clone(memory_format=torch.contiguous_format)
    return t2


_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _out_dtype(dtype):
    return dtype if dtype in (torch.bfloat16, torch.float32) else torch.bfloat16


def _quant_rows(t2: torch.Tensor, transposed: bool):
    """(per-token 1x128 operand, wgrad operand [C, rows] or None) of t2 [rows, C]: both from one pass over t2
    (per_token_group_quant_fp8_dual) when the transposed one is needed too."""
    if transposed:
        q, s, qt, st = api.per_token_group_quant_fp8_dual(t2)
        return (q, s), (qt, st)
    return per_token_group_quant_fp8(t2), None


def _linear(x, xop, weight, bias, wop) -> torch.Tensor:
    """y = x @ W.T (+ b) from the FP8 operands: x's 1x128 copy xop and W's 128x128-block copy wop."""
    (xq, xs), (wq, ws) = xop, wop
    y = api.fp8_gemm_nt(xq, xs, wq, ws, out_dtype=_out_dtype(x.dtype))
    if bias is not None:
        y = y + bias.to(y.dtype)
    if x.dim() != 2:
        y = y.reshape(*x.shape[:-1], weight.shape[0])
    # No `.to` when the dtype already matches: under torch.compile on torch 2.11, an autograd.Function output that
    # is `t.to(same dtype)` (t itself) got a zero tangent in the compiled backward, i.e. all-zero gradients (2.10
    # and 2.13 are fine; tests/compile checks the gradients' values).
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _forward(x, weight, bias, wop) -> torch.Tensor:
    """Inference: y = x @ W.T (+ b) in FP8, x quantised per 1x128 group."""
    return _linear(x, per_token_group_quant_fp8(_rows(x, x.shape[-1])), weight, bias, wop)


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, cache, need_dgrad):
        # Operands the backward will need are made in the same passes as the forward's: W^T with W (a data
        # gradient to come), x^T (tokens along K, the wgrad operand) with x's per-token copy (a weight gradient).
        # The forward saves x in FP8, not in bf16.
        wop, wtop = cache.operands(weight, need_dgrad)
        xop, xtop = _quant_rows(_rows(x, x.shape[-1]), weight.requires_grad)
        y = _linear(x, xop, weight, bias, wop)
        xtq, xts = xtop if xtop is not None else (None, None)
        wtq, wts = wtop if wtop is not None else (None, None)
        ctx.save_for_backward(xtq, xts, wtq, wts)
        ctx.x_shape, ctx.x_dtype, ctx.has_bias = x.shape, x.dtype, bias is not None
        ctx.n, ctx.w_dtype = weight.shape[0], weight.dtype   # (the backward needs no W values: W^T is saved in FP8)
        return y

    @staticmethod
    def backward(ctx, dy):
        xtq, xts, wtq, wts = ctx.saved_tensors
        dy2 = _rows(dy, ctx.n)
        if dy2.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            dy2 = dy2.float()
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx = dw = db = None
        if need_dx:   # (with a weight gradient too, dy's transposed copy comes from the same pass)
            (dyq, dys), dytop = _quant_rows(dy2, need_dw)
            dx = api.fp8_gemm_nt(dyq, dys, wtq, wts, out_dtype=_out_dtype(ctx.x_dtype))
            if len(ctx.x_shape) != 2:
                dx = dx.reshape(ctx.x_shape)
            if dx.dtype != ctx.x_dtype:
                dx = dx.to(ctx.x_dtype)
        elif need_dw:
            dytop = _wgrad_operand(dy2)
        if need_dw:
            dytq, dyts = dytop
            # bf16 / fp32 weights get their gradient straight from the GEMM's epilogue (fp32 accumulation either
            # way), not through an fp32 tensor and a cast kernel (~9% of a 2048-token step on the H200)
            dw = api.fp8_wgrad_gemm_nt(_padded(dytq), dyts, _padded(xtq), xts, out_dtype=_out_dtype(ctx.w_dtype))
            if dw.dtype != ctx.w_dtype:
                dw = dw.to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.float().sum(0).to(dy.dtype)
        return dx, dw, db, None, None


class FrozenFP8Weights:
    """Serving with fixed weights for modules whose FP8 weight copies live in _WeightCache objects (FP8Linear,
    FP8Experts; `_fp8_weights()` gives the (cache, weight) pairs)."""

    def _fp8_weights(self):
        raise NotImplementedError

    def freeze_fp8_weight_(self, frozen: bool = True):
        """For serving with fixed weights, chiefly under CUDA graphs. By default the FP8 copies of the weights are
        cached while they are unchanged (their version counters), and a CUDA graph captured with this module
        quantises them inside the graph on every replay, so that replays never read a stale or freed copy. Frozen,
        the module makes the copies once (on its next eager call, which must not be under capture) and uses them from
        then on, in eager calls, in graphs captured later and in torch.compile'd graphs traced after that call,
        which then skip the per-call weight quantisation. Weight changes are not seen until `refresh_fp8_weight_()`
        (which rewrites the copies in place, so captured graphs see the new values too) or until unfrozen
        (`frozen=False`; graphs captured while frozen keep reading the copies they were captured with, which stay
        allocated). Returns self."""
        for cache, _ in self._fp8_weights():
            cache.freeze(bool(frozen))
        return self

    @property
    def fp8_weight_frozen(self) -> bool:
        """Whether freeze_fp8_weight_() is in effect."""
        return all(cache.frozen for cache, _ in self._fp8_weights())

    @torch.no_grad()
    def refresh_fp8_weight_(self) -> None:
        """Frozen module: quantise the current weights into their FP8 copies in place (see freeze_fp8_weight_).
        Unfrozen: drop the cached copies, so the next call quantises the weights again. Needed only after a write
        that bypasses the weight's version counter, i.e. through `weight.data` (as some init code does); in-place
        updates of the parameter itself (optimizer steps, `with torch.no_grad(): w.mul_(...)`) are seen anyway."""
        for cache, weight in self._fp8_weights():
            if self.fp8_weight_frozen:
                cache.refresh(weight)
            else:
                cache.key = cache.fwd = cache.bwd = None


class FP8Linear(FrozenFP8Weights, nn.Module):
    """Drop-in for nn.Linear(in_features, out_features, bias) computing in FP8 (see module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if v <= 0 or v % 128:
                raise ValueError(f"FP8Linear: {name}={v} must be a positive multiple of 128 (the FP8 scaling block)")
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
        """An FP8Linear that uses `linear`'s own weight and bias Parameters (no copy: weight ties, requires_grad
        and optimizer state keep pointing at them) in its train/eval mode."""
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, "meta", linear.weight.dtype)
        m.weight = linear.weight
        m.bias = linear.bias
        m.train(linear.training)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"FP8Linear: input last dim {x.shape[-1]} != in_features {self.in_features}")
        # x and W may differ in dtype (bf16 activations on fp32 master weights: both are quantised to FP8 anyway);
        # each must be one the quantisers read. nn.Linear would refuse the mix; here y and dx follow x, dW follows W.
        if x.dtype not in _FLOAT_DTYPES or self.weight.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"FP8Linear: input and weight must be bfloat16, float16 or float32, got input {x.dtype} "
                            f"and weight {self.weight.dtype}")
        params = (x, self.weight) if self.bias is None else (x, self.weight, self.bias)
        if torch.is_grad_enabled() and any(t.requires_grad for t in params):
            return _FP8LinearFn.apply(x, self.weight, self.bias, self._cache, x.requires_grad)
        # inference: no autograd node, no transposed copies of x or W for gradients that will not come
        return _forward(x, self.weight, self.bias, self._cache.operands(self.weight, False)[0])

    def _fp8_weights(self):
        return ((self._cache, self.weight),)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
