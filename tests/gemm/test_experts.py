"""FP8Experts (torch_deepstack/gemm/experts.py): MoE expert MLPs as grouped FP8 GEMMs, on the CPU reference kernels
(the CUDA kernels take the same calls; their own tests are in test_gemm_cuda.py). Compared with a per-expert loop in
fp32 of the same bf16 weights. Tolerance calc_diff < 5e-3 for the output and every gradient: an expert is two FP8
GEMMs in a row (FP8Linear's single GEMM is held to 2e-3); measured over six seeds 1.9-2.1e-3 with SwiGLU (the
product of two quantised results) and 0.95-1.5e-3 without, while a wrong expert, row or scale gives 1e-1 and more.
Routing with an expert that gets no token, slots with no expert (-1) and a token sent twice to one expert."""
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import calc_diff
from torch_deepstack.gemm import FP8Experts

TOL = 5e-3


def _routing(t, k, g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, g - 1, (t, k), generator=gen)      # expert g - 1 gets no token
    idx[3, 1] = -1                                              # a slot with no expert
    idx[5] = idx[5, 0]                                          # a token sent twice to one expert
    w = torch.rand(t, k, generator=gen)
    return idx, w / w.sum(-1, keepdim=True)


def _small_case(num_experts, tokens, k, seed):
    """(module, x, topk_idx, topk_weights) with d_model = d_ff = 128."""
    torch.manual_seed(seed)
    x = torch.randn(tokens, 128, dtype=torch.bfloat16)
    return (FP8Experts(num_experts, 128, 128), x, *_routing(tokens, k, num_experts, seed=seed))


def _training_inputs(tokens, d_model, k, num_experts):
    """x (bf16) and the routing weights as leaves that want gradients, with topk_idx from _routing."""
    x = torch.randn(tokens, d_model, dtype=torch.bfloat16, requires_grad=True)
    idx, w = _routing(tokens, k, num_experts)
    return x, idx, w.requires_grad_(True)


def _reference(mod: FP8Experts, x, idx, w):
    """The loop FP8Experts replaces, in fp32 of the same weights."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    w_in, w_out = mod.w_in.float(), mod.w_out.float()
    for e in range(mod.num_experts):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x[tok].float() @ w_in[e].T
        act = F.silu(h[:, :mod.d_ff]) * h[:, mod.d_ff:] if mod.gated else F.silu(h)
        out.index_add_(0, tok, (act @ w_out[e].T) * w[tok, slot].float().unsqueeze(-1))
    return out


@pytest.mark.parametrize("gated", [True, False])
def test_forward_and_gradients_match_the_expert_loop(gated):
    torch.manual_seed(0)
    mod = FP8Experts(5, 256, 128, gated=gated)
    x, idx, w = _training_inputs(37, 256, 2, 5)
    y = mod(x, idx, w)
    assert y.shape == x.shape and y.dtype == x.dtype
    x_ref = x.detach().float().requires_grad_(True)
    w_ref = w.detach().clone().requires_grad_(True)
    ref_mod = FP8Experts(5, 256, 128, gated=gated, dtype=torch.float32)
    with torch.no_grad():
        ref_mod.w_in.copy_(mod.w_in.float())
        ref_mod.w_out.copy_(mod.w_out.float())
    want = _reference(ref_mod, x_ref, idx, w_ref)
    assert calc_diff(y.detach(), want.detach()) < TOL
    dy = torch.randn_like(want)
    y.float().backward(dy)
    want.backward(dy)
    assert calc_diff(x.grad, x_ref.grad) < TOL
    assert calc_diff(mod.w_in.grad, ref_mod.w_in.grad) < TOL
    assert calc_diff(mod.w_out.grad, ref_mod.w_out.grad) < TOL
    assert calc_diff(w.grad, w_ref.grad) < TOL
    assert mod.w_in.grad[4].eq(0).all() and mod.w_out.grad[4].eq(0).all()    # the expert with no token


@pytest.mark.parametrize("gated", [True, False])
def test_unwritten_padding_rows_never_reach_a_result(gated, monkeypatch):
    """The grouped GEMMs leave padding rows (id -1) unwritten; training zeroes only those that enter a weight
    gradient's operand. Poisoned (NaN) GEMM outputs must give the same outputs and gradients, bit for bit."""
    from torch_deepstack.gemm import experts as experts_mod

    def run():
        torch.manual_seed(3)
        mod = FP8Experts(4, 256, 128, gated=gated)
        x, idx, w = _training_inputs(29, 256, 2, 4)
        y = mod(x, idx, w)
        y.float().backward(torch.randn(y.shape))
        return [t.detach().clone() for t in (y, x.grad, w.grad, mod.w_in.grad, mod.w_out.grad)]

    clean = run()
    monkeypatch.setattr(experts_mod, "_new_rows", lambda m, n, device: torch.full(
        (m, n), float("nan"), dtype=torch.bfloat16, device=device))
    poisoned = run()
    for a, b in zip(clean, poisoned):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_from_linears_and_no_grad_and_a_weight_update():
    torch.manual_seed(1)
    lin = lambda i, o: torch.nn.Linear(i, o, bias=False, dtype=torch.bfloat16)   # noqa: E731
    up, gate = [lin(128, 256) for _ in range(3)], [lin(128, 256) for _ in range(3)]
    down = [lin(256, 128) for _ in range(3)]
    mod = FP8Experts.from_linears(up, down, gate)
    assert mod.gated and mod.w_in.shape == (3, 512, 128) and mod.w_out.shape == (3, 128, 256)
    x = torch.randn(20, 128, dtype=torch.bfloat16)
    idx, w = torch.randint(0, 3, (20, 2)), torch.full((20, 2), 0.5)
    want = torch.zeros(20, 128)
    for t in range(20):
        for s in range(2):
            e = int(idx[t, s])
            xf = x[t].float()
            act = F.silu(xf @ gate[e].weight.float().T) * (xf @ up[e].weight.float().T)
            want[t] += 0.5 * (act @ down[e].weight.float().T)
    with torch.no_grad():
        y = mod(x, idx, w)
    assert calc_diff(y.detach(), want.detach()) < TOL
    # with autograd: the same products, but the activation is kept in bf16 (the weight gradient quantises it
    # along M) where inference quantises the fp32 silu(gate) * up directly: 9.6e-5 apart here
    assert calc_diff(mod(x, idx, w).detach(), y) < 2e-4
    with torch.no_grad():
        mod.w_out.mul_(2)                                        # an optimizer step: the FP8 copies follow
        assert calc_diff(mod(x, idx, w), 2 * y) < 1e-4


def test_no_routed_token_gives_zeros():
    mod = FP8Experts(2, 128, 128)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    y = mod(x, torch.full((4, 1), -1), torch.ones(4, 1))
    assert y.eq(0).all()


def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match="multiples of 128"):
        FP8Experts(2, 100, 128)
    mod = FP8Experts(2, 128, 128)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="expert ids >= num_experts = 2"):
        mod(x, torch.full((4, 1), 2), torch.ones(4, 1))
    with pytest.raises(ValueError, match=r"topk_idx / topk_weights \[tokens, k\]"):
        mod(x, torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
    with pytest.raises(ValueError, match=r"x must be \[tokens, 128\]"):
        mod(torch.randn(4, 256), torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1))
    with pytest.raises(ValueError, match=r"x must be \[tokens, 128\]"):      # 3-D: was "too many values to unpack"
        mod(torch.randn(2, 2, 128), torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1))


def test_graph_safe_layout_equals_the_eager_one(monkeypatch):
    """Under CUDA-graph capture or torch.compile (simulated: the host-sync check patched) the layout is sized for the
    worst case on the device, without reading the counts: the same products, ids past the experts drop out, and a
    training step is refused with a clear error."""
    from torch_deepstack.gemm import experts as experts_mod
    mod, x, idx, w = _small_case(num_experts=4, tokens=30, k=3, seed=3)
    with torch.no_grad():
        want = mod(x, idx, w)
        monkeypatch.setattr(experts_mod, "_host_sync_allowed", lambda x: False)
        assert calc_diff(mod(x, idx, w), want) < 1e-6
        bad = idx.clone()
        bad[idx == 1] = 7                                   # no such expert: dropped (not checked without a sync)
        dropped = idx.masked_fill(idx == 1, -1)
        assert calc_diff(mod(x, bad, w), mod(x, dropped, w)) < 1e-6
    with pytest.raises(RuntimeError, match="training steps need the per-expert row counts"):
        mod(x, idx, w)


def test_inference_compiles_with_fullgraph():
    mod, x, idx, w = _small_case(num_experts=3, tokens=16, k=2, seed=4)
    with torch.no_grad():
        want = mod(x, idx, w)
        torch._dynamo.reset()
        got = torch.compile(mod, fullgraph=True, backend="eager")(x, idx, w)
    assert calc_diff(got, want) < 1e-6


@pytest.mark.parametrize("quantised", [False, True])
def test_masked_decode_layout_matches_the_expert_loop(quantised):
    """forward_masked on low-latency dispatch's layout [G, M_max, d]: valid rows as the fp32 expert (no routing
    weight), rows past masked_m untouched (out poisoned with NaN), an expert with no rows, x given as (q, scales)."""
    from torch_deepstack.quant import per_token_group_quant_fp8
    torch.manual_seed(6)
    mod = FP8Experts(4, 256, 128)
    x = torch.randn(4, 40, 256, dtype=torch.bfloat16)
    masked_m = torch.tensor([40, 0, 17, 1], dtype=torch.int32)
    out = torch.full((4, 40, 256), float("nan"), dtype=torch.bfloat16)
    with torch.no_grad():
        y = mod.forward_masked(per_token_group_quant_fp8(x) if quantised else x, masked_m, 16, out=out)
    assert y is out
    w_in, w_out = mod.w_in.detach().float(), mod.w_out.detach().float()
    for e, n in enumerate(masked_m.tolist()):
        assert y[e, n:].isnan().all()
        if n:
            h = x[e, :n].float() @ w_in[e].T
            want = (F.silu(h[:, :128]) * h[:, 128:]) @ w_out[e].T
            assert calc_diff(y[e, :n], want) < TOL


def test_masked_decode_layout_refuses_bad_input():
    mod = FP8Experts(2, 128, 128)
    x = torch.randn(2, 8, 128, dtype=torch.bfloat16)
    counts = torch.tensor([3, 8], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="inference only"):
        mod.forward_masked(x, counts, 8)
    with torch.no_grad(), pytest.raises(ValueError, match=r"x must be \[num_experts=2, M_max, 128\]"):
        mod.forward_masked(x[:1], counts, 8)


def test_frozen_weights_for_serving(monkeypatch):
    """freeze_fp8_weight_: the copies are made once and reused, also where an unfrozen module would quantise per call
    (capture, simulated by patching the capture check); refresh rewrites them in place; freeze_fp8_weights_ and
    refresh_fp8_weights_ reach FP8Experts; a first call under capture is refused."""
    from torch_deepstack.compile import freeze_fp8_weights_, refresh_fp8_weights_
    from torch_deepstack.gemm import linear
    mod, x, idx, w = _small_case(num_experts=3, tokens=20, k=2, seed=8)
    model = torch.nn.ModuleDict({"experts": mod})
    assert freeze_fp8_weights_(model) == 1 and mod.fp8_weight_frozen
    with torch.no_grad():
        y1 = mod(x, idx, w)
        fwd_in, fwd_out = mod._in_cache.fwd, mod._out_cache.fwd
        monkeypatch.setattr(linear, "_capturing", lambda t: True)
        from torch_deepstack.gemm import experts as experts_mod
        monkeypatch.setattr(experts_mod, "_capturing", lambda t: True)
        assert calc_diff(mod(x, idx, w), y1) < 1e-6
        assert mod._in_cache.fwd is fwd_in and mod._out_cache.fwd is fwd_out      # the same copies, not requantised
        mod.w_out.mul_(2)                                       # not seen until refreshed
        assert calc_diff(mod(x, idx, w), y1) < 1e-6
        assert refresh_fp8_weights_(model) == 1
        assert calc_diff(mod(x, idx, w), 2 * y1) < 1e-4 and mod._out_cache.fwd[0] is fwd_out[0]   # in place
        fresh = FP8Experts(3, 128, 128).freeze_fp8_weight_()
        with pytest.raises(RuntimeError, match="FP8Experts: the frozen FP8 weight is made on the first call"):
            fresh(x, idx, w)


@pytest.mark.cuda
@pytest.mark.parametrize("gated", [True, False])
def test_cuda_kernels_match_the_cpu_reference_path(gated):
    """The same module and routing on the H200 (grouped contiguous, k-grouped wgrad, quantiser kernels) and on the
    CPU reference kernels: the same recipe, so the results agree far closer than the FP8 tolerance."""
    torch.manual_seed(2)
    mod = FP8Experts(6, 512, 256, gated=gated)
    x = torch.randn(301, 512, dtype=torch.bfloat16)
    idx, w = _routing(301, 4, 6, seed=2)
    outs = []
    for device in ("cpu", "cuda"):
        m = FP8Experts(6, 512, 256, gated=gated, device=device)
        with torch.no_grad():
            m.w_in.copy_(mod.w_in)
            m.w_out.copy_(mod.w_out)
        xd, wd = (t.detach().to(device, copy=True).requires_grad_(True) for t in (x, w))   # fresh leaves
        y = m(xd, idx.to(device), wd)
        y.float().square().sum().backward()
        outs.append([t.detach().cpu() for t in (y, xd.grad, m.w_in.grad, m.w_out.grad, wd.grad)])
    for got, want in zip(outs[1], outs[0]):
        assert torch.isfinite(got).all() and calc_diff(got, want) < 5e-4


@pytest.mark.cuda
def test_cuda_graph_capture_of_inference_replays_new_routing():
    """Captured under torch.no_grad() (the device-sized layout, no host sync), replayed with new tokens and routing
    copied into the static inputs: equal to eager calls on the same inputs."""
    from torch_deepstack.testing.bench import capture_graph
    torch.manual_seed(5)
    mod = FP8Experts(8, 256, 256, device="cuda")
    x = torch.randn(200, 256, dtype=torch.bfloat16, device="cuda")
    idx, w = (t.cuda() for t in _routing(200, 2, 8, seed=5))
    with torch.no_grad():
        mod(x, idx, w)                                         # (eager first: the weight copies, the kernels)
        replay, out = capture_graph(lambda: mod(x, idx, w))
        for seed in (6, 7):
            x.copy_(torch.randn_like(x))
            new_idx, new_w = _routing(200, 2, 8, seed=seed)
            idx.copy_(new_idx)
            w.copy_(new_w)
            replay()
            assert calc_diff(out, mod(x, idx, w)) < 1e-6


@pytest.mark.cuda
def test_cuda_graph_of_the_masked_decode_layout_follows_masked_m():
    """forward_masked captured once, replayed with new rows and new valid counts (a decode step's experts behind
    low-latency dispatch): each replay equals an eager call on the valid rows."""
    from torch_deepstack.testing.bench import capture_graph
    torch.manual_seed(7)
    mod = FP8Experts(6, 256, 256, device="cuda")
    x = torch.randn(6, 64, 256, dtype=torch.bfloat16, device="cuda")
    masked_m = torch.tensor([64, 0, 5, 33, 1, 17], dtype=torch.int32, device="cuda")
    with torch.no_grad():
        mod.forward_masked(x, masked_m, 32)
        replay, out = capture_graph(lambda: mod.forward_masked(x, masked_m, 32))
        for counts in ([3, 64, 0, 9, 40, 2], [64, 64, 64, 64, 64, 64]):
            x.copy_(torch.randn_like(x))
            masked_m.copy_(torch.tensor(counts, dtype=torch.int32))
            replay()
            want = mod.forward_masked(x, masked_m, 32)
            for e, n in enumerate(counts):
                assert calc_diff(out[e, :n], want[e, :n]) < 1e-6

