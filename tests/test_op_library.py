"""Repo-wide checks over every op registered under torch.ops.deepstack: no op can skip them."""
import pytest
import torch

import torch_deepstack  # noqa: F401
from torch_deepstack import _library


def all_ops():
    return sorted(_library.SCHEMAS)


_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def opcheck_utils(args, kwargs):
    # SchemaCheckMode compares inputs before/after with allclose, which has no float8 kernel: skip only that check
    # for samples that feed float8 tensors (their mutation annotations are still checked by the other utils).
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    fp8_in = any(isinstance(t, torch.Tensor) and t.dtype in _FP8 for t in leaves)
    return tuple(u for u in torch.library._OPCHECK_DEFAULT_UTILS if not (fp8_in and u == "test_schema"))


def test_every_schema_is_registered_with_all_faces():
    registered = {n.split("::", 1)[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("deepstack::")}
    for name in all_ops():
        assert name in registered, f"deepstack::{name} is in SCHEMAS but not registered"
        f = _library.FACES[name]
        assert f.fake is not None, f"deepstack::{name} has no fake in meta_impls/"
        assert f.samples is not None, f"deepstack::{name} provides no sample inputs for opcheck"
        assert f.reference is not None, f"deepstack::{name} has no CPU reference kernel"
    unknown = registered - set(all_ops())
    assert not unknown, f"ops registered outside the SCHEMAS table: {unknown}"


@pytest.mark.parametrize("name", all_ops())
def test_opcheck_cpu(name):
    op = _library.op(name)
    samples = _library.FACES[name].samples("cpu")
    assert samples, f"deepstack::{name} returned no samples"
    for args, kwargs in samples:
        torch.library.opcheck(op, args, kwargs, test_utils=opcheck_utils(args, kwargs))


@pytest.mark.cuda
@pytest.mark.parametrize("name", all_ops())
def test_opcheck_cuda(name):
    if _library.FACES[name].cuda is None:
        pytest.skip(f"deepstack::{name} has no CUDA kernel")
    op = _library.op(name)
    for args, kwargs in _library.FACES[name].samples("cuda"):
        torch.library.opcheck(op, args, kwargs, test_utils=opcheck_utils(args, kwargs))


def test_missing_device_kernel_gives_clear_error():
    lib = torch.library.Library("deepstack_test_missing", "DEF")
    lib.define("only_cpu(Tensor x) -> Tensor")
    lib.impl("only_cpu", _library._missing_kernel("only_cpu", "cuda", ["cpu"]), "CPU")
    with pytest.raises(_library.DeviceNotSupportedError, match="no CUDA kernel; it runs on: cpu"):
        torch.ops.deepstack_test_missing.only_cpu(torch.zeros(1))


def test_compiles_fullgraph_through_every_op_family():
    # One op per area through torch.compile(fullgraph=True): the fakes must carry the graph.
    x = torch.randn(5, 256, dtype=torch.bfloat16)

    def f(x):
        q, s = torch.ops.deepstack.per_token_group_quant_fp8(x)
        return q.float() * s.repeat_interleave(128, dim=-1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)
    x2 = torch.randn(9, 384, dtype=torch.bfloat16)   # a second shape through the same dynamic graph
    torch.testing.assert_close(compiled(x2), f(x2), rtol=0, atol=0)


@pytest.mark.cuda
def test_allocating_into_cuda_graph_pool_under_capture_and_graph_trees():
    """The guard that keeps caches and first-use state out of CUDA graph pools: true under torch.cuda.graph capture
    and while Inductor's graph trees warm up and record a compiled function (seen from inside an op), false
    outside them."""
    seen = []

    @torch.library.custom_op("deepstack_test::pool_probe", mutates_args=())
    def probe(x: torch.Tensor) -> torch.Tensor:
        seen.append(_library.allocating_into_cuda_graph_pool())
        return x * 2

    @probe.register_fake
    def _(x):
        return torch.empty_like(x)

    x = torch.ones(8, device="cuda")
    assert not _library.allocating_into_cuda_graph_pool()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        probe(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        probe(x)
    assert seen == [False, True]
    seen.clear()
    compiled = torch.compile(lambda t: probe(t) + 1, mode="reduce-overhead", fullgraph=True)
    for _ in range(4):
        assert torch.equal(compiled(x), x * 2 + 1)
    assert seen == [True, True]   # the warm-up run and the recording; replays run no Python
    assert not _library.allocating_into_cuda_graph_pool()
    probe(x)
    assert seen[-1] is False
