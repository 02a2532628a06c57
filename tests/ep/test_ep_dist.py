"""Expert parallelism over gloo on CPU: world sizes 2 and 4, one spawn per world running many checks."""
import pytest

from tests.ep import workers
from tests.ep.spawn import run_world


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world_size", [2, 4])
def test_dispatch_combine_layout_grads_low_latency(world_size):
    run_world(workers.normal_mode_checks, world_size, 1234, timeout_s=200)


@pytest.mark.timeout(120)
def test_bad_input_raises_clear_errors():
    run_world(workers.error_checks, 2, timeout_s=100)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [1, 2])
def test_edge_cases_zero_and_one_rows_and_unspecified_low_latency_rows(world_size):
    run_world(workers.edge_case_checks, world_size, timeout_s=100)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("case", ["worst_tokens", "ll_tokens", "expert_ids"])
def test_check_failing_on_some_ranks_raises_on_every_rank_at_once(case, world_size):
    run_world(workers.uneven_input_checks, world_size, case, timeout_s=100)


@pytest.mark.timeout(120)
def test_dead_peer_raises_instead_of_hanging():
    run_world(workers.dead_peer_check, 3, timeout_s=100, allow_exit=(0, 1, 2))
