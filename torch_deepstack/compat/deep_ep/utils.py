"""`deep_ep.utils`: `EventOverlap` and `EventHandle` (Megatron: `from deep_ep.utils import EventHandle,
EventOverlap`; `previous_event = EventOverlap(EventHandle())`). Names only: the classes are torch_deepstack.ep's, so
this module may be loaded twice (as deep_ep.utils under an alias, say) and still hand out the same classes."""
from torch_deepstack.ep.buffer import EventHandle, EventOverlap

__all__ = ["EventHandle", "EventOverlap"]
