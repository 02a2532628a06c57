"""An Inductor post-grad pass replacing linear layers with `deepstack::fp8_linear`.

The search pattern is `F.linear` traced through the same decompositions as the model (Inductor's pattern matcher
with `fwd_only`), so it matches the addmm/mm + permute + view form Inductor sees for 2-D and 3-D inputs. A match is
rewritten only when the kernel can run it (`extra_check`: bf16/fp32, N and K multiples of 128). The pass is a
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


def _kernel_can_run(match) -> bool:
    w, x = _val(match, "w"), _val(match, "x")
    if w is None or x is None:
        return False
    return (w.dtype in (torch.bfloat16, torch.float32) and x.dtype == w.dtype and w.dim() == 2
            and w.shape[0] % 128 == 0 and w.shape[1] % 128 == 0)


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
        for dtype in dtypes:
            for lead in ((8,), (2, 4)):         # 2-D and 3-D inputs decompose differently
                x = torch.empty(*lead, 128, dtype=dtype)
                w = torch.empty(256, 128, dtype=dtype)
                b = torch.empty(256, dtype=dtype)
                register_replacement(_linear_bias, _fp8_bias, [x, w, b], fwd_only, self.pm, skip_duplicates=True,
                                     extra_check=_kernel_can_run)
                register_replacement(_linear, _fp8, [x, w], fwd_only, self.pm, skip_duplicates=True,
                                     extra_check=_kernel_can_run)

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.count += self.pm.apply(graph)

    def uuid(self):
        return get_hash_for_files((__file__,))


@functools.lru_cache(maxsize=1)
def _shared_pass() -> LinearToFP8Pass:
    return LinearToFP8Pass()


@contextlib.contextmanager
def fp8_linear_pass():
    """Within this context, Inductor compiles rewrite eligible linears to FP8. Yields the pass (see `.count`)."""
    p = _shared_pass()
    with torch._inductor.config.patch(post_grad_custom_post_pass=p):
        yield p
