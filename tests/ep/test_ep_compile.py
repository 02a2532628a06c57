"""The EP ops under torch.compile(fullgraph=True): the fakes carry data-dependent receive sizes (unbacked) and
the static worst-case form, in a world of one (gloo group in this process)."""
import pytest
import torch

import torch_deepstack  # noqa: F401
from tests.helpers import output_and_grads
from torch_deepstack.ep.ops import single_process_group_name

E_NORMAL, E_LL, M_LL = 8, 4, 8


def _normal_step(num_worst_tokens):
    """dispatch -> a stand-in expert that uses the routing weights -> combine."""
    group = single_process_group_name()

    def step(x, idx, w):
        rx, _, ridx, rw, _, mask, rc, src = torch.ops.deepstack.ep_dispatch(x, None, idx, w, None, E_NORMAL, 1, group,
                                                                             1, num_worst_tokens)
        y = rx * (rw.sum(1, keepdim=True) + 1)
        out, _ = torch.ops.deepstack.ep_combine(y, None, mask, rc, src, group, num_worst_tokens)
        return out
    return step


def _low_latency_step(x, idx, w):
    group = single_process_group_name()
    rx, _, cnt, src_info, layout_range = torch.ops.deepstack.ep_low_latency_dispatch(x, idx, M_LL, E_LL, 1, group,
                                                                                     False)
    return torch.ops.deepstack.ep_low_latency_combine(rx * 2, idx, w, src_info, layout_range, M_LL, group), cnt


def _assert_grads_like_eager(step, x, idx, w, gy):
    """Output and gradients of x and w, compiled against eager autograd, by value (a compiled backward can come out
    all-zero while staying finite, as FP8Linear's did on torch 2.11)."""
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got_all, want_all = (output_and_grads(lambda xi, wi, f=fn: f(xi, idx, wi), (x, w), gy) for fn in (compiled, step))
    for got, want in zip(got_all, want_all):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("num_worst_tokens", [0, 32])
def test_dispatch_expert_combine_compiles_fullgraph(num_worst_tokens):
    step = _normal_step(num_worst_tokens)
    x = torch.randn(16, 128)
    idx = torch.randint(-1, E_NORMAL, (16, 2))
    w = torch.rand(16, 2)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, idx, w), step(x, idx, w))
    x2, idx2 = torch.randn(16, 128), torch.randint(-1, E_NORMAL, (16, 2))
    torch.testing.assert_close(compiled(x2, idx2, w), step(x2, idx2, w))


def test_low_latency_compiles_fullgraph():
    x = torch.randn(6, 128, dtype=torch.bfloat16)
    idx = torch.randint(-1, E_LL, (6, 2))
    w = torch.rand(6, 2)
    compiled = torch.compile(_low_latency_step, fullgraph=True, backend="aot_eager")
    out, cnt = compiled(x, idx, w)
    ref_out, ref_cnt = _low_latency_step(x, idx, w)
    assert torch.equal(out, ref_out) and torch.equal(cnt, ref_cnt)


@pytest.mark.parametrize("num_worst_tokens", [0, 32])
def test_dispatch_combine_backward_compiles_like_eager(num_worst_tokens):
    """Forward and backward through dispatch -> expert -> combine under torch.compile(fullgraph=True)."""
    _assert_grads_like_eager(_normal_step(num_worst_tokens), torch.randn(16, 128),
                             torch.randint(-1, E_NORMAL, (16, 2)), torch.rand(16, 2), torch.randn(16, 128))


def test_low_latency_backward_compiles_like_eager():
    """The low-latency pair forward and backward under torch.compile(fullgraph=True)."""
    _assert_grads_like_eager(lambda x, idx, w: _low_latency_step(x, idx, w)[0],
                             torch.randn(6, 128, dtype=torch.bfloat16), torch.randint(0, E_LL, (6, 2)),
                             torch.rand(6, 2), torch.randn(6, 128, dtype=torch.bfloat16))
