"""_library.may_skip_dispatcher: eager calls go straight to an op's kernel only when nothing could see or change the
call in the dispatcher. Checked on CPU tensors (device_type="cpu"); the GPU tests run the CUDA path itself."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from torch_deepstack._library import kernel_for, may_skip_dispatcher


class _Sub(torch.Tensor):
    pass


class _Mode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _skip(*tensors):
    return may_skip_dispatcher(tensors, device_type="cpu")


def test_plain_eager_call_skips():
    x = torch.ones(4, 4)
    assert _skip(x, None, x)
    assert not may_skip_dispatcher((x,), device_type="cuda")      # another device: the dispatcher's choice


def test_anything_that_watches_the_dispatcher_keeps_it():
    x = torch.ones(4, 4)
    assert not _skip(x, x.as_subclass(_Sub))                       # subclasses (DTensor, FakeTensor, ...)
    with _Mode():
        assert not _skip(x)                                        # dispatch modes (FlopCounterMode, ...)
    with torch.device("cpu"):
        assert not _skip(x)                                        # function modes
    with torch.profiler.profile():
        assert not _skip(x)                                        # the profiler records ops in the dispatcher
    seen = []
    torch.vmap(lambda t: seen.append(_skip(t)) or t)(x)            # functorch transforms
    assert seen == [False]
    assert _skip(x)


def test_tracked_tensors_keep_the_dispatcher():
    x = torch.ones(4, 4, requires_grad=True)
    assert not _skip(torch.ones(2), x)
    with torch.no_grad():
        assert _skip(torch.ones(2), x)


def test_compiled_code_calls_the_op():
    seen = []

    @torch.compile(backend="eager", fullgraph=True)
    def f(x):
        seen.append(kernel_for("per_token_group_quant_fp8", x))
        return x + 1
    f(torch.ones(2, 128))
    assert seen == [torch.ops.deepstack.per_token_group_quant_fp8]
