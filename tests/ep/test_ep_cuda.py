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


@pytest.mark.cuda
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size,transport,backend", [(1, "ipc", "nccl"), (1, "dist", "nccl"), (2, "ipc", "gloo")])
def test_async_finish_outputs_ready_after_event(world_size, transport, backend):
    """With async_finish=True the caller's stream does not wait for the comm stream before the call returns, so
    every step that reads an output must run on the comm stream before the returned event is recorded. Before
    (review, 2026-12-02) five ran on the caller's stream after the return: low_latency_dispatch's
    cumulative_local_expert_recv_stats.add_(count), low_latency_combine's out.copy_(result), combine's bias add,
    dispatch's cumsum for handle.rank_prefix_matrix, and the non-fused dispatch's per-expert .tolist(); they read
    those outputs before the comm stream had written them, and waiting on the event afterwards could not help
    (out= held garbage even after event.current_stream_wait()).

    The test makes that race certain: each async call is queued behind a ~0.5 s sleep on the comm stream
    (buffer_workers.delay_comm_stream, which also fills the comm stream's free memory with 0xff, so an early read
    sees NaN/-1 or fresh memory, never an earlier call's result), while the caller's stream stays free; after
    waiting on the returned event every result must equal the synchronous call's. On the old code the IPC cases
    fail: the fused NVLink low-latency, worst-case and combine calls make no host sync, so the caller's stream ran
    the add/copy/bias/cumsum at once, ~0.5 s before the data existed (each call's inputs were already checked by
    the synchronous call first: the expert-id check's host sync runs once per tensor version). On the NCCL "dist"
    path the calls read small results on the host (counts, failure codes) after their first exchange, which waits
    out the sleep, so there the old code only lost a short race: that case checks the results, not the race."""
    from tests.ep import buffer_workers
    run_world(buffer_workers.async_finish_checks, world_size, transport, backend=backend, timeout_s=280)


@pytest.mark.cuda
@pytest.mark.timeout(400)
def test_gloo_group_buffer_moves_cuda_tensors_set_up_at_first_exchange():
    """A gloo group with transport="auto" moves CUDA tensors (as DeepEP, which uses its group only for handles; vLLM
    passes its gloo CPU group). Before (review, 2026-12-02) such a Buffer took CPU tensors only and every CUDA call
    raised "this Buffer's group moves cpu tensors". Here the processes have not touched CUDA when the Buffers are
    made, so their CUDA side is set up at the first exchange of CUDA tensors; then every normal, FP8, gradient,
    low-latency and graph check of normal_mode_checks runs on CUDA tensors (2 processes sharing GPU 0)."""
    from tests.ep import buffer_workers
    run_world(buffer_workers.gloo_auto_normal_mode, 2, 31, timeout_s=380)


@pytest.mark.cuda
@pytest.mark.timeout(300)
def test_gloo_group_buffer_after_set_device_moves_cuda_and_cpu():
    """vLLM's form: torch.cuda.set_device, then Buffer(group=a gloo group): the CUDA side (IPC buffers) is made at
    construction; the same Buffer moves CUDA and CPU tensors with equal results; Megatron's
    EventOverlap(EventHandle()) as previous_event; transport="dist" on gloo refuses CUDA tensors, saying why.
    Fails before: the Buffer chose CPU tensors for any gloo group."""
    from tests.ep import buffer_workers
    run_world(buffer_workers.gloo_group_cuda_and_cpu, 2, 37, timeout_s=280)
