"""Helpers shared by the tests of every area."""
from __future__ import annotations

import torch


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - cosine similarity, in float64 (DeepGEMM's accuracy measure): 0 for identical directions.

    Uses the symmetric form 1 - 2<x,y> / (|x|^2 + |y|^2), which also penalises a difference in magnitude."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    if denom == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denom)


def output_and_grads(fn, inputs: tuple, grad_out: torch.Tensor, params=()) -> tuple:
    """(fn(*x), d/dx..., d/dparams...): fn on fresh leaf copies of `inputs`, and the gradients of its output,
    weighted by grad_out, with respect to those copies and to `params`. Compare a compiled fn's tuple with the eager
    one's element by element."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return (out, *torch.autograd.grad(out, (*leaves, *params), grad_out))


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with a value no kernel would produce, so unwritten elements are caught."""
    if t.dtype.is_floating_point:
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            t.view(torch.uint8).fill_(0x7F)  # NaN in e4m3fn
        else:
            t.fill_(float("nan"))
    else:
        t.fill_(torch.iinfo(t.dtype).min if t.dtype != torch.bool else True)
    return t


def poisoned_empty(*shape, dtype, device) -> torch.Tensor:
    return poison_(torch.empty(*shape, dtype=dtype, device=device))


def fresh_randn(*shape, dtype=torch.float32, device="cpu", scale: float = 1.0, generator=None) -> torch.Tensor:
    """Fresh random input (never zeros), drawn anew for every check."""
    return (torch.randn(*shape, generator=generator, device="cpu", dtype=torch.float32) * scale).to(device=device,
                                                                                                     dtype=dtype)


def assert_close_to_reference(op, args, kwargs=None, device="cuda", atol=0.0, rtol=0.0, exact_dtypes=()):
    """Run `op` on `device` and on CPU (the reference kernel) with the same inputs; compare every output."""
    kwargs = kwargs or {}

    def to(v, dev):
        return v.to(dev) if isinstance(v, torch.Tensor) else v

    fast = op(*[to(a, device) for a in args], **{k: to(v, device) for k, v in kwargs.items()})
    ref = op(*[to(a, "cpu") for a in args], **{k: to(v, "cpu") for k, v in kwargs.items()})
    fast = fast if isinstance(fast, (tuple, list)) else (fast,)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    for i, (f, r) in enumerate(zip(fast, ref)):
        f = f.cpu()
        assert f.shape == r.shape and f.dtype == r.dtype, f"output {i}: {f.shape}/{f.dtype} vs {r.shape}/{r.dtype}"
        assert f.stride() == r.stride(), f"output {i}: strides {f.stride()} vs reference {r.stride()}"
        if f.dtype in exact_dtypes:
            assert torch.equal(f.view(torch.uint8) if f.element_size() == 1 else f,
                               r.view(torch.uint8) if r.element_size() == 1 else r), f"output {i} differs"
        else:
            torch.testing.assert_close(f.float(), r.float(), atol=atol, rtol=rtol, msg=f"output {i}")
    return fast, ref


def use_storage_read_path(kind: str, monkeypatch) -> None:
    """Run a storage test on one read path: "pure-python" disables the C helper (torch_deepstack.storage.fastio),
    "c-helper" skips the test where the helper cannot be built."""
    import pytest

    from torch_deepstack.storage import fastio
    if kind == "pure-python":
        monkeypatch.setattr(fastio, "_lib", None)
        monkeypatch.setattr(fastio, "_tried", True)
    elif fastio.load() is None:
        pytest.skip(f"C helper unavailable: {fastio.reason}")


def recorded_cuda_graphs() -> int:
    """CUDA graphs that Inductor's CUDA graph trees (torch.compile(mode="reduce-overhead")) have recorded on the
    current device: the trees' nodes."""
    from torch._inductor import cudagraph_trees
    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    if manager is None:
        return 0
    count, todo = 0, list(manager.get_roots())
    while todo:
        node = todo.pop()
        count += 1
        for children in node.children.values():
            todo.extend(children)
    return count
