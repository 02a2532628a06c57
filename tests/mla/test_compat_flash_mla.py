"""torch_deepstack.compat.flash_mla: FlashMLA's call forms on the CPU reference."""
import pytest
import torch

from tests.mla.mla_data import make_case
from torch_deepstack.compat import flash_mla
from torch_deepstack.mla.reference import mla_decode_fp32


def test_v1_and_scheduler_object_forms_match_reference():
    q, cache, bt, seq = make_case(3, 2, 4, 1, 576, torch.bfloat16, [90, 0, 130])
    ref_out, ref_lse = mla_decode_fp32(q, cache, bt, seq, 576 ** -0.5, True, False)
    md, splits = flash_mla.get_mla_metadata(seq, 2 * 4 // 1, 1)
    out, lse = flash_mla.flash_mla_with_kvcache(q, cache, bt, seq, 512, md, splits, causal=True)
    torch.testing.assert_close(out.float(), ref_out.to(torch.bfloat16).float())
    torch.testing.assert_close(lse, ref_lse)
    # v1's keyword names (flash_mla_interface: cache_seqlens, num_heads_per_head_k, num_heads_k)
    md_kw, splits_kw = flash_mla.get_mla_metadata(cache_seqlens=seq, num_heads_per_head_k=8, num_heads_k=1)
    assert torch.equal(md_kw, md) and torch.equal(splits_kw, splits)
    with pytest.raises(TypeError, match="not both"):
        flash_mla.get_mla_metadata(seq, 8, 1, num_heads_per_head_k=8)
    sched, none = flash_mla.get_mla_metadata()
    assert none is None and isinstance(sched, flash_mla.FlashMLASchedMeta)
    for _ in range(2):   # planned on the first call, reused on the second ("next layer")
        out2, lse2 = flash_mla.flash_mla_with_kvcache(q, cache, bt, seq, 512, sched, None, causal=True)
        assert torch.equal(out2, out) and torch.equal(lse2, lse)
    # a later layer passing a new seqlens tensor with the same values (as upstream allows) reuses the plan
    out3, lse3 = flash_mla.flash_mla_with_kvcache(q, cache, bt, seq.clone(), 512, sched, None, causal=True)
    assert torch.equal(out3, out) and torch.equal(lse3, lse)
    with pytest.raises(ValueError, match="planned for"):
        flash_mla.flash_mla_with_kvcache(q, cache, bt, seq, 512, sched, None, causal=False)


def test_unsupported_features_raise_clearly():
    q, cache, bt, seq = make_case(1, 1, 4, 1, 576, torch.bfloat16, [10])
    md, splits = flash_mla.get_mla_metadata(seq, 4, 1)
    with pytest.raises(NotImplementedError, match="indices"):
        flash_mla.flash_mla_with_kvcache(q, cache, bt, seq, 512, md, splits, indices=torch.zeros(1, 1, 4))
    with pytest.raises(NotImplementedError, match="topk"):
        flash_mla.get_mla_metadata(seq, 4, 1, topk=128)
    with pytest.raises(TypeError, match="num_splits"):
        flash_mla.flash_mla_with_kvcache(q, cache, bt, seq, 512, md, None)
