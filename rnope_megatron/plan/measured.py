"""Peak memory as the CPU allocator saw it, to check the memory model against: the torch
profiler's allocation events (``profile_memory=True``) replayed in time order. Not RSS:
RSS keeps freed pages, counts the interpreter and libraries, and moves with the OS."""

from __future__ import annotations

from torch._C._profiler import _EventType


def allocator_peak(profiler) -> int:
    """Largest net bytes allocated at any point of a finished ``torch.profiler.profile``
    region (frees are negative events), relative to what was live when it began."""
    events = []
    stack = list(profiler.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak
