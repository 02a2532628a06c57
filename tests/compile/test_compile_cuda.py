"""Compile integration on the GPU: quantize_ + torch.compile (Inductor, fullgraph) trains on the FP8 kernels with
the eager module's results, and the Inductor pass rewrites linears to the CUDA fp8_linear."""
import pytest
import torch
import torch.nn as nn

import torch_deepstack  # noqa: F401
from tests.helpers import calc_diff, fresh_randn, output_and_grads, recorded_cuda_graphs
from torch_deepstack.compile import fp8_linear_pass, quantize_
from torch_deepstack.gemm import FP8Linear

pytestmark = pytest.mark.cuda
DEV = "cuda"
FP8_DIFF = 2e-3    # FP8 forward / dgrad / wgrad against an fp32 product of the unquantised inputs


def _mlp():
    return nn.Sequential(nn.Linear(512, 768, dtype=torch.bfloat16), nn.GELU(),
                         nn.Linear(768, 384, bias=False, dtype=torch.bfloat16)).to(DEV)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("lead", [(300,), (3, 129)])
def test_inductor_compiled_fp8linear_matches_eager(lead):
    """One FP8Linear with bias under Inductor (fullgraph): output and gradients (x, W, b) as the eager module's, up to
    the order of the bias-gradient reduction. (torch 2.11 once gave all-zero compiled gradients.)"""
    torch._dynamo.reset()
    layer = FP8Linear(512, 384, device=DEV, dtype=torch.bfloat16)
    x = fresh_randn(*lead, 512, dtype=torch.bfloat16, device=DEV)
    gy = fresh_randn(*lead, 384, dtype=torch.bfloat16, device=DEV)
    params = tuple(layer.parameters())
    got = output_and_grads(torch.compile(layer, fullgraph=True), (x,), gy, params)
    want = output_and_grads(layer, (x,), gy, params)
    for g, w in zip(got, want):
        assert w.abs().max() > 0
        assert calc_diff(g, w) < 1e-6


@pytest.mark.timeout(600)
@pytest.mark.parametrize("lead", [(300,), (3, 129)])
def test_quantize_then_inductor_fullgraph_trains(lead):
    """quantize_ + Inductor (fullgraph) on a two-layer MLP: output and every gradient FP8-close to fp32 autograd of
    the unquantised model. (Against the eager FP8 modules the fused GELU/bias rounding may move a 1x128 group's
    scale, so that comparison is only FP8-close too.)"""
    torch._dynamo.reset()
    model = _mlp()
    plain = tuple(p.detach().float() for p in model.parameters())   # W0, b0, W2 before the swap
    quantize_(model)
    assert isinstance(model[0], FP8Linear) and isinstance(model[2], FP8Linear)
    x = fresh_randn(*lead, 512, dtype=torch.bfloat16, device=DEV)
    gy = fresh_randn(*lead, 384, dtype=torch.bfloat16, device=DEV)
    got = output_and_grads(torch.compile(model, fullgraph=True), (x,), gy, tuple(model.parameters()))

    F = torch.nn.functional
    want = output_and_grads(lambda xf, w0, b0, w2: F.linear(F.gelu(F.linear(xf, w0, b0)), w2), (x.float(), *plain),
                            gy.float())
    for g, w in zip(got, want):
        assert calc_diff(g, w) < FP8_DIFF


@pytest.mark.timeout(600)
def test_inductor_pass_runs_the_cuda_fp8_linear():
    torch._dynamo.reset()
    model = _mlp()
    x = fresh_randn(257, 512, dtype=torch.bfloat16, device=DEV)
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False), fp8_linear_pass() as p:
        before = p.count
        y = torch.compile(model, fullgraph=True)(x)
        rewrites = p.count - before
        expected = torch.ops.deepstack.fp8_linear(torch.nn.functional.gelu(torch.ops.deepstack.fp8_linear(
            x, model[0].weight, model[0].bias)), model[2].weight)
        want = model(x).float()
    assert rewrites == 2
    assert calc_diff(y, expected) < 1e-5
    assert calc_diff(y, want) < FP8_DIFF


# torch.compile(mode="reduce-overhead"): Inductor replays the compiled graphs through CUDA graph trees, PyTorch's
# answer to a host-bound step (docs/gemm.md "Host time"). Our ops must be captured, not make Inductor skip the graphs.

@pytest.mark.timeout(600)
def test_reduce_overhead_fp8linear_training_replays_match_eager():
    """FP8Linear under torch.compile(mode="reduce-overhead", fullgraph=True): forward and backward are recorded as
    CUDA graphs (no cudagraph skip), and every step - warm-up, recording and replays, each with fresh inputs and the
    weight changed in place as an optimizer would - gives the eager module's output and gradients."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    layer = FP8Linear(512, 384, device=DEV, dtype=torch.bfloat16)
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    params = tuple(layer.parameters())
    for _ in range(5):
        with torch.no_grad():
            layer.weight.add_(fresh_randn(384, 512, dtype=torch.bfloat16, device=DEV, scale=0.01))
        x = fresh_randn(300, 512, dtype=torch.bfloat16, device=DEV)
        gy = fresh_randn(300, 384, dtype=torch.bfloat16, device=DEV)
        got = [t.clone() for t in output_and_grads(compiled, (x,), gy, params)]
        want = output_and_grads(layer, (x,), gy, params)
        for g, w in zip(got, want):
            assert w.abs().max() > 0
            assert calc_diff(g, w) < 1e-6
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert recorded_cuda_graphs() >= 2   # the forward and the backward


@pytest.mark.timeout(600)
def test_reduce_overhead_inductor_pass_replays():
    """The Inductor FP8 pass under reduce-overhead (inference): the rewritten graph is recorded as a CUDA graph and its
    replays compute deepstack::fp8_linear's result on fresh inputs."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = _mlp()
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False), fp8_linear_pass() as p:
        before = p.count
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        for _ in range(4):
            x = fresh_randn(257, 512, dtype=torch.bfloat16, device=DEV)
            y = compiled(x).clone()
            expected = torch.ops.deepstack.fp8_linear(torch.nn.functional.gelu(torch.ops.deepstack.fp8_linear(
                x, model[0].weight, model[0].bias)), model[2].weight)
            assert calc_diff(y, expected) < 1e-5
        rewrites = p.count - before
    assert rewrites == 2
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert recorded_cuda_graphs() >= 1


@pytest.mark.timeout(600)
def test_reduce_overhead_frozen_fp8linear_serving():
    """Serving: a frozen FP8Linear compiled with reduce-overhead after its first eager call replays with its frozen
    FP8 copies read in place (no cudagraph skip), equal to the eager module on fresh inputs, and a
    refresh_fp8_weight_ after a weight change reaches the recorded graph."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    layer = FP8Linear(512, 384, device=DEV, dtype=torch.bfloat16).freeze_fp8_weight_()
    with torch.no_grad():
        layer(fresh_randn(8, 512, dtype=torch.bfloat16, device=DEV))   # makes the frozen copies
        compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
        for step in range(5):
            if step == 3:
                layer.weight.mul_(-0.5)
                layer.refresh_fp8_weight_()
            x = fresh_randn(65, 512, dtype=torch.bfloat16, device=DEV)
            got = compiled(x).clone()
            assert calc_diff(got, layer(x)) < 1e-6
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert recorded_cuda_graphs() >= 1
