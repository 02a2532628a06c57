"""Rewrite stock PyTorch models to use deepstack ops.

* `quantize_(model, filter_fn=None)`: swap `nn.Linear` modules for `FP8Linear` in place (weights quantised once
  and cached; forward, dgrad and wgrad in FP8). Works in eager, compile and export alike: the primary route.
  For serving with fixed weights, `freeze_fp8_weights_(model)` then keeps one FP8 copy per layer, also inside CUDA
  graphs and compiled graphs (`refresh_fp8_weights_(model)` after changing the weights).
* `LinearToFP8Pass` / `fp8_linear_pass()`: an Inductor post-grad pass that replaces linear layers inside compiled
  graphs with `deepstack::fp8_linear`, for models whose code you do not own (inference graphs).
Attention is deliberately not pattern-matched (its forms vary too much): swap the attention module instead, as
`torch_deepstack.models.TinyDeepSeek` does with MLA decode. See docs/compile.md.
"""
from torch_deepstack.compile.fp8_linear import check_fp8_linear  # noqa: F401

__all__ = ["quantize_", "freeze_fp8_weights_", "refresh_fp8_weights_", "LinearToFP8Pass", "fp8_linear_pass"]


def __getattr__(name):  # the graph pass imports Inductor: load it only when asked for
    if name in ("LinearToFP8Pass", "fp8_linear_pass"):
        from torch_deepstack.compile import inductor_pass
        return getattr(inductor_pass, name)
    if name in ("quantize_", "freeze_fp8_weights_", "refresh_fp8_weights_"):
        from torch_deepstack.compile import module_swap
        return getattr(module_swap, name)
    raise AttributeError(name)
