"""`quantize_`: swap nn.Linear modules for FP8Linear, in place (torchao-style module swap)."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from torch_deepstack.gemm import FP8Linear


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
