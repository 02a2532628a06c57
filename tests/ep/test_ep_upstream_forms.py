"""DeepEP V1 call forms that upstream's tests/test_intranode.py uses and a review (2026-12) found wrong or
rejected here: the per-expert receive counts of a dispatch without topk_idx, and (x, x_scales) pairs whose scales
are not fp32 [N, hidden / 128] (int32 packed UE8M0, per-token [N, 1], e5m2 data, any S and strides)."""
import pytest
import torch

from tests.ep import workers
from tests.ep.spawn import run_world


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world_size", [2, 3])
def test_recv_tokens_per_expert_come_from_callers_counts(world_size):
    run_world(workers.tokens_per_expert_checks, world_size, 5, timeout_s=180)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world_size", [2, 3])
def test_dispatch_moves_every_upstream_scale_form(world_size):
    run_world(workers.scale_forms_checks, world_size, 6, timeout_s=180)


def test_fakes_give_scales_in_their_dtype_and_width():
    """torch.compile's view of the ops: recv_x_scales is [rows, S] in x_scales' dtype (not fp32 [rows, H/128])."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import torch_deepstack  # noqa: F401
    from torch_deepstack.ep.ops import single_process_group_name
    group = single_process_group_name()
    with FakeTensorMode():
        q = torch.empty(6, 1024, dtype=torch.float8_e5m2)
        s = torch.empty(6, 2, dtype=torch.int32)
        idx = torch.zeros(6, 2, dtype=torch.int64)
        w = torch.ones(6, 2)
        counts = torch.zeros(4, dtype=torch.int32)
        out = torch.ops.deepstack.ep_dispatch(q, s, idx, w, None, 4, 1, group, 1, 8, counts)
        assert out[0].dtype == torch.float8_e5m2 and out[1].dtype == torch.int32 and tuple(out[1].shape) == (8, 2)
        mask = torch.ones(6, 1, dtype=torch.bool)
        rc = torch.empty(1, 1, dtype=torch.int32)
        src = torch.empty(8, dtype=torch.int32)
        cq, cs = torch.ops.deepstack.ep_dispatch_cached(q, s[:, :1], mask, rc, src, group, 8)
        assert cs.dtype == torch.int32 and tuple(cs.shape) == (8, 1)


@pytest.mark.cuda
@pytest.mark.timeout(400)
@pytest.mark.parametrize("world_size,transport,backend", [(1, "dist", "nccl"), (2, "ipc", "gloo"),
                                                          (3, "ipc", "gloo")])
def test_upstream_forms_on_cuda(world_size, transport, backend):
    """The same on the GPU: the fused NVLink kernels (processes sharing the GPU over IPC; gloo carries the handles)
    and NCCL (a world of one)."""
    for fn, seed in ((workers.tokens_per_expert_checks, 15), (workers.scale_forms_checks, 16)):
        run_world(fn, world_size, seed, "cuda", transport, backend=backend, timeout_s=180)
