#!/usr/bin/env bash
# Issue 8 in one device call: the EP GPU suite (world sizes 2, 4, 8 one process per GPU, as many as the machine
# has; NVLink IPC and NCCL paths; errors, dead peer, graph captures), then the normal and low-latency benchmark at
# the machine's full width. NVLink multicast stays off in every process (NCCL NVLS, symmetric memory, NVSHMEM).
#
#   bash benchmarks/ep_multi_gpu.sh            # tables and logs go to $DEEPSTACK_BENCH_OUT (default: .)
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${DEEPSTACK_BENCH_OUT:-.}"
mkdir -p "$out"
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
echo "== $gpus GPUs; prebuilding the EP kernels"
python -m torch_deepstack.cli jit prebuild --area ep --area quant --area gemm -j 8 > "$out/ep_prebuild.log" 2>&1
echo "== pytest -m cuda tests/ep"
python -m pytest -m cuda tests/ep -q -rs --durations=10 > "$out/ep_tests.log" 2>&1
tests_rc=$?
tail -20 "$out/ep_tests.log"
echo "== bench_ep.py, $gpus ranks"
python benchmarks/bench_ep.py --rep 20 --warmup 5 > "$out/ep_bench.log" 2>&1
bench_rc=$?
grep -E "\| (ipc|dist) \|" "$out/ep_bench.log" || tail -30 "$out/ep_bench.log"
echo "== tests exit $tests_rc, bench exit $bench_rc (logs in $out)"
exit $(( tests_rc || bench_rc ))
