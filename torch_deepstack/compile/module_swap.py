"""`quantize_`: swap nn.Linear modules for FP8Linear, in place (torchao-style module swap)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from torch_deepstack.gemm import FP8Linear
from torch_deepstack.gemm.linear import FrozenFP8Weights


_FP8_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _hooked(module: nn.Module) -> bool:
    """Hooks or parametrizations (e.g. weight_norm, spectral_norm) that a swap would lose or break."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None) or module._state_dict_hooks
                or module._load_state_dict_pre_hooks or hasattr(module, "parametrizations")
                or not isinstance(module.weight, nn.Parameter))


def _swappable(module: nn.Module) -> str | None:
    """Why FP8Linear cannot stand in for this module, or None."""
    if type(module) is not nn.Linear:
        return "only plain nn.Linear (a subclass's own forward would be lost)"
    if module.in_features <= 0 or module.out_features <= 0 or module.in_features % 128 or module.out_features % 128:
        return "in/out features must be positive multiples of 128"
    if module.weight.dtype not in _FP8_DTYPES:
        return f"weight dtype {module.weight.dtype} (bf16, fp16 or fp32 only)"
    if _hooked(module):
        return "it has hooks or parametrizations (weight_norm, ...) that FP8Linear would not run"
    return None


def fp8_compatible(module: nn.Module, fqn: str = "") -> bool:
    """The default filter: a plain nn.Linear FP8Linear can replace (dims multiples of the 128-wide scaling block,
    bf16/fp16/fp32, no hooks or parametrizations); others are left alone."""
    return type(module) is nn.Linear and _swappable(module) is None


def quantize_(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Replace every module for which `filter_fn(module, fully_qualified_name)` is true (default:
    `fp8_compatible`) with `FP8Linear.from_linear(module)`. Returns `model` (modified in place).

    A filter may accept only modules that FP8Linear supports (a plain nn.Linear with dims that are multiples of 128,
    bf16/fp16/fp32, no hooks or parametrizations); anything else raises a ValueError naming the module. The new
    modules take over the Linear's own Parameters (ties, requires_grad and optimizer references survive) and its
    train/eval mode; a module registered under several names is replaced under all of them by one FP8Linear.
    Modules that already are FP8Linear are skipped, so calling it twice is harmless. The root module itself cannot
    be replaced in place: use `FP8Linear.from_linear(model)`."""
    filter_fn = filter_fn or fp8_compatible
    swaps: list[tuple[str, nn.Module]] = []
    for fqn, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, FP8Linear) or not filter_fn(mod, fqn):
            continue
        if not fqn:
            raise ValueError("quantize_: the root module was selected; it cannot be swapped in place, use "
                             "FP8Linear.from_linear(model) instead")
        why = _swappable(mod) if isinstance(mod, nn.Linear) else "only plain nn.Linear"
        if why:
            raise ValueError(f"quantize_: {fqn} ({mod.__class__.__name__}) cannot become an FP8Linear: {why}")
        swaps.append((fqn, mod))
    new: dict[int, FP8Linear] = {}
    for fqn, mod in swaps:
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if id(mod) not in new:
            new[id(mod)] = FP8Linear.from_linear(mod)
        setattr(parent, child, new[id(mod)])
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
