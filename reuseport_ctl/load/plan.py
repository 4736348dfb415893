"""How the work is cut into processes and lanes (pure; unit-tested).

A lane is one in-flight connection (or datagram) slot: it runs its indices
one after another. Connection i is the i-th of the run; when source ports
are pinned, connection i uses source_ports[i % len]. A pinned port then
belongs to exactly one lane, so two live sockets never want the same
4-tuple, and the set of flows is the same whatever the concurrency.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence


def split(total: int, parts: int) -> list[int]:
    """total as `parts` near-equal non-negative integers, larger ones first."""
    q, r = divmod(total, parts)
    return [q + (i < r) for i in range(parts)]


def pinned_indices(conns: int, nports: int, port_slots: Sequence[int]) -> Iterator[int]:
    """Indices i < conns whose i % nports is one of port_slots, ascending."""
    slots = sorted(port_slots)
    base = 0
    while base < conns:
        for k in slots:
            i = base + k
            if i >= conns:
                return
            yield i
        base += nports


def lanes_per_process(conns: int, concurrency: int, processes: int,
                      nports: Optional[int] = None) -> list[list[Iterator[int]]]:
    """For each process, its lanes (each an iterator of connection indices).

    Unpinned: process p owns indices p, p+P, ...; its lanes share that one
    iterator, so a fast lane simply takes more. Pinned: port slots are dealt
    to lanes, lanes to processes.
    """
    if nports is None:
        processes = max(1, min(processes, concurrency, conns))
        out = []
        for p, width in enumerate(split(concurrency, processes)):
            shared = iter(range(p, conns, processes))
            out.append([shared] * width)
        return out
    nlanes = max(1, min(concurrency, nports, conns))
    processes = max(1, min(processes, nlanes))
    lanes = [pinned_indices(conns, nports, range(j, min(nports, conns), nlanes))
             for j in range(nlanes)]
    return [lanes[p::processes] for p in range(processes)]
