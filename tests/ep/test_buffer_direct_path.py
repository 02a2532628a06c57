"""ep.Buffer's eager fast path: plain eager calls run the op implementations directly; anything that needs the
dispatcher (autograd, dispatch modes, tensor subclasses, torch.compile) still goes through torch.ops."""
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from torch_deepstack.ep import Buffer
from torch_deepstack.ep.buffer import _direct_ok
from torch_deepstack.ep.ops import single_process_group_name


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


class _Sub(torch.Tensor):
    pass


def test_direct_ok_conditions():
    x = torch.randn(3, 4)
    assert _direct_ok(x, None)
    xg = x.clone().requires_grad_()
    assert not _direct_ok(xg)
    with torch.no_grad():
        assert _direct_ok(xg)
    assert not _direct_ok(x.as_subclass(_Sub))
    with _OpLog():
        assert not _direct_ok(x)


def _buffer_and_inputs(gen):
    single_process_group_name()
    buf = Buffer(dist.group.WORLD, Buffer.get_dispatch_config(1).get_nvl_buffer_size_hint(512, 1), 0)
    x = torch.randn(11, 256, generator=gen)
    idx = torch.randint(-1, 8, (11, 2), generator=gen)
    w = torch.rand(11, 2, generator=gen)
    return buf, x, idx, w


def _step(buf, x, idx, w):
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, 8)
    rx, ridx, rw, counts, handle, ev = buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                   num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w)
    again, *_ = buf.dispatch(x * 2, handle=handle)
    out, _, _ = buf.combine(rx * 3, handle)
    return rx, ridx, rw, counts, again, out


def test_direct_path_matches_dispatcher_path():
    gen = torch.Generator().manual_seed(7)
    buf, x, idx, w = _buffer_and_inputs(gen)
    direct = _step(buf, x, idx, w)
    with _OpLog() as log:
        through_ops = _step(buf, x, idx, w)
    assert {"deepstack.ep_get_dispatch_layout.default", "deepstack.ep_dispatch.default",
            "deepstack.ep_dispatch_cached.default", "deepstack.ep_combine.default"} <= set(log.names)
    for a, b in zip(direct, through_ops):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:
            assert a == b
    routed = (idx >= 0).any(1)
    assert torch.equal(direct[0], x[routed]) and torch.equal(direct[4], 2 * x[routed])
    assert torch.equal(direct[5], torch.where(routed.unsqueeze(1), 3 * x, torch.zeros_like(x)))
    buf.destroy()


def test_autograd_still_goes_through_the_op():
    gen = torch.Generator().manual_seed(8)
    buf, x, idx, w = _buffer_and_inputs(gen)
    x.requires_grad_()
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, 8)
    rx, _, _, _, handle, _ = buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                          num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w)
    assert rx.grad_fn is not None
    out, _, _ = buf.combine(rx * 2, handle)
    out.sum().backward()
    routed = (idx >= 0).any(1).float().unsqueeze(1)
    assert torch.equal(x.grad, 2 * routed.expand_as(x))
    buf.destroy()
