"""Per-Buffer transport names: "<group>@buffer<id>" routes CUDA tensors to that Buffer's own transport, and
CPU tensors to its own torch.distributed transport (with its timeout) over the process group named by the part
before the suffix."""
import torch
import torch.distributed as dist

from torch_deepstack.ep.ops import single_process_group_name
from torch_deepstack.ep.transport import (BUFFER_SEP, DistTransport, process_group_name, register_transport,
                                          resolve_group, transport_for, unregister_transport)


class _Marker:
    world_size = 1
    rank = 0
    name = "marker"


def test_buffer_names_resolve_to_their_group_and_their_own_transport():
    g = single_process_group_name()
    first, second = f"{g}{BUFFER_SEP}101", f"{g}{BUFFER_SEP}102"
    assert process_group_name(first) == g and resolve_group(first) is dist.group.WORLD
    a, b = _Marker(), _Marker()
    register_transport(first, a)
    register_transport(second, b)
    try:
        cuda = torch.device("cuda")           # only the device type is looked at
        assert transport_for(first, cuda) is a and transport_for(second, cuda) is b
        unregister_transport(second, b)
        assert transport_for(first, cuda) is a           # removing one Buffer leaves the other in place
        cpu_t = transport_for(first, torch.device("cpu"))
        assert isinstance(cpu_t, DistTransport) and cpu_t.group is transport_for(g, torch.device("cpu")).group
    finally:
        unregister_transport(first, a)
        unregister_transport(second, b)


def test_each_buffer_keeps_its_own_timeout():
    """timeout_s is the Buffer's, not its group's: before, the last Buffer made on a group set it for all of them
    (found by a review, 2026-12-02)."""
    from torch_deepstack.ep import Buffer
    single_process_group_name()
    short, long = Buffer(None, timeout_s=5), Buffer(None, timeout_s=60)
    try:
        cpu = torch.device("cpu")
        assert transport_for(short._op_group, cpu).timeout.total_seconds() == 5
        assert transport_for(long._op_group, cpu).timeout.total_seconds() == 60
    finally:
        short.destroy()
        long.destroy()
