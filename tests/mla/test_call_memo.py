"""The MLA decode and append faces remember a call's launches by its operands' addresses and layouts
(mla/kernels.py _DECODE_PLANS, _APPENDS). Their host-side logic, on the CPU with the GPU parts stubbed
(torch_deepstack.testing.gpu_stub): a repeat skips the argument checks and the planning but still launches with its
fresh outputs' addresses, the data checks still follow the tables' versions, and anything the launches depend on
(operands, arguments, the kernel switches) makes a new plan."""
import pytest
import torch

from torch_deepstack.mla import kernels
from torch_deepstack.testing.gpu_stub import gpu_parts_stubbed


@pytest.fixture
def stubs(monkeypatch):
    checked = []
    for name in ("check_decode_inputs", "check_append_inputs"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, real=real, name=name, **k: (checked.append(name), real(*a, **k)))
    with gpu_parts_stubbed() as kernels_by_spec:
        yield kernels_by_spec, checked


def _decode_operands(b=5, h_q=16, blocks=3, dtype=torch.bfloat16):
    k_cache = torch.zeros(b * blocks, 64, 1, 576, dtype=dtype)
    block_table = torch.randperm(b * blocks, dtype=torch.int32).view(b, blocks)
    seqlens = torch.randint(1, 64 * blocks, (b,), dtype=torch.int32)
    q = torch.randn(b, 1, h_q, 576, dtype=dtype)
    sched, splits = kernels.get_mla_metadata_cuda(seqlens, h_q, 1)
    return q, k_cache, block_table, seqlens, 512, sched, splits


def _launches(kernels_by_spec):
    """Launches per kernel of the decode and append faces (not the metadata kernel, which _decode_operands runs)."""
    return {kern.spec.kernel: kern.launches for kern in kernels_by_spec.values()
            if kern.launches and "metadata" not in kern.spec.kernel}


def _packed(kernel, launch):
    return kernel._struct.unpack(launch._buf.raw[:kernel._struct.size])


def test_repeated_decode_skips_checks_and_launches_with_its_own_outputs(stubs):
    kernels_by_spec, checked = stubs
    ops = _decode_operands()
    outs = [kernels.mla_decode_with_kvcache_cuda(*ops, causal=True) for _ in range(3)]
    assert checked == ["check_decode_inputs"] and len(kernels._DECODE_PLANS) == 1
    plan = next(iter(kernels._DECODE_PLANS.values()))
    counts = _launches(kernels_by_spec)
    assert sorted(counts.values()) == [3, 3] and plan.launches      # decode + combine, three calls each
    q, k_cache, block_table, seqlens, _, sched, splits = ops
    out, lse = outs[-1]                              # (all three alive: three output addresses, the last added last)
    decode = _packed(plan.decode, list(plan.launches.values())[-1][0])
    assert decode[:3] == (q.data_ptr(), out.data_ptr(), lse.data_ptr())
    assert decode[4] - decode[3] == 4 * plan.lse_at                # lse partials after the o partials, one buffer
    assert decode[5:9] == tuple(t.data_ptr() for t in (block_table, seqlens, sched, splits))
    assert out.shape == (5, 1, 16, 512) and lse.shape == (5, 16, 1)


def test_decode_data_checks_follow_versions_on_a_remembered_plan(stubs):
    ops = _decode_operands()
    kernels.mla_decode_with_kvcache_cuda(*ops)
    block_table = ops[2]
    block_table[0, 0] = 10_000                                        # in place: a new version, checked again
    with pytest.raises(IndexError, match=r"block_table\[0, 0\] = 10000"):
        kernels.mla_decode_with_kvcache_cuda(*ops)
    assert len(kernels._DECODE_PLANS) == 1


def test_anything_a_decode_launch_depends_on_is_a_new_plan(stubs, monkeypatch):
    kernels_by_spec, checked = stubs
    q, k_cache, bt, seq, dv, sched, splits = _decode_operands()
    kernels.mla_decode_with_kvcache_cuda(q, k_cache, bt, seq, dv, sched, splits)
    kernels.mla_decode_with_kvcache_cuda(q, k_cache, bt, seq, dv, sched, splits, causal=True)     # an argument
    kernels.mla_decode_with_kvcache_cuda(q, k_cache, bt, seq, dv, sched, splits, softmax_scale=0.5)
    kernels.mla_decode_with_kvcache_cuda(q.clone(), k_cache, bt, seq, dv, sched, splits)          # an address
    monkeypatch.setattr(kernels, "_DECODE_KERNEL", "overlap")                                     # a switch
    kernels.mla_decode_with_kvcache_cuda(q, k_cache, bt, seq, dv, sched, splits)
    assert len(checked) == 5 and len(kernels._DECODE_PLANS) == 5
    assert "deepstack::mla::mla_decode_overlap_kernel" in str(_launches(kernels_by_spec))


def test_decode_inputs_copied_to_the_kernel_layout_are_never_remembered(stubs):
    kernels_by_spec, checked = stubs
    q, k_cache, bt, seq, dv, sched, splits = _decode_operands()
    wide = torch.zeros(bt.shape[0], 2 * bt.shape[1], dtype=torch.int32)
    wide[:, ::2] = bt
    for _ in range(2):
        kernels.mla_decode_with_kvcache_cuda(q, k_cache, wide[:, ::2], seq, dv, sched, splits)
    assert len(checked) == 2 and not kernels._DECODE_PLANS and sum(_launches(kernels_by_spec).values()) == 4


def test_bad_decode_input_still_raises_after_a_good_call(stubs):
    ops = _decode_operands()
    kernels.mla_decode_with_kvcache_cuda(*ops)
    with pytest.raises(RuntimeError, match="head_dim_v must be 512"):
        kernels.mla_decode_with_kvcache_cuda(*ops[:4], 256, *ops[5:])


def test_repeated_append_skips_checks_and_follows_slot_versions(stubs):
    kernels_by_spec, checked = stubs
    k_cache = torch.zeros(4, 64, 1, 576, dtype=torch.bfloat16)
    kv = torch.randn(3, 1, 576, dtype=torch.bfloat16)
    slots = torch.tensor([0, 70, 255])                                # int64: used as it is
    for _ in range(3):
        kernels.mla_append_kv_cuda(k_cache, kv, slots)
    assert checked == ["check_append_inputs"] and len(kernels._APPENDS) == 1
    assert sum(_launches(kernels_by_spec).values()) == 3
    slots[1] = 256                                                    # past the cache: checked again, refused
    with pytest.raises(IndexError, match="slot 256 is out of range"):
        kernels.mla_append_kv_cuda(k_cache, kv, slots)
    for _ in range(2):                                                # int32 slots: an int64 copy per call
        kernels.mla_append_kv_cuda(k_cache, kv, torch.tensor([0, 70, 255], dtype=torch.int32))
    assert len(kernels._APPENDS) == 1 and len(checked) == 3


def test_a_wrapped_get_kernel_makes_new_plans(stubs, monkeypatch):
    """Tests and A/B runs wrap kernels.get_kernel to build kernels with extra -D defines (mla_data.add_kernel_defines):
    a plan made before must not serve calls after (the CUDA allocator hands later tests the same addresses)."""
    ops = _decode_operands()
    kernels.mla_decode_with_kvcache_cuda(*ops)
    real, built = kernels.get_kernel, []
    monkeypatch.setattr(kernels, "get_kernel", lambda spec, sig: (built.append(spec.kernel), real(spec, sig))[1])
    kernels.mla_decode_with_kvcache_cuda(*ops)
    assert len(kernels._DECODE_PLANS) == 2 and "deepstack::mla::mla_decode_kernel" in built


def test_repeated_metadata_plans_once_and_follows_the_switches(stubs, monkeypatch):
    kernels_by_spec, _ = stubs
    checked, real = [], kernels.check_metadata_inputs
    monkeypatch.setattr(kernels, "check_metadata_inputs", lambda *a: (checked.append(a), real(*a)))
    seqlens = torch.full((7,), 100, dtype=torch.int32)
    for _ in range(3):
        sched, splits = kernels.get_mla_metadata_cuda(seqlens, 16, 1)
    assert len(checked) == 1 and sched.shape == (132, 8) and splits.shape == (8,)
    kernels.get_mla_metadata_cuda(seqlens, 128, 1)                 # other rows per KV head: a new plan
    monkeypatch.setattr(kernels, "_PAIR_CLUSTER", 4)               # a switch the part count depends on
    kernels.get_mla_metadata_cuda(seqlens, 128, 1)
    assert len(checked) == 3 and len(kernels._METADATA_PLANS) == 3
    meta = [kern for kern in kernels_by_spec.values() if "metadata" in kern.spec.kernel]
    assert len(meta) == 1 and meta[0].launches == 5
    with pytest.raises(RuntimeError, match="num_heads_k must be >= 1"):
        kernels.get_mla_metadata_cuda(seqlens, 16, 0)
