"""An Inductor post-grad pass replacing linear layers with `deepstack::fp8_linear`.

The search pattern is `F.linear` traced through the same decompositions as the model (Inductor's pattern matcher
with `fwd_only`), so it matches the addmm/mm + permute + view form Inductor sees for 2-D and 3-D inputs. A match is
rewritten only when the kernel can run it and it is a linear layer (`extra_check`: bf16/fp32 or the pass's
`dtypes`, N and K multiples of 128, a [N] bias in x's dtype, addmm with beta = alpha = 1, and the weight a graph
input or constant, so activations multiplied together, e.g. attention scores q @ k.T, stay as they are). The pass is a
`CustomGraphPass` whose uuid hashes this file, so Inductor's FX graph cache stays on.

Install it for a region with `with fp8_linear_pass(): torch.compile(model)(x)`. Training graphs are out of scope
(the post-grad pass sees forward and backward separately): use `quantize_` for training.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.pattern_matcher import PatternMatcherPass, fwd_only, register_replacement


def _val(match, name):
    node = match.kwargs.get(name)
    return node.meta.get("val") if hasattr(node, "meta") else None


_LAYOUT_OPS = {torch.ops.aten.t.default, torch.ops.aten.permute.default, torch.ops.aten.view.default,
               torch.ops.aten._unsafe_view.default, torch.ops.aten.reshape.default, torch.ops.aten.clone.default,
               torch.ops.aten.contiguous.default, torch.ops.aten._to_copy.default}


def _is_weight(node) -> bool:
    """A graph input or constant (a parameter, under layout ops), not an activation computed in the graph: the
    attention scores q @ k.T match F.linear's pattern too, and are not meant for FP8."""
    while getattr(node, "op", None) == "call_function" and node.target in _LAYOUT_OPS:
        node = node.args[0]
    return getattr(node, "op", None) in ("placeholder", "get_attr")


def _plain_addmm(match) -> bool:
    """addmm/baddbmm with beta = alpha = 1 (the pattern is traced without them; others scale the terms)."""
    for n in match.nodes:
        if n.op == "call_function" and n.target in (torch.ops.aten.addmm.default, torch.ops.aten.baddbmm.default):
            beta = n.kwargs.get("beta", n.args[3] if len(n.args) > 3 else 1)
            alpha = n.kwargs.get("alpha", n.args[4] if len(n.args) > 4 else 1)
            if beta != 1 or alpha != 1:
                return False
    return True


def _kernel_can_run(match, dtypes=(torch.bfloat16, torch.float32)) -> bool:
    w, x = _val(match, "w"), _val(match, "x")
    if w is None or x is None:
        return False
    if not (w.dtype in dtypes and x.dtype == w.dtype and w.dim() == 2
            and w.shape[0] % 128 == 0 and w.shape[1] % 128 == 0):
        return False
    if "b" in match.kwargs:   # F.linear's bias: [N] in x's dtype (an addmm with an [M, N] or [1] bias is not one)
        b = _val(match, "b")
        if b is None or b.dtype != x.dtype or tuple(b.shape) != (w.shape[0],):
            return False
    return _plain_addmm(match) and _is_weight(match.kwargs.get("w"))


def _linear_bias(x, w, b):
    return F.linear(x, w, b)


def _fp8_bias(x, w, b):
    return torch.ops.deepstack.fp8_linear(x, w, b)


def _linear(x, w):
    return F.linear(x, w)


def _fp8(x, w):
    return torch.ops.deepstack.fp8_linear(x, w)


class LinearToFP8Pass(CustomGraphPass):
    """Post-grad pass: F.linear -> deepstack::fp8_linear where the FP8 kernel applies. `.count` = rewrites."""

    def __init__(self, dtypes=(torch.bfloat16, torch.float32)):
        self.pm = PatternMatcherPass(pass_name="deepstack_linear_to_fp8")
        self.count = 0
        self.dtypes = tuple(dtypes)
        check = functools.partial(_kernel_can_run, dtypes=self.dtypes)   # (the traced pattern is dtype-blind)
        for dtype in dtypes:
            for lead in ((8,), (2, 4)):         # 2-D and 3-D inputs decompose differently
                x = torch.empty(*lead, 128, dtype=dtype)
                w = torch.empty(256, 128, dtype=dtype)
                b = torch.empty(256, dtype=dtype)
                register_replacement(_linear_bias, _fp8_bias, [x, w, b], fwd_only, self.pm, skip_duplicates=True,
                                     extra_check=check)
                register_replacement(_linear, _fp8, [x, w], fwd_only, self.pm, skip_duplicates=True,
                                     extra_check=check)

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.count += self.pm.apply(graph)

    def uuid(self):
        # this file, the op it rewrites to, and the settings (a pass for other dtypes must not share cache entries)
        from torch_deepstack.compile import fp8_linear
        return get_hash_for_files((__file__, fp8_linear.__file__), extra=repr(self.dtypes))


@functools.lru_cache(maxsize=1)
def _shared_pass() -> LinearToFP8Pass:
    return LinearToFP8Pass()


@contextlib.contextmanager
def fp8_linear_pass():
    """Within this context, Inductor compiles rewrite eligible linears to FP8. Yields the pass (see `.count`)."""
    p = _shared_pass()
    with torch._inductor.config.patch(post_grad_custom_post_pass=p):
        yield p
