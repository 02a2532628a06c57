"""`quantize_`: swap nn.Linear modules for FP8Linear, in place (torchao-style module swap)."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from torch_deepstack.gemm import FP8Linear
from torch_deepstack.gemm.linear import FrozenFP8Weights


def fp8_compatible(module: nn.Module, fqn: str = "") -> bool:
    """The default filter: a plain nn.Linear whose both dims are multiples of the 128-wide scaling block."""
    return (type(module) is nn.Linear and module.in_features % 128 == 0 and module.out_features % 128 == 0)


def quantize_(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Replace every module for which `filter_fn(module, fully_qualified_name)` is true (default:
    `fp8_compatible`) with `FP8Linear.from_linear(module)`. Returns `model` (modified in place).

    A filter may accept only modules that FP8Linear supports (nn.Linear with dims that are multiples of 128);
    anything else raises a ValueError naming the module."""
    filter_fn = filter_fn or fp8_compatible
    swaps = []
    for fqn, mod in model.named_modules():
        if fqn and filter_fn(mod, fqn):
            if not isinstance(mod, nn.Linear) or mod.in_features % 128 or mod.out_features % 128:
                raise ValueError(f"quantize_: {fqn} ({mod.__class__.__name__}) cannot become an FP8Linear: "
                                 "need nn.Linear with in/out features multiples of 128")
            swaps.append(fqn)
    for fqn in swaps:
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FP8Linear.from_linear(getattr(parent, child)))
    return model


def freeze_fp8_weights_(model: nn.Module, frozen: bool = True) -> int:
    """Serving with fixed weights: `freeze_fp8_weight_(frozen)` on every FP8Linear and FP8Experts of `model` (their
    FP8 weight copies made once, on the next eager call, and used by captured and compiled graphs without a per-call
    quantisation). Returns how many modules it set."""
    layers = [m for m in model.modules() if isinstance(m, FrozenFP8Weights)]
    for m in layers:
        m.freeze_fp8_weight_(frozen)
    return len(layers)


def refresh_fp8_weights_(model: nn.Module) -> int:
    """After changing a frozen model's weights (a weight sync, say): `refresh_fp8_weight_()` on every frozen
    FP8Linear and FP8Experts, rewriting their FP8 copies in place so graphs captured or compiled earlier use the new
    weights. Returns how many modules it refreshed."""
    layers = [m for m in model.modules() if isinstance(m, FrozenFP8Weights) and m.fp8_weight_frozen]
    for m in layers:
        m.refresh_fp8_weight_()
    return len(layers)
