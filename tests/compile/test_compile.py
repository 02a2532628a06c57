"""Compile integration: the fp8_linear op, the quantize_ module swap and the Inductor pass."""
import pytest
import torch
import torch.nn as nn

import torch_deepstack  # noqa: F401
from torch_deepstack.compile import fp8_linear_pass, freeze_fp8_weights_, quantize_, refresh_fp8_weights_
from torch_deepstack.gemm import FP8Linear
from tests.helpers import calc_diff, fresh_randn, output_and_grads

FP8_DIFF = 1e-3    # FP8 (e4m3, 1x128 / 128x128 scales) against an fp32 product of the unquantised inputs


@pytest.mark.parametrize("lead", [(7,), (2, 5)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_linear_matches_linear(lead, dtype):
    x = fresh_randn(*lead, 256, dtype=dtype)
    w = fresh_randn(384, 256, dtype=dtype, scale=256 ** -0.5)
    b = fresh_randn(384, dtype=dtype)
    y = torch.ops.deepstack.fp8_linear(x, w, b)
    assert y.shape == (*lead, 384) and y.dtype == dtype
    assert calc_diff(y, x.double() @ w.double().t() + b.double()) < FP8_DIFF


def test_fp8_linear_bad_input():
    x = torch.randn(4, 256)
    with pytest.raises(ValueError, match="multiples of 128"):
        torch.ops.deepstack.fp8_linear(x, torch.randn(100, 256))
    with pytest.raises(TypeError, match="bfloat16 or float32"):
        torch.ops.deepstack.fp8_linear(x.half(), torch.randn(128, 256).half())
    with pytest.raises(ValueError, match="bias must be"):
        torch.ops.deepstack.fp8_linear(x, torch.randn(128, 256), torch.randn(3))


def test_quantize_swaps_eligible_linears_only():
    model = nn.Sequential(nn.Linear(256, 384), nn.ReLU(), nn.Linear(384, 100), nn.Linear(100, 128))
    x = fresh_randn(9, 256)
    ref = model(x)
    quantize_(model)
    assert isinstance(model[0], FP8Linear) and type(model[2]) is nn.Linear and type(model[3]) is nn.Linear
    assert calc_diff(model(x), ref) < FP8_DIFF
    with pytest.raises(ValueError, match="cannot become an FP8Linear"):
        quantize_(model, lambda m, fqn: fqn == "2")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_then_compile_fullgraph_trains(dtype):
    """The compiled module's output and gradients (input, weights, biases) equal the eager FP8 module's. (On torch
    2.11 an output `.to(its own dtype)` once made every compiled gradient zero; finite-only checks missed it.)"""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(256, 256, dtype=dtype), nn.GELU(), nn.Linear(256, 128, dtype=dtype))
    quantize_(model)
    x = fresh_randn(6, 256, dtype=dtype)
    gy = fresh_randn(6, 128, dtype=dtype)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    params = tuple(model.parameters())
    got_all, want_all = (output_and_grads(fn, (x,), gy, params) for fn in (compiled, model))
    for got, want in zip(got_all, want_all):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.timeout(600)
def test_freeze_and_refresh_a_whole_model():
    """freeze_fp8_weights_ / refresh_fp8_weights_ set every FP8Linear of a quantize_'d model: frozen outputs ignore a
    weight change until the refresh, then equal the unfrozen model's."""
    model = quantize_(nn.Sequential(nn.Linear(256, 384, dtype=torch.bfloat16), nn.GELU(),
                                    nn.Linear(384, 128, bias=False, dtype=torch.bfloat16)))
    x = fresh_randn(7, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        assert freeze_fp8_weights_(model) == 2 and model[0].fp8_weight_frozen and model[2].fp8_weight_frozen
        before = model(x)
        for layer in (model[0], model[2]):
            layer.weight.mul_(0.5)                   # (the bias is not quantised: not frozen)
        assert torch.equal(model(x), before)
        assert refresh_fp8_weights_(model) == 2
        refreshed = model(x)
        assert freeze_fp8_weights_(model, frozen=False) == 2 and refresh_fp8_weights_(model) == 0
        assert calc_diff(refreshed, model(x)) < 1e-6 and calc_diff(refreshed, before) > 1e-3


def _deepstack_ops_of(module, x):
    """(compiled module, its output on x, the deepstack ops in the graph torch.compile(fullgraph=True) traced);
    the traced graph runs as it is."""
    ops = []

    def backend(gm, example_inputs):
        for m in gm.modules():   # (an autograd.Function's forward is a subgraph)
            if isinstance(m, torch.fx.GraphModule):
                ops.extend(str(n.target) for n in m.graph.nodes if "deepstack" in str(n.target))
        return gm.forward
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    return compiled, compiled(x), ops


@pytest.mark.parametrize("train", [False, True], ids=["inference", "frozen-weight training"])
def test_compiled_frozen_fp8_linear_reads_its_fp8_copies(train):
    """A frozen FP8Linear (freeze_fp8_weight_) compiled after its first eager call: the graph reads the frozen FP8
    copies (no weight quantisation in it, unlike the unfrozen module's graph) and sees refresh_fp8_weight_'s
    in-place update on the next call."""
    torch._dynamo.reset()
    f8 = FP8Linear(256, 128, dtype=torch.bfloat16)
    x = fresh_randn(5, 256, dtype=torch.bfloat16).requires_grad_(train)
    f8.weight.requires_grad_(False)   # (training: a frozen base weight, gradients for x only)
    mode = torch.enable_grad if train else torch.no_grad
    with mode():
        _, _, ops = _deepstack_ops_of(f8, x)
        assert any("per_block_quant" in o for o in ops)      # unfrozen: W quantised inside the graph
        f8.freeze_fp8_weight_()
        want = f8(x)                                          # eager: makes the frozen copies
        torch._dynamo.reset()
        compiled, got, ops = _deepstack_ops_of(f8, x)
        assert ops and not any("per_block_quant" in o for o in ops)
        assert calc_diff(got, want) < 1e-6
        with torch.no_grad():
            f8.weight.mul_(-2)
        f8.refresh_fp8_weight_()
        again = compiled(x)                                   # the same graph, the rewritten copies
        assert calc_diff(again, f8(x)) < 1e-6 and calc_diff(again, -2 * want) < 1e-2


def test_inductor_pass_rewrites_eligible_linears():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(256, 384, dtype=torch.bfloat16)
            self.b = nn.Linear(384, 256, bias=False, dtype=torch.bfloat16)
            self.c = nn.Linear(256, 100, dtype=torch.bfloat16)        # N not a multiple of 128: left alone

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    torch._dynamo.reset()
    m = M()
    x = fresh_randn(2, 5, 256, dtype=torch.bfloat16)
    # No FX graph cache: on a cache hit Inductor reuses the rewritten graph without running the pass, so the
    # rewrite count below would read 0.
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False), fp8_linear_pass() as p:
        before = p.count
        y = torch.compile(m, fullgraph=True)(x)
        rewrites = p.count - before
        expected = m.c(torch.relu(torch.ops.deepstack.fp8_linear(
            torch.relu(torch.ops.deepstack.fp8_linear(x, m.a.weight, m.a.bias)), m.b.weight)))
        plain = m(x)
    assert rewrites == 2
    assert calc_diff(y, expected) < 1e-5
    assert calc_diff(y, plain) < FP8_DIFF * 4


def test_quantize_keeps_parameters_ties_mode_and_leaves_unsupported_linears_alone():
    """Found by a review (2026-12-02): the swap copied weights into new Parameters (an embedding-tied head came
    untied, frozen layers started training), dropped eval mode, swapped one of two names of a shared Linear, failed
    on a second call, and swapped fp64, zero-width and weight_norm'd linears it could not run."""
    emb = nn.Embedding(128, 256)
    head = nn.Linear(256, 128, bias=False)
    head.weight = emb.weight                           # tied, as language models tie embedding and output
    shared = nn.Linear(128, 128)
    frozen = nn.Linear(256, 128).requires_grad_(False)
    normed = torch.nn.utils.parametrizations.weight_norm(nn.Linear(128, 128))
    model = nn.ModuleDict(dict(emb=emb, head=head, a=shared, b=shared, frozen=frozen, normed=normed,
                               f64=nn.Linear(128, 128, dtype=torch.float64), empty=nn.Linear(0, 128)))
    model.eval()
    keep = {k: model[k].weight for k in ("head", "frozen", "a")}
    quantize_(model)
    assert isinstance(model["head"], FP8Linear) and model["head"].weight is emb.weight
    assert model["a"] is model["b"] and isinstance(model["a"], FP8Linear) and model["a"].weight is keep["a"]
    assert model["frozen"].weight is keep["frozen"] and not model["frozen"].weight.requires_grad
    assert not model["frozen"].training and not model["head"].training
    for name in ("normed", "f64", "empty"):
        assert type(model[name]) is not FP8Linear, name
    quantize_(model)                                   # a second call: nothing left to swap, no error
    with pytest.raises(ValueError, match="normed .* cannot become an FP8Linear"):
        quantize_(model, lambda m, fqn: fqn == "normed")

    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)
    with pytest.raises(ValueError, match="only plain nn.Linear"):
        quantize_(nn.Sequential(Doubled(128, 128)), lambda m, fqn: fqn == "0")
    with pytest.raises(ValueError, match="root module"):
        quantize_(nn.Linear(128, 128))


def _rewrites(fn, *args, pass_=None):
    from torch_deepstack.compile import LinearToFP8Pass
    torch._dynamo.reset()
    p = pass_ or LinearToFP8Pass()
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False, post_grad_custom_post_pass=p):
        y = torch.compile(fn, fullgraph=True)(*args)
    return p.count, y


def test_inductor_pass_leaves_non_linear_products_alone():
    """Found by a review (2026-12-02): addmm with beta/alpha (rewritten without them: wrong values), an addmm whose
    bias is [M, N] or [1] (compile error), the pass's dtypes (ignored) and activation products such as attention
    scores (rewritten to FP8)."""
    from torch_deepstack.compile import LinearToFP8Pass
    bf = torch.bfloat16
    x = fresh_randn(8, 128, dtype=bf)
    w = nn.Parameter(fresh_randn(256, 128, dtype=bf, scale=0.1), requires_grad=False)
    b = fresh_randn(256, dtype=bf)
    lin = nn.Linear(128, 256, dtype=bf)
    assert _rewrites(lin, x)[0] == 1                                     # control: a linear layer is rewritten
    for name, fn in (("beta/alpha", lambda x: torch.addmm(b, x, w.t(), beta=2, alpha=3)),
                     ("[M, N] bias", lambda x: torch.addmm(fresh_randn(8, 256, dtype=bf), x, w.t())),
                     ("[1] bias", lambda x: torch.addmm(b[:1], x, w.t()))):
        assert _rewrites(fn, x)[0] == 0, name
    proj = nn.Linear(128, 128, dtype=bf)
    n, _ = _rewrites(lambda x: (x @ proj(x).T).softmax(-1), x)          # q @ k.T, k computed in the graph
    assert n == 1                                                        # (proj itself; not the scores)
    lin32 = nn.Linear(128, 256)
    assert _rewrites(lin32, x.float(), pass_=LinearToFP8Pass(dtypes=(torch.bfloat16,)))[0] == 0
    assert LinearToFP8Pass(dtypes=(torch.bfloat16,)).uuid() != LinearToFP8Pass().uuid()
    with pytest.raises(ValueError, match="bias must be torch.bfloat16"):
        torch.ops.deepstack.fp8_linear(x, w, b.float())
