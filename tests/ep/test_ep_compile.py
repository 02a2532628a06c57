"""The EP ops under torch.compile(fullgraph=True): the fakes carry data-dependent receive sizes (unbacked) and
the static worst-case form, in a world of one (gloo group in this process)."""
import pytest
import torch

import torch_deepstack  # noqa: F401
from torch_deepstack.ep.ops import single_process_group_name


@pytest.mark.parametrize("num_worst_tokens", [0, 32])
def test_dispatch_expert_combine_compiles_fullgraph(num_worst_tokens):
    group = single_process_group_name()
    E = 8

    def step(x, idx, w):
        rx, _, ridx, rw, _, mask, rc, src = torch.ops.deepstack.ep_dispatch(x, None, idx, w, None, E, 1, group, 1,
                                                                             num_worst_tokens)
        y = rx * (rw.sum(1, keepdim=True) + 1)
        out, _ = torch.ops.deepstack.ep_combine(y, None, mask, rc, src, group, num_worst_tokens)
        return out

    x = torch.randn(16, 128)
    idx = torch.randint(-1, E, (16, 2))
    w = torch.rand(16, 2)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, idx, w), step(x, idx, w))
    x2, idx2 = torch.randn(16, 128), torch.randint(-1, E, (16, 2))
    torch.testing.assert_close(compiled(x2, idx2, w), step(x2, idx2, w))


def test_low_latency_compiles_fullgraph():
    group = single_process_group_name()
    E, M = 4, 8

    def step(x, idx, w):
        rx, _, cnt, src_info, layout_range = torch.ops.deepstack.ep_low_latency_dispatch(x, idx, M, E, 1, group,
                                                                                         False)
        return torch.ops.deepstack.ep_low_latency_combine(rx * 2, idx, w, src_info, layout_range, M, group), cnt

    x = torch.randn(6, 128, dtype=torch.bfloat16)
    idx = torch.randint(-1, E, (6, 2))
    w = torch.rand(6, 2)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out, cnt = compiled(x, idx, w)
    ref_out, ref_cnt = step(x, idx, w)
    assert torch.equal(out, ref_out) and torch.equal(cnt, ref_cnt)


@pytest.mark.parametrize("num_worst_tokens", [0, 32])
def test_dispatch_combine_backward_compiles_like_eager(num_worst_tokens):
    """Forward and backward through dispatch -> expert -> combine under torch.compile(fullgraph=True): the gradients
    of x and of the routing weights equal eager autograd's (by value: a compiled backward can come out all-zero while
    staying finite, as FP8Linear's did on torch 2.11)."""
    group = single_process_group_name()
    E = 8

    def step(x, idx, w):
        rx, _, ridx, rw, _, mask, rc, src = torch.ops.deepstack.ep_dispatch(x, None, idx, w, None, E, 1, group, 1,
                                                                             num_worst_tokens)
        y = rx * (rw.sum(1, keepdim=True) + 1)
        out, _ = torch.ops.deepstack.ep_combine(y, None, mask, rc, src, group, num_worst_tokens)
        return out

    x = torch.randn(16, 128)
    idx = torch.randint(-1, E, (16, 2))
    w = torch.rand(16, 2)
    gy = torch.randn(16, 128)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (compiled, step):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(xi, idx, wi)
        grads.append((out, *torch.autograd.grad(out, (xi, wi), gy)))
    for got, want in zip(*grads):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want)


def test_low_latency_backward_compiles_like_eager():
    """The low-latency pair forward and backward under torch.compile(fullgraph=True): gradients of x and of the
    combine weights equal eager autograd's, by value."""
    group = single_process_group_name()
    E, M = 4, 8

    def step(x, idx, w):
        rx, _, cnt, src_info, layout_range = torch.ops.deepstack.ep_low_latency_dispatch(x, idx, M, E, 1, group,
                                                                                         False)
        return torch.ops.deepstack.ep_low_latency_combine(rx * 2, idx, w, src_info, layout_range, M, group)

    x = torch.randn(6, 128, dtype=torch.bfloat16)
    idx = torch.randint(0, E, (6, 2))
    w = torch.rand(6, 2)
    gy = torch.randn(6, 128, dtype=torch.bfloat16)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (compiled, step):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(xi, idx, wi)
        grads.append((out, *torch.autograd.grad(out, (xi, wi), gy)))
    for got, want in zip(*grads):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want)
