"""Per-Buffer transport names: "<group>@buffer<id>" routes CUDA tensors to that Buffer's own transport, while the
process group (and its torch.distributed transport) is resolved from the part before the suffix."""
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
        assert isinstance(cpu_t, DistTransport) and cpu_t is transport_for(g, torch.device("cpu"))
    finally:
        unregister_transport(first, a)
        unregister_transport(second, b)
