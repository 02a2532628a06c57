"""Expert parallelism on one GPU: a world of one over NCCL (both transports), and several processes sharing the
GPU through the NVLink/IPC transport (peer-mapped buffers, barrier kernel), which is the intranode code path."""
import pytest

from tests.ep import workers
from tests.ep.spawn import run_world


@pytest.mark.cuda
@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", ["dist", "ipc"])
def test_world_of_one_nccl(transport):
    run_world(workers.normal_mode_checks, 1, 7, "cuda", transport, backend="nccl", timeout_s=280)


@pytest.mark.cuda
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 3])
def test_processes_sharing_one_gpu_over_ipc(world_size):
    # gloo carries the IPC handles; every CUDA byte moves through the peer-mapped buffers.
    run_world(workers.normal_mode_checks, world_size, 11, "cuda", "ipc", timeout_s=280)


@pytest.mark.cuda
@pytest.mark.timeout(600)
@pytest.mark.parametrize("world_size", [4, 8])
def test_ranks_spread_over_gpus_over_ipc(world_size):
    """World sizes 4 and 8 on the GPUs there are (rank r on GPU r % count): the fused NVLink kernels with R peers,
    some across NVLink and some on the same GPU. Not a substitute for one process per GPU (no bandwidth claim)."""
    import torch
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs to mix NVLink and same-GPU peers")
    run_world(workers.spread_over_gpus_checks, world_size, 17, timeout_s=550)


@pytest.mark.cuda
@pytest.mark.timeout(400)
@pytest.mark.parametrize("world_size,transport", [(1, "dist"), (1, "ipc"), (2, "ipc")])
def test_ep_steps_under_reduce_overhead(world_size, transport):
    """torch.compile(mode="reduce-overhead") of steps through the EP ops (low-latency, worst-case and exact-size
    dispatch + combine): a world of one over NCCL and over IPC, and two processes sharing the GPU over IPC (gloo
    carries the handles: NCCL refuses two ranks on one GPU)."""
    run_world(workers.reduce_overhead_checks, world_size, 23, transport,
              backend="nccl" if transport == "dist" else "gloo", timeout_s=380)


@pytest.mark.cuda
@pytest.mark.timeout(200)
def test_ipc_errors_and_dead_peer():
    run_world(workers.error_checks, 2, "cuda", "ipc", timeout_s=90)
    run_world(workers.dead_peer_check, 2, "cuda", "ipc", timeout_s=90, allow_exit=(0, 1))


@pytest.mark.cuda
@pytest.mark.timeout(600)
@pytest.mark.parametrize("transport", ["dist", "ipc"])
@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_one_process_per_gpu(world_size, transport):
    """The multi-GPU run (issue 8): NVLink IPC and NCCL between distinct GPUs. Skips without enough GPUs."""
    import torch
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs, this machine has {torch.cuda.device_count()}")
    run_world(workers.normal_mode_checks, world_size, 13, "cuda", transport, backend="nccl", timeout_s=550)


@pytest.mark.cuda
@pytest.mark.timeout(400)
@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_one_process_per_gpu_errors_and_dead_peer(world_size):
    """Bad input on distinct GPUs raises a clear error on every rank (both transports; see workers.error_checks for
    which checks run before any collective and which travel in the first exchange); a peer that exits
    makes the NVLink barrier report it (EPTransportError) in bounded time."""
    import torch
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs, this machine has {torch.cuda.device_count()}")
    for transport in ("dist", "ipc"):
        run_world(workers.error_checks, world_size, "cuda", transport, backend="nccl", timeout_s=150)
    run_world(workers.dead_peer_check, world_size, "cuda", "ipc", backend="nccl", timeout_s=120,
              allow_exit=tuple(range(world_size)))
